"Integration tests of the precompute cache (sara.precompute) on the toy world."
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sara.config import site_settings
from sara.data import load_masks, load_video, read_manifest, save_masks, write_video
from sara.masks import flow_to_grid, reduce_to_grid, saliency_from_masks
from sara.precompute import (CacheCorruptError, PrecomputeConfig, PrecomputeConfigError, SettingsMismatchError, TooManyFailedClips,
                             build_precompute_models, check_sizes,
                             make_precompute_config, open_cache, precompute, read_index, settings_key, write_layer)

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data" / "toy"
N_TOY = len(read_manifest(TOY / "manifest.jsonl"))


def make_cfg(cache_dir, data_root=TOY, **kw) -> PrecomputeConfig:
    params = dict(data_root=str(data_root), cache_dir=str(cache_dir), device="cpu", progress=False, shard_size=3,
                  wan_model="tiny", vfm_model="tiny", text_model="minilm")
    params.update(kw)
    return make_precompute_config(params, settings=site_settings(ROOT))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny models on 2 shared cores: one torch thread avoids oversubscription stalls (restored afterwards)."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_precompute_models(make_cfg(tmp_path_factory.mktemp("unused")))


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory, models):
    "The whole toy world, precomputed once (shards of 3 clips)."
    cfg = make_cfg(tmp_path_factory.mktemp("cache"))
    return precompute(cfg, models=models)


def shard_sums(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(Path(folder).glob("shard_*.safetensors"))}


def flip_byte_of(shard: Path, tensor: str, at: int = 5):
    "Flip one byte inside the data of `tensor` of a safetensors file (parses the header)."
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    start, end = header[tensor]["data_offsets"]
    pos = 8 + n + start + min(at, end - start - 1)
    raw[pos] ^= 0xFF
    shard.write_bytes(bytes(raw))


def copy_toy(dst: Path) -> Path:
    shutil.copytree(TOY, dst)
    return dst


# ---------------------------------------------------------------- content


def test_entries_equal_direct_computation(toy_cache):
    from sara.vfm import build_vfm
    from sara.wan import build_wan, encode_video
    from sara.text import MiniLMEncoder
    cache = open_cache(toy_cache)
    recs = read_manifest(TOY / "manifest.jsonl")
    assert len(cache) == N_TOY and cache.ids == [r.id for r in recs]
    vfm, vae, text = build_vfm("tiny", seed=0), build_wan("tiny", seed=0).vae, MiniLMEncoder()
    geo = vfm.geometry
    for rec in recs[:3]:
        e = cache[rec.id]
        masks = load_masks(rec.masks)                                  # E, 17, 64, 64 (toy: no resampling needed)
        t_used = 1 + geo.usable_frames(masks.shape[1] - 1)            # the target sees frames 1..16 (sara.grids)
        assert torch.equal(e["masks_grid"], reduce_to_grid(masks[:, 1:t_used], geo.tubelet, geo.patch))
        assert torch.equal(e["w"], saliency_from_masks(masks[:, 1:t_used], geo.tubelet, geo.patch, how="max"))
        video = (load_video(rec.video).float() / 127.5 - 1).clamp(-1, 1)[None]  # 1, T, C, H, W
        assert torch.equal(e["y"], vfm(video[:, 1:])[0])
        torch.testing.assert_close(e["latents"], encode_video(vae, video)[0])
        emb, mask = text.encode_prompts([rec.caption])
        torch.testing.assert_close(e["prompt"], emb[0]); assert torch.equal(e["prompt_mask"], mask[0].bool())
        torch.testing.assert_close(e["entity_emb"], text.embed(rec.entities))
        assert e["caption"] == rec.caption and e["entities"] == rec.entities and e["line"] == rec.line
        flow_file = TOY / "flow" / f"{rec.id}.safetensors"
        if flow_file.is_file():  # the toy world's exact flow, averaged over each token cell
            from sara.data import load_flow
            assert torch.equal(e["flow_grid"], flow_to_grid(load_flow(flow_file)[1:t_used], geo.tubelet, geo.patch))
        else: assert "flow_grid" not in e
    assert cache.settings["vfm_model"] == "tiny" and read_index(toy_cache)["key"] == settings_key(cache.settings)


def test_flow_grid_when_a_flow_file_exists(tmp_path, models):
    data = copy_toy(tmp_path / "toy")
    (data / "flow").mkdir(exist_ok=True)
    flow = torch.zeros(17, 2, 64, 64); flow[:, 0, :32] = 2.0; flow[:, 1] = -1.0  # top half moves right
    from safetensors.torch import save_file
    save_file({"flow": flow}, str(data / "flow" / "toy_000.safetensors"))
    (data / "flow" / "toy_001.safetensors").unlink(missing_ok=True)
    cache = open_cache(precompute(make_cfg(tmp_path / "c", data, limit=2), models=models))
    fg = cache["toy_000"]["flow_grid"]                               # T', H', W', 2
    assert fg.shape == (8, 8, 8, 2)
    assert torch.all(fg[:, :4, :, 0] == 2.0) and torch.all(fg[:, 4:, :, 0] == 0.0) and torch.all(fg[..., 1] == -1.0)
    assert "flow_grid" not in cache["toy_001"]


# ---------------------------------------------------------------- resume, settings, corruption


def test_resume_skips_finished_clips(toy_cache, models):
    before = shard_sums(toy_cache)
    calls = []
    precompute(make_cfg(toy_cache.parent, name=toy_cache.name), models=models, after_clip=calls.append)
    assert calls == []                                               # no clip encoded again
    assert shard_sums(toy_cache) == before                           # no shard rewritten
    run = read_index(toy_cache)["last_run"]
    assert run["skipped"] == N_TOY and run["done"] == 0 and run["failed"] == 0


def test_other_settings_are_refused(toy_cache, models):
    for change, word in ((dict(n_frames=9), "n_frames"), (dict(merge="union"), "merge"), (dict(y_dtype="bfloat16"), "y_dtype")):
        with pytest.raises(SettingsMismatchError, match=word) as ei:
            precompute(make_cfg(toy_cache.parent, name=toy_cache.name, **change), models=models)
        assert "index.json" in str(ei.value)
    # without a name the settings key picks another folder: nothing is mixed
    other = make_cfg(toy_cache.parent, merge="union", limit=1)
    assert settings_key(other) != toy_cache.name


def test_corrupt_entry_is_detected_and_recomputed(toy_cache, models, tmp_path):
    folder = tmp_path / toy_cache.name
    shutil.copytree(toy_cache, folder)
    entry = read_index(folder)["entries"]["toy_004"]
    shard = folder / entry["shard"]
    flip_byte_of(shard, "toy_004/y")
    cache = open_cache(folder)
    with pytest.raises(CacheCorruptError, match=entry["shard"]):
        cache["toy_004"]
    ok = [c for c in cache.ids if read_index(folder)["entries"][c]["shard"] == entry["shard"] and c != "toy_004"]
    for c in ok: cache[c]                                             # its shard-mates still verify
    calls = []
    with pytest.warns(UserWarning, match=entry["shard"]):
        precompute(make_cfg(tmp_path, name=folder.name), models=models, after_clip=calls.append)
    assert calls == ["toy_004"]                                      # only the corrupt entry is recomputed
    run = read_index(folder)["last_run"]
    assert len(run["corrupt"]) == 1 and entry["shard"] in run["corrupt"][0] and "toy_004" in run["corrupt"][0]
    fresh, ref = open_cache(folder), open_cache(toy_cache)
    assert torch.equal(fresh["toy_004"]["y"], ref["toy_004"]["y"])
    for c in ref.ids: assert fresh.index["entries"][c]["sha256"] == ref.index["entries"][c]["sha256"]


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from sara.config import site_settings
    from sara.precompute import make_precompute_config, precompute
    root, data, cache = sys.argv[1:4]
    cfg = make_precompute_config(dict(data_root=data, cache_dir=cache, device="cpu", progress=False, shard_size=3,
                                      wan_model="tiny", vfm_model="tiny", text_model="minilm"), settings=site_settings(root))
    done = []
    def die(cid):
        done.append(cid)
        if len(done) == 5: os._exit(17)   # killed mid-shard: no cleanup, the lock file stays behind
    precompute(cfg, after_clip=die)
""")


def test_crash_mid_shard_then_resume(toy_cache, models, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(ROOT), str(TOY), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 17, r.stderr[-2000:]
    folder = tmp_path / toy_cache.name                               # same settings -> same key
    idx = read_index(folder)
    assert sorted(idx["entries"]) == ["toy_000", "toy_001", "toy_002"]  # the finished shard survived
    assert (folder / ".lock").exists()                               # left by the killed writer
    before = shard_sums(folder)
    calls = []
    precompute(make_cfg(tmp_path), models=models, after_clip=calls.append)  # takes over the dead writer's lock
    assert calls == ["toy_003", "toy_004", "toy_005", "toy_006", "toy_007"][:N_TOY - 3]
    for name, v in before.items(): assert shard_sums(folder)[name] == v  # finished shard untouched
    fresh, ref = open_cache(folder), open_cache(toy_cache)
    assert fresh.ids == ref.ids
    for c in ref.ids: assert fresh.index["entries"][c]["sha256"] == ref.index["entries"][c]["sha256"]


def test_crash_in_process_loses_only_the_open_shard(tmp_path, models):
    def boom(cid):
        if cid == "toy_004": raise RuntimeError("simulated crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        precompute(make_cfg(tmp_path), models=models, after_clip=boom)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert sorted(read_index(folder)["entries"]) == ["toy_000", "toy_001", "toy_002"]
    assert not (folder / ".lock").exists()
    assert not list(folder.glob(".*tmp*"))


# ---------------------------------------------------------------- bad input


def test_bad_clips_are_recorded_and_the_run_goes_on(tmp_path, models):
    "One policy for missing, unreadable and too-short clips: skipped and listed within max_failed_fraction."
    data = copy_toy(tmp_path / "toy")
    (data / "videos" / "broken.mp4").write_bytes(os.urandom(4096))           # unreadable
    write_video(data / "videos" / "short.mp4", torch.zeros(5, 3, 64, 64, dtype=torch.uint8))  # 5 < 17 frames
    m = load_masks(data / "masks" / "toy_001.safetensors").clone()
    ents = read_manifest(data / "manifest.jsonl")[1].entities
    m[1] = False                                                                 # entity 1 is found nowhere
    save_masks(data / "masks" / "toy_001.safetensors", m, ents, overwrite=True)
    lines = (data / "manifest.jsonl").read_text().splitlines()
    lines.insert(2, json.dumps(dict(id="broken", video="videos/broken.mp4", caption="noise", entities=["static"])))
    lines.append(json.dumps(dict(id="short", video="videos/short.mp4", caption="a blink", entities=["nothing"])))
    lines.append(json.dumps(dict(id="gone", video="videos/gone.mp4", caption="a ghost", entities=["ghost"])))  # missing
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    folder = precompute(make_cfg(tmp_path / "c", data, max_failed_fraction=0.5), models=models)
    cache = open_cache(folder)
    assert sorted(cache.failed) == ["broken", "gone", "short"]
    assert "broken.mp4" in cache.failed["broken"]["error"] and cache.failed["broken"]["line"] == 3
    assert "short.mp4" in cache.failed["short"]["error"] and "5 frames" in cache.failed["short"]["error"]
    assert "FileNotFoundError" in cache.failed["gone"]["error"] and "gone.mp4" in cache.failed["gone"]["error"]
    assert len(cache) == N_TOY and "broken" not in cache.ids
    assert cache.empty_entities == {"toy_001": [ents[1]]}
    e = cache["toy_001"]
    assert e["empty_entities"] == [ents[1]] and e["masks_grid"][1].abs().sum() == 0
    run = read_index(folder)["last_run"]
    assert (run["done"], run["failed"], run["empty_entities"]) == (N_TOY, 3, {"toy_001": [ents[1]]})
    with pytest.raises(KeyError, match="it failed"):
        cache["broken"]
    # a rerun retries the failed clips (they fail again) and skips the rest
    calls = []
    precompute(make_cfg(tmp_path / "c", data, max_failed_fraction=0.5), models=models, after_clip=calls.append)
    assert calls == [] and read_index(folder)["last_run"]["failed"] == 3
    # beyond the default 5% the pass fails, listing the clips; what finished is kept
    with pytest.raises(TooManyFailedClips, match=r"3 of 11 clips failed, more than max_failed_fraction=0.05 allows: broken \(line 3\)"):
        precompute(make_cfg(tmp_path / "c", data), models=models)
    assert len(open_cache(folder)) == N_TOY


def test_a_failed_pass_leaves_no_empty_index(tmp_path, models):
    "The index is written with the first finished clip: a pass that finishes none leaves no cache folder behind."
    data = copy_toy(tmp_path / "toy")
    for v in (data / "videos").glob("*.mp4"): v.unlink()                      # every video missing
    with pytest.raises(TooManyFailedClips, match=f"{N_TOY} of {N_TOY} clips failed"):
        precompute(make_cfg(tmp_path / "c", data), models=models)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    def boom(cid): raise RuntimeError("killed before the first shard")
    with pytest.raises(RuntimeError, match="killed"):
        precompute(make_cfg(tmp_path / "c", TOY), models=models, after_clip=boom)
    assert not any((tmp_path / "c").iterdir())


def test_sizes_are_checked_before_any_work(tmp_path):
    with pytest.raises(PrecomputeConfigError, match="PrecomputeConfig.height = 100000 is not allowed; expected at most 1024"):
        precompute(make_cfg(tmp_path / "c", height=100000, width=100000))
    assert not (tmp_path / "c").exists()
    with pytest.raises(PrecomputeConfigError, match="PrecomputeConfig.n_frames = 1029 is not allowed; expected at most 253"):
        check_sizes(make_cfg(tmp_path / "c", n_frames=1029))
    with pytest.raises(PrecomputeConfigError, match=r"height/width = \(1024, 1024\) .* GiB available"):
        check_sizes(make_cfg(tmp_path / "c", height=1024, width=1024), memory=2**28)


def test_stale_entry_is_recomputed_when_the_caption_changes(tmp_path, models):
    data = copy_toy(tmp_path / "toy")
    folder = precompute(make_cfg(tmp_path / "c", data, limit=3), models=models)
    lines = (data / "manifest.jsonl").read_text().splitlines()
    row = json.loads(lines[1]); row["caption"] = row["caption"] + " slowly"; lines[1] = json.dumps(row)
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    calls = []
    precompute(make_cfg(tmp_path / "c", data, limit=3), models=models, after_clip=calls.append)
    assert calls == ["toy_001"] and open_cache(folder)["toy_001"]["caption"].endswith(" slowly")


# ---------------------------------------------------------------- layers


def test_layers_never_mix_heads(toy_cache, tmp_path):
    folder = tmp_path / toy_cache.name
    shutil.copytree(toy_cache, folder)
    base_before = (folder / "index.json").read_bytes()
    head = dict(checkpoint="runs/s1/aligner.safetensors", step=10)
    cache = open_cache(folder)
    g = cache["toy_000"]["masks_grid"]
    write_layer(folder, "aligner", ["toy_000", "toy_001"], [dict(w_aligner=torch.rand(g[0].numel())),
                                                             dict(w_aligner=torch.rand(g[0].numel()))], head)
    assert cache.has_layer("aligner") and cache["toy_001"]["w_aligner"].shape == (g[0].numel(),)
    with pytest.raises(ValueError, match="never mixes heads"):
        write_layer(folder, "aligner", "toy_002", dict(w_aligner=torch.rand(3)), dict(checkpoint="other", step=10))
    assert (folder / "index.json").read_bytes() == base_before       # base index untouched
    part = next((folder / "layers" / "aligner").glob("part_*.safetensors"))
    flip_byte_of(part, "toy_000/w_aligner")
    with pytest.raises(CacheCorruptError, match=part.name):
        open_cache(folder)["toy_000"]


# ---------------------------------------------------------------- providers


def test_sam3_masks_and_raft_flow_through_the_same_path(tmp_path):
    "Tiny random SAM 3 and RAFT (only the weights differ from real checkpoints): the pass runs and records what they find."
    from safetensors.torch import save_file
    from torchvision.models.optical_flow import raft_small
    from sara.masks import make_tiny_sam3_dir
    make_tiny_sam3_dir(tmp_path / "sam3")
    save_file(raft_small(weights=None).state_dict(), str(tmp_path / "raft.safetensors"))
    cfg = make_cfg(tmp_path / "c", limit=2, masks="sam3", mask_model=str(tmp_path / "sam3"), flow="raft_small",
                   flow_model=str(tmp_path / "raft.safetensors"))
    timings = {}
    cache = open_cache(precompute(cfg, timings=timings))
    assert len(cache) == 2 and not cache.failed and timings["masks"] > 0 and timings["flow"] > 0
    e = cache[0]
    assert e["masks_grid"].shape == (len(e["entities"]), 8, 8, 8) and e["flow_grid"].shape == (8, 8, 8, 2)
    found_nowhere = [n for n, g in zip(e["entities"], e["masks_grid"]) if g.sum() == 0]
    assert e["empty_entities"] == found_nowhere
    assert cache.settings["masks"] == "sam3" and cache.settings["flow"] == "raft_small"
