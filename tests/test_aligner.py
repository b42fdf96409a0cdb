"Stage 1 heads: losses, frozen VFM, save/load, bad input, determinism, export into a cache."
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sara.aligner import (AlignerConfig, MotionConfig, MotionHead, SemanticAligner, collate_entries, export_head,
                          flow_epe, head_digest, info_nce, load_head, merge_saliency, saliency_loss,
                          save_head, split_entries, toy_entries, train_aligner, train_motion_head)

TOY = Path(__file__).resolve().parents[1] / "data" / "toy" / "manifest.jsonl"


@pytest.fixture(scope="module")
def entries():
    return toy_entries(TOY)


@pytest.fixture(scope="module")
def batch(entries):
    return collate_entries(entries[:4], max_entities=4, need=("y", "masks_grid", "caption_emb", "flow_grid"))


def _aligner(batch, seed=0, **kw):
    torch.manual_seed(seed)
    return SemanticAligner(AlignerConfig(d_vfm=batch["y"].shape[-1], d_text=batch["entity_emb"].shape[-1], max_entities=4, **kw))


# --- losses are minimised by the right answer -------------------------------------------------------------------

def test_saliency_loss_minimised_by_perfect_logits(batch):
    tgt = (batch["masks_grid"] >= 0.5).float()
    m = batch["entity_mask"]
    perfect = (tgt * 2 - 1) * 15
    best = saliency_loss(perfect, tgt, m)
    assert best["total"] < 0.01
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 6.0):
        noisy = perfect + torch.randn(perfect.shape, generator=g) * scale * 5
        assert saliency_loss(noisy, tgt, m)["total"] > best["total"]
    assert saliency_loss(-perfect, tgt, m)["total"] > 1.0       # inverted masks are far worse
    # soft targets: BCE is minimised where sigmoid(logit) equals the covered-area fraction
    soft = batch["masks_grid"].clamp(1e-3, 1 - 1e-3)
    exact = torch.logit(soft)
    assert saliency_loss(exact, soft, m)["bce"] < saliency_loss(exact + 0.5, soft, m)["bce"]
    assert saliency_loss(exact, soft, m)["bce"] < saliency_loss(exact - 0.5, soft, m)["bce"]


def test_saliency_loss_ignores_padding_and_handles_empty_masks(batch):
    tgt, m = batch["masks_grid"], batch["entity_mask"]
    lg = torch.randn(tgt.shape, generator=torch.Generator().manual_seed(1))
    junk = lg.clone(); junk[~m] = 99.0
    assert torch.equal(saliency_loss(lg, tgt, m)["total"], saliency_loss(junk, tgt, m)["total"])
    # an entity whose mask is empty everywhere is a finite negative: lower loss for lower logits
    empty = torch.zeros_like(tgt)
    lo, hi = saliency_loss(torch.full_like(lg, -15.0), empty, m), saliency_loss(torch.full_like(lg, 3.0), empty, m)
    for part in ("bce", "dice", "total"):
        assert torch.isfinite(lo[part]) and torch.isfinite(hi[part])
    assert lo["total"] < hi["total"] and lo["dice"] < 0.01
    # gradient is finite too
    x = lg.clone().requires_grad_()
    saliency_loss(x, empty, m)["total"].backward()
    assert torch.isfinite(x.grad).all()


def test_info_nce_lowest_for_matched_pairs():
    g = torch.Generator().manual_seed(0)
    zv = F.normalize(torch.randn(16, 32, generator=g), dim=-1)
    zt = F.normalize(zv + 0.2 * torch.randn(16, 32, generator=g), dim=-1)
    matched = info_nce(zv, zt)
    for k in range(5):
        perm = torch.randperm(16, generator=g)
        if torch.equal(perm, torch.arange(16)): continue
        assert info_nce(zv, zt[perm]) > matched
    # symmetric in its two directions
    assert torch.allclose(info_nce(zv, zt), info_nce(zt, zv), atol=1e-6)


# --- only the head learns ------------------------------------------------------------------------------------------

def test_gradients_flow_only_into_the_heads(entries, batch):
    from sara.vfm import build_vfm
    from sara.data import ClipDataset
    vfm = build_vfm("tiny", seed=0)
    assert all(not p.requires_grad for p in vfm.parameters())
    video = ClipDataset(TOY)[0]["video"][None]
    y = vfm(video)                                                   # 1, T', H', W', D
    assert not y.requires_grad
    al = _aligner(batch)
    emb = entries[0]["entity_emb"][None]
    o = al(y, emb)
    loss = saliency_loss(o["logits"], entries[0]["masks_grid"][None], torch.ones(1, emb.shape[1], dtype=torch.bool))["total"] \
        + info_nce(o["clip"], al.embed_captions(entries[0]["caption_emb"][None]), al.logit_scale)
    mh = MotionHead(MotionConfig(d_vfm=y.shape[-1]))
    loss = loss + flow_epe(mh(y)["flow"], entries[0]["flow_grid"][None])
    loss.backward()
    assert all(p.grad is None for p in vfm.parameters())
    assert all(p.grad is not None for p in al.parameters())
    assert all(p.grad is not None for p in mh.parameters())


# --- save / load ---------------------------------------------------------------------------------------------------

def test_save_load_reproduces_outputs_exactly(tmp_path, batch):
    al = _aligner(batch, learn_temperature=False)
    mh = MotionHead(MotionConfig(d_vfm=batch["y"].shape[-1], d_motion=16))
    with torch.no_grad():  # perturb so that nothing sits at its init value
        for p in [*al.parameters(), *mh.parameters()]: p.add_(0.01 * torch.randn_like(p))
    save_head(al, tmp_path / "a"); save_head(mh, tmp_path / "m")
    al2, mh2 = load_head(tmp_path / "a"), load_head(tmp_path / "m")
    assert isinstance(al2, SemanticAligner) and isinstance(mh2, MotionHead) and mh2.cfg.d_motion == 16
    al.eval()
    with torch.no_grad():
        a, b = al(batch["y"], batch["entity_emb"], batch["entity_mask"]), al2(batch["y"], batch["entity_emb"], batch["entity_mask"])
        assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["clip"], b["clip"])
        assert torch.equal(al.embed_captions(batch["caption_emb"]), al2.embed_captions(batch["caption_emb"]))
        assert torch.equal(al.logit_scale, al2.logit_scale)
        assert torch.equal(mh.motion_features(batch["y"]), mh2.motion_features(batch["y"]))
        assert torch.equal(mh(batch["y"])["flow"], mh2(batch["y"])["flow"])
    assert head_digest(al) == head_digest(al2)
    with pytest.raises(FileExistsError, match="already holds a head"): save_head(al, tmp_path / "a")
    save_head(mh, tmp_path / "a", overwrite=True)
    assert isinstance(load_head(tmp_path / "a"), MotionHead)
    # a torn / corrupt save is detected
    wf = tmp_path / "m" / "head.safetensors"
    data = bytearray(wf.read_bytes()); data[-1] ^= 0xFF; wf.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"): load_head(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no saved head"): load_head(tmp_path / "nothing")


# --- bad input -----------------------------------------------------------------------------------------------------

def test_clip_with_zero_entities(entries, batch):
    e = dict(entries[0], id="no_entities", entities=[], entity_emb=entries[0]["entity_emb"][:0],
             masks_grid=entries[0]["masks_grid"][:0])
    with pytest.warns(UserWarning, match="zero entities"):
        b = collate_entries([e, entries[1]], max_entities=4, need=("masks_grid",))
    assert not b["entity_mask"][0].any()
    al = _aligner(batch)
    o = al(b["y"], b["entity_emb"], b["entity_mask"])
    # excluded from the saliency loss: its logits do not matter
    lg = o["logits"].detach().clone(); lg[0] = 50.0
    assert torch.equal(saliency_loss(lg, b["masks_grid"], b["entity_mask"])["total"],
                       saliency_loss(o["logits"].detach(), b["masks_grid"], b["entity_mask"])["total"])
    # its merged saliency is 0, with a warning
    with pytest.warns(UserWarning, match="no real entity"):
        w = merge_saliency(o["logits"], b["entity_mask"])
    assert torch.equal(w[0], torch.zeros_like(w[0])) and w[1].max() > 0
    # zero entity slots at all: empty logits, zero w
    o0 = al(b["y"], b["entity_emb"][:, :0])
    assert o0["logits"].shape[1] == 0
    with pytest.warns(UserWarning):
        assert torch.equal(merge_saliency(o0["logits"]), torch.zeros(2, b["y"].shape[1:4].numel()))


def test_entity_with_empty_mask_is_a_negative(entries):
    e = dict(entries[0])
    e["masks_grid"] = e["masks_grid"].clone(); e["masks_grid"][1] = 0
    b = collate_entries([e], max_entities=4, need=("masks_grid",))
    assert b["entity_mask"][0, :2].all()                          # still a real entity
    lg = torch.zeros_like(b["masks_grid"], requires_grad=True)
    loss = saliency_loss(lg, b["masks_grid"], b["entity_mask"])
    assert torch.isfinite(loss["total"])
    loss["total"].backward()
    assert (lg.grad[0, 1] > 0).all()                              # pushes the empty entity's logits down everywhere


def test_more_entities_than_padding(entries, batch):
    with pytest.raises(ValueError, match=r"has \d+ entities, more than the padding allows \(max_entities=1\)"):
        collate_entries(entries[:2], max_entities=1)
    al = _aligner(batch)
    with pytest.raises(ValueError, match=r"6 entities, more than the padding allows \(max_entities=4\)"):
        al(batch["y"], torch.zeros(4, 6, batch["entity_emb"].shape[-1]))


def test_text_and_video_batches_of_different_sizes(batch):
    al = _aligner(batch)
    with pytest.raises(ValueError, match="text batch has 3 clips but video batch y has 4"):
        al(batch["y"], batch["entity_emb"][:3])
    zv = F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="video batch has 4 clips but text batch has 2 captions"):
        info_nce(zv, zv[:2])
    with pytest.raises(ValueError, match=r"entity_mask has shape \(4, 2\)"):
        al(batch["y"], batch["entity_emb"], batch["entity_mask"][:, :2])


# --- training and export -------------------------------------------------------------------------------------------

def test_training_is_deterministic_and_learns(entries, tmp_path):
    tr, va = split_entries(entries, 0.25, seed=0)
    cfg = dict(steps=12, batch_size=4, eval_every=6, log_every=3, progress=False)
    a1, h1 = train_aligner(tr, va, dict(cfg, run_dir=str(tmp_path / "run")))
    a2, h2 = train_aligner(tr, va, cfg)
    assert head_digest(a1) == head_digest(a2) and h1 == h2
    losses = [r["loss"] for r in h1 if r["split"] == "train"]
    assert losses[-1] < losses[0]
    run = tmp_path / "run"
    assert (run / "metrics.jsonl").read_text().count("\n") == len(h1)
    assert (run / "curves.html").is_file() and isinstance(load_head(run / "head"), SemanticAligner)
    with pytest.raises(FileExistsError, match=r"already holds a Stage 1 run; set overwrite=True .* \(run_name in nbs/aligner.ipynb"):
        train_aligner(tr, va, dict(cfg, run_dir=str(run)))
    first = (run / "head" / "head.json").read_text()
    train_aligner(tr, va, dict(cfg, run_dir=str(run), steps=3, overwrite=True))   # the earlier run is moved aside
    aside = list(run.glob("previous-*"))
    assert len(aside) == 1 and (aside[0] / "head" / "head.json").read_text() == first
    assert (aside[0] / "metrics.jsonl").read_text().count("\n") == len(h1)
    assert (run / "metrics.jsonl").read_text().count("\n") < len(h1)
    m1, hm = train_motion_head(tr, va, dict(cfg, lr=3e-3))
    ep = [r["loss"] for r in hm if r["split"] == "train"]
    assert ep[-1] < ep[0]


def test_export_layers_into_cache(tmp_path, entries):
    from sara.precompute import precompute, open_cache
    cp = precompute(dict(data_root=str(TOY.parent), cache_dir=str(tmp_path), limit=2, progress=False))
    c = open_cache(cp)
    e = c[0]
    al = SemanticAligner(AlignerConfig(d_vfm=e["y"].shape[-1], d_text=e["entity_emb"].shape[-1]))
    mh = MotionHead(MotionConfig(d_vfm=e["y"].shape[-1]))
    export_head(al, cp, progress=False)
    export_head(mh, cp, progress=False, checkpoint="somewhere/head")
    c = open_cache(cp)
    assert c.has_layer("aligner") and c.has_layer("motion")
    assert c.layer_meta("motion")["digest"] == head_digest(mh)
    for cid in c.ids:
        e = c[cid]
        with torch.no_grad():
            o = al(e["y"][None], e["entity_emb"][None])
            # the export runs padded batches: equal up to float rounding of a different batch layout
            close = dict(atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(e["w_aligner"], merge_saliency(o["logits"])[0], **close)
            torch.testing.assert_close(e["saliency_entities"], torch.sigmoid(o["logits"][0]), **close)
            torch.testing.assert_close(e["y_motion"], mh.motion_features(e["y"][None])[0], **close)
        assert e["w_aligner"].shape == e["w"].shape and e["y_motion"].shape[:3] == e["y"].shape[:3]
    # re-exporting the same head needs overwrite; another head is refused
    with pytest.raises(FileExistsError): export_head(al, cp, progress=False)
    with pytest.raises(ValueError, match="never mixes heads"): export_head(_aligner_like(al), cp, progress=False)
    export_head(al, cp, progress=False, overwrite=True)


def _aligner_like(al):
    torch.manual_seed(123)
    return SemanticAligner(al.cfg)
