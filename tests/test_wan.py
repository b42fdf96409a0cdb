"Integration tests of sara.wan: building, latents, feature tap (with gradient checkpointing), resampling, flow matching."
import json

import pytest
import torch
from sara.grids import GridMap, align_dit
import torch.utils.checkpoint as cp
from diffusers import UniPCMultistepScheduler

from sara.wan import (FeatureTap, Projector, WanParts, build_wan, dit_forward, dit_grid, encode_video,
                      flow_matching_loss, flow_matching_pair, latent_stats, sample_sigmas,
                      tiny_wan_configs, training_sigmas)


@pytest.fixture(scope="module")
def wan():
    return build_wan("tiny")


@pytest.fixture(scope="module")
def video(video1):
    return video1


@pytest.fixture(scope="module")
def latents(wan, video):
    return encode_video(wan.vae, video)


def test_tiny_configs_and_build(wan):
    cfg = tiny_wan_configs()
    assert cfg["transformer"]["in_channels"] == cfg["vae"]["z_dim"] == wan.transformer.config.out_channels
    assert wan.transformer.config.text_dim == 384 and tuple(wan.transformer.config.patch_size) == (1, 2, 2)
    assert wan.scheduler.config.shift == 3.0
    assert isinstance(wan, WanParts) and wan.transformer_2 is None
    assert not wan.vae.training and not any(p.requires_grad for p in wan.vae.parameters())
    again = build_wan("tiny")
    for a, b in zip(wan.transformer.state_dict().values(), again.transformer.state_dict().values()):
        assert torch.equal(a, b)
    other = build_wan("tiny", seed=1)
    assert not torch.equal(other.transformer.patch_embedding.weight, wan.transformer.patch_embedding.weight)


def test_chain_shapes(wan, video, latents):
    assert latents.shape == (1, 8, 5, 8, 8)
    grid = dit_grid(wan.transformer, latents.shape)
    assert grid == (5, 4, 4)
    sigma, ts = sample_sigmas(wan.scheduler, 1, torch.Generator().manual_seed(0))
    x_t, target = flow_matching_pair(latents, torch.randn_like(latents), sigma)
    with FeatureTap(wan.transformer, 2) as tap:
        pred = dit_forward(wan.transformer, x_t, ts, torch.randn(1, 32, 384))
    assert pred.shape == latents.shape
    feats = tap.features
    assert feats.shape == (1, 80, 32)
    p = align_dit(Projector(32, 64)(feats), GridMap(17, grid, (8, 8, 8)))   # tiny V-JEPA 2 grid of frames 1..16
    assert p.shape == (1, 8 * 4 * 4, 64)
    assert flow_matching_loss(pred, target).ndim == 0


def test_latent_normalisation_convention(wan, video, latents):
    "Wan pipelines: (z - latents_mean) * (1 / latents_std), posterior mode."
    with torch.no_grad():
        raw = wan.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode()
    mean = torch.tensor(wan.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(wan.vae.config.latents_std).view(1, -1, 1, 1, 1)
    assert not torch.allclose(mean, torch.zeros_like(mean)) and not torch.allclose(std, torch.ones_like(std))
    torch.testing.assert_close(latents, (raw - mean) / std)
    m, inv = latent_stats(wan.vae, latents)
    torch.testing.assert_close(latents / inv + m, raw)             # the pipelines' decode-side inverse
    assert torch.equal(encode_video(wan.vae, video), latents)       # mode: deterministic
    s1 = encode_video(wan.vae, video, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = encode_video(wan.vae, video, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.equal(s1, latents)
    assert not latents.requires_grad


def test_encode_video_errors(wan, video):
    with pytest.raises(ValueError, match="T=16"):
        encode_video(wan.vae, video[:, :16])
    with pytest.raises(ValueError, match="H=60"):
        encode_video(wan.vae, video[:, :, :, :60])
    with pytest.raises(ValueError, match="C=1"):
        encode_video(wan.vae, video[:, :, :1])


def _tap_grads(latents, k, ckpt, early_stop=True):
    m = build_wan("tiny").transformer
    if ckpt:
        m.enable_gradient_checkpointing()
    fired = []
    h = m.blocks[k].register_forward_hook(lambda *a: fired.append(1))
    with FeatureTap(m, k) as tap:
        with cp.set_checkpoint_early_stop(early_stop):  # read by checkpoint at forward time
            dit_forward(m, latents, torch.tensor([700.0]),
                        torch.randn(1, 16, 384, generator=torch.Generator().manual_seed(0)))
        feats = tap.features
        assert feats.requires_grad and feats.grad_fn is not None
        (feats.square().mean() + feats[..., 0].mean()).backward()
        assert tap.features is feats                 # a recompute during backward did not replace it
    h.remove()
    return [[None if p.grad is None else p.grad.clone() for p in b.parameters()] for b in m.blocks], len(fired)


@pytest.mark.parametrize("k", [0, 1])
def test_tap_gradients_identical_under_checkpointing(latents, k):
    ref, n_ref = _tap_grads(latents, k, ckpt=False)
    for early_stop in (True, False):
        got, n_fired = _tap_grads(latents, k, ckpt=True, early_stop=early_stop)
        if not early_stop:
            assert n_fired == 2 and n_ref == 1      # the hook really fired again in the recompute
        for b_ref, b_got in zip(ref, got):
            for a, b in zip(b_ref, b_got):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for i, block in enumerate(ref):
        if i <= k:
            assert all(g is not None for g in block) and sum(g.abs().sum() for g in block) > 0
        else:
            assert all(g is None for g in block)


def test_tap_rejects_reentrant_checkpointing(latents):
    m = build_wan("tiny").transformer
    m.enable_gradient_checkpointing(lambda mod, *a: cp.checkpoint(mod.__call__, *a, use_reentrant=True))
    with FeatureTap(m, 1) as tap:
        dit_forward(m, latents, torch.tensor([700.0]), torch.randn(1, 16, 384))
        with pytest.raises(RuntimeError, match="reentrant"):
            tap.features


def test_tap_errors_and_removal(wan, latents):
    n = len(wan.transformer.blocks)
    with pytest.raises(IndexError, match=f"block={n}.*{n} blocks"):
        FeatureTap(wan.transformer, n)
    with pytest.raises(IndexError, match="block=-1"):
        FeatureTap(wan.transformer, -1)
    with pytest.raises(TypeError):
        FeatureTap(wan.transformer, 1.0)
    tap = FeatureTap(wan.transformer, 0)
    with pytest.raises(RuntimeError, match="no features"):
        tap.features
    assert len(wan.transformer.blocks[0]._forward_hooks) == 1 and len(wan.transformer._forward_pre_hooks) == 1
    with torch.no_grad():
        dit_forward(wan.transformer, latents, torch.tensor([10.0]), torch.randn(1, 4, 384))
    first = tap.features
    with torch.no_grad():
        dit_forward(wan.transformer, latents, torch.tensor([900.0]), torch.randn(1, 4, 384))
    assert tap.features is not first                     # each forward refreshes the capture
    tap.remove(); tap.remove()
    assert len(wan.transformer.blocks[0]._forward_hooks) == 0 and len(wan.transformer._forward_pre_hooks) == 0


def test_dit_grid_errors(wan):
    assert dit_grid(wan.transformer, (21, 30, 52)) == (21, 15, 26)   # DESIGN.md's 480p numbers
    with pytest.raises(ValueError, match="W_lat=7"):
        dit_grid(wan.transformer, (1, 8, 5, 8, 7))


def test_projector():
    p = Projector(32, 1024)
    assert p.hidden_dim == 1024 and p(torch.randn(2, 7, 32)).shape == (2, 7, 1024)
    kinds = [type(m).__name__ for m in p.net]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert Projector(32, 8, hidden_dim=16).net[2].in_features == 16


def test_flow_matching_formulas():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 3, 3, generator=g), torch.randn(3, 4, 2, 3, 3, generator=g)
    sigma = torch.tensor([0.0, 1.0, 0.25])
    x_t, target = flow_matching_pair(x0, noise, sigma)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], noise[1])
    torch.testing.assert_close(x_t[2], 0.75 * x0[2] + 0.25 * noise[2])
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(flow_matching_loss(x0, noise), ((x0 - noise) ** 2).mean())
    assert flow_matching_loss(x0.half(), noise.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="B=3"):
        flow_matching_pair(x0, noise, sigma[:2])
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(x0, noise[:2])


def test_sample_sigmas(wan):
    table, ts_table = training_sigmas(wan.scheduler)
    assert table.shape == (1000,)
    u = torch.arange(1000, 0, -1.0) / 1000
    torch.testing.assert_close(table, 3 * u / (1 + 2 * u))            # shift 3
    torch.testing.assert_close(ts_table, table * 1000)
    s1, t1 = sample_sigmas(wan.scheduler, 64, torch.Generator().manual_seed(3))
    s2, t2 = sample_sigmas(wan.scheduler, 64, torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and torch.equal(t1, t2) and s1.shape == (64,)
    assert torch.isin(s1, table).all() and s1.unique().numel() > 30
    wan.scheduler.set_timesteps(4)                                   # sampling setup does not leak into training
    torch.testing.assert_close(training_sigmas(wan.scheduler)[0], table)
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        sample_sigmas(UniPCMultistepScheduler(), 2)


def test_dit_forward_errors(wan, latents):
    with pytest.raises(ValueError, match="prompt_embeds"):
        dit_forward(wan.transformer, latents, torch.tensor([1.0]), torch.randn(2, 4, 384))
    with pytest.raises(ValueError, match="timesteps"):
        dit_forward(wan.transformer, latents, torch.tensor([1.0, 2.0]), torch.randn(1, 4, 384))


def test_build_from_directory(tmp_path, wan, latents):
    root = tmp_path / "Wan2.2-tiny"
    wan.transformer.save_pretrained(root / "transformer")
    wan.vae.save_pretrained(root / "vae")
    UniPCMultistepScheduler(flow_shift=5.0, use_flow_sigmas=True,
                            prediction_type="flow_prediction").save_pretrained(root / "scheduler")
    parts = build_wan(str(root))
    assert parts.scheduler.config.shift == 5.0 and parts.transformer_2 is None
    assert build_wan(str(root), shift=1.5).scheduler.config.shift == 1.5
    assert not any(p.requires_grad for p in parts.vae.parameters())
    torch.testing.assert_close(encode_video(parts.vae, torch.zeros(1, 5, 3, 16, 16)),
                               encode_video(wan.vae, torch.zeros(1, 5, 3, 16, 16)))
    # A14B layout: a second expert and its boundary
    wan.transformer.save_pretrained(root / "transformer_2")
    (root / "model_index.json").write_text(json.dumps({"boundary_ratio": 0.875}))
    a14b = build_wan(str(root))
    assert a14b.transformer_2 is not None and a14b.boundary_ratio == 0.875
    with pytest.raises(FileNotFoundError, match="vae"):
        (tmp_path / "broken" / "transformer").mkdir(parents=True)
        build_wan(str(tmp_path / "broken"))
    with pytest.raises(FileNotFoundError, match="missing"):
        build_wan(str(tmp_path / "missing"))
