"""Integration tests of `sara.masks`: covered-area reduction, entity merging, token order, toy saliency."""
from pathlib import Path

import numpy as np
import pytest
import torch

from sara.data import ClipDataset, collate_clips, sample_frames
from sara.toy import render_toy_clip
from sara.masks import MERGE_RULES, merge_entities, reduce_to_grid, saliency_from_masks

TOY = Path(__file__).resolve().parents[1] / "data" / "toy" / "manifest.jsonl"


def _tiny():
    m = torch.zeros(2, 4, 4, dtype=torch.bool)  # T, H, W
    m[0, 0, 0] = True                           # cell (0, 0): 1/8
    m[:, 0:2, 2:4] = True                       # cell (0, 1): 8/8
    m[1, 2:4, 0:2] = True                       # cell (1, 0): 4/8
    m[0, 3, 3] = m[1, 3, 3] = m[1, 2, 2] = True  # cell (1, 1): 3/8
    return m


def test_reduce_hand_computed():
    g = reduce_to_grid(_tiny(), tubelet=2, patch=2)
    assert g.dtype == torch.float32 and g.shape == (1, 2, 2)
    assert torch.equal(g, torch.tensor([[[0.125, 1.0], [0.5, 0.375]]]))


def test_reduce_per_frame_and_batched():
    m = _tiny()
    g = reduce_to_grid(m, tubelet=1, patch=2)
    assert torch.equal(g, torch.tensor([[[0.25, 1.0], [0.0, 0.25]], [[0.0, 1.0], [1.0, 0.5]]]))
    b = torch.stack([m, ~m])[None]  # 1, 2, T, H, W
    gb = reduce_to_grid(b, 2, 2)
    assert gb.shape == (1, 2, 1, 2, 2) and torch.allclose(gb[0, 0] + gb[0, 1], torch.ones(1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64, torch.float16])
def test_reduce_dtypes_agree(dtype):
    m = _tiny()
    g = reduce_to_grid(m.to(dtype), 2, 2)
    assert g.dtype == (torch.float32 if dtype == torch.uint8 else dtype)
    assert torch.equal(g.float(), reduce_to_grid(m, 2, 2))


def test_reduce_soft_masks_is_mean():
    m = torch.rand(3, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    g = reduce_to_grid(m, 2, 4)
    assert g.shape == (3, 2, 2, 3)
    assert torch.allclose(g[1, 1, 0, 2], m[1, 2:4, 0:4, 8:12].mean())
    assert torch.allclose(g.mean((1, 2, 3)), m.mean((1, 2, 3)))


@pytest.mark.parametrize("shape,tubelet,patch,msg", [
    ((17, 64, 64), 2, 16, r"T = 17 is not divisible by tubelet = 2"),
    ((16, 60, 64), 2, 16, r"H = 60 is not divisible by patch = 16"),
    ((16, 64, 40), 2, 16, r"W = 40 is not divisible by patch = 16"),
])
def test_reduce_indivisible_names_dimension(shape, tubelet, patch, msg):
    with pytest.raises(ValueError, match=msg) as e:
        reduce_to_grid(torch.zeros(2, *shape), tubelet, patch)
    assert str((2, *shape)) in str(e.value)


def test_reduce_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reduce_to_grid(torch.full((2, 4, 4), 255, dtype=torch.uint8), 2, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., T, H, W\)"):
        reduce_to_grid(torch.zeros(4, 4), 1, 1)


def test_merge_rules_hand_examples():
    g = torch.tensor([[0.5, 0.0, 1.0, 0.2], [0.5, 0.3, 0.0, 0.9]])  # E=2, 4 tokens
    assert torch.allclose(merge_entities(g), torch.tensor([0.5, 0.3, 1.0, 0.9]))
    assert torch.allclose(merge_entities(g, "sum_clip"), torch.tensor([1.0, 0.3, 1.0, 1.0]))
    assert torch.allclose(merge_entities(g, "union"), torch.tensor([0.75, 0.3, 1.0, 0.92]))
    for how in MERGE_RULES:
        out = merge_entities(torch.rand(4, 2, 3, 3), how)
        assert out.shape == (2, 3, 3) and out.min() >= 0 and out.max() <= 1


def test_merge_padding_mask():
    real = torch.tensor([[0.2, 0.6], [0.4, 0.1]])       # 2 entities, 2 tokens
    junk = torch.ones(1, 2)                             # a padded entity slot with junk in it
    g = torch.stack([torch.cat([real, junk]), torch.cat([real[:1], junk, junk])])  # B=2, E=3, 2
    em = torch.tensor([[True, True, False], [True, False, False]])
    for how in MERGE_RULES:
        out = merge_entities(g, how, entity_mask=em)
        assert torch.allclose(out[0], merge_entities(real, how))
        assert torch.allclose(out[1], real[0])
    assert torch.equal(merge_entities(g, entity_mask=torch.zeros(2, 3, dtype=torch.bool)), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"entity_mask of shape \(2, 2\).*expected \(2, 3\)"):
        merge_entities(g, entity_mask=em[:, :2])


def test_merge_errors():
    with pytest.raises(ValueError, match="zero entities"):
        merge_entities(torch.zeros(0, 2, 2, 2))
    with pytest.raises(ValueError, match="zero entities"):
        merge_entities(torch.zeros(3, 0, 2, 2, 2))
    with pytest.raises(ValueError, match="how must be one of"):
        merge_entities(torch.zeros(1, 2), how="mean")


def test_flatten_order_is_t_h_w():
    masks = torch.rand(2, 6, 8, 12) > 0.5           # E, T, H, W -> grid 3 x 4 x 6 with tubelet 2, patch 2
    grid = merge_entities(reduce_to_grid(masks, 2, 2))  # T', H', W'
    s = saliency_from_masks(masks, 2, 2)
    assert s.shape == (72,) and torch.equal(s, grid.reshape(-1))
    t, h, w = 2, 1, 4
    assert s[(t * 4 + h) * 6 + w] == grid[t, h, w]
    one = torch.zeros(1, 6, 8, 12); one[0, 2 * t:2 * t + 2, 2 * h:2 * h + 2, 2 * w:2 * w + 2] = 1
    assert saliency_from_masks(one, 2, 2).nonzero().flatten().tolist() == [(t * 4 + h) * 6 + w]


def test_saliency_batched_matches_single():
    mb = torch.rand(3, 2, 4, 8, 8) > 0.6
    em = torch.tensor([[True, False], [True, True], [True, True]])
    sb = saliency_from_masks(mb, 2, 4, "union", entity_mask=em)
    assert sb.shape == (3, 2 * 2 * 2)
    assert torch.equal(sb[0], saliency_from_masks(mb[0, :1], 2, 4, "union"))
    assert torch.equal(sb[2], saliency_from_masks(mb[2], 2, 4, "union"))


@pytest.mark.parametrize("seed", range(8))
def test_toy_saliency_matches_pixel_coverage(seed):
    _, masks, _, _ = render_toy_clip(np.random.default_rng(seed), 17, 64)
    masks = sample_frames(masks, 16, dim=1)         # tubelet 2 needs an even T
    fg = masks.any(0).float().mean()
    s_sum = saliency_from_masks(masks, 2, 16, "sum_clip")
    s_max = saliency_from_masks(masks, 2, 16, "max")
    assert s_sum.shape == s_max.shape == (8 * 4 * 4,)
    assert s_max.min() >= 0 and s_sum.max() <= 1
    assert torch.allclose(s_sum.mean(), fg, atol=1e-6)  # toy masks are disjoint: sum = union coverage
    assert s_max.mean() <= fg + 1e-6
    assert (s_max > 0).float().mean() >= fg            # a token is salient wherever some pixel of it is covered


def test_saliency_on_shipped_toy_batch():
    ds = ClipDataset(TOY, n_frames=16, size=(64, 64))
    batch = collate_clips([ds[i] for i in range(4)])
    s = saliency_from_masks(batch["masks"], 2, 16, entity_mask=batch["entity_mask"])
    assert s.shape == (4, 8 * 4 * 4) and s.min() >= 0 and s.max() <= 1
    fg = batch["masks"].amax(1).mean((1, 2, 3))  # toy masks are disjoint, so max over entities = union
    s_sum = saliency_from_masks(batch["masks"], 2, 16, "sum_clip", entity_mask=batch["entity_mask"])
    assert torch.allclose(s_sum.mean(1), fg, atol=1e-5)
    assert (s.mean(1) > 0.02).all()
