"Integration tests of Stage 2: the papermill entry point, identical data order across methods, bad input."
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from sara.config import make_config, site_settings, ConfigError
from sara.train import train, read_metrics, load_checkpoint, build_models, resolve_device

ROOT = Path(__file__).resolve().parents[1]


def cfg_for(tmp_path, **kw):
    params = dict(run_name="t", steps=3, batch_size=2, runs_dir=str(tmp_path / "runs"))
    params.update(kw)
    return make_config(params, settings=site_settings(ROOT, env={}))


def test_papermill_runs_train_notebook(tmp_path):
    "The README's batch path: papermill executes nbs/train.ipynb with parameters and writes the run folder."
    out = tmp_path / "run.ipynb"
    cmd = [sys.executable, "-m", "papermill", "--cwd", str(ROOT / "nbs"), str(ROOT / "nbs" / "train.ipynb"), str(out),
           "-p", "run_name", "pm", "-p", "steps", "2", "-p", "runs_dir", str(tmp_path / "runs"), "--log-level", "ERROR"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "pm"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["trd"] > 0 for r in rows), "sara must add a TRD term"
    assert (run / "checkpoint" / "transformer.safetensors").stat().st_size > 0
    assert json.loads((run / "config.json").read_text())["config"]["method"] == "sara"
    nb = json.loads(out.read_text())
    assert any("plotly" in json.dumps(c.get("outputs", [])) for c in nb["cells"]), "the loss curve must be drawn"


def test_methods_share_data_order_and_lam0_equals_sft(tmp_path):
    "Switching method changes only the loss: with lam=0 every method follows the SFT trajectory bit for bit."
    runs = {m: train(cfg_for(tmp_path, run_name=m, method=m, lam=0.0), progress=False)["metrics"] for m in ("sft", "videorepa", "sara")}
    for m in ("videorepa", "sara"):
        assert [r["clips"] for r in runs[m]] == [r["clips"] for r in runs["sft"]]
        assert [r["fm"] for r in runs[m]] == [r["fm"] for r in runs["sft"]]
        assert all(r["trd"] > 0 for r in runs[m])
    assert all(r["trd"] == 0 for r in runs["sft"])


def test_trd_changes_training_when_lam_positive(tmp_path):
    a = train(cfg_for(tmp_path, run_name="a", method="sft"), progress=False)["metrics"]
    b = train(cfg_for(tmp_path, run_name="b", method="sara", lam=1.0), progress=False)["metrics"]
    assert a[0]["fm"] == b[0]["fm"]          # same start: same weights, data, noise
    assert a[-1]["fm"] != b[-1]["fm"]        # the TRD gradient changed the trajectory


def test_checkpoint_round_trip(tmp_path):
    cfg = cfg_for(tmp_path, steps=2)
    out = train(cfg, progress=False)
    fresh = build_models(cfg, resolve_device("cpu"))
    assert load_checkpoint(cfg.run_dir, fresh) == 2
    for (k, a), (_, b) in zip(out["models"].wan.transformer.state_dict().items(), fresh.wan.transformer.state_dict().items()):
        assert torch.equal(a, b), k


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = cfg_for(tmp_path, steps=1)
    train(cfg, progress=False)
    ck = Path(cfg.run_dir) / "checkpoint" / "transformer.safetensors"
    before = ck.read_bytes()
    with pytest.raises(FileExistsError, match="already holds"):
        train(cfg, progress=False)
    assert ck.read_bytes() == before


def test_bad_parameters_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="RunConfig.method = 'repa'.*sft, videorepa, sara"):
        cfg_for(tmp_path, method="repa")
    with pytest.raises(ConfigError, match="RunConfig.op = 'nand'"):
        cfg_for(tmp_path, op="nand")
    with pytest.raises(ConfigError, match="RunConfig.block = 99"):
        train(cfg_for(tmp_path, block=99), progress=False)
    with pytest.raises(ConfigError, match="RunConfig.stpes"):
        cfg_for(tmp_path, stpes=3)


def test_manifest_error_names_line(tmp_path):
    data = tmp_path / "data"; data.mkdir()
    (data / "manifest.jsonl").write_text(json.dumps(dict(video="missing.mp4", caption="a red circle", entities=["red circle"])) + "\n")
    with pytest.raises(FileNotFoundError, match="line 1"):
        train(cfg_for(tmp_path, data_root=str(data)), progress=False)
