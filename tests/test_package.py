"The installed package works outside the repository: the wheel carries the toy world and the accelerate configurations."
import os, subprocess, sys, zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    "`pip wheel . --no-deps` of the repository (no build isolation: setuptools comes from the venv, nothing is fetched)."
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
                       capture_output=True, text=True, cwd=out)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("sara-*.whl")
    return whl


def test_wheel_ships_the_toy_world_and_accelerate_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    toy = sorted(p.relative_to(ROOT / "data" / "toy").as_posix() for p in (ROOT / "data" / "toy").rglob("*") if p.is_file())
    acc = sorted(p.name for p in (ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert toy and acc
    missing = [f for f in [f"sara/assets/toy/{t}" for t in toy] + [f"sara/assets/accelerate/{a}" for a in acc] if f not in names]
    assert not missing, f"the wheel lacks {missing[:5]}"
    assert "sara/train.py" in names and "sara/viz.py" in names


def test_installed_library_loads_the_toy_world_from_an_empty_folder(wheel, tmp_path):
    "From an empty folder (no settings.ini, no data/): the site settings point at the shipped toy world and a clip loads."
    site, work = tmp_path / "site", tmp_path / "empty"
    zipfile.ZipFile(wheel).extractall(site)
    work.mkdir()
    code = """
import sara, json
from pathlib import Path
from sara.config import site_settings, packaged
from sara.data import ClipDataset
s = site_settings()
item = ClipDataset(Path(s["data_root"]) / s["manifest"], n_frames=17, size=(64, 64))[0]
print(json.dumps(dict(sara=sara.__file__, data_root=s["data_root"], runs_dir=s["runs_dir"], video=list(item["video"].shape),
                      masks=list(item["masks"].shape), fsdp=str(packaged("accelerate") / "fsdp.yaml"))))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARA_")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(out["sara"]).is_relative_to(site), f"imported {out['sara']}, not the wheel's copy"
    assert Path(out["data_root"]) == site / "sara" / "assets" / "toy"
    assert Path(out["runs_dir"]) == work.resolve() / "runs"                 # results go to the user's folder
    assert out["video"] == [17, 3, 64, 64] and out["masks"][1:] == [17, 64, 64]
    assert Path(out["fsdp"]).is_file()
    assert list(work.iterdir()) == []                                       # loading wrote nothing


def _readme_block(section: str) -> str:
    "The ```python block of a README section."
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return body.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_use_the_library_runs_from_an_empty_folder(wheel, tmp_path):
    "The README's 'Using the library' block, as written, with the wheel's package and no repository around."
    site, work = tmp_path / "site", tmp_path / "empty"
    zipfile.ZipFile(wheel).extractall(site)
    work.mkdir()
    code = "import sara\nassert sara.__file__.startswith(%r), sara.__file__\n" % str(site) + _readme_block("Using the library")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARA_")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = work / "runs" / "first"
    assert (run / "checkpoint" / "transformer.safetensors").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert str(run) in r.stdout and "fsdp.yaml" in r.stdout
    assert sorted(p.name for p in work.iterdir()) == ["cache", "runs"]         # everything it wrote is in the user's folder
