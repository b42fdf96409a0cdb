"Issue 17: the dress rehearsal at tiny size (the paper-size path on the CPU), and the fixes it pinned."
import errno, json, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reh(tmp_path_factory):
    "bench/rehearsal.py --size tiny, every stage, as the lead runs it at paper size (notebooks through the cells runner)."
    root = tmp_path_factory.mktemp("reh")
    p = subprocess.run([sys.executable, str(REPO / "bench" / "rehearsal.py"), "--size", "tiny", "--root", str(root), "--runner", "cells"],
                       cwd=REPO, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root


def test_every_stage_recorded(reh):
    st = json.loads((reh / "rehearsal.json").read_text())
    assert list(st["stages"]) == ["models", "data", "precompute", "stage1", "train", "resume", "export", "sample"]
    for r in st["stages"].values():
        assert r["wall_s"] >= 0 and r["host_peak_rss_gib"] > 0 and "gpu_peak_gib" in r
    table = (reh / "table.md").read_text()
    assert table.count("\n| ") == 9 and "not run" not in table and "stopped" not in table


def test_models_in_the_formats_users_download(reh):
    "diffusers' Wan2.2-TI2V-5B layout (converter's configs), V-JEPA 2 and an embedder, loadable offline by sara."
    wan = reh / "models" / "Wan2.2-TI2V-5B-Diffusers"
    index = json.loads((wan / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["expand_timesteps"] is True
    assert {"transformer", "vae", "scheduler", "text_encoder", "tokenizer"} <= set(index)
    tr, vae = (json.loads((wan / d / "config.json").read_text()) for d in ("transformer", "vae"))
    assert (tr["in_channels"], tr["out_channels"], tr["patch_size"], tr["qk_norm"]) == (48, 48, [1, 2, 2], "rms_norm_across_heads")
    assert (vae["z_dim"], vae["scale_factor_spatial"], vae["patch_size"], vae["is_residual"]) == (48, 16, 2, True)
    sched = json.loads((wan / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "UniPCMultistepScheduler" and sched["flow_shift"] == 5.0
    assert json.loads((wan / "text_encoder" / "config.json").read_text())["architectures"] == ["UMT5EncoderModel"]
    from sara.config import wan_facts
    f = wan_facts(str(wan))
    assert (f["spatial"], f["shift"], f["fps"], f["ti2v"]) == (16, 5.0, 24, True)
    from sara.text import build_text_encoder
    e, mask = build_text_encoder(str(wan)).encode_prompts(["a red circle bounces off a zebra"])   # unknown word: <unk>
    assert e.shape == (1, 512, 32) and int(mask.sum()) == 8                                      # 7 words + </s>
    vj = json.loads((reh / "models" / "vjepa2-vitl-fpc64-256" / "config.json").read_text())
    assert vj["model_type"] == "vjepa2" and vj["patch_size"] == 16


def test_checkpoints_kept_resumed_exported_sampled(reh):
    st = json.loads((reh / "rehearsal.json").read_text())["stages"]
    assert [c["step"] for c in st["train"]["checkpoints"]] == [2, 4] and [c["step"] for c in st["resume"]["checkpoints"]] == [6]
    assert st["resume"]["resume"]["step"] == 4 and st["resume"]["last_step"] == 6
    run = reh / "runs" / "rehearsal-sara"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000006"]   # keep_last=1, pruned after the write
    man = json.loads((run / "checkpoints" / "step_000006" / "MANIFEST.json").read_text())
    assert man["bytes"] == sum(r["size"] for r in man["files"].values()) and man["write_seconds"] >= 0
    assert st["export"]["files"]["transformer.safetensors"]["step"] == "6"
    assert st["train"]["losses_finite"] and st["resume"]["losses_finite"]
    assert (reh / "samples" / st["sample"]["files"][0]).stat().st_size > 0


def test_precompute_reads_the_vae_alone(reh, tmp_path):
    "Precompute never loads the DiT (5B: 20 GB in float32): it works with the transformer's weights gone."
    from sara.wan import build_vae, build_wan
    wan = shutil.copytree(reh / "models" / "Wan2.2-TI2V-5B-Diffusers", tmp_path / "wan")
    for f in (wan / "transformer").glob("*.safetensors"): f.unlink()
    assert build_vae(str(wan)).config.z_dim == 48
    with pytest.raises(Exception): build_wan(str(wan))


def test_train_refuses_a_disk_too_small_before_any_step(reh, tmp_path, monkeypatch):
    "sara.train.checkpoint_budget: the run stops before its first step, naming the folder, when checkpoints cannot fit."
    import sara.checkpoint
    from sara.config import make_config
    from sara.train import train
    m = reh / "models"
    cache = next((reh / "cache").glob("*/index.json")).parent
    cfg = make_config(dict(steps=4, checkpoint_every=2, n_frames=5, height=64, width=96, task="ti2v", cache=str(cache),
                           run_dir=str(tmp_path / "run"), data_root=str(reh / "data"), wan_model=str(m / "Wan2.2-TI2V-5B-Diffusers"),
                           vfm_model=str(m / "vjepa2-vitl-fpc64-256"), text_model=str(m / "Wan2.2-TI2V-5B-Diffusers")))
    monkeypatch.setattr(sara.checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError) as e: train(cfg, progress=False)
    assert e.value.errno == errno.ENOSPC and str(tmp_path / "run" / "checkpoints") in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text().strip()


def test_precompute_runs_umt5_in_its_compute_dtype(reh):
    "compute_dtype (part of the cache key) sets the UMT5 encoder's dtype too: bf16 halves UMT5-XXL (23 -> 11 GB), as Wan2.2 runs it."
    from sara.precompute import build_precompute_models, make_precompute_config
    wan = str(reh / "models" / "Wan2.2-TI2V-5B-Diffusers")
    cfg = make_precompute_config(dict(data_root=str(reh / "data"), cache_dir=str(reh / "cache"), wan_model=wan, text_model=wan,
                                      vfm_model=str(reh / "models" / "vjepa2-vitl-fpc64-256"), embedder=str(reh / "models" / "embedder"),
                                      compute_dtype="bfloat16", device="cpu"))
    m = build_precompute_models(cfg)
    assert next(m.text.model.parameters()).dtype == torch.bfloat16 and next(m.vfm.parameters()).dtype == torch.bfloat16
    assert m.vae.dtype == torch.float32
