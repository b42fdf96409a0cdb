"The documentation build's own logic (tools/docs.py): which notebooks are executed, and a check that can fail."
import importlib.util, json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sara_docs", ROOT / "tools" / "docs.py")
docs = importlib.util.module_from_spec(spec); spec.loader.exec_module(docs)


def _nb(*cells, html=None) -> dict:
    out = [{"output_type": "display_data", "metadata": {}, "data": {"text/html": html}}] if html else []
    return {"cells": [{"cell_type": "code", "source": c, "metadata": {}, "outputs": out, "execution_count": None} for c in cells],
            "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_draws_figures_skips_exported_and_flagged_cells():
    skip = {"slow", "gpu", "notest"}
    assert docs.draws_figures(_nb("fig = saliency_figure(x)\nfig"), skip)
    assert not docs.draws_figures(_nb("#| export\ndef saliency_figure(x): ..."), skip)
    assert not docs.draws_figures(_nb("#| notest\nshow(run_story(d))"), skip)
    assert not docs.draws_figures(_nb("x = 1"), skip)


def test_every_notebook_page_is_required_and_figures_must_reach_the_page(tmp_path, monkeypatch):
    stage, out = tmp_path / "stage", tmp_path / "site"
    stage.mkdir(); out.mkdir()
    monkeypatch.setattr(docs, "STAGE", stage)
    mark = docs.FIGURE_MARK
    (stage / "a.ipynb").write_text(json.dumps(_nb("show(f)", html=[f'<div {mark}></div>'])))   # executed, drew a figure
    (stage / "b.ipynb").write_text(json.dumps(_nb("x = 1")))                                 # not executed
    (stage / "c.ipynb").write_text(json.dumps(_nb("show(f)")))                                # executed, drew nothing
    files = [Path(n) for n in ("a.ipynb", "b.ipynb", "c.ipynb", "d.ipynb")]
    executed = {"a.ipynb": True, "b.ipynb": False, "c.ipynb": True, "d.ipynb": False}
    (out / "a.html").write_text("<html>no figure here</html>")
    (out / "b.html").write_text("<html>b</html>"); (out / "c.html").write_text("<html>c</html>")
    problems = docs.check(files, out, executed)
    assert any(p.startswith("a.ipynb: the notebook drew a figure but its page") for p in problems)
    assert any(p.startswith("c.ipynb: its figure cells drew no figure") for p in problems)
    assert any(p.startswith("d.ipynb: no page") for p in problems) and not any(p.startswith("b.ipynb") for p in problems)
    (out / "a.html").write_text(f"<html><div {mark}></div></html>"); (out / "d.html").write_text("<html>d</html>")
    assert [p[:7] for p in docs.check(files, out, executed)] == ["c.ipynb"]


def test_quarto_front_matter_and_directives_become_plain_html_input():
    nb = {"cells": [{"cell_type": "raw", "source": "---\ntitle: Explorers\ndescription: 'Plotly figures'\n---", "metadata": {}},
                    {"cell_type": "code", "source": "#| echo: false\n#| output: asis\nshow_doc(f)", "metadata": {}, "execution_count": None,
                     "outputs": [{"output_type": "display_data", "metadata": {},
                                  "data": {"text/markdown": '[source](x){target="_blank" style="float:right"}'}}]}]}
    plain, head = docs._for_nbconvert(nb)
    assert head == "<h1>Explorers</h1><p><i>Plotly figures</i></p>" and len(plain["cells"]) == 1
    c = plain["cells"][0]
    assert c["source"] == "show_doc(f)" and c["metadata"]["tags"] == ["remove_input"]
    assert c["outputs"][0]["data"]["text/markdown"] == "[source](x)"


def test_a_page_must_hold_every_section_of_its_notebook(tmp_path, monkeypatch):
    "nbdev turns a notebook's first markdown cell into front matter: a page that lost its sections fails the check."
    monkeypatch.setattr(docs, "STAGE", tmp_path)
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "# T\n\n> s\n\n## Running a job\n\n### `sam2`: [box](#x) prompts"}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "index.ipynb").write_text(json.dumps(nb))
    assert docs.headings(tmp_path / "index.ipynb") == ["Running a job", "sam2: box prompts"]
    out = tmp_path / "site"; out.mkdir()
    (out / "index.html").write_text("<h1>T</h1><p>s</p>")
    assert "lacks the sections ['Running a job', 'sam2: box prompts']" in docs.check([tmp_path / "index.ipynb"], out, {})[0]
    (out / "index.html").write_text("<h2>Running a job</h2><h3><code>sam2</code>: <a href='#x'>box</a> prompts</h3>")
    assert docs.check([tmp_path / "index.ipynb"], out, {}) == []


def test_pictures_linked_by_relative_path_are_copied_in_and_checked(tmp_path, monkeypatch):
    "The README's figure (a path relative to the repository) must reach the site: copied in, and a missing one fails the check."
    repo, out, stage = tmp_path / "repo", tmp_path / "site", tmp_path / "stage"
    (repo / "bench" / "x").mkdir(parents=True); out.mkdir(); stage.mkdir()
    (repo / "bench" / "x" / "fig.png").write_bytes(b"\x89PNG")
    monkeypatch.setattr(docs, "ROOT", repo); monkeypatch.setattr(docs, "NBS", repo / "nbs"); monkeypatch.setattr(docs, "STAGE", stage)
    page = out / "index.html"
    page.write_text('<p><img alt="a figure" src="bench/x/fig.png"></p><img src="https://e.org/a.png"><img src="data:image/png;base64,AA">'
                    '<img alt="gone" src="bench/x/none.png">')
    assert docs.local_images(page) == ["bench/x/fig.png", "bench/x/none.png"]
    assert docs.copy_images(out) == ["bench/x/fig.png"] and (out / "bench" / "x" / "fig.png").read_bytes() == b"\x89PNG"
    (stage / "index.ipynb").write_text(json.dumps(_nb("x = 1")))
    problems = docs.check([Path("index.ipynb")], out, {"index.ipynb": False})
    assert problems == [f"index.ipynb: its page {page} shows pictures not in the site: ['bench/x/none.png']"]
