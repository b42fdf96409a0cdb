"""The `sam2` package as a backend of the SAM 2 mask provider: a tiny model built from the package's own Hiera-T
config (Hydra overrides shrink it to 6 M parameters at 128 px), saved as a `.pt` checkpoint, loaded from that path,
and run on the CPU with box and point prompts (video predictor: init_state, add_new_points_or_box, propagate_in_video)."""
import builtins, dataclasses, os
from pathlib import Path

import pytest
import torch

from sara.data import load_video, read_manifest
from sara.masks import (Sam2MaskProvider, _sam2_backend, build_mask_provider, empty_entities, make_tiny_sam2_checkpoint,
                        sam2_config_for)

TOY = Path(__file__).resolve().parents[1] / "data" / "toy" / "manifest.jsonl"


def _have_sam2() -> bool:
    try: _sam2_backend(backend="sam2"); return True
    except ImportError: return False


needs_sam2 = pytest.mark.skipif(not _have_sam2() and os.environ.get("SARA_REQUIRE_SAM2") != "1",
                                reason="the sam2 package is not installed (SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_sam2_checkpoint(tmp_path_factory.mktemp("sam2") / "sam2.1_tiny_test.pt")


@needs_sam2
def test_sam2_package_backend_end_to_end(tiny):
    ckpt, config, over = tiny
    rec = read_manifest(TOY)[1]
    video = load_video(rec.video)[:4]                                             # T, 3, 64, 64 uint8
    p = build_mask_provider("sam2", ckpt, config=config, hydra_overrides=over)
    assert p.backend == "sam2" and p.config == config
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]        # the weights come from the path
    live = p.predictor.state_dict()
    assert set(saved) <= set(live) and all(torch.equal(live[k], v) for k, v in saved.items())
    prompts = {rec.entities[0]: {"frame": 2, "box": [4, 4, 40, 40]},               # propagates forward and backward
               rec.entities[1]: {"frame": 0, "points": [[30, 30], [5, 60]], "labels": [1, 0]}}
    res = p(video, rec.entities, dataclasses.replace(rec, prompts=prompts))
    assert res.masks.shape == (2, 4, 64, 64) and res.masks.dtype == torch.bool
    assert res.empty == empty_entities(res.masks, rec.entities)
    again = p(video, rec.entities, dataclasses.replace(rec, prompts=prompts))
    assert torch.equal(res.masks, again.masks)                                     # deterministic
    with pytest.raises(ValueError, match="beyond the clip's 4 frames"):
        p(video, rec.entities[:1], dataclasses.replace(rec, prompts={rec.entities[0]: {"frame": 9, "box": [0, 0, 4, 4]}}))
    with pytest.raises(FileNotFoundError, match="takes a .pt file"):
        Sam2MaskProvider(ckpt.parent / "missing.pt", config=config)


def test_sam2_backend_choice_and_configs(tmp_path):
    if _have_sam2(): assert _sam2_backend(tmp_path / "x.pt") == "sam2"
    assert sam2_config_for("sam2.1_hiera_tiny.pt") == "configs/sam2.1/sam2.1_hiera_t.yaml"
    assert sam2_config_for("/w/sam2_hiera_small.pt") == "configs/sam2/sam2_hiera_s.yaml"
    with pytest.raises(ValueError, match="pass config="): sam2_config_for("my_finetune.pt")
    with pytest.raises(ValueError, match="must be one of"): _sam2_backend(backend="sam3")


def test_sam2_package_missing_says_how_to_install(monkeypatch):
    real = builtins.__import__
    def fake(name, *a, **k):
        if name == "sam2" or name.startswith("sam2."): raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2"):
        Sam2MaskProvider("/ckpt/sam2.1_hiera_tiny.pt")
