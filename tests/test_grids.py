"Issue 12: DiT and target token grids meet exactly in time and space: geometry, the cache and the training step."
import json
from pathlib import Path

import pytest
import torch

from sara.config import make_config, site_settings
from sara.grids import ALIGNMENT, GridMap, align_target, grid_map_for
from sara.masks import reduce_to_grid
from sara.precompute import (CACHE_FORMAT, SettingsMismatchError, build_precompute_models, make_precompute_config,
                             open_cache, precompute, read_index)
from sara.data import ClipDataset

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data" / "toy"


@pytest.mark.parametrize("n_frames", [17, 33, 81, 121])
@pytest.mark.parametrize("tubelet", [1, 2])
def test_every_target_token_faces_a_latent_holding_its_frames(n_frames, tubelet):
    gm = grid_map_for(n_frames, 480, 832, vae_spatial=16, dit_patch=(1, 2, 2), tubelet=tubelet, patch=16)
    dit, tgt = gm.dit_frame_spans(), gm.target_frame_spans()
    assert dit[0] == (0, 0) and tgt[0][0] == 1 and tgt[-1][1] == n_frames - 1   # frame 0 is never a target
    assert sorted(set(gm.dit_latent_of())) == list(range(1, gm.dit[0]))          # every latent but 0 is used
    for k, l in enumerate(gm.dit_latent_of()):
        assert dit[l][0] <= tgt[k][0] and tgt[k][1] <= dit[l][1], (n_frames, tubelet, k, l)
    assert gm.repeat == 4 // tubelet and gm.common[1:] == (15, 26)               # TI2V-5B: target pooled 2x2


def test_bad_grids_name_the_dimension():
    with pytest.raises(ValueError, match="width=840"):
        grid_map_for(81, 480, 840, vae_spatial=16, dit_patch=(1, 2, 2), tubelet=2, patch=16)
    with pytest.raises(ValueError, match="n_frames=81 does not match"):
        GridMap(81, (20, 15, 26), (40, 30, 52))
    with pytest.raises(ValueError, match="height"):
        GridMap(17, (5, 4, 4), (8, 6, 8))


@pytest.fixture(scope="module")
def one_clip_cache(tmp_path_factory):
    params = dict(data_root=str(TOY), cache_dir=str(tmp_path_factory.mktemp("cache")), device="cpu", progress=False,
                  limit=1, wan_model="tiny", vfm_model="tiny", text_model="minilm")
    cfg = make_precompute_config(params, settings=site_settings(ROOT, env={}))
    models = build_precompute_models(cfg)
    return cfg, models, precompute(cfg, models=models)


def test_cache_targets_come_from_frames_1_to_T(one_clip_cache):
    "y, masks and saliency in the cache are computed on frames 1..16 of a 17-frame clip (frame 0 sits in latent 0)."
    cfg, models, folder = one_clip_cache
    cache = open_cache(folder)
    e = next(iter(cache))
    ds = ClipDataset(cfg.manifest, n_frames=cfg.n_frames, size=(cfg.height, cfg.width))
    item = ds[0]
    video = item["video"][None]                                                  # 1, 17, 3, 64, 64
    with torch.no_grad():
        want = models.vfm(video[:, 1:])[0]
        old = models.vfm(video[:, :16])[0]
    torch.testing.assert_close(e["y"].float(), want.float(), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(e["y"].float(), old.float(), atol=1e-3), "the cache still encodes frames 0..15"
    g = models.vfm.geometry
    torch.testing.assert_close(e["masks_grid"], reduce_to_grid(item["masks"][:, 1:], g.tubelet, g.patch).float())
    s = read_index(folder)["settings"]
    assert s["format"] == CACHE_FORMAT and s["alignment"] == ALIGNMENT


def test_cache_made_before_alignment_is_refused_with_rebuild_advice(tmp_path):
    (tmp_path / "index.json").write_text(json.dumps(dict(format="sara-cache/1", settings={}, key="x", entries={},
                                                         shards={}, failed={}, order=[])))
    with pytest.raises(SettingsMismatchError, match="rebuild"):
        read_index(tmp_path)


def test_training_step_compares_each_latent_with_its_own_tubelets(tmp_path, monkeypatch):
    "What reaches the TRD loss: DiT latent 1 + k // 2 against tubelet k, and the target pooled 2x2 onto the DiT grid."
    import sara.train as st
    seen = {}
    real = st.trd_loss
    def spy(p, y, w=None, **kw):
        seen.update(p=p.detach(), y=y.detach(), w=None if w is None else w.detach())
        return real(p, y, w=w, **kw)
    monkeypatch.setattr(st, "trd_loss", spy)
    feats = []
    orig_fwd = st.Projector.forward
    monkeypatch.setattr(st.Projector, "forward", lambda self, x: feats.append(orig_fwd(self, x).detach()) or feats[-1])
    captured = {}
    orig_collate = st.collate_targets
    monkeypatch.setattr(st, "collate_targets", lambda *a, **k: captured.setdefault("batch", orig_collate(*a, **k)))
    cfg = make_config(dict(run_name="g", steps=1, batch_size=2, runs_dir=str(tmp_path / "runs"),
                           cache_dir=str(tmp_path / "cache"), checkpoint_every=0, method="sara", op="or"),
                      settings=site_settings(ROOT, env={}))
    st.train(cfg, progress=False)
    batch, q = captured["batch"], feats[-1]                                      # q: B, 5*4*4, D on the DiT grid
    B, D = q.shape[0], q.shape[-1]
    assert batch["grid"] == (8, 8, 8)                                            # tiny V-JEPA 2 on frames 1..16
    qg = q.view(B, 5, 4, 4, D)
    want_p = torch.stack([qg[:, 1 + k // 2] for k in range(8)], 1).flatten(1, 3)  # B, 8*4*4, D
    torch.testing.assert_close(seen["p"], want_p)
    yg = batch["y"].view(B, 8, 4, 2, 4, 2, -1).float().mean((3, 5)).flatten(1, 3)
    torch.testing.assert_close(seen["y"].float(), yg)
    wg = batch["w"].view(B, 8, 4, 2, 4, 2).mean((3, 5)).flatten(1, 3)
    torch.testing.assert_close(seen["w"], wg)
    torch.testing.assert_close(seen["w"], align_target(batch["w"], GridMap(17, (5, 4, 4), (8, 8, 8))))
