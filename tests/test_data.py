"""Integration tests of `sara.data`: manifest validation, video/mask I/O, the toy world, ClipDataset."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sara.data import (TOY_BACKGROUND, TOY_COLOURS, ClipDataset, check_masks, collate_clips, frame_indices,
                       load_masks, load_video, make_toy_world, read_mask_entities, read_manifest,
                       render_toy_clip, resize_video, sample_frames, save_masks, write_video)

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "data" / "toy" / "manifest.jsonl"


# ---------------------------------------------------------------- toy world
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


# ---------------------------------------------------------------- video I/O
def test_video_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    video = torch.zeros(6, 3, 32, 48, dtype=torch.uint8)
    video[:, 0] = 30; video[:, 1, 4:28, 4:44] = 180; video[3:, 2, 8:24, 8:24] = 220
    video += torch.randint(0, 3, video.shape, generator=g, dtype=torch.uint8)
    path = write_video(tmp_path / "clip.mp4", video, fps=8)
    back = load_video(path)
    assert back.shape == video.shape and back.dtype == torch.uint8
    err = (back.float() - video.float()).abs()
    assert err.mean() < 6, err.mean()  # lossy (4:2:0 chroma blurs colour edges), but close
    assert (back.float().mean((1, 2, 3)) - video.float().mean((1, 2, 3))).abs().max() < 2
    assert err[:, :, 10:22, 10:22].max() < 10


def test_write_video_refuses_overwrite(tmp_path):
    v = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    p = write_video(tmp_path / "v.mp4", v)
    before = p.read_bytes()
    with pytest.raises(FileExistsError, match=r"v\.mp4 already exists"):
        write_video(p, v + 100)
    assert p.read_bytes() == before
    write_video(p, v + 100, overwrite=True)
    assert load_video(p).float().mean() > 50
    assert sorted(q.name for q in tmp_path.iterdir()) == ["v.mp4"]  # no temporary files left


def test_video_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\(T, C, H, W\) = \(2, 3, 15, 16\).*even H, W"):
        write_video(tmp_path / "odd.mp4", torch.zeros(2, 3, 15, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        write_video(tmp_path / "f.mp4", torch.zeros(2, 3, 16, 16))
    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"junk\.mp4: cannot decode"):
        load_video(tmp_path / "junk.mp4")
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        load_video(tmp_path / "nope.mp4")


# ---------------------------------------------------------------- sampling / resizing
def test_sample_frames():
    v = torch.arange(17).view(17, 1, 1, 1).expand(17, 3, 4, 4)
    assert sample_frames(v, 5)[:, 0, 0, 0].tolist() == [0, 4, 8, 12, 16]
    assert frame_indices(17, 16) == sorted(set(frame_indices(17, 16)))
    with pytest.raises(ValueError, match=r"has 8 frames, fewer than the n_frames=17"):
        sample_frames(v[:8], 17)


def test_resize_keeps_aspect_and_mask_area():
    v = torch.zeros(2, 3, 60, 120, dtype=torch.uint8)
    v[..., :, 20:100] = 255  # a band wider than the centre crop
    r = resize_video(v, (30, 30))
    assert r.shape == (2, 3, 30, 30) and r.dtype == torch.uint8
    assert (r == 255).all()  # 60x120 -> 30x60 -> the centre crop 30x30 (columns 15..45) lies inside the band (10..50)
    assert resize_video(v, (30, 60)).float().mean() < 255  # without cropping the dark sides show
    m = torch.rand(2, 4, 64, 64) > 0.7
    rm = resize_video(m.float(), (32, 32), mode="area")
    assert torch.allclose(rm.mean((-2, -1)), m.float().mean((-2, -1)), atol=1e-6)


# ---------------------------------------------------------------- manifest errors
@pytest.fixture
def mdir(tmp_path):
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4", torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    return tmp_path


def _write(mdir, *objs):
    lines = [o if isinstance(o, str) else json.dumps(o) for o in objs]
    (mdir / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return mdir / "manifest.jsonl"


GOOD = {"video": "videos/a.mp4", "caption": "a red circle", "entities": ["red circle"]}


def test_manifest_ok(mdir):
    recs = read_manifest(_write(mdir, GOOD, "", {**GOOD, "id": "second"}))
    assert [(r.id, r.line) for r in recs] == [("a", 1), ("second", 3)]
    assert recs[0].video == (mdir / "videos" / "a.mp4").resolve() and recs[0].masks is None


def test_manifest_missing_video(mdir):
    with pytest.raises(FileNotFoundError, match=r"manifest\.jsonl line 2: field 'video': file not found: .*b\.mp4"):
        read_manifest(_write(mdir, GOOD, {**GOOD, "video": "videos/b.mp4", "id": "b"}))


def test_manifest_empty_entities(mdir):
    with pytest.raises(ValueError, match=r"manifest\.jsonl line 2: field 'entities' is empty \(a caption with no entities cannot be routed\)"):
        read_manifest(_write(mdir, GOOD, {**GOOD, "entities": [], "id": "b"}))


def test_manifest_missing_entities(mdir):
    obj = {k: v for k, v in GOOD.items() if k != "entities"}
    with pytest.raises(ValueError, match=r"manifest\.jsonl line 1: field 'entities' is missing"):
        read_manifest(_write(mdir, obj))


def test_manifest_bad_entity_and_caption(mdir):
    with pytest.raises(ValueError, match=r"line 1: field 'entities' item 1 must be a non-empty string"):
        read_manifest(_write(mdir, {**GOOD, "entities": ["x", ""]}))
    with pytest.raises(ValueError, match=r"line 1: field 'caption' must be a non-empty string"):
        read_manifest(_write(mdir, {**GOOD, "caption": ""}))


def test_manifest_bad_json(mdir):
    with pytest.raises(ValueError, match=r"manifest\.jsonl line 3: invalid JSON"):
        read_manifest(_write(mdir, GOOD, "", '{"video": "videos/a.mp4", caption'))


def test_manifest_duplicate_id(mdir):
    with pytest.raises(ValueError, match=r"line 2: field 'id': duplicate id 'a' \(first used on line 1\)"):
        read_manifest(_write(mdir, GOOD, GOOD))


def test_manifest_missing_masks_file(mdir):
    with pytest.raises(FileNotFoundError, match=r"line 1: field 'masks': file not found"):
        read_manifest(_write(mdir, {**GOOD, "masks": "m.safetensors"}))


def test_masks_shape_mismatch_names_file_and_shapes(mdir):
    save_masks(mdir / "m.safetensors", torch.zeros(1, 3, 16, 16, dtype=torch.bool), ["red circle"])
    ds = ClipDataset(_write(mdir, {**GOOD, "masks": "m.safetensors"}), n_frames=2, size=(16, 16))
    with pytest.raises(ValueError, match=r"m\.safetensors: masks have shape \(1, 3, 16, 16\).*video \(4, 3, 16, 16\).*needs \(1, 4, 16, 16\)"):
        ds[0]


def test_masks_entity_names_must_match(mdir):
    save_masks(mdir / "m.safetensors", torch.zeros(1, 4, 16, 16, dtype=torch.bool), ["blue square"])
    ds = ClipDataset(_write(mdir, {**GOOD, "masks": "m.safetensors"}), n_frames=2, size=(16, 16))
    with pytest.raises(ValueError, match=r"m\.safetensors: entities \['blue square'\] differ"):
        ds[0]


def test_save_masks_refuses_overwrite(tmp_path):
    p = save_masks(tmp_path / "m.safetensors", torch.zeros(1, 2, 4, 4, dtype=torch.bool), ["x"])
    with pytest.raises(FileExistsError, match="already exists"):
        save_masks(p, torch.ones(1, 2, 4, 4, dtype=torch.bool), ["x"])
    assert not load_masks(p).any()


# ---------------------------------------------------------------- the shipped toy set
def test_clip_dataset_on_shipped_toy():
    ds = ClipDataset(TOY, n_frames=17, size=(64, 64))
    assert len(ds) == 8 and [r.id for r in ds.records] == [f"toy_{i:03d}" for i in range(8)]
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        E = len(it["entities"])
        assert it["video"].shape == (17, 3, 64, 64) and it["video"].dtype == torch.float32
        assert it["video"].min() >= -1 and it["video"].max() <= 1 and it["video"].std() > 0.05
        assert it["masks"].shape == (E, 17, 64, 64) and it["masks"].dtype == torch.float32
        assert it["masks"].min() >= 0 and it["masks"].max() <= 1 and (it["masks"].amax((1, 2, 3)) == 1).all()
    batch = collate_clips(items)
    E_max = max(len(it["entities"]) for it in items)
    assert batch["video"].shape == (8, 17, 3, 64, 64)
    assert batch["masks"].shape == (8, E_max, 17, 64, 64)
    assert batch["entity_mask"].sum(1).tolist() == [len(it["entities"]) for it in items]
    assert not batch["masks"][~batch["entity_mask"]].any()  # padded entities are empty
    assert batch["has_masks"].all() and isinstance(batch["caption"], list)


def test_clip_dataset_resamples_masks_like_video():
    ds = ClipDataset(TOY, n_frames=9, size=(32, 32))
    it = ds[0]
    full = load_masks(ds.records[0].masks)[:, frame_indices(17, 9)].float()  # E, 9, 64, 64
    assert it["masks"].shape == (len(it["entities"]), 9, 32, 32)
    assert torch.allclose(it["masks"].mean((-2, -1)), full.mean((-2, -1)), atol=1e-6)  # area preserved


def test_shipped_toy_is_regenerable(tmp_path):
    """data/toy's manifest and masks are what make_toy_world(seed=0) produces."""
    man = make_toy_world(tmp_path / "toy", n_clips=8, n_frames=17, size=64, seed=0)
    assert man.read_text() == TOY.read_text()
    for a, b in zip(read_manifest(man), read_manifest(TOY)):
        assert hashlib.sha256(a.masks.read_bytes()).digest() == hashlib.sha256(b.masks.read_bytes()).digest()
