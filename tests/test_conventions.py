"""Stage 2 follows Wan2.2's and VideoREPA's conventions (issue 12): A14B experts, flow shift, TI2V image conditioning,
classifier-free guidance dropout, frame rate, the size the DiT can patch, the block index."""
import json
from pathlib import Path

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from sara.config import ConfigError, RunConfig, field_help
from sara.data import ClipDataset, clip_frame_indices
from sara.wan import FeatureTap, build_wan, dit_forward, expert_window

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data" / "toy" / "manifest.jsonl"   # 8 clips, 17 frames at 8 fps


def _wan_dir(root: Path, experts: bool = False, index: dict | None = None, shift: float = 5.0) -> str:
    "A diffusers-layout Wan2.2 directory made of tiny parts (a TI2V-5B stand-in, or A14B with `experts`)."
    hi = build_wan("tiny", seed=0)
    hi.transformer.save_pretrained(root / "transformer")
    hi.vae.save_pretrained(root / "vae")
    if experts: build_wan("tiny", seed=1).transformer.save_pretrained(root / "transformer_2")
    UniPCMultistepScheduler(flow_shift=shift, use_flow_sigmas=True, prediction_type="flow_prediction").save_pretrained(root / "scheduler")
    if index is not None: (root / "model_index.json").write_text(json.dumps(index))
    return str(root)


@pytest.fixture
def dit_calls(monkeypatch):
    "Every DiT call of the training step, as (x_t, timesteps, prompt_embeds)."
    import sara.train as T
    calls, orig = [], T.dit_forward
    def spy(dit, x_t, timesteps, prompt, **kw):
        calls.append((x_t.detach().clone(), timesteps.detach().clone(), prompt.detach().clone()))
        return orig(dit, x_t, timesteps, prompt, **kw)
    monkeypatch.setattr(T, "dit_forward", spy)
    return calls


# ---------------------------------------------------------------- A14B experts
def test_a14b_needs_an_expert_at_config_and_build_time(cfg_for, tmp_path):
    "A directory with transformer_2/ refuses expert='' (it used to train the high-noise expert on every timestep)."
    from sara.train import build_models, resolve_device
    d = _wan_dir(tmp_path / "a14b", experts=True, index=dict(boundary_ratio=0.875))
    with pytest.raises(ConfigError, match=r"RunConfig.expert = '' is not allowed; expected 'high' or 'low'"):
        cfg_for(wan_model=d, fps=8)
    cfg = cfg_for(wan_model=d, fps=8, expert="low")
    cfg.expert = ""   # as if built by hand, past make_config
    with pytest.raises(ConfigError, match=r"RunConfig.expert = '' .*'high' or 'low'.*boundary_ratio=0.875"):
        build_models(cfg, resolve_device("cpu"), target_dim=8)
    with pytest.raises(ValueError, match="'high' .* or 'low'"):
        expert_window(0.875, "")


@pytest.mark.parametrize("index,want", [(None, 0.875), (dict(_class_name="WanPipeline"), 0.875),
                                        (dict(_class_name="WanImageToVideoPipeline"), 0.9),
                                        (dict(boundary_ratio=0.8), 0.8)])
def test_a14b_boundary_from_the_directory_never_missing(tmp_path, index, want):
    "model_index.json's boundary_ratio, else Wan2.2's 0.875 (T2V) / 0.9 (I2V); never None (which meant t < 1000 always)."
    parts = build_wan(_wan_dir(tmp_path / "a14b", experts=True, index=index))
    assert parts.boundary_ratio == want


# ---------------------------------------------------------------- shift
def test_flow_shift_defaults_to_the_model_and_is_recorded(cfg_for, tmp_path):
    d = _wan_dir(tmp_path / "ti2v", index=dict(_class_name="WanPipeline", expand_timesteps=True), shift=5.0)
    assert cfg_for(wan_model=d, fps=8).flow_shift == 5.0          # diffusers' TI2V-5B ships 5.0; the config used to force 3.0
    assert cfg_for().flow_shift == 3.0                             # tiny: the documented default
    assert cfg_for(wan_model=d, fps=8, flow_shift=7.0).flow_shift == 7.0   # explicit wins
    from sara.train import train
    cfg = RunConfig(**{**cfg_for(wan_model=d, fps=8, steps=1).to_dict(), "flow_shift": 0.0})   # unresolved, as a user could pass it
    out = train(cfg, progress=False)
    assert out["models"].wan.scheduler.config.shift == 5.0
    assert json.loads((Path(cfg.run_dir) / "config.json").read_text())["config"]["flow_shift"] == 5.0


# ---------------------------------------------------------------- TI2V
def test_ti2v_first_latent_is_clean_and_carries_no_loss(cfg_for, dit_calls, monkeypatch):
    "task=ti2v: latent frame 0 of x_t is x0's, its tokens get timestep 0, and a wrong prediction there costs nothing."
    from sara.train import train
    import sara.train as T
    out = train(cfg_for(run_name="ti2v", task="ti2v", method="sft", steps=1), progress=False)
    (x_t, ts, _), = dit_calls
    x0 = torch.stack([out["targets"][j]["latents"] for j in out["metrics"][0]["clips"]])   # B, z, t, h, w
    assert torch.equal(x_t[:, :, 0], x0[:, :, 0].to(x_t)) and not torch.allclose(x_t[:, :, 1:], x0[:, :, 1:])
    n0 = x0.shape[3] * x0.shape[4] // 4                             # tokens of latent frame 0 (patch 2x2)
    assert ts.shape == (2, x0.shape[2] * n0) and (ts[:, :n0] == 0).all() and (ts[:, n0:] > 0).all()
    orig = T.dit_forward
    def wrong_on_image(*a, **k):
        pred = orig(*a, **k).clone()
        pred[:, :, 0] += 100.0                                      # any prediction for the clean latent
        return pred
    monkeypatch.setattr(T, "dit_forward", wrong_on_image)
    again = train(cfg_for(run_name="ti2v-wrong", task="ti2v", method="sft", steps=1), progress=False)
    assert again["metrics"][0]["fm"] == pytest.approx(out["metrics"][0]["fm"], rel=1e-6)
    t2v = train(cfg_for(run_name="t2v-wrong", method="sft", steps=1), progress=False)
    assert t2v["metrics"][0]["fm"] > 100                            # in t2v the same error is counted


def test_ti2v_refused_where_the_model_does_not_condition_that_way(cfg_for, tmp_path):
    d = _wan_dir(tmp_path / "a14b", experts=True, index=dict(boundary_ratio=0.875))
    with pytest.raises(ConfigError, match="RunConfig.task = 'ti2v'.*expand_timesteps"):
        cfg_for(wan_model=d, fps=8, expert="high", task="ti2v")


# ---------------------------------------------------------------- classifier-free guidance dropout
def test_text_dropout_uses_the_empty_prompt_and_the_seeded_generator(cfg_for, dit_calls):
    from sara.train import train, empty_prompt_embeds
    empty = empty_prompt_embeds("minilm")
    seen = {}
    for m in ("sft", "sara"):
        dit_calls.clear()
        out = train(cfg_for(run_name=f"drop-{m}", method=m, text_dropout=0.5, steps=4), progress=False)
        prompts = [c[2] for c in dit_calls]                          # per step: B, L, D
        cached = [torch.stack([out["targets"][j]["prompt"] for j in r["clips"]]) for r in out["metrics"]]
        dropped = [(p == empty[None]).flatten(1).all(1) for p in prompts]
        kept = [(p == c).flatten(1).all(1) for p, c in zip(prompts, cached)]
        assert all((d ^ k).all() for d, k in zip(dropped, kept))      # each prompt: the cached one or the empty one
        seen[m] = torch.cat(dropped)
    assert 0 < seen["sft"].sum() < len(seen["sft"])                  # p = 0.5 over 8 prompts: some of each
    assert torch.equal(seen["sft"], seen["sara"])                    # same draws for every method
    dit_calls.clear()
    out = train(cfg_for(run_name="nodrop", method="sft", steps=2), progress=False)
    assert all(torch.equal(c[2], torch.stack([out["targets"][j]["prompt"] for j in r["clips"]]))
               for c, r in zip(dit_calls, out["metrics"]))
    with pytest.raises(ConfigError, match="RunConfig.text_dropout"):
        cfg_for(text_dropout=1.0)


# ---------------------------------------------------------------- frame rate
def test_frames_are_sampled_at_a_fixed_rate_not_spread():
    "A 40-frame clip at 24 fps gives 5 consecutive frames at fps=24, every other frame at 12; never 0..39 spread out."
    assert clip_frame_indices(40, 5, clip_fps=24, fps=24) == [0, 1, 2, 3, 4]
    assert clip_frame_indices(40, 5, clip_fps=24, fps=12) == [0, 2, 4, 6, 8]
    ds = ClipDataset(TOY, n_frames=9, size=(32, 32))                  # fps 0: the clip's own (8 fps)
    assert ds[0]["frames"] == list(range(9))
    assert ClipDataset(TOY, n_frames=5, size=(32, 32), fps=2)[0]["frames"] == [0, 4, 8, 12, 16]
    with pytest.raises(ValueError, match=r"toy_000\.mp4 \(manifest line 1\): too short"):
        ClipDataset(TOY, n_frames=9, size=(32, 32), fps=2)[0]         # 9 frames at 2 fps need 4 s; the clip lasts 2.1 s
    with pytest.raises(ValueError, match="frames would repeat"):
        ClipDataset(TOY, n_frames=9, size=(32, 32), fps=16)[0]


def test_precompute_reports_clips_too_short_and_keys_on_fps(tmp_path):
    "A clip too short for n_frames at the target fps is skipped and listed by the cache, the others are encoded."
    from sara.precompute import TooManyFailedClips, make_precompute_config, precompute, read_index, settings_key
    from sara.toy import make_toy_world
    long = make_toy_world(tmp_path / "long", n_clips=1, n_frames=33, seed=3)       # 33 frames at 8 fps: 4.1 s
    rec = json.loads(long.read_text().splitlines()[0])
    short = json.loads(TOY.read_text().splitlines()[0])                              # 17 frames at 8 fps: 2.1 s
    mix = tmp_path / "mix"; mix.mkdir()
    lines = [{**r, "id": cid, "video": str(base / r["video"]), "masks": str(base / r["masks"])} for r, base, cid in
             ((rec, long.parent, "long"), (short, TOY.parent, "short"))]
    (mix / "manifest.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    base = dict(data_root=str(mix), cache_dir=str(tmp_path / "cache"), progress=False, wan_model="tiny",
                vfm_model="tiny", text_model="minilm", n_frames=9)
    assert settings_key(make_precompute_config(dict(base, fps=2))) != settings_key(make_precompute_config(base))
    with pytest.raises(TooManyFailedClips, match="short.*too short"):                 # 9 frames at 2 fps span 4 s
        precompute(dict(base, fps=2))
    idx = read_index(precompute(dict(base, fps=2, max_failed_fraction=0.5)))           # tolerated: skipped and listed
    assert list(idx["entries"]) == ["long"] and list(idx["failed"]) == ["short"]
    assert "too short" in idx["failed"]["short"]["error"] and "never stretched" in idx["failed"]["short"]["error"]
    assert idx["settings"]["fps"] == 2
    assert make_precompute_config(dict(base, wan_model=_wan_dir(tmp_path / "w", index={}))).fps == 16   # a Wan2.1/A14B VAE


def test_run_fps_defaults_to_the_model(cfg_for, tmp_path):
    ti2v = tmp_path / "ti2v"
    _wan_dir(ti2v, index=dict(expand_timesteps=True))
    cfg = json.loads((ti2v / "vae" / "config.json").read_text())
    (ti2v / "vae" / "config.json").write_text(json.dumps({**cfg, "z_dim": 48}))   # Wan2.2's TI2V VAE: 24 fps, 16x
    c = cfg_for(wan_model=str(ti2v), height=64, width=64)
    assert c.fps == 24
    assert cfg_for().fps == 0                                          # tiny: the clip's own rate
    assert cfg_for(wan_model=_wan_dir(tmp_path / "a14b", experts=True, index={}), expert="high").fps == 16


# ---------------------------------------------------------------- sizes the DiT can patch
def test_config_refuses_sizes_the_dit_cannot_patch(cfg_for, tmp_path):
    "TI2V-5B tokens cover 32 px (VAE 16x, patch 2): 48 is refused at config time, naming the field."
    d = tmp_path / "ti2v"
    _wan_dir(d, index=dict(expand_timesteps=True))
    vae = json.loads((d / "vae" / "config.json").read_text())
    (d / "vae" / "config.json").write_text(json.dumps({**vae, "scale_factor_spatial": 16}))
    with pytest.raises(ConfigError, match=r"RunConfig.height = 48 is not allowed; expected a multiple of 32"):
        cfg_for(wan_model=str(d), fps=8, height=48, width=64)
    with pytest.raises(ConfigError, match=r"RunConfig.width = 80 .*multiple of 32"):
        cfg_for(wan_model=str(d), fps=8, height=64, width=80)
    assert cfg_for(wan_model=str(d), fps=8, height=64, width=96).width == 96
    with pytest.raises(ConfigError, match=r"RunConfig.width = 40 .*multiple of 16"):
        cfg_for(width=40)


# ---------------------------------------------------------------- block index
def test_block_is_videorepa_align_layer_minus_one():
    "VideoREPA keeps the hidden states after block i when (i + 1) == align_layer: our block = align_layer - 1."
    assert "align_layer" in field_help(RunConfig)["block"] and "block=17" in field_help(RunConfig)["block"]
    wan = build_wan("tiny")
    outs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o.detach())) for b in wan.transformer.blocks]
    x, t, text = torch.randn(1, 8, 5, 8, 8), torch.tensor([500.0]), torch.randn(1, 8, 384)
    try:
        for align_layer in (1, 2, 3):
            outs.clear()
            with FeatureTap(wan.transformer, align_layer - 1) as tap, torch.no_grad():
                dit_forward(wan.transformer, x, t, text)
                got = tap.features
            videorepa = [o for i, o in enumerate(outs) if (i + 1) == align_layer][0]
            assert torch.equal(got, videorepa)
    finally:
        for h in hooks: h.remove()
