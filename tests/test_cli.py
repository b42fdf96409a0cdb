"Commands and their parameters: console-script exit codes, --help, papermill parameters cells, the Makefile's demo and install stamp."
import contextlib, io, json, os, shutil, subprocess, sys, time
from dataclasses import fields
from pathlib import Path

import nbformat
import pytest
from papermill.parameterize import parameterize_notebook
from papermill.translators import PythonTranslator

from sara.aligner import Stage1Config
from sara.config import RUN_CHOICES, ConfigError, RunConfig, dataclass_args
from sara.precompute import PrecomputeConfig, precompute_cli
from sara.train import train_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOY = ROOT / "data" / "toy"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def exit_code(f, *args) -> tuple:
    "(exit status, stdout, stderr) of a console entry point called in-process (0 when it returns)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: f(*args); code = 0
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------- exit codes: 0 success, 2 configuration, 1 failure


def test_sara_precompute_exits_0_on_success(tmp_path):
    "The console script itself (the wrapper passes the entry point's return value to sys.exit)."
    r = subprocess.run([str(BIN / "sara-precompute"), "--data_root", str(TOY), "--cache_dir", str(tmp_path), "--limit", "2",
                        "--progress", "false", "--device", "cpu", "--wan_model", "tiny", "--vfm_model", "tiny",
                        "--text_model", "minilm"], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["done"] == 2 and Path(summary["cache"], "index.json").is_file()


def test_configuration_error_exits_2_with_one_line(tmp_path):
    r = subprocess.run([str(BIN / "sara-train"), "--steps", "0", "--runs_dir", str(tmp_path)], capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "sara-train: error: RunConfig.steps = 0 is not allowed; expected an integer >= 1\n"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, needle", [
    (["--overwrite", "yes"], "argument --overwrite: expected true, false, 1 or 0, got 'yes'"),
    (["--stesp", "3"], "unrecognized arguments: --stesp 3 (did you mean --steps?)"),
    (["--steps", "three"], "argument --steps: invalid int value: 'three'"),
    (["--method", "repa"], "RunConfig.method = 'repa' is not allowed; expected one of sft, videorepa, moalign, sara"),
    (["--resume", "latest", "--run_name", "no-such-run"], "RunConfig.resume = 'latest' is not allowed; expected an existing run folder"),
])
def test_train_cli_configuration_errors(argv, needle, tmp_path):
    code, out, err = exit_code(train_cli, argv + ["--runs_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "c")])
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "c").exists()                     # refused before any work


def test_precompute_cli_refuses_sizes_the_models_cannot_take(tmp_path):
    code, out, err = exit_code(precompute_cli, ["--height", "100000", "--width", "100000", "--cache_dir", str(tmp_path / "c"),
                                                "--wan_model", "tiny", "--device", "cpu"])
    assert code == 2, err
    assert err.startswith("sara-precompute: error: PrecomputeConfig.height = 100000 is not allowed; expected at most 1024")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "c").exists()   # no folder, so no empty index


def test_precompute_cli_failure_exits_1_listing_the_clips(tmp_path):
    data = tmp_path / "data"; data.mkdir()
    (data / "manifest.jsonl").write_text("".join(json.dumps(dict(id=c, video=f"videos/{c}.mp4", caption="a cat", entities=["cat"])) + "\n"
                                                 for c in ("gone_a", "gone_b")))
    code, out, err = exit_code(precompute_cli, ["--data_root", str(data), "--cache_dir", str(tmp_path / "c"), "--progress", "false",
                                                "--device", "cpu", "--wan_model", "tiny", "--vfm_model", "tiny", "--text_model", "minilm"])
    assert code == 1, err
    last = err.strip().splitlines()[-1]                     # (after the progress bars of loading the models)
    assert last.startswith("sara-precompute: failed: ") and "2 of 2 clips failed" in last and "gone_a (line 1)" in last
    assert "Traceback" not in err
    assert not any((tmp_path / "c").iterdir()) if (tmp_path / "c").exists() else True


def test_help_shows_comment_default_and_allowed_values():
    code, out, err = exit_code(train_cli, ["--help"])
    assert code == 0
    text = " ".join(out.split())
    from fastcore.docments import docments
    docs = docments(RunConfig)
    for f in fields(RunConfig):
        assert f"--{f.name} {f.type.upper()} {' '.join(docs[f.name].split())} (default: {f.default!r}" in text, f.name
    assert "--op STR" in text and "(default: 'or'; one of: uniform, or, and, xor)" in text
    assert "--overwrite BOOL" in text and "(default: False; one of: true, false, 1, 0)" in text
    code, out, err = exit_code(precompute_cli, ["--help"])
    assert code == 0 and "(default: 0.05)" in " ".join(out.split()) and "one of: toy, sam3, sam2" in " ".join(out.split())


def test_booleans_accept_only_true_false_1_0():
    for v, b in (("true", True), ("FALSE", False), ("1", True), ("0", False)):
        assert dataclass_args(RunConfig, ["--overwrite", v], "t", "") == dict(overwrite=b)
    for v in ("yes", "no", "on", ""):
        code, _, err = exit_code(dataclass_args, RunConfig, ["--overwrite", v], "t", "")
        assert code == 2 and "--overwrite" in err


# ---------------------------------------------------------------- papermill parameters cells


def params_cell(name: str):
    nb = nbformat.read(ROOT / "nbs" / f"{name}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}.ipynb: {len(cells)} cells tagged 'parameters'"
    return nb, cells[0]


def parsed(name: str) -> dict:
    "The parameters of a notebook as papermill's own parser reads them; every assignment line must parse."
    _, cell = params_cell(name)
    lines = [l for l in cell.source.splitlines() if l.strip() and not l.strip().startswith("#")]
    params = {p.name: p for p in PythonTranslator.inspect(cell)}
    unparsed = [l for l in lines if l.split(":")[0].split("=")[0].strip() not in params]
    assert not unparsed, f"{name}.ipynb: papermill cannot parse {unparsed} (a comment may not hold '=')"
    return params


@pytest.mark.parametrize("name", ["train", "aligner", "precompute", "evaluate"])
def test_every_parameter_line_parses(name):
    parsed(name)


@pytest.mark.parametrize("name, cls, extra, left_out", [
    ("train", RunConfig, {"num_processes", "accelerate_config"}, set()),
    ("aligner", Stage1Config, {"run_name", "cache", "runs_dir", "export"}, {"run_dir"}),
    ("precompute", PrecomputeConfig, set(), set()),
])
def test_parameters_cell_holds_every_field_with_its_default(name, cls, extra, left_out):
    "A field added to the dataclass later must appear in the notebook's parameters too (same type and default)."
    import ast
    ps = parsed(name)
    want = {f.name for f in fields(cls)} - left_out
    assert set(ps) - extra == want, f"{name}.ipynb: missing {sorted(want - set(ps))}, unknown {sorted(set(ps) - extra - want)}"
    for f in fields(cls):
        if f.name in left_out: continue
        assert ps[f.name].inferred_type_name == f.type, f.name
        assert ast.literal_eval(ps[f.name].default) == f.default, f"{name}.ipynb: {f.name} = {ps[f.name].default}, field default {f.default!r}"


def test_documented_parameters_exist():
    "The README's parameters: aligner's head and cache, evaluate's run_dirs."
    assert {"head", "cache", "run_name"} <= set(parsed("aligner"))
    assert "run_dirs" in parsed("evaluate")


def run_parameter_cells(name: str, params: dict, upto: int | None = None) -> dict:
    """Execute, in a fresh namespace, the cell before the parameters cell, the parameters cell, papermill's injected
    cell (made by papermill's own `parameterize_notebook`) and the `upto` cells after it (default: up to the first
    that calls `notebook_params`, an imports cell may come before it)."""
    from papermill.iorw import load_notebook_node  # as papermill loads it (every cell gets a tags list)
    nb = parameterize_notebook(load_notebook_node(str(ROOT / "nbs" / f"{name}.ipynb")), params)
    i = next(k for k, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", []))
    import importlib
    ns = dict(vars(importlib.import_module(f"sara.{name}")))   # what the notebook's own cells define before these
    if upto is None: upto = next(k for k, c in enumerate(nb.cells[i + 1:], 1) if "notebook_params(" in c.source)
    for c in nb.cells[i - 2:i + 1 + upto]: exec(c.source, ns)
    return ns


def test_mistyped_papermill_parameter_stops_the_run():
    with pytest.raises(ConfigError, match=r"RunConfig.stesp = 3 is not allowed; expected a known parameter \(did you mean 'steps'\?"):
        run_parameter_cells("train", dict(stesp=3))
    ns = run_parameter_cells("train", dict(steps=3, height=32, num_processes=1))
    assert (ns["cfg"].steps, ns["cfg"].height) == (3, 32)
    with pytest.raises(ConfigError, match=r"Stage1Config.stesp = 3 .*did you mean 'steps'\? known: batch_size, cache, d_embed"):
        run_parameter_cells("aligner", dict(stesp=3))
    with pytest.raises(ConfigError, match=r"Stage1Config.run_dir = 'x' .*did you mean 'runs_dir'"):
        run_parameter_cells("aligner", dict(run_dir="x"))             # derived from runs_dir and run_name, not a parameter
    with pytest.raises(ConfigError, match=r"PrecomputeConfig.shard_sise = 4 .*did you mean 'shard_size'"):
        run_parameter_cells("precompute", dict(shard_sise=4))
    assert run_parameter_cells("precompute", dict(shard_size=4))["cfg"].shard_size == 4


# ---------------------------------------------------------------- the Makefile: content-keyed install, repeatable demo


@pytest.fixture
def make_copy(tmp_path):
    "The Makefile and pyproject.toml in a scratch folder, with a fake papermill and a stamp holding the current key."
    d = tmp_path / "repo"; d.mkdir()
    for f in ("Makefile", "pyproject.toml"): shutil.copy(ROOT / f, d / f)
    fake = d / "fakebin"; fake.mkdir()
    # papermill -k sara --cwd nbs IN OUT ...: writes OUT (as papermill does while it runs), then fails when FAIL is set
    (fake / "papermill").write_text('#!/bin/sh\necho "{\\"ran\\": \\"$6\\"}" > "$6"\n[ -z "$FAIL" ]\n')
    (fake / "papermill").chmod(0o755)
    key = subprocess.run(["make", "-s", "deps-key"], cwd=d, capture_output=True, text=True, check=True).stdout.strip()
    (d / "stamp").write_text(key + "\n")
    return d


def make(d: Path, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", f"BIN={d / 'fakebin'}", f"STAMP={d / 'stamp'}", *args],
                          cwd=d, capture_output=True, text=True, env={**os.environ, **env})


def test_install_stamp_is_keyed_on_content(make_copy):
    d = make_copy
    key = lambda: make(d, "-s", "deps-key").stdout.strip()
    k0 = key()
    os.utime(d / "pyproject.toml")                                   # nbdev-export rewrites it unchanged
    (d / "pyproject.toml").write_text((d / "pyproject.toml").read_text())
    assert key() == k0
    r = make(d, "setup")
    assert r.returncode == 0 and r.stdout == "", r.stdout             # nothing to install: the stamp matches
    text = (d / "pyproject.toml").read_text()
    (d / "pyproject.toml").write_text(text.replace('"tqdm>=4.60",', '"tqdm>=4.60",\n    "rich>=13",'))
    assert key() != k0                                               # a new dependency: a new key, so a reinstall
    (d / "pyproject.toml").write_text(text.replace("[tool.nbdev]", "[tool.nbdev]\n# a comment nbdev might write"))
    assert key() == k0                                               # other tables do not matter
    assert make(d, "-s", "deps-key", "TORCH=torch==9").stdout.strip() != k0


def test_demo_is_repeatable_and_never_replaces_an_executed_notebook(make_copy):
    d = make_copy
    r1 = make(d, "demo"); time.sleep(1.1); r2 = make(d, "demo")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    nbs = sorted(p.name for p in (d / "runs").glob("*.ipynb"))
    assert len(nbs) == 2 and all(n.startswith("demo-") for n in nbs)  # a fresh run name each time
    assert make(d, "demo", "RUN=mine").returncode == 0
    good = (d / "runs" / "mine.ipynb").read_text()
    r = make(d, "demo", "RUN=mine", FAIL="1")
    assert r.returncode != 0 and "runs/mine.failed.ipynb" in r.stdout
    assert (d / "runs" / "mine.ipynb").read_text() == good            # the executed notebook is kept
    assert (d / "runs" / "mine.failed.ipynb").is_file() and not list((d / "runs").glob("*.partial.ipynb"))


def console_scripts() -> dict:
    "The [project.scripts] of pyproject.toml: name -> 'module:function'."
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("script", sorted(console_scripts()))
def test_every_console_script_follows_the_exit_codes(script):
    "Any console script, including ones added later: --help exits 0, an unknown flag exits 2 with one line."
    import importlib
    mod, fn = console_scripts()[script].split(":")
    main = getattr(importlib.import_module(mod), fn)
    code, out, err = exit_code(main, ["--help"])
    assert code in (0, None) and "--" in out, (script, err)
    code, out, err = exit_code(main, ["--no-such-flag", "1"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{script}: error: " in err, (script, err)


# ---------------------------------------------------------------- the README's "Running a job", as written


def readme_job_commands() -> list[str]:
    "The command lines of the first `sh` block under '## Running a job' in README.md (comments dropped)."
    text = (ROOT / "README.md").read_text()
    sec = text[text.index("## Running a job"):]
    start = sec.index("```sh\n") + len("```sh\n")
    block = sec[start:sec.index("```", start)]
    return [line.split(" # ")[0].strip() for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def fresh_clone(dst: Path) -> Path:
    "The repository's tracked files as they are in the working tree (no runs, caches or build outputs), with its .venv."
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src, out = ROOT / f, dst / f
        if not src.exists() and not src.is_symlink(): continue          # deleted in the working tree
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink(): out.symlink_to(os.readlink(src))
        else: shutil.copy2(src, out)
    (dst / ".venv").symlink_to(ROOT / ".venv")
    return dst


def test_readme_running_a_job(tmp_path):
    "Every command of the README's 'Running a job' block, in order, from a fresh clone: each must exit 0."
    from sara.precompute import open_cache
    from sara.train import read_metrics
    cmds = readme_job_commands()
    assert len(cmds) >= 8 and cmds[0] == "mkdir -p runs", cmds
    clone = fresh_clone(tmp_path / "clone")
    for cmd in cmds:
        r = subprocess.run(cmd, shell=True, cwd=clone, env=ENV, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    caches = [p.parent for p in (clone / "cache").glob("*/index.json")]
    assert len(caches) == 1 and open_cache(caches[0]).layers == ["aligner", "motion"]
    for head in ("aligner", "motion"): assert (clone / "runs" / "stage1" / head / "head" / "head.json").is_file()
    assert [r["step"] for r in read_metrics(clone / "runs" / "sara-and" / "metrics.jsonl")] == list(range(1, 21))
    cfg = json.loads((clone / "runs" / "moalign" / "config.json").read_text())
    assert (cfg["config"]["method"], cfg["routing_op"]) == ("moalign", "uniform")
    assert (clone / "runs" / "eval.ipynb").is_file() and (clone / "runs" / "videorepa.ipynb").is_file()
