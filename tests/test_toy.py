"""Tests of `sara.toy`: the demo renderer (exact masks and flow, the shipped data/toy), the scaled-up world, the analyser."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sara.data import check_masks, find_flow, flow_path, load_flow, load_masks, load_video, read_mask_entities, read_manifest
from sara.toy import (TOY_BACKGROUND, TOY_COLOURS, make_toy_world, render_toy_clip, render_toy_clip_with_flow,
                      write_toy_flow)

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "data" / "toy" / "manifest.jsonl"


# ---------------------------------------------------------------- the demo world (data/toy)
@pytest.mark.parametrize("seed", range(10))


def test_toy_masks_match_rendered_pixels(seed):
    frames, masks, caption, entities = render_toy_clip(np.random.default_rng(seed), 17, 64)
    assert frames.dtype == torch.uint8 and frames.shape == (17, 3, 64, 64)
    assert masks.dtype == torch.bool and masks.shape == (len(entities), 17, 64, 64)
    assert 2 <= len(entities) <= 3 and len(set(entities)) == len(entities)
    for k, name in enumerate(entities):
        colour = torch.tensor(TOY_COLOURS[name.split()[0]], dtype=torch.uint8).view(1, 3, 1, 1)
        painted = (frames == colour).all(1)
        assert torch.equal(painted, masks[k]), f"mask of {name} differs from its painted pixels"
        assert masks[k].any(), f"{name} is never visible"
        assert name in caption
    background = (frames == torch.tensor(TOY_BACKGROUND, dtype=torch.uint8).view(1, 3, 1, 1)).all(1)
    assert torch.equal(background, ~masks.any(0))
    assert masks.sum(0).max() <= 1  # visible masks never overlap
    assert ("bounces off" in caption) != ("drift apart" in caption)


def test_toy_world_reproducible(tmp_path):
    kw = dict(n_clips=3, n_frames=9, size=32)
    a = make_toy_world(tmp_path / "a", seed=3, **kw)
    b = make_toy_world(tmp_path / "b", seed=3, **kw)
    c = make_toy_world(tmp_path / "c", seed=4, **kw)
    assert a.read_text() == b.read_text()
    ra, rb, rc = read_manifest(a), read_manifest(b), read_manifest(c)
    assert [r.id for r in ra] == ["toy_000", "toy_001", "toy_002"]
    for x, y in zip(ra, rb):
        assert torch.equal(load_masks(x.masks), load_masks(y.masks))
        assert read_mask_entities(x.masks) == x.entities
    differs = a.read_text() != c.read_text() or any(
        load_masks(x.masks).shape != load_masks(z.masks).shape or not torch.equal(load_masks(x.masks), load_masks(z.masks))
        for x, z in zip(ra, rc))
    assert differs
    with pytest.raises(FileExistsError, match="already exists"):
        make_toy_world(tmp_path / "a", seed=3, **kw)


def test_toy_world_video_matches_masks(tmp_path):
    man = make_toy_world(tmp_path / "w", n_clips=2, n_frames=9, size=32, seed=1)
    for rec in read_manifest(man):
        video, masks = load_video(rec.video), load_masks(rec.masks)
        check_masks(masks, video, rec.entities, rec.masks)
        # away from edges (chroma is subsampled 2x2), decoded pixels are close to the entity colour
        for k, name in enumerate(rec.entities):
            inner = masks[k].clone()
            inner[:, 1:-1, 1:-1] &= masks[k][:, :-2, 1:-1] & masks[k][:, 2:, 1:-1] & masks[k][:, 1:-1, :-2] & masks[k][:, 1:-1, 2:]
            inner[:, [0, -1]] = False; inner[:, :, [0, -1]] = False
            if inner.sum() < 4: continue
            got = video.permute(0, 2, 3, 1)[inner].float().mean(0)
            assert (got - torch.tensor(TOY_COLOURS[name.split()[0]]).float()).abs().max() < 20


def test_shipped_toy_is_regenerable(tmp_path):
    """data/toy's manifest and masks are what make_toy_world(seed=0) produces."""
    man = make_toy_world(tmp_path / "toy", n_clips=8, n_frames=17, size=64, seed=0)
    assert man.read_text() == TOY.read_text()
    for a, b in zip(read_manifest(man), read_manifest(TOY)):
        assert hashlib.sha256(a.masks.read_bytes()).digest() == hashlib.sha256(b.masks.read_bytes()).digest()


@pytest.mark.parametrize("seed", range(6))


def test_toy_flow_same_clip_and_warps_masks(seed):
    a = render_toy_clip(np.random.default_rng(seed), 17, 64)
    frames, masks, caption, entities, flow = render_toy_clip_with_flow(np.random.default_rng(seed), 17, 64)
    assert torch.equal(a[0], frames) and torch.equal(a[1], masks) and a[2:] == (caption, entities)
    assert flow.shape == (17, 2, 64, 64) and flow.dtype == torch.float32
    assert (flow.abs().sum(1)[~masks.any(0)] == 0).all()
    T, H, W = 17, 64, 64
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    agree = total = 0
    for t in range(T - 1):
        for k in range(len(entities)):
            m = masks[k, t].clone()
            m[1:-1, 1:-1] &= masks[k, t][:-2, 1:-1] & masks[k, t][2:, 1:-1] & masks[k, t][1:-1, :-2] & masks[k, t][1:-1, 2:]
            m[[0, -1]] = False; m[:, [0, -1]] = False                   # interior pixels only
            if not m.any(): continue
            ty = (yy[m] + flow[t, 1][m]).round().long(); tx = (xx[m] + flow[t, 0][m]).round().long()
            inside = (ty >= 0) & (ty < H) & (tx >= 0) & (tx < W)
            ty, tx = ty[inside], tx[inside]
            others = masks[:, t + 1, ty, tx].clone(); others[k] = False
            free = ~others.any(0)                                       # not occluded at t+1
            agree += int(masks[k, t + 1, ty, tx][free].sum()); total += int(free.sum())
    assert total > 500 and agree / total > 0.97, (agree, total)


def test_toy_flow_last_frame_and_rigid():
    frames, masks, _, ents, flow = render_toy_clip_with_flow(np.random.default_rng(2), 9, (32, 48))
    for k in range(len(ents)):
        for t in range(9):
            v = flow[t][:, masks[k, t]]
            if v.shape[1]: assert torch.allclose(v, v[:, :1].expand_as(v))   # one velocity per shape
        if masks[k, -1].any() and masks[k, -2].any():
            assert torch.equal(flow[-1][:, masks[k, -1]][:, 0], flow[-2][:, masks[k, -2]][:, 0])


def test_shipped_toy_flow_matches_renderer():
    recs = read_manifest(TOY)
    for i, (rec, child) in enumerate(zip(recs, np.random.SeedSequence(0).spawn(8))):
        assert find_flow(rec) == flow_path(REPO / "data" / "toy", rec.id).resolve()
        *_, flow = render_toy_clip_with_flow(np.random.default_rng(child), 17, 64)
        assert torch.equal(load_flow(find_flow(rec)), flow)


def test_write_toy_flow_leaves_world_untouched(tmp_path):
    man = make_toy_world(tmp_path / "w", n_clips=2, n_frames=5, size=16, seed=5)
    before = {p: p.read_bytes() for p in (tmp_path / "w").rglob("*") if p.is_file()}
    write_toy_flow(tmp_path / "w", n_clips=2, n_frames=5, size=16, seed=5)
    assert all(p.read_bytes() == b for p, b in before.items())
    assert [find_flow(r).name for r in read_manifest(man)] == ["toy_000.safetensors", "toy_001.safetensors"]

