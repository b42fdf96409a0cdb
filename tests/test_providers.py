"""Integration tests of the mask and flow providers of `sara.masks` on tiny random models and the toy world."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sara.data import load_video, read_manifest
from sara.toy import TOY_COLOURS, make_toy_world, render_toy_clip, render_toy_clip_with_flow
from sara.masks import (MASK_PROVIDERS, MaskProvider, MaskResult, RaftFlowProvider, Sam2MaskProvider,
                        Sam3MaskProvider, ToyFlowProvider, ToyMaskProvider, _sam2_backend, build_flow_provider,
                        build_mask_provider, empty_entities, flow_to_grid, make_tiny_sam2_dir, make_tiny_sam3_dir,
                        reduce_to_grid)

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "data" / "toy" / "manifest.jsonl"


@pytest.fixture(scope="module")
def toy():
    recs = read_manifest(TOY)
    return recs, [load_video(r.video) for r in recs]


# ---------------------------------------------------------------- toy
def test_toy_provider_matches_rendered_pixels(toy):
    recs, videos = toy
    for rec, video, child in zip(recs, videos, np.random.SeedSequence(0).spawn(8)):
        masks, empty = ToyMaskProvider()(video, rec.entities, rec)
        frames, want, _, ents = render_toy_clip(np.random.default_rng(child), 17, 64)
        assert ents == rec.entities and empty == []
        assert masks.dtype == torch.bool and torch.equal(masks, want)
        for k, name in enumerate(ents):  # the rendered pixels exactly
            painted = (frames == torch.tensor(TOY_COLOURS[name.split()[0]], dtype=torch.uint8).view(1, 3, 1, 1)).all(1)
            assert torch.equal(painted, masks[k])


def test_toy_provider_errors(toy):
    recs, videos = toy
    with pytest.raises(ValueError, match="differ from the requested"):
        ToyMaskProvider()(videos[0], ["nothing"], recs[0])
    with pytest.raises(ValueError, match=r"masks have shape .* needs"):
        ToyMaskProvider()(videos[0][:5], recs[0].entities, recs[0])
    with pytest.raises(ValueError, match=r"needs a record with a 'masks' file \(manifest line 1\)"):
        ToyMaskProvider()(videos[0], recs[0].entities, dataclasses.replace(recs[0], masks=None))
    with pytest.raises(ValueError, match=r"uint8 \(T, 3, H, W\)"):
        ToyMaskProvider()(videos[0].float(), recs[0].entities, recs[0])
    with pytest.raises(ValueError, match="non-empty list"):
        ToyMaskProvider()(videos[0], [], recs[0])


def test_empty_entity_is_reported_not_raised():
    class Half(MaskProvider):
        name = "half"
        def masks(self, video, entities, record):
            m = torch.zeros(len(entities), *video.shape[:1], *video.shape[2:], dtype=torch.bool)
            m[0, :, :4, :4] = True
            return m
    res = Half()(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), ["fox", "unicorn", "dragon"])
    assert isinstance(res, MaskResult) and res.empty == ["unicorn", "dragon"]
    masks, empty = res
    assert masks.shape == (3, 3, 8, 8) and not masks[1:].any()
    with pytest.raises(ValueError, match="2 planes for 3 entities"):
        empty_entities(torch.zeros(2, 1, 1, 1), ["a", "b", "c"])


def test_provider_shape_contract():
    class Bad(MaskProvider):
        name = "bad"
        def masks(self, video, entities, record): return torch.zeros(1, 1, 1, 1)
    with pytest.raises(RuntimeError, match=r"bad provider returned masks \(1, 1, 1, 1\)"):
        Bad()(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ["a", "b"])


# ---------------------------------------------------------------- sam3
@pytest.fixture(scope="module")
def sam3_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sam3")
    return make_tiny_sam3_dir(d / "video", video=True), make_tiny_sam3_dir(d / "image", video=False)


def test_sam3_video_end_to_end(sam3_dirs, toy):
    recs, videos = toy
    p = build_mask_provider("sam3", sam3_dirs[0])
    assert p.kind == "sam3_video"
    res = p(videos[0][:3], recs[0].entities, recs[0])
    assert res.masks.shape == (len(recs[0].entities), 3, 64, 64) and res.masks.dtype == torch.bool
    assert res.empty == empty_entities(res.masks, recs[0].entities)
    # the same prompts again give the same masks (deterministic inference)
    assert torch.equal(p(videos[0][:3], recs[0].entities, recs[0]).masks, res.masks)


def test_sam3_image_end_to_end_and_nothing_found(sam3_dirs, toy):
    recs, videos = toy
    p = Sam3MaskProvider(sam3_dirs[1], threshold=0.0)
    assert p.kind == "sam3"
    res = p(videos[1][:2], recs[1].entities, recs[1])
    assert res.masks.shape == (len(recs[1].entities), 2, 64, 64)
    none = Sam3MaskProvider(sam3_dirs[1], threshold=1.01)(videos[1][:2], recs[1].entities, recs[1])
    assert not none.masks.any() and none.empty == recs[1].entities   # recorded, not raised


def test_sam3_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Sam3MaskProvider(tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Sam3MaskProvider(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="'bert' is not a SAM 3 model"):
        Sam3MaskProvider(tmp_path / "x")


# ---------------------------------------------------------------- sam2
def _has_sam2():
    try: _sam2_backend(); return True
    except ImportError: return False


@pytest.mark.skipif(not _has_sam2(), reason="neither transformers' Sam2VideoModel nor the sam2 package is importable "
                                            "(pip install -U transformers, or the sam2 package)")
def test_sam2_end_to_end_with_prompts(tmp_path, toy):
    recs, videos = toy
    rec = recs[2]
    p = build_mask_provider("sam2", make_tiny_sam2_dir(tmp_path / "sam2"))
    prompts = {rec.entities[0]: {"frame": 1, "box": [4, 4, 30, 30]},
               rec.entities[1]: {"frame": 0, "points": [[40, 40], [10, 50]], "labels": [1, 0]}}
    res = p(videos[2][:3], rec.entities[:2], dataclasses.replace(rec, prompts=prompts))
    assert res.masks.shape == (2, 3, 64, 64) and res.masks.dtype == torch.bool
    assert res.empty == empty_entities(res.masks, rec.entities[:2])
    with pytest.raises(ValueError, match=r"manifest line 3\); missing for"):
        p(videos[2][:3], rec.entities[:2], rec)
    with pytest.raises(ValueError, match="beyond the clip's 3 frames"):
        p(videos[2][:3], rec.entities[:1], dataclasses.replace(rec, prompts={rec.entities[0]: {"frame": 5, "box": [0, 0, 4, 4]}}))


def test_sam2_missing_backend_message(monkeypatch):
    import builtins
    real = builtins.__import__
    def fake(name, *a, **k):
        if name == "sam2" or (name == "transformers" and a and a[2] and "Sam2VideoModel" in a[2]):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match="pip install"):
        Sam2MaskProvider("/nowhere")


def test_build_mask_provider_errors():
    assert MASK_PROVIDERS == ("toy", "sam3", "sam2")
    assert isinstance(build_mask_provider("toy"), ToyMaskProvider)
    with pytest.raises(ValueError, match="needs `path`"):
        build_mask_provider("sam2")
    with pytest.raises(ValueError, match="must be one of"):
        build_mask_provider("sam4", "/x")


# ---------------------------------------------------------------- flow
def test_flow_to_grid_is_cell_mean():
    f = torch.randn(4, 2, 8, 12, generator=torch.Generator().manual_seed(0))
    g = flow_to_grid(f, 2, 4)
    assert g.shape == (2, 2, 3, 2)
    assert torch.allclose(g[1, 0, 2], f[2:4, :, 0:4, 8:12].mean((0, 2, 3)))
    assert torch.allclose(g.mean((0, 1, 2)), f.mean((0, 2, 3)), atol=1e-6)
    # same cells as the mask reduction: a mask-weighted constant flow reduces like the mask
    m = torch.rand(4, 8, 12) > 0.5
    assert torch.allclose(flow_to_grid(m[:, None].float().expand(4, 2, 8, 12) * 3, 2, 4)[..., 0], 3 * reduce_to_grid(m, 2, 4))


@pytest.mark.parametrize("shape,msg", [((3, 2, 8, 8), "T = 3 is not divisible by tubelet = 2"),
                                       ((4, 2, 6, 8), "H = 6 is not divisible by patch = 4"),
                                       ((4, 3, 8, 8), r"\(T, 2, H, W\)")])
def test_flow_to_grid_errors(shape, msg):
    with pytest.raises(ValueError, match=msg):
        flow_to_grid(torch.zeros(shape), 2, 4)


def test_toy_flow_provider(toy, tmp_path):
    recs, videos = toy
    fl = build_flow_provider("toy")(videos[3], recs[3])
    *_, want = render_toy_clip_with_flow(np.random.default_rng(np.random.SeedSequence(0).spawn(8)[3]), 17, 64)
    assert torch.equal(fl, want)
    grid = flow_to_grid(fl[:16], 2, 16)
    assert grid.shape == (8, 4, 4, 2) and grid.abs().sum() > 0
    man = make_toy_world(tmp_path / "w", n_clips=1, n_frames=5, size=16, seed=1)  # no flow files
    rec = read_manifest(man)[0]
    with pytest.raises(FileNotFoundError, match="has no flow file"):
        ToyFlowProvider()(load_video(rec.video), rec)
    with pytest.raises(ValueError, match="flow has shape"):
        ToyFlowProvider()(videos[3][:5], recs[3])


def test_raft_random_init_shapes(tmp_path):
    torch.manual_seed(0)
    raft = RaftFlowProvider("small", num_flow_updates=2)
    v = torch.randint(0, 256, (3, 3, 36, 44), dtype=torch.uint8)
    fl = raft(v)
    assert fl.shape == (3, 2, 36, 44) and fl.dtype == torch.float32 and torch.isfinite(fl).all()
    assert torch.equal(fl[-1], fl[-2])                                   # last frame repeats
    assert flow_to_grid(fl[:2, :, :32, :32], 2, 16).shape == (1, 2, 2, 2)
    # weights from a local file, through load_state_dict
    torch.save(raft.model.state_dict(), tmp_path / "raft.pth")
    again = build_flow_provider("raft_small", tmp_path / "raft.pth", num_flow_updates=2)
    assert torch.allclose(again(v), fl)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_flow_provider("raft_large", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="T >= 2"):
        raft(v[:1])
    with pytest.raises(ValueError, match="flow provider must be"):
        build_flow_provider("farneback")
