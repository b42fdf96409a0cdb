"Integration tests of Stage 2: papermill entry point, one code path for every method, exact resume, exports, bad input."
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from sara.config import make_config, site_settings, ConfigError
from sara.checkpoint import list_checkpoints
from sara.train import train, read_metrics, load_checkpoint, build_models, resolve_device

ROOT = Path(__file__).resolve().parents[1]


# cache_dir and cfg_for (a short run on the toy world) are in conftest.py


def test_papermill_runs_train_notebook(tmp_path, cache_dir):
    "The README's batch path: papermill executes nbs/train.ipynb with parameters and writes the run folder."
    out = tmp_path / "run.ipynb"
    cmd = [sys.executable, "-m", "papermill", "--cwd", str(ROOT / "nbs"), str(ROOT / "nbs" / "train.ipynb"), str(out),
           "-p", "run_name", "pm", "-p", "steps", "2", "-p", "runs_dir", str(tmp_path / "runs"),
           "-p", "checkpoint_every", "1", "--log-level", "ERROR"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SARA_CACHE_DIR": cache_dir}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "pm"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["trd"] > 0 for r in rows), "sara must add a TRD term"
    assert (run / "checkpoint" / "transformer.safetensors").stat().st_size > 0
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [1, 2]
    assert json.loads((run / "config.json").read_text())["config"]["method"] == "sara"
    nb = json.loads(out.read_text())
    assert any("plotly" in json.dumps(c.get("outputs", [])) for c in nb["cells"]), "the loss curve must be drawn"
    # the run's story (losses, saliency picture, budget) survives an HTML export and is linked from the top (issue 16)
    r = subprocess.run([sys.executable, "-m", "nbconvert", "--to", "html", "--stdout", "--log-level", "ERROR", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    page = r.stdout
    link, anchor, fig = 'href="#Results-of-this-run"', 'id="Results-of-this-run"', 'class="plotly-graph-div"'
    assert link in page and anchor in page and fig in page, "the HTML export lost the results section or its figure"
    assert page.index(link) < page.index(anchor) < page.index(fig)
    assert "Plotly.newPlot" in page and "pair budget" in page and "run pm: sara (or routing), 2 steps" in page


def test_methods_share_data_order_and_lam0_equals_sft(cfg_for):
    "Switching method changes only the loss: with lam=0 every method follows the SFT trajectory bit for bit."
    runs = {m: train(cfg_for(run_name=m, method=m, lam=0.0), progress=False)["metrics"] for m in ("sft", "videorepa", "sara")}
    for m in ("videorepa", "sara"):
        assert [r["clips"] for r in runs[m]] == [r["clips"] for r in runs["sft"]]
        assert [r["fm"] for r in runs[m]] == [r["fm"] for r in runs["sft"]]
        assert all(r["trd"] > 0 for r in runs[m])
    assert all(r["trd"] == 0 for r in runs["sft"])


def test_trd_changes_training_when_lam_positive(cfg_for):
    a = train(cfg_for(run_name="a", method="sft"), progress=False)["metrics"]
    b = train(cfg_for(run_name="b", method="sara", lam=1.0), progress=False)["metrics"]
    assert a[0]["fm"] == b[0]["fm"]          # same start: same weights, data, noise
    assert a[-1]["fm"] != b[-1]["fm"]        # the TRD gradient changed the trajectory


def test_resume_is_exact(cfg_for):
    "Stopping after 3 of 6 steps and resuming from the checkpoint reproduces the uninterrupted run exactly."
    full = train(cfg_for(run_name="full", steps=6, checkpoint_every=1, ema_decay=0.9, warmup_steps=2), progress=False)["metrics"]
    part = cfg_for(run_name="part", steps=6, checkpoint_every=1, ema_decay=0.9, warmup_steps=2)
    first = train(part, progress=False, stop_after=3)["metrics"]
    assert len(first) == 3 and not (Path(part.run_dir) / "checkpoint").exists()
    part.resume = "latest"
    rest = train(part, progress=False)["metrics"]
    assert [r["step"] for r in rest] == [4, 5, 6]
    keys = ("fm", "trd", "loss", "grad_norm", "lr", "clips")
    assert [{k: r[k] for k in keys} for r in first + rest] == [{k: r[k] for k in keys} for r in full]
    assert [r["step"] for r in read_metrics(Path(part.run_dir) / "metrics.jsonl")] == list(range(1, 7))


def test_checkpoint_round_trip_and_ema_export(cfg_for):
    cfg = cfg_for(steps=2, ema_decay=0.5)
    out = train(cfg, progress=False)
    fresh = build_models(cfg, resolve_device("cpu"), target_dim=out["targets"][0]["y"].shape[-1])
    assert load_checkpoint(cfg.run_dir, fresh) == 2
    for (k, a), (_, b) in zip(out["models"].dit.state_dict().items(), fresh.dit.state_dict().items()):
        assert torch.equal(a, b), k
    assert load_checkpoint(cfg.run_dir, fresh, ema=True) == 2
    assert any(not torch.equal(a, b) for a, b in zip(out["models"].dit.state_dict().values(), fresh.dit.state_dict().values()))


def test_lora_trains_only_the_adapter(cfg_for):
    cfg = cfg_for(steps=2, lora_rank=4)
    out = train(cfg, progress=False)
    dit = out["models"].dit
    assert all(("lora_" in n) == p.requires_grad for n, p in dit.named_parameters())
    exported = Path(cfg.run_dir) / "checkpoint" / "transformer.safetensors"
    from safetensors.torch import load_file
    keys = load_file(str(exported))
    assert keys and all("lora_" in k for k in keys)
    fresh = build_models(cfg, resolve_device("cpu"), target_dim=out["targets"][0]["y"].shape[-1])
    load_checkpoint(cfg.run_dir, fresh)
    for (k, a), (_, b) in zip(dit.state_dict().items(), fresh.dit.state_dict().items()):
        assert torch.equal(a, b), k


def test_lambda_cutoff_turns_alignment_off(cfg_for):
    rows = train(cfg_for(steps=3, lam_schedule="cutoff", lam_cutoff_step=1), progress=False)["metrics"]
    assert [r["lam"] for r in rows] == [0.5, 0.0, 0.0]


def test_existing_run_is_not_overwritten(cfg_for):
    cfg = cfg_for(steps=1)
    train(cfg, progress=False)
    ck = Path(cfg.run_dir) / "checkpoint" / "transformer.safetensors"
    before = ck.read_bytes()
    with pytest.raises(FileExistsError, match="already holds"):
        train(cfg, progress=False)
    assert ck.read_bytes() == before
    cfg.overwrite = True
    train(cfg, progress=False)                        # the earlier run is moved aside, not deleted
    moved = list(Path(cfg.run_dir).glob("previous-*/checkpoint/transformer.safetensors"))
    assert len(moved) == 1 and moved[0].read_bytes() == before


def test_bad_parameters_name_the_field(cfg_for):
    with pytest.raises(ConfigError, match="RunConfig.method = 'repa'.*sft, videorepa, moalign, sara"):
        cfg_for(method="repa")
    with pytest.raises(ConfigError, match="RunConfig.op = 'nand'"):
        cfg_for(op="nand")
    with pytest.raises(ConfigError, match="RunConfig.block = 99"):
        train(cfg_for(block=99), progress=False)
    with pytest.raises(ConfigError, match="RunConfig.stpes"):
        cfg_for(stpes=3)
    with pytest.raises(ConfigError, match="RunConfig.expert = 'high'"):
        train(cfg_for(expert="high"), progress=False)


def test_missing_stage1_layer_is_named(cfg_for):
    with pytest.raises(FileNotFoundError, match="layer 'aligner'"):
        train(cfg_for(saliency="aligner"), progress=False)
    with pytest.raises(FileNotFoundError, match="layer 'motion'"):
        train(cfg_for(method="moalign"), progress=False)


def test_targets_in_loop_matches_cache(cfg_for):
    "The in-loop ablation recomputes exactly what the cache holds: same trajectory."
    a = train(cfg_for(run_name="cached", steps=2), progress=False)["metrics"]
    b = train(cfg_for(run_name="inloop", steps=2, targets_in_loop=True), progress=False)["metrics"]
    for x, y in zip(a, b):
        assert abs(x["trd"] - y["trd"]) < 1e-5 and x["fm"] == y["fm"]


def test_manifest_error_names_line(cfg_for, tmp_path):
    data = tmp_path / "data"; data.mkdir()
    (data / "manifest.jsonl").write_text(json.dumps(dict(video="missing.mp4", caption="a red circle", entities=["red circle"])) + "\n")
    from sara.precompute import TooManyFailedClips   # a missing video is a failed clip (the cache's failure policy)
    with pytest.raises(TooManyFailedClips, match=r"1 of 1 clips failed.*missing \(line 1\): FileNotFoundError"):
        train(cfg_for(data_root=str(data)), progress=False)


def _tiny_a14b_dir(root: Path) -> Path:
    "A diffusers-layout Wan2.2 A14B stand-in: two tiny experts (different weights), the VAE, a scheduler, the boundary."
    import json as _json
    from diffusers import UniPCMultistepScheduler
    from sara.wan import build_wan
    hi, lo = build_wan("tiny", seed=0), build_wan("tiny", seed=1)
    hi.transformer.save_pretrained(root / "transformer")
    lo.transformer.save_pretrained(root / "transformer_2")
    hi.vae.save_pretrained(root / "vae")
    UniPCMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(_json.dumps({"boundary_ratio": 0.875}))
    return root


def test_a14b_expert_trains_one_expert_in_its_window(cfg_for, tmp_path, monkeypatch):
    "expert=low trains transformer_2 only, on timesteps below the boundary; expert=high the other one above it."
    wan_dir = str(_tiny_a14b_dir(tmp_path / "Wan2.2-A14B-tiny"))
    import sara.train as T
    seen = []
    orig = T.sample_sigmas
    monkeypatch.setattr(T, "sample_sigmas", lambda *a, **k: (lambda r: (seen.append(r[1].clone()), r)[1])(orig(*a, **k)))
    for expert, ok in (("low", lambda t: t < 875), ("high", lambda t: t >= 875)):
        seen.clear()
        cfg = cfg_for(run_name=f"a14b-{expert}", wan_model=wan_dir, expert=expert, steps=2, fps=8)  # the toy clips' 8 fps (A14B: 16)
        out = train(cfg, progress=False)
        m = out["models"]
        trained, other = (m.wan.transformer_2, m.wan.transformer) if expert == "low" else (m.wan.transformer, m.wan.transformer_2)
        assert m.dit is trained and not any(p.requires_grad for p in other.parameters())
        assert all(ok(t).all() for t in seen) and len(seen) == 2
        fresh = build_models(cfg, resolve_device("cpu"), target_dim=out["targets"][0]["y"].shape[-1])
        assert load_checkpoint(cfg.run_dir, fresh) == 2
        assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.dit.state_dict().values()))


def test_tensorboard_logs(cfg_for):
    cfg = cfg_for(steps=2, tensorboard=True)
    train(cfg, progress=False)
    events = list((Path(cfg.run_dir) / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_failed_weight_export_leaves_no_temporary(tmp_path, monkeypatch):
    "A writer that fails half way (disk full) leaves the export folder as it was: no partial file, no temporary."
    import errno
    import sara.train as T
    (tmp_path / "projector.safetensors").write_bytes(b"previous export")

    def failing(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(T, "save_file", failing)
    with pytest.raises(OSError, match="No space left"):
        T._atomic_save({"w": torch.ones(2)}, tmp_path / "projector.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projector.safetensors"]
    assert (tmp_path / "projector.safetensors").read_bytes() == b"previous export"


def test_deterministic_runs_under_deterministic_algorithms_and_restores(cfg_for, monkeypatch):
    """`deterministic=True` trains (sara: TRD included) with torch's deterministic algorithms on, the same metrics as
    without on the CPU (whose kernels are deterministic already), and leaves torch's settings as they were; on a GPU
    the mode's point is bitwise repeats (bench/stage2_determinism.py, bench/README part 7)."""
    import sara.train as st
    seen, build = [], st.build_models
    monkeypatch.setattr(st, "build_models", lambda *a, **k: (seen.append(torch.are_deterministic_algorithms_enabled()), build(*a, **k))[1])
    assert not torch.are_deterministic_algorithms_enabled()
    on = train(cfg_for(run_name="det", method="sara", lam=1.0, deterministic=True), progress=False)["metrics"]
    off = train(cfg_for(run_name="nondet", method="sara", lam=1.0), progress=False)["metrics"]
    assert seen == [True, False] and not torch.are_deterministic_algorithms_enabled()
    keys = ("fm", "trd", "loss", "grad_norm", "clips")
    assert [{k: r[k] for k in keys} for r in on] == [{k: r[k] for k in keys} for r in off]
    assert json.loads((Path(cfg_for(run_name="det").run_dir) / "config.json").read_text())["config"]["deterministic"] is True


def test_deterministic_algorithms_context_restores_on_error(monkeypatch):
    "The mode is restored after an error inside it; the cuBLAS workspace variable is set unless given; off leaves torch alone."
    from sara.train import deterministic_algorithms, CUBLAS_DETERMINISTIC
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="inside"):
        with deterministic_algorithms(True):
            assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
            raise RuntimeError("inside")
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic_algorithms(True): pass
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    with deterministic_algorithms(False): assert not torch.are_deterministic_algorithms_enabled()
