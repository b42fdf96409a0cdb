"""Tests of `sara.toy`: the demo renderer (exact masks and flow, the shipped data/toy), the scaled-up world, the analyser."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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



# ---------------------------------------------------------------- the study world
from sara.data import ClipDataset
from sara.toy import (TOY_CORRUPTIONS, TOY_HELD_OUT, TOY_SPEED, corrupt_toy_clip, frechet_distance, make_toy_dataset,
                      render_toy_scene, score_toy_batch, score_toy_clip, simulate_toy_scene, toy_batch, toy_combos,
                      toy_prompts, toy_scenes, toy_split)

METRICS = ["prompt_fidelity", "permanence", "shape_constancy", "motion_plausibility", "event"]


def test_default_held_out_split_is_fixed():
    """The documented held-out combinations; changing them silently would change every study table."""
    assert list(TOY_HELD_OUT) == [("blue", "circle"), ("yellow", "square"), ("purple", "triangle"), ("white", "triangle")]
    train, held = toy_split()
    assert sorted(train + held) == sorted(toy_combos()) and not set(train) & set(held)


def test_toy_batch_same_seed_same_clips():
    a = toy_batch(4, seed=5, n_frames=9, size=64, masks=True, flow=True)
    b = toy_batch(4, seed=5, n_frames=9, size=64, masks=True, flow=True)
    assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["flow"], b["flow"]) and a["scenes"] == b["scenes"]
    assert all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"]))
    c = toy_batch(4, seed=6, n_frames=9, size=64)
    assert not torch.equal(a["frames"], c["frames"])


@pytest.mark.parametrize("seed", range(4))
def test_study_world_masks_flow_and_physics(seed):
    b = toy_batch(3, seed=seed, n_frames=21, size=128, masks=True, flow=True)
    assert b["frames"].shape == (3, 21, 3, 128, 128) and b["frames"].dtype == torch.uint8
    for fr, mk, fl, sc in zip(b["frames"], b["masks"], b["flow"], b["scenes"]):
        assert 2 <= len(sc["entities"]) <= 4 and all(n in sc["caption"] for n in sc["names"])
        for k, e in enumerate(sc["entities"]):
            painted = (fr == torch.tensor(TOY_COLOURS[e["colour"]], dtype=torch.uint8).view(1, 3, 1, 1)).all(1)
            assert torch.equal(painted, mk[k])
            pos = np.array(e["pos"])
            step = np.concatenate([np.diff(pos, axis=0), np.diff(pos, axis=0)[-1:]])   # T, 2
            for t in range(21):
                if mk[k, t].any():
                    assert torch.allclose(fl[t][:, mk[k, t]], torch.tensor(step[t], dtype=torch.float32)[:, None], atol=1e-4)
        background = (fr == torch.tensor(TOY_BACKGROUND, dtype=torch.uint8).view(1, 3, 1, 1)).all(1)
        assert torch.equal(background, ~mk.any(0)) and (fl.abs().sum(1)[background] == 0).all()
        vel = np.array([e["vel"] for e in sc["entities"]])                            # E, T, 2
        energy = (vel ** 2).sum((0, 2))
        assert np.allclose(energy, energy[0], rtol=1e-3)                              # elastic: kinetic energy conserved


def test_splits_keep_held_out_combinations_apart():
    held = {f"{c} {s}" for c, s in TOY_HELD_OUT}
    assert not any(set(s["names"]) & held for s in toy_scenes(50, seed=0, split="train"))
    prompts = toy_prompts(20, seed=0)
    assert all(set(p["held_out"]) & held and set(p["held_out"]) <= set(p["entities"]) for p in prompts)
    assert [p["caption"] for p in prompts] == [s["caption"] for s in toy_batch(20, seed=0, split="held_out", n_frames=17)["scenes"]]


def test_toy_dataset_feeds_clip_dataset(tmp_path):
    man = make_toy_dataset(tmp_path / "w", n_clips=3, seed=1, n_frames=17, size=128)
    ds = ClipDataset(man, n_frames=17, size=(128, 128))
    it = ds[0]
    assert it["video"].shape == (17, 3, 128, 128) and it["masks"].shape == (len(it["entities"]), 17, 128, 128)
    assert all(find_flow(r) is not None for r in ds.records)
    with pytest.raises(FileExistsError, match="already exists"):
        make_toy_dataset(tmp_path / "w", n_clips=3, seed=1)


# ---------------------------------------------------------------- the analyser
@pytest.fixture(scope="module")
def clips():
    return toy_batch(24, seed=11, n_frames=17, size=128, masks=True)


@pytest.fixture(scope="module")
def real_scores(clips):
    return score_toy_batch(clips["frames"], clips["scenes"])


def test_real_clips_are_the_ceiling(real_scores):
    for r in real_scores:
        assert all(0.0 <= v <= 1.0 for v in r.values())
        assert min(r[m] for m in METRICS[:4]) >= 0.9, r
    means = {m: np.mean([r[m] for r in real_scores]) for m in METRICS}
    assert min(means.values()) >= 0.95, means


def test_decoded_video_scores_near_ceiling(tmp_path):
    """A lossy mp4 round trip (blurred chroma, codec noise) still scores as real."""
    man = make_toy_dataset(tmp_path / "w", n_clips=4, seed=2, n_frames=17, size=128, with_flow=False)
    for rec in read_manifest(man):
        s = score_toy_clip(load_video(rec.video), rec.entities, rec.caption)
        assert min(s[m] for m in METRICS[:4]) >= 0.9, (rec.caption, s)


def test_imperfect_video_still_scores(clips, real_scores):
    """Blur, noise and a colour cast, as in a generated video: the analyser matches colours softly."""
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        x = clips["frames"][i].float()
        x = F.avg_pool2d(x, 3, 1, 1)                                                  # blurred edges
        x = (x + 8 * torch.randn(x.shape, generator=g) + torch.tensor([10.0, -10.0, 5.0]).view(1, 3, 1, 1)).clamp(0, 255)
        s = score_toy_clip(x.round().to(torch.uint8), clips["scenes"][i]["entities"], clips["scenes"][i]["caption"])
        assert min(s[m] for m in METRICS[:4]) >= 0.8, s


@pytest.mark.parametrize("kind", ["noise", "blank"])
def test_noise_and_blank_are_the_floor(clips, kind):
    x = (torch.from_numpy(np.random.default_rng(0).integers(0, 256, (17, 3, 128, 128), dtype=np.uint8)) if kind == "noise"
         else torch.full((17, 3, 128, 128), 16, dtype=torch.uint8))
    for sc in clips["scenes"][:3]:
        s = score_toy_clip(x, sc["entities"], sc["caption"])
        assert max(s[m] for m in METRICS) <= 0.1, s


@pytest.mark.parametrize("kind", list(TOY_CORRUPTIONS))
def test_each_corruption_lowers_its_metric(clips, real_scores, kind):
    metric = TOY_CORRUPTIONS[kind]
    drops = []
    for i in range(8):
        sc = clips["scenes"][i]
        bad = score_toy_clip(corrupt_toy_clip(clips["frames"][i], clips["masks"][i], sc["entities"], kind, seed=i),
                             sc["entities"], sc["caption"])
        drop = real_scores[i][metric] - bad[metric]
        assert drop >= 0.25 / len(sc["entities"]), (kind, sc["caption"], real_scores[i][metric], bad[metric])
        drops.append(drop)
    assert np.mean(drops) >= {"shuffle": 0.5, "swap_colour": 0.3, "erase_some": 0.1, "erase_all": 0.2}[kind], drops


def test_shuffling_breaks_claimed_collisions(clips, real_scores):
    idx = [i for i, s in enumerate(clips["scenes"]) if any(e["type"] == "collide" for e in s["events"])]
    assert len(idx) >= 6
    shuffled = [score_toy_clip(corrupt_toy_clip(clips["frames"][i], clips["masks"][i], clips["scenes"][i]["entities"],
                                                "shuffle", seed=i), clips["scenes"][i]["entities"], clips["scenes"][i]["caption"])
                for i in idx]
    real = np.mean([real_scores[i]["event"] for i in idx]); shuf = np.mean([s["event"] for s in shuffled])
    assert real >= 0.9 and real - shuf >= 0.3, (real, shuf)


def test_erasing_everywhere_also_breaks_permanence(clips, real_scores):
    sc = clips["scenes"][0]
    bad = score_toy_clip(corrupt_toy_clip(clips["frames"][0], clips["masks"][0], sc["entities"], "erase_all"), sc["entities"], sc["caption"])
    assert real_scores[0]["permanence"] - bad["permanence"] >= 0.9 / len(sc["entities"])


def test_analyser_bad_input_is_clear(clips):
    fr, sc = clips["frames"][0], clips["scenes"][0]
    with pytest.raises(ValueError, match="must be uint8"):
        score_toy_clip(fr.float(), sc["entities"], sc["caption"])
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        score_toy_clip(fr[:, :2], sc["entities"], sc["caption"])
    with pytest.raises(TypeError, match="uint8 tensor"):
        score_toy_clip(fr.tolist(), sc["entities"], sc["caption"])
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        score_toy_clip(fr, ["pink circle", "red square"], "a pink circle and a red square move without touching")
    with pytest.raises(ValueError, match="unknown shape 'star'"):
        score_toy_clip(fr, ["red star"], "a red star")
    with pytest.raises(ValueError, match="not among the entities"):
        score_toy_clip(fr, ["red circle"], "a red circle collides with a blue square")
    with pytest.raises(ValueError, match="kind must be one of"):
        corrupt_toy_clip(fr, clips["masks"][0], sc["entities"], "melt")


# ---------------------------------------------------------------- Frechet distance
def test_frechet_distance_closed_forms():
    g = np.random.default_rng(1)
    a, b = g.normal(2.0, 1.5, (300, 1)), g.normal(0.0, 0.5, (200, 1))
    want = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2       # 1-D Gaussians
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    s_a, s_b = np.array([1.0, 2.0, 0.5]), np.array([0.5, 2.0, 3.0])               # diagonal: exact orthogonal design
    design = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    a, b = design * s_a, design * s_b + [1.0, -1.0, 0.0]
    want = 2.0 + ((s_a - s_b) ** 2).sum() * 8 / 7                                  # sample std of +-s over 8 rows: s sqrt(8/7)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(torch.tensor(a, dtype=torch.float32), torch.tensor(a)) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(a, b[:, :2])


def test_caption_tells_exactly_the_told_events():
    from sara.toy import parse_toy_caption
    for s in toy_scenes(60, seed=4, n_frames=17, size=128, split="all"):
        told = {(e["type"], *e["entities"]) for e in s["events"] if e.get("told")}
        first = {}                                                                  # the caption names each pair once
        for e in s["events"]:
            if e.get("told"): first.setdefault(frozenset(e["entities"]), (e["type"], *e["entities"]))
        assert set(parse_toy_caption(s["caption"], s["names"])) == set(first.values()) and set(first.values()) <= told
        for e in s["events"]:
            if e["type"] == "collide":
                assert e["told"] == (1 <= e["time"] <= 15 and e["impulse"] >= TOY_SPEED[0] * 128)
