"""Build the documentation site into `_docs/`: one page per notebook of `nbs/`, with its figures; `--check` verifies it.

Notebooks whose untagged cells draw figures are executed first, in a copy (the cells nbdev-test skips, flagged
`slow`, `gpu`, `notest`, `interp`, are skipped here too), with plotly's renderer set so that a figure is also stored
as HTML; the others are rendered from their source. Then:

* with Quarto on the PATH, `nbdev-docs` renders the executed copies (nbdev's own site);
* without it, nbdev's notebook processing (`nbdev.processors.FilterDefaults`, the notebooks nbdev hands to Quarto:
  directives removed, `show_doc` of every exported symbol) is rendered by nbconvert's HTML exporter, one page per
  notebook with a navigation bar. Quarto is not installable on a machine that reaches only package registries:
  the `quarto-cli` package on PyPI is an sdist that downloads the Quarto binary from GitHub when it is built.

Pictures that markdown cells link by a relative path (e.g. the README's `bench/.../vae_recon.png`, relative to the
repository root as the README is) are copied into the site at the same relative path.

`--check` fails unless every notebook has its page, every notebook that drew a figure has one on its page, and every
picture a page links by a relative path is in the site.
Usage: python tools/docs.py [--out _docs] [--only GLOB] [--check] [--renderer auto|quarto|nbconvert]
"""
from __future__ import annotations

import argparse, html, json, os, re, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
STAGE = ROOT / "_proc" / "docs-executed"   # executed copies (git-ignored, like _proc/)
FIGURE_CODE = re.compile(r"plotly|go\.Figure|_figure\(|Explorer\(|\bshow\(|plot_\w+\(")  # a cell that may draw a figure
FIGURE_MARK = 'class="plotly-graph-div"'   # what a drawn plotly figure leaves in HTML
RENDERER = "import plotly.io as _pio; _pio.renderers.default = 'plotly_mimetype+notebook_connected'"


def notebooks(only: str = "*") -> list[Path]:
    "The notebooks of the site: nbs/*.ipynb, without nbdev's private ones (leading _ or .)."
    return sorted(p for p in NBS.glob(f"{only}.ipynb") if not p.name.startswith(("_", ".")))


def _flags(src: str) -> set[str]:
    return {w for line in src.splitlines() if line.startswith("#|") for w in line[2:].split()}


def draws_figures(nb: dict, skip: set[str]) -> bool:
    "Does a cell that nbdev-test would run (not exported, no skip flag) look like it draws a figure?"
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "code" and not ({"export", "exports"} | skip) & _flags(src) and FIGURE_CODE.search(src): return True
    return False


def execute(fn: Path, dest: Path, skip: set[str]) -> float:
    "Run a notebook as nbdev-test does (same cells skipped, working directory nbs/) and save it with its outputs."
    from execnb.shell import CaptureShell
    from fastcore.nbio import write_nb
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    t0 = time.time()
    nb = NBProcessor(fn, rm_directives=False, process=True).nb
    k = CaptureShell(fn)
    cwd = os.getcwd()
    os.chdir(fn.parent)
    os.environ["IN_TEST"] = "1"
    try:
        k.run(RENDERER)
        k.run_all(nb, exc_stop=True, preproc=_skip_cell(nb, list(skip)))
    finally: os.chdir(cwd)
    for c in nb.cells: c.get("metadata", {}).pop("execution", None)   # execnb's timings are not valid nbformat metadata
    write_nb(nb, dest)
    return time.time() - t0


def _execute_one(args) -> tuple[str, float]:
    fn, dest, skip = args
    return fn.name, execute(fn, dest, skip)


def stage(files: list[Path], skip: set[str], workers: int) -> dict[str, bool]:
    "Copy the notebooks to STAGE, executing the ones that draw figures (in parallel); returns {name: executed}."
    from concurrent.futures import ProcessPoolExecutor
    shutil.rmtree(STAGE, ignore_errors=True); STAGE.mkdir(parents=True)
    todo, executed = [], {}
    for fn in files:
        nb = json.loads(fn.read_text())
        executed[fn.name] = draws_figures(nb, skip)
        if executed[fn.name]: todo.append((fn, STAGE / fn.name, skip))
        else: shutil.copy2(fn, STAGE / fn.name)
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as ex:
        for name, secs in ex.map(_execute_one, todo): print(f"docs: executed {name} ({secs:.0f} s)")
    return executed


def _nav(pages: list[str], here: str) -> str:
    links = " · ".join(f'<b>{p}</b>' if p == here else f'<a href="{p}.html">{p}</a>' for p in pages)
    return f'<nav style="padding:8px 16px;border-bottom:1px solid #ddd;font-family:sans-serif;font-size:14px">{links}</nav>'


_QUARTO_ATTRS = re.compile(r"\{(?:target|style|\.)[^{}\n]*\}")   # pandoc attributes Quarto reads and nbconvert would print


def _for_nbconvert(nb: dict) -> tuple[dict, str]:
    "Turn a processed notebook (Quarto flavour) into plain nbformat: front matter out (returned as a header), directives applied."
    head, cells = "", []
    for c in nb["cells"]:
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        if c["cell_type"] == "raw":                                    # Quarto front matter: title, description
            import yaml
            fm = yaml.safe_load(src.strip().strip("-")) or {}
            head = (f"<h1>{html.escape(str(fm['title']))}</h1>" if fm.get("title") else "") + (
                f"<p><i>{html.escape(str(fm['description']))}</i></p>" if fm.get("description") else "")
            continue
        if c["cell_type"] == "code":
            lines = src.splitlines()
            dirs = {l[3:].strip() for l in lines if l.startswith("#| ")}
            c["source"] = "\n".join(l for l in lines if not l.startswith("#|"))
            if "echo: false" in dirs: c.setdefault("metadata", {})["tags"] = ["remove_input"]
            for o in c.get("outputs", []):
                md = o.get("data", {}).get("text/markdown")
                if md is not None: o["data"]["text/markdown"] = _QUARTO_ATTRS.sub("", "".join(md) if isinstance(md, list) else md)
        cells.append(c)
    nb["cells"] = cells
    return nb, head


def _NoShowDoc():
    "nbdev's processors without the one that executes cells (`exec_show_docs`)."
    from nbdev.processors import FilterDefaults, exec_show_docs
    class NoShowDoc(FilterDefaults):
        def base_procs(self): return [p for p in super().base_procs() if p is not exec_show_docs]
    return NoShowDoc()


def render_nbconvert(files: list[Path], out: Path):
    "nbdev's processing of each staged notebook, rendered to HTML by nbconvert (lab template), with a navigation bar."
    import nbformat
    from fastcore.nbio import read_nb, write_nb
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from nbdev.processors import FilterDefaults
    os.environ["IN_TEST"] = "1"
    exporter = HTMLExporter(template_name="lab", exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"remove_input"}), enabled=True)
    pages = [f.stem for f in files]
    for f in files:
        nb = read_nb(STAGE / f.name)
        cwd = os.getcwd(); os.chdir(NBS)
        try: FilterDefaults()(nb)                                   # exec_show_docs runs the exported and import cells
        except Exception as e:                                      # nbdev-docs would stop here; this build says why and goes on
            print(f"docs: WARNING {f.name}: nbdev's show_doc processing failed ({str(e).splitlines()[0][:160]}); "
                  "rendered without show_doc (nbdev executes every cell that imports something: keep imports in their own cell)")
            nb = read_nb(STAGE / f.name)
            _NoShowDoc()(nb)
        finally: os.chdir(cwd)
        for c in nb.cells: c.get("metadata", {}).pop("execution", None)
        write_nb(nb, STAGE / f"{f.stem}.processed.ipynb")             # what Quarto would render
        plain, head = _for_nbconvert(json.loads((STAGE / f"{f.stem}.processed.ipynb").read_text()))
        (STAGE / f"{f.stem}.plain.ipynb").write_text(json.dumps(plain))
        node = nbformat.read(STAGE / f"{f.stem}.plain.ipynb", as_version=4)
        body, _ = exporter.from_notebook_node(node, resources={"metadata": {"name": f"sara · {f.stem}"}})
        i = body.find(">", body.find("<body")) + 1
        top = _nav(pages, f.stem) + (f'<div style="padding:0 16px;font-family:sans-serif">{head}</div>' if head else "")
        (out / f"{f.stem}.html").write_text(body[:i] + top + body[i:])


def render_quarto(out: Path):
    "nbdev's own site: nbdev-docs on the executed copies (needs `quarto` on the PATH)."
    for extra in ("_quarto.yml", "nbdev.yml", "sidebar.yml", "styles.css"):
        if (NBS / extra).exists(): shutil.copy2(NBS / extra, STAGE / extra)
    r = subprocess.run([str(Path(sys.executable).parent / "nbdev-docs"), "--path", str(STAGE)], cwd=ROOT)
    if r.returncode: sys.exit(f"docs: nbdev-docs failed ({r.returncode})")
    if out.resolve() != (ROOT / "_docs").resolve(): shutil.copytree(ROOT / "_docs", out, dirs_exist_ok=True)


def drew_figure(path: Path) -> bool:
    "Does a notebook's saved output hold a drawn plotly figure (as HTML)?"
    for c in json.loads(path.read_text())["cells"]:
        for o in c.get("outputs", []):
            h = o.get("data", {}).get("text/html", "")
            if FIGURE_MARK in ("".join(h) if isinstance(h, list) else h): return True
    return False


def headings(nb_path: Path) -> list[str]:
    "The section headings (## and deeper) of a notebook's markdown cells, as plain text."
    out = []
    for c in json.loads(Path(nb_path).read_text())["cells"]:
        if c["cell_type"] != "markdown": continue
        for line in "".join(c["source"]).splitlines():
            if re.match(r"#{2,6} ", line):
                t = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", line.lstrip("#").strip())   # [text](url) -> text
                out.append(" ".join(t.replace("`", "").replace("*", "").split()))
    return out


def page_text(page: Path) -> str:
    "A page's visible text, tags removed, whitespace collapsed."
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", page.read_text())).split())


IMG_SRC = re.compile(r'<img[^>]*\ssrc="([^"]+)"')


def local_images(page: Path) -> list[str]:
    "The relative paths of the pictures a page shows (not web addresses, not embedded data)."
    return [u for u in IMG_SRC.findall(page.read_text()) if not re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", u, re.I)]


def copy_images(out: Path) -> list[str]:
    "Copy each picture the site's pages link by a relative path from the repository (root first, then nbs/) into the site."
    copied = []
    for page in sorted(out.glob("*.html")):
        for u in local_images(page):
            dest = out / u
            src = next((b / u for b in (ROOT, NBS) if (b / u).is_file()), None)
            if dest.is_file() or src is None: continue
            dest.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(src, dest); copied.append(u)
    return copied


def check(files: list[Path], out: Path, executed: dict[str, bool]) -> list[str]:
    "Every notebook has its page with all its section headings; every executed notebook that drew a figure shows one on its page."
    problems = []
    for f in files:
        page = out / f"{f.stem}.html"
        if not page.is_file() or page.stat().st_size == 0: problems.append(f"{f.name}: no page {page}"); continue
        src = f if f.is_file() else STAGE / f.name
        text = page_text(page)
        lost = [h for h in (headings(src) if src.is_file() else []) if " ".join(h.split()) not in text]
        if lost: problems.append(f"{f.name}: its page {page} lacks the sections {lost[:3]}")
        missing = [u for u in local_images(page) if not (out / u).is_file()]
        if missing: problems.append(f"{f.name}: its page {page} shows pictures not in the site: {missing[:3]}")
        if not executed.get(f.name): continue
        if not drew_figure(STAGE / f.name): problems.append(f"{f.name}: its figure cells drew no figure when executed (plotly output missing)")
        elif FIGURE_MARK not in page.read_text(): problems.append(f"{f.name}: the notebook drew a figure but its page {page} holds none")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_docs"), help="site folder (default _docs/, git-ignored)")
    ap.add_argument("--only", default="*", help="only notebooks matching this glob (e.g. viz)")
    ap.add_argument("--check", action="store_true", help="verify pages and figures after the build")
    ap.add_argument("--renderer", default="auto", choices=("auto", "quarto", "nbconvert"))
    ap.add_argument("--workers", type=int, default=2, help="notebooks executed at once")
    a = ap.parse_args(argv)
    from nbdev.config import get_config
    skip = set(str(get_config().get("tst_flags", "")).split())
    files, out = notebooks(a.only), Path(a.out)
    if not files: sys.exit(f"docs: no notebook matches {a.only!r} in {NBS}")
    t0 = time.time()
    executed = stage(files, skip, a.workers)
    renderer = a.renderer if a.renderer != "auto" else ("quarto" if shutil.which("quarto") else "nbconvert")
    if renderer == "quarto" and not shutil.which("quarto"): sys.exit("docs: --renderer quarto, but quarto is not on the PATH")
    shutil.rmtree(out, ignore_errors=True); out.mkdir(parents=True)
    if renderer == "quarto": render_quarto(out)
    else:
        print("docs: rendering with nbconvert (no quarto on the PATH; see tools/docs.py)")
        render_nbconvert(files, out)
    pics = copy_images(out)
    if pics: print(f"docs: {len(pics)} pictures copied in ({', '.join(pics[:3])})")
    print(f"docs: {len(files)} pages in {out} ({renderer}, {sum(executed.values())} notebooks executed, {time.time() - t0:.0f} s)")
    if a.check:
        problems = check(files, out, executed)
        if problems: sys.exit("docs check failed:\n  " + "\n  ".join(problems))
        print(f"docs check: {len(files)} pages, figures on {sorted(f.stem for f in files if executed[f.name])}")


if __name__ == "__main__":
    main()
