"Integration tests of sara.vfm: geometry, frozen V-JEPA 2 encoder, token order, building."
import pytest
import torch
from transformers import VJEPA2Model

from sara.vfm import FrozenVFM, VFMGeometry, build_vfm, tiny_vjepa2_config


@pytest.fixture(scope="module")
def vfm():
    return build_vfm("tiny")


@pytest.fixture(scope="module")
def video(video2):
    return video2


def test_geometry_grid_and_errors():
    g = VFMGeometry(tubelet=2, patch=16, frames_per_clip=64, crop_size=256)
    assert g.grid(64, 256, 256) == (32, 16, 16)
    assert g.n_tokens(64, 256, 256) == 8192          # DESIGN.md: 32 x 16 x 16
    assert g.grid(81, 480, 832) == (40, 30, 52)       # trailing frame dropped
    assert g.usable_frames(81) == 80
    with pytest.raises(ValueError, match="T=81"):
        g.grid(81, 256, 256, trim_frames=False)
    with pytest.raises(ValueError, match="H=250"):
        g.grid(16, 250, 256)
    with pytest.raises(ValueError, match="W=100"):
        g.grid(16, 256, 100)
    with pytest.raises(ValueError, match="T=1"):
        g.grid(1, 256, 256)


def test_output_shape_and_geometry(vfm, video):
    y = vfm(video)
    assert y.shape == (2, 8, 8, 8, vfm.dim) == (2, *vfm.geometry.grid(17, 64, 64), 64)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    # frame rule: the 17th frame is dropped, so it cannot influence the tokens
    v2 = video.clone(); v2[:, 16] = -v2[:, 16]
    assert torch.equal(vfm(v2), y)
    # but frame 15 does
    v3 = video.clone(); v3[:, 15] = -v3[:, 15]
    assert not torch.allclose(vfm(v3), y)


def test_frozen(vfm, video):
    assert not any(p.requires_grad for p in vfm.parameters())
    vfm.train()
    assert not vfm.training and not vfm.model.training
    x = video[:1].clone().requires_grad_(True)
    y = vfm(x)
    assert not y.requires_grad and y.grad_fn is None


def test_preprocessing_is_imagenet_normalisation(vfm):
    v = torch.zeros(1, 2, 3, 64, 64)          # mid-grey in [-1, 1] -> 0.5 in [0, 1]
    x = vfm.preprocess(v)
    expect = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, 0, :, 0, 0], expect)


def test_build_is_deterministic():
    a, b, c = build_vfm("tiny"), build_vfm("tiny", seed=0), build_vfm("tiny", seed=1)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)
    w = lambda m: m.model.get_input_embeddings().proj.weight
    assert not torch.equal(w(a), w(c))


def test_token_order_exact_without_layers(video):
    "With 0 transformer layers each token only sees its own tubelet x patch cell."
    torch.manual_seed(0)
    m = FrozenVFM(VJEPA2Model(tiny_vjepa2_config(num_hidden_layers=0)))
    base = m(video[:1])
    for t, h, w in [(0, 0, 0), (1, 0, 7), (6, 3, 2), (7, 7, 7)]:
        v = video[:1].clone()
        v[:, 2 * t:2 * t + 2, :, 8 * h:8 * h + 8, 8 * w:8 * w + 8] *= -1
        changed = torch.nonzero((m(v) - base).abs().sum(-1)[0] > 1e-6).tolist()
        assert changed == [[t, h, w]]


def test_token_order_with_attention(video):
    "With a 1-layer model the perturbed cell's token still changes most (residual stream)."
    torch.manual_seed(0)
    m = FrozenVFM(VJEPA2Model(tiny_vjepa2_config(num_hidden_layers=1)))
    base = m(video[:1])
    for t, h, w in [(2, 5, 1), (7, 0, 3)]:
        v = video[:1].clone()
        v[:, 2 * t:2 * t + 2, :, 8 * h:8 * h + 8, 8 * w:8 * w + 8] *= -1
        d = (m(v) - base).norm(dim=-1)[0]
        assert divmod(int(d.argmax()), 64) == (t, h * 8 + w)


def test_reshape_matches_conv3d_patch_embedding(vfm, video):
    "The (t, h, w) layout of the patch embedding Conv3d is the layout of the tokens."
    x = vfm.preprocess(video[:1])                      # B, T, C, H, W
    conv = vfm.model.get_input_embeddings().proj(x.permute(0, 2, 1, 3, 4))  # B, D, T', H', W'
    emb = vfm.model.encoder.embeddings(x)              # B, N, D
    torch.testing.assert_close(emb.reshape(1, 8, 8, 8, -1), conv.permute(0, 2, 3, 4, 1))


def test_rope_grid_follows_input_size(vfm, video):
    "A 32 px clip through the 64 px model equals a model built for 32 px crops with the same weights."
    small = VJEPA2Model(tiny_vjepa2_config(crop_size=32))
    small.load_state_dict(vfm.model.state_dict())
    clip = video[:1, :, :, :32, :32]
    torch.testing.assert_close(vfm(clip), FrozenVFM(small)(clip), rtol=1e-5, atol=1e-5)
    # and transformers' own positions (grid from crop_size=64) would differ: the fix matters
    with torch.no_grad():
        raw = vfm.model(pixel_values_videos=vfm.preprocess(clip), skip_predictor=True).last_hidden_state
    assert not torch.allclose(raw.reshape(1, 8, 4, 4, -1), vfm(clip), atol=1e-4)


def test_bad_inputs_raise(vfm, video):
    with pytest.raises(ValueError, match="H=60"):
        vfm(video[:, :, :, :60])
    with pytest.raises(ValueError, match="W=20"):
        vfm(video[..., :20])
    assert vfm(video[..., :32]).shape[2:4] == (8, 4)   # non-square frames are a grid, not an error (480 x 832)
    with pytest.raises(ValueError, match="C=1"):
        vfm(video[:, :, :1])
    with pytest.raises(ValueError, match="T=1"):
        vfm(video[:, :1])
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        vfm(video[0])


def test_build_from_directory_and_missing(tmp_path, vfm, video):
    vfm.model.save_pretrained(tmp_path / "vjepa2")
    loaded = build_vfm(str(tmp_path / "vjepa2"))
    torch.testing.assert_close(loaded(video[:1]), vfm(video[:1]))
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        build_vfm(str(missing))


# ---------------------------------------------------------------- preprocessing, DINOv2, VideoMAE, dispatch
import json

from transformers import Dinov2Model, VideoMAEModel

from sara.vfm import (FrozenDINOv2, FrozenVideoMAE, prepare_clip, read_vfm_preprocessing, tiny_dinov2_config,
                      tiny_videomae_config)


def test_read_preprocessing_and_defaults(tmp_path, vfm):
    assert read_vfm_preprocessing(tmp_path) == dict(mean=None, std=None, crop_size=None, resize_short=None)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2], "crop_size": 64, "size": {"shortest_edge": 73}}))
    pp = read_vfm_preprocessing(tmp_path)
    assert pp == dict(mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2], crop_size=64, resize_short=73)
    vfm.model.save_pretrained(tmp_path)
    m = build_vfm(str(tmp_path))
    assert m.resize_short == 73
    x = m.preprocess(torch.zeros(1, 2, 3, 64, 64))
    torch.testing.assert_close(x[0, 0, :, 0, 0], (0.5 - torch.tensor([0.5, 0.4, 0.3])) / 0.2)
    (tmp_path / "video_preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="video_preprocessor_config.json: invalid JSON"):
        read_vfm_preprocessing(tmp_path)


def test_prepare_clip_frames_crop_and_range(vfm):
    clip = torch.zeros(40, 3, 48, 96, dtype=torch.uint8)
    clip[:, :, :, 40:56] = 255                                  # a bright band in the middle columns
    clip[20:, 0] = 100
    x = prepare_clip(clip, vfm)                                 # 16 frames (frames_per_clip), 64 crop
    assert x.shape == (1, 16, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert x[0, 0, 1, :, 32].min() > 0.9                        # the centre column is inside the band
    assert x[0, 0, 1, :, 0].max() < -0.9                        # the left edge of the crop is dark
    assert prepare_clip(clip, vfm, n_frames=4, size=32).shape == (1, 4, 3, 32, 32)
    with pytest.raises(ValueError, match="fewer than the 16"):
        prepare_clip(clip[:9], vfm)
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        prepare_clip(clip[None], vfm)


def test_dinov2_per_frame_grid(video):
    torch.manual_seed(0)
    enc = FrozenDINOv2(Dinov2Model(tiny_dinov2_config()))
    v = video[:, :4, :, :56, :42]
    y = enc(v)
    assert y.shape == (2, 4, 4, 3, 32) and enc.geometry.tubelet == 1 and enc.geometry.patch == 14
    assert enc.geometry.grid(4, 56, 42) == (4, 4, 3)
    v2 = v.clone(); v2[:, 2] = -v2[:, 2]
    y2 = enc(v2)
    torch.testing.assert_close(y2[:, [0, 1, 3]], y[:, [0, 1, 3]])
    assert not torch.allclose(y2[:, 2], y[:, 2])
    # per-frame equals the model on that frame alone (CLS dropped)
    with torch.no_grad():
        ref = enc.model(pixel_values=enc.preprocess(v)[0, 1:2]).last_hidden_state[:, 1:]
    torch.testing.assert_close(y[0, 1].reshape(1, 12, 32), ref)
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="W=40"):
        enc(video[:, :2, :, :56, :40])


def test_videomae_grid_and_fixed_size(video):
    torch.manual_seed(0)
    enc = FrozenVideoMAE(VideoMAEModel(tiny_videomae_config()))
    y = enc(video)
    assert y.shape == (2, 8, 4, 4, 32) and (enc.geometry.tubelet, enc.geometry.patch) == (2, 16)
    with pytest.raises(ValueError, match="needs 16 frames of 64x64"):
        enc(video[:, :9])
    with pytest.raises(ValueError, match="needs 16 frames of 64x64"):
        enc(video[:, :, :, :48, :48])
    torch.manual_seed(0)
    flat = FrozenVideoMAE(VideoMAEModel(tiny_videomae_config(num_hidden_layers=0)))
    base = flat(video[:1])
    for t, h, w in [(0, 0, 0), (7, 3, 1)]:
        v = video[:1].clone(); v[:, 2 * t:2 * t + 2, :, 16 * h:16 * h + 16, 16 * w:16 * w + 16] *= -1
        assert torch.nonzero((flat(v) - base).abs().sum(-1)[0] > 1e-6).tolist() == [[t, h, w]]


@pytest.mark.parametrize("name,cls", [("tiny", FrozenVFM), ("tiny-vjepa2", FrozenVFM),
                                      ("tiny-dinov2", FrozenDINOv2), ("tiny-videomae", FrozenVideoMAE)])
def test_build_by_name_and_directory(name, cls, tmp_path):
    enc = build_vfm(name)
    assert type(enc) is cls and enc.dim == enc.model.config.hidden_size
    enc.model.save_pretrained(tmp_path / "m")
    back = build_vfm(str(tmp_path / "m"))
    assert type(back) is cls
    clip = prepare_clip(torch.randint(0, 256, (20, 3, 70, 90), dtype=torch.uint8), back, n_frames=16,
                        size=56 if cls is FrozenDINOv2 else 64)
    y = back(clip)
    assert y.shape[0] == 1 and y.shape[1:4] == back.geometry.grid(*clip.shape[1:2], *clip.shape[-2:]) and y.shape[-1] == back.dim
    torch.testing.assert_close(y, enc(clip))


def test_build_rejects_other_model_types(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' is not a supported target encoder"):
        build_vfm(str(tmp_path))
    with pytest.raises(TypeError, match="Dinov2Model"):
        FrozenDINOv2(VJEPA2Model(tiny_vjepa2_config()))
    with pytest.raises(TypeError, match="VideoMAEModel"):
        FrozenVideoMAE(VJEPA2Model(tiny_vjepa2_config()))
