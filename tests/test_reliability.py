"""Reliability guarantees of Stage 2 and the precompute cache, each tried as a fault (issue 8):

* kill -9 of a training run at seeded-random moments (and deterministically in the middle of writing a
  checkpoint): the resumed run reproduces the uninterrupted one exactly, as one metrics file;
* kill -9 of the precompute at seeded-random moments: the rerun finishes the cache, recomputes only
  what was not finished, and every entry passes its checksum;
* bit-flipped or truncated cache entries and checkpoints: detected, named, refused; the previous
  checkpoint stays usable;
* a full disk (failing writer) and a real write failure (RLIMIT_FSIZE) while saving: the previous
  checkpoint survives and the error says what happened;
* NaN/Inf in the loss, the DiT output, the gradients or a cached target: skipped and logged, or refused,
  and the run stops after `max_bad_steps` consecutive bad steps.

Runs are tiny (8 steps of the tiny Wan on the toy world, CPU). The uninterrupted reference run and the
precompute cache are shared by the whole module."""
import errno
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import sara.precompute as P
import sara.train as T
from sara.checkpoint import CorruptCheckpoint, latest_checkpoint, list_checkpoints, verify_checkpoint
from sara.config import make_config, site_settings
from sara.precompute import CacheCorruptError, make_precompute_config, open_cache, precompute, read_index
from sara.train import cli_args, read_metrics, resume_folder, train, trainable_parameters

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
KEYS = ("fm", "trd", "loss", "grad_norm", "lr", "clips")
TRIALS = []   # (guarantee, what happened) lines, printed at the end of the module (run with -s to see them)


def pick(rows):
    "The deterministic part of metrics rows, keyed by step."
    return [dict(step=r["step"], **{k: r[k] for k in KEYS}) for r in rows]


def child_env() -> dict:
    "The environment of a child process: offline, same thread count as this process, no site overrides."
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARA_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def make_cfg(runs_dir, cache_dir, **kw):
    params = dict(run_name="r", steps=STEPS, batch_size=2, runs_dir=str(runs_dir), cache_dir=cache_dir,
                  checkpoint_every=1, device="cpu", warmup_steps=4, ema_decay=0.9)   # LR schedule and EMA must resume too
    params.update(kw)
    return make_config(params, settings=site_settings(ROOT, env={}))


@pytest.fixture
def cfg_for(tmp_path, cache_dir):
    return lambda **kw: make_cfg(tmp_path / "runs", cache_dir, **kw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    "The uninterrupted run every fault is compared with (it also builds the module's cache)."
    out = train(make_cfg(tmp_path_factory.mktemp("ref"), cache_dir, run_name="reference"), progress=False)
    assert [r["step"] for r in out["metrics"]] == list(range(1, STEPS + 1))
    assert not any(r["skipped"] for r in out["metrics"])
    assert len({r["lr"] for r in out["metrics"]}) == 3            # warm-up: the schedule matters
    return dict(rows=out["metrics"], cache=Path(out["cache"]), export=exported(out["run_dir"]))


def exported(run_dir) -> dict:
    "The weights-only export of a finished run (raw and EMA): file name -> tensors."
    from safetensors.torch import load_file
    files = sorted((Path(run_dir) / "checkpoint").glob("*.safetensors"))
    assert {f.name for f in files} == {"transformer.safetensors", "projector.safetensors",
                                       "transformer_ema.safetensors", "projector_ema.safetensors"}
    return {f.name: load_file(str(f)) for f in files}


@pytest.fixture(scope="module", autouse=True)
def trial_table():
    yield
    print("\n".join(["", "reliability trials:"] + TRIALS))


def complete_rows(path: Path) -> int:
    "Number of complete (newline-terminated) lines of a file that may be being written."
    try: return path.read_bytes().count(b"\n")
    except FileNotFoundError: return 0


def wait_for(cond, proc, log: Path, timeout: float = 180):
    t_end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before the kill point:\n{log.read_text()[-3000:]}")
        if time.monotonic() > t_end:
            proc.kill(); proc.wait()
            pytest.fail(f"timed out waiting for the kill point:\n{log.read_text()[-3000:]}")
        time.sleep(0.002)


def sigkill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the child finished before it could be killed"


def check_resumed_run(cfg, reference, capsys=None) -> int:
    "Resume `cfg` with resume='latest' and check it against the reference; return the step it resumed from."
    ck_root = Path(cfg.run_dir) / "checkpoints"
    ck = latest_checkpoint(ck_root, report=lambda m: None)
    start = int(ck.name.split("_")[1]) if ck is not None else 0
    cfg.resume = "latest"
    rest = train(cfg, progress=False)["metrics"]
    assert [r["step"] for r in rest] == list(range(start + 1, STEPS + 1))
    assert pick(rest) == pick(reference["rows"][start:]), "the resumed run differs from the uninterrupted one"
    rows = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "metrics.jsonl must read as one run"
    assert pick(rows) == pick(reference["rows"])
    assert not list(ck_root.glob(".tmp-*")), "a leftover temporary checkpoint folder was not cleaned"
    steps = [s for s, _ in list_checkpoints(ck_root)]
    assert steps == [STEPS - 2, STEPS - 1, STEPS]
    for _, folder in list_checkpoints(ck_root): verify_checkpoint(folder)
    got, want = exported(cfg.run_dir), reference["export"]
    for name in want:                                              # raw and EMA weights, bit for bit
        assert got[name].keys() == want[name].keys()
        assert all(torch.equal(got[name][k], want[name][k]) for k in want[name]), f"{name} differs from the reference"
    return start


# ---------------------------------------------------------------- 1. kill -9 during training


def start_training(cfg, log: Path, script: str | None = None, extra: tuple = ()) -> subprocess.Popen:
    cmd = [sys.executable, *(("-c", script, *extra) if script else ("-m", "sara.train")), *cli_args(cfg)]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


KILL_ROWS = random.Random(8).sample(range(1, STEPS - 1), 5)   # distinct seeded kill points, one per trial


@pytest.mark.parametrize("trial", range(len(KILL_ROWS)))
def test_kill9_training_at_random_steps_resumes_exactly(trial, cfg_for, reference, tmp_path):
    k = KILL_ROWS[trial]
    delay = random.Random(8000 + trial).uniform(0.0, 0.12)        # kill `delay` s after the k-th metrics row
    cfg = cfg_for(run_name=f"kill{trial}")
    log = tmp_path / "child.log"
    proc = start_training(cfg, log)
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    wait_for(lambda: complete_rows(metrics) >= k, proc, log)
    time.sleep(delay)
    sigkill(proc)
    ck_root = Path(cfg.run_dir) / "checkpoints"
    rows_at_kill = complete_rows(metrics)
    tmp_left = sorted(p.name for p in ck_root.glob(".tmp-*"))
    start = check_resumed_run(cfg, reference)
    assert start >= k - 1, "a checkpoint finished before the kill was not used"
    TRIALS.append(f"kill -9 train trial {trial}: after row {k} + {delay * 1000:.0f} ms; {rows_at_kill} rows on disk, "
                  f"temporary folders {tmp_left or 'none'}; resumed from step {start}; exact")


HANG_IN_SAVE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import accelerate
    from sara.train import train_cli
    marker, step = Path(sys.argv[1]), int(sys.argv[2])
    orig = accelerate.Accelerator.save_state
    def save_state(self, output_dir=None, **kw):
        out = orig(self, output_dir, **kw)
        if Path(output_dir).name == f".tmp-step_{step:06d}":
            f = Path(output_dir) / "model.safetensors"
            with open(f, "r+b") as h: h.truncate(f.stat().st_size // 2)   # as if killed while writing it
            marker.write_text("in save_state")
            time.sleep(600)
        return out
    accelerate.Accelerator.save_state = save_state
    train_cli(sys.argv[3:])
""")


def test_kill9_in_the_middle_of_a_checkpoint(cfg_for, reference, tmp_path):
    "Killed while step 4's checkpoint is half written: the temporary folder is ignored, then cleaned."
    cfg = cfg_for(run_name="midckpt")
    marker, log = tmp_path / "marker", tmp_path / "child.log"
    proc = start_training(cfg, log, HANG_IN_SAVE, (str(marker), "4"))
    wait_for(marker.exists, proc, log)
    sigkill(proc)
    ck_root = Path(cfg.run_dir) / "checkpoints"
    tmp = ck_root / ".tmp-step_000004"
    assert tmp.is_dir() and not (tmp / "MANIFEST.json").exists()
    assert [s for s, _ in list_checkpoints(ck_root)] == [1, 2, 3]
    assert complete_rows(Path(cfg.run_dir) / "metrics.jsonl") == 4   # row 4 was logged before its checkpoint
    assert check_resumed_run(cfg, reference) == 3
    TRIALS.append("kill -9 train mid-checkpoint (step 4, half-written model file, no manifest): resumed from step 3; exact")


# ---------------------------------------------------------------- 2. kill -9 during precompute

PRECOMPUTE_CHILD = textwrap.dedent("""
    import sys
    from sara.config import site_settings
    from sara.precompute import make_precompute_config, precompute
    root, cache = sys.argv[1:3]
    cfg = make_precompute_config(dict(cache_dir=cache, device="cpu", progress=False, shard_size=3),
                                 settings=site_settings(root, env={}))
    precompute(cfg, after_clip=lambda cid: print("clip", cid, flush=True))
""")


PRECOMPUTE_KILL_CLIPS = random.Random(9).sample(range(2, 8), 3)   # after how many encoded clips (of 8) to kill


@pytest.mark.parametrize("trial", range(len(PRECOMPUTE_KILL_CLIPS)))
def test_kill9_precompute_mid_shard_then_rerun(trial, reference, tmp_path):
    """Extends tests/test_precompute.py::test_crash_mid_shard_then_resume (a cooperative os._exit after the
    5th clip) with a real SIGKILL at a random moment, and reads back every entry with its checksum."""
    ref = open_cache(reference["cache"])
    k, delay = min(PRECOMPUTE_KILL_CLIPS[trial], len(ref) - 1), random.Random(9000 + trial).uniform(0.0, 0.5)
    cache_dir = tmp_path / "cache"
    log = tmp_path / "child.err"
    proc = subprocess.Popen([sys.executable, "-c", PRECOMPUTE_CHILD, str(ROOT), str(cache_dir)], cwd=ROOT,
                            env=child_env(), stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    seen = 0
    while seen < k:
        line = proc.stdout.readline()
        if not line: pytest.fail(f"precompute exited ({proc.wait()}) after {seen} clips:\n{log.read_text()[-3000:]}")
        seen += line.startswith("clip ")
    time.sleep(delay)
    sigkill(proc)
    cfg = make_precompute_config(dict(cache_dir=str(cache_dir), device="cpu", progress=False, shard_size=3),
                                 settings=site_settings(ROOT, env={}))
    folder = P.cache_path(cfg)
    assert folder.name == reference["cache"].name                     # same content settings, same key
    idx = read_index(folder) if (folder / "index.json").exists() else dict(entries={}, shards={})
    finished = [c for c in ref.ids if c in idx["entries"]]
    assert len(finished) >= 3 * ((k - 1) // 3), "a shard finished before the kill was lost"
    shards_before = {name: (folder / name).read_bytes() for name in idx["shards"]}
    calls = []
    precompute(cfg, after_clip=calls.append)
    assert calls == [c for c in ref.ids if c not in finished], "a finished entry was recomputed, or one was skipped"
    for name, data in shards_before.items():
        assert (folder / name).read_bytes() == data, f"finished shard {name} was rewritten"
    fresh = open_cache(folder, verify=True)
    assert fresh.ids == ref.ids and not fresh.failed
    for cid in fresh.ids:
        e, r = fresh[cid], ref[cid]                                    # each read recomputes the entry's checksum
        assert fresh.index["entries"][cid]["sha256"] == ref.index["entries"][cid]["sha256"]
        assert all(torch.equal(e[f], r[f]) for f in ("y", "w", "latents", "prompt")), cid
    assert not list(folder.glob(".*tmp*")) and not (folder / ".lock").exists()
    TRIALS.append(f"kill -9 precompute trial {trial}: after clip {k} + {delay * 1000:.0f} ms; {len(finished)} finished "
                  f"entries kept, {len(calls)} recomputed; all {len(fresh)} entries verify")


# ---------------------------------------------------------------- 3. corrupted cache entries and checkpoints


def safetensors_header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n])


def flip_byte_of(path: Path, tensor: str):
    "Flip one byte inside the data of `tensor` of a safetensors file."
    n, header = safetensors_header(path)
    raw = bytearray(path.read_bytes())
    start, end = header[tensor]["data_offsets"]
    raw[8 + n + start + (end - start) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: float = 0.6):
    with open(path, "r+b") as f: f.truncate(int(path.stat().st_size * keep))


@pytest.mark.parametrize("how", ["bitflip", "truncate"])
def test_corrupt_cache_entry_is_refused_by_training(how, cfg_for, reference, tmp_path):
    folder = tmp_path / "cache" / reference["cache"].name
    shutil.copytree(reference["cache"], folder)
    idx = read_index(folder)
    cid = idx["order"][3]
    shard = folder / idx["entries"][cid]["shard"]
    flip_byte_of(shard, f"{cid}/y") if how == "bitflip" else truncate(shard)
    cfg = cfg_for(run_name=f"corrupt-{how}", cache=str(folder))
    with pytest.raises(CacheCorruptError, match=re.escape(str(shard))) as ei:
        train(cfg, progress=False)
    if how == "bitflip": assert f"clip {cid!r} does not match its checksum" in str(ei.value)
    assert not (Path(cfg.run_dir) / "metrics.jsonl").exists() and not (Path(cfg.run_dir) / "checkpoints").exists()
    TRIALS.append(f"{how} cache shard read by train: refused ({str(ei.value)[len(str(folder)) + 1:][:70]}...)")


def test_corrupt_entry_of_the_runs_own_cache_is_recomputed_before_training(cfg_for, reference, tmp_path):
    "With no `cache` set, train resumes its own cache first: the corrupt entry is recomputed, then training is exact."
    cache_dir = tmp_path / "own"
    shutil.copytree(reference["cache"], cache_dir / reference["cache"].name)
    folder = cache_dir / reference["cache"].name
    idx = read_index(folder)
    cid = idx["order"][5]
    shard = folder / idx["entries"][cid]["shard"]
    flip_byte_of(shard, f"{cid}/latents")
    cfg = make_cfg(tmp_path / "runs", str(cache_dir), run_name="own")
    with pytest.warns(UserWarning, match=re.escape(str(shard))):
        rows = train(cfg, progress=False, stop_after=2)["metrics"]
    assert pick(rows) == pick(reference["rows"][:2])
    assert read_index(folder)["last_run"]["done"] == 1 and cid in read_index(folder)["last_run"]["corrupt"][0]
    TRIALS.append("bit flip in the run's own cache: precompute recomputed the one entry, training exact")


@pytest.fixture
def stopped_run(cfg_for):
    "A run stopped (as if killed) after 5 of 8 steps: checkpoints step_000003..5 (keep_last=3)."
    cfg = cfg_for(run_name="stopped")
    train(cfg, progress=False, stop_after=5)
    root = Path(cfg.run_dir) / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [3, 4, 5]
    return cfg, root


def corrupt_checkpoint(folder: Path, how: str) -> Path:
    if how == "bitflip":
        f = folder / "model.safetensors"
        flip_byte_of(f, next(k for k in safetensors_header(f)[1] if k != "__metadata__"))
    elif how == "truncate":
        f = folder / "optimizer.bin"; truncate(f)
    else:
        f = folder / "MANIFEST.json"; f.unlink()
    return f


@pytest.mark.parametrize("how", ["bitflip", "truncate", "no_manifest"])
def test_corrupt_newest_checkpoint_is_named_and_skipped(how, stopped_run, reference, capsys):
    cfg, root = stopped_run
    bad = corrupt_checkpoint(root / "step_000005", how)
    msgs = []
    cfg.resume = "latest"
    assert resume_folder(cfg, report=msgs.append) == root / "step_000004"
    want = {"bitflip": "SHA-256 does not match", "truncate": "(truncated?)", "no_manifest": "no MANIFEST.json"}[how]
    named = str(bad) if how != "no_manifest" else str(bad.parent)
    assert len(msgs) == 1 and named in msgs[0] and want in msgs[0], msgs
    rest = train(cfg, progress=False)["metrics"]
    out = capsys.readouterr().out
    assert named in out and "resumed from" in out and "step_000004" in out
    assert pick(rest) == pick(reference["rows"][4:])
    assert [r["step"] for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert [s for s, _ in list_checkpoints(root)] == [6, 7, 8]   # the run went on checkpointing past step 5
    for _, f in list_checkpoints(root): verify_checkpoint(f)
    aside = root / "corrupt-step_000005"
    assert aside.is_dir() and f"moved corrupt checkpoint step_000005" in out and str(aside) in out
    TRIALS.append(f"{how} newest checkpoint: reported by name, set aside as {aside.name}, resumed from the previous one; exact")


def test_resume_past_a_corrupt_checkpoint_keeps_checkpointing(stopped_run, reference):
    cfg, root = stopped_run
    corrupt_checkpoint(root / "step_000005", "bitflip")
    cfg.resume = "latest"
    rest = train(cfg, progress=False)["metrics"]
    assert pick(rest) == pick(reference["rows"][4:])
    assert [s for s, _ in list_checkpoints(root)] == [6, 7, 8]
    for _, f in list_checkpoints(root): verify_checkpoint(f)
    assert (root / "corrupt-step_000005").is_dir()
    TRIALS.append("resume='latest' past a corrupt step 5 with checkpointing on: set aside, steps 6-8 written; exact")


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(stopped_run, reference):
    "Resuming on purpose from step 4 while a valid step 5 exists: step 5 is kept (renamed), the run re-does 5-8."
    cfg, root = stopped_run
    before = (root / "step_000005" / "MANIFEST.json").read_bytes()
    cfg.resume = str(root / "step_000004")
    rest = train(cfg, progress=False)["metrics"]
    assert pick(rest) == pick(reference["rows"][4:])
    assert [s for s, _ in list_checkpoints(root)] == [6, 7, 8]
    kept = root / "superseded-step_000005"
    assert (kept / "MANIFEST.json").read_bytes() == before
    verify_checkpoint(kept)
    TRIALS.append("resume= an older checkpoint (4) with a valid newer one (5): 5 kept as superseded-step_000005; exact")


@pytest.mark.parametrize("how", ["bitflip", "truncate"])
def test_named_corrupt_checkpoint_raises(how, stopped_run):
    cfg, root = stopped_run
    bad = corrupt_checkpoint(root / "step_000004", how)
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    before = metrics.read_bytes()
    cfg.resume = str(root / "step_000004")
    with pytest.raises(CorruptCheckpoint, match=re.escape(str(bad))):
        train(cfg, progress=False)
    assert metrics.read_bytes() == before, "a refused resume must not touch the run's metrics"
    verify_checkpoint(root / "step_000005")
    TRIALS.append(f"{how} checkpoint named in resume=: CorruptCheckpoint naming {bad.name}; nothing written")


# ---------------------------------------------------------------- 4. full disk while saving


def test_disk_full_while_saving_keeps_previous_checkpoint(cfg_for, reference, monkeypatch):
    import accelerate
    cfg = cfg_for(run_name="diskfull")
    orig = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, **kw):
        if Path(output_dir).name == ".tmp-step_000003":
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 4096)   # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(self, output_dir, **kw)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    with pytest.raises(OSError) as ei:
        train(cfg, progress=False)
    msg = str(ei.value)
    assert ei.value.errno == errno.ENOSPC
    assert "No space left on device" in msg and "checkpoint step 3" in msg and "step_000002 is intact" in msg, msg
    root = Path(cfg.run_dir) / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [1, 2] and not list(root.glob(".tmp-*"))
    verify_checkpoint(root / "step_000002")
    monkeypatch.undo()
    assert check_resumed_run(cfg, reference) == 2
    TRIALS.append(f"ENOSPC writer at step 3: {msg[msg.index('failed'):][:90]}...; resumed from step 2; exact")


def run_with_file_size_limit(cfg, monkeypatch, at_step: int, limit: int = 100_000):
    "Run `cfg` with a real per-process file-size limit (RLIMIT_FSIZE) while checkpoint `at_step` is written."
    import resource
    orig = T.write_checkpoint

    def write_checkpoint(root, step, *a, **kw):
        if step != at_step: return orig(root, step, *a, **kw)
        old, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
        try: return orig(root, step, *a, **kw)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(T, "write_checkpoint", write_checkpoint)
    with pytest.raises(Exception) as ei:
        train(cfg, progress=False)
    monkeypatch.undo()
    return ei.value


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX RLIMIT_FSIZE")
def test_real_write_failure_keeps_previous_checkpoint(cfg_for, reference, monkeypatch):
    "The kernel refuses the write (EFBIG, as a full filesystem refuses it with ENOSPC) half way through a file."
    cfg = cfg_for(run_name="fsize")
    err = run_with_file_size_limit(cfg, monkeypatch, at_step=3)
    root = Path(cfg.run_dir) / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [1, 2] and not list(root.glob(".tmp-*"))
    verify_checkpoint(root / "step_000002")
    assert check_resumed_run(cfg, reference) == 2
    TRIALS.append(f"RLIMIT_FSIZE write failure at step 3 ({type(err).__name__}: {str(err)[:60]}): "
                  "step_000002 intact; resumed exactly")


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX RLIMIT_FSIZE")
def test_real_write_failure_message_says_what_happened(cfg_for, monkeypatch):
    err = run_with_file_size_limit(cfg_for(run_name="fsize-msg"), monkeypatch, at_step=3)
    assert isinstance(err, OSError)
    assert "checkpoint step 3" in str(err) and "step_000002 is intact" in str(err), str(err)
    TRIALS.append(f"RLIMIT_FSIZE write failure, message: {str(err)[:150]}")


# ---------------------------------------------------------------- 5. NaN / Inf


class NanGrad(torch.autograd.Function):
    "Identity forward; NaN gradient backward (a finite loss whose gradients are not)."
    @staticmethod
    def forward(ctx, x): return x.clone()
    @staticmethod
    def backward(ctx, g): return g * float("nan")


def inject(monkeypatch, plan: dict) -> list:
    """Make step s of the next run non-finite as `plan[s]` says: nan_loss (total), inf_trd, nan_pred (DiT output),
    nan_grad (finite loss, NaN gradients), nan_feats (projector output). Returns the trainable parameters
    (flattened) seen at the start of every step."""
    seen, cur = [], [0]
    orig_losses, orig_fwd = T.step_losses, T.dit_forward

    def step_losses(batch, models, cfg, noise_gen, lam=None, part=None):
        cur[0] += 1
        seen.append(torch.cat([p.detach().flatten() for p in trainable_parameters(models)]).clone())
        out = orig_losses(batch, models, cfg, noise_gen, lam=lam, part=part)
        kind = plan.get(cur[0])
        if kind == "nan_loss": out["total"] = out["total"] * float("nan")
        elif kind == "inf_trd":
            out["trd"] = out["trd"] + float("inf"); out["total"] = out["fm"] + lam * out["trd"]
        elif kind == "nan_grad": out["total"] = NanGrad.apply(out["total"])
        return out

    def dit_forward(*a, **kw):
        pred = orig_fwd(*a, **kw)
        return pred * float("nan") if plan.get(cur[0]) == "nan_pred" else pred

    import sara.wan as W
    orig_proj = W.Projector.forward

    def proj_forward(self, h):
        out = orig_proj(self, h)
        return out * float("nan") if plan.get(cur[0]) == "nan_feats" else out

    monkeypatch.setattr(T, "step_losses", step_losses)
    monkeypatch.setattr(T, "dit_forward", dit_forward)
    monkeypatch.setattr(W.Projector, "forward", proj_forward)
    return seen


def check_skips(rows, seen, plan):
    assert [r["skipped"] for r in rows] == [r["step"] in plan for r in rows]
    for r in rows:
        s = r["step"]
        if s >= len(seen): continue                     # the last step of a finished run: no later snapshot                                   # seen[s] = weights after step s, seen[s - 1] before it
        same = torch.equal(seen[s], seen[s - 1])
        assert same == (s in plan), f"step {s} ({plan.get(s, 'finite')}): weights {'unchanged' if same else 'changed'}"


def test_non_finite_steps_are_skipped_and_logged(cfg_for, reference, monkeypatch):
    plan = {2: "nan_loss", 3: "nan_pred", 5: "inf_trd", 7: "nan_grad"}
    seen = inject(monkeypatch, plan)
    cfg = cfg_for(run_name="nan", max_bad_steps=2)
    rows = train(cfg, progress=False)["metrics"]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    check_skips(rows, seen, plan)
    logged = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert [r["skipped"] for r in logged] == [s in plan for s in range(1, STEPS + 1)]
    assert all(r["grad_norm"] != r["grad_norm"] for r in logged if r["skipped"])   # NaN: no update was made
    assert pick(rows[:1]) == pick(reference["rows"][:1])                             # same run until the first fault
    TRIALS.append(f"NaN/Inf injected at steps {plan}: each skipped (weights unchanged), logged, run finished")


@pytest.mark.parametrize("max_bad, plan, stop", [
    (2, {3: "nan_loss", 4: "nan_grad", 5: "inf_trd"}, 5),
    (0, {4: "nan_pred"}, 4),
])
def test_too_many_bad_steps_stop_the_run(max_bad, plan, stop, cfg_for, monkeypatch):
    seen = inject(monkeypatch, plan)
    cfg = cfg_for(run_name=f"stop{max_bad}", max_bad_steps=max_bad)
    with pytest.raises(FloatingPointError, match=rf"step {stop}: non-finite loss or gradient {max_bad + 1} steps in a "
                                                 r"row.*last checkpoint .* is intact"):
        train(cfg, progress=False)
    logged = read_metrics(Path(cfg.run_dir) / "metrics.jsonl")
    assert [r["step"] for r in logged] == list(range(1, stop))
    check_skips(logged, seen, plan)
    root = Path(cfg.run_dir) / "checkpoints"
    assert list_checkpoints(root)[-1][0] == stop - 1
    verify_checkpoint(list_checkpoints(root)[-1][1])
    TRIALS.append(f"{max_bad + 1} bad steps in a row with max_bad_steps={max_bad}: FloatingPointError at step {stop}")


def test_non_finite_projector_features_are_skipped(cfg_for, monkeypatch):
    plan = {3: "nan_feats"}
    seen = inject(monkeypatch, plan)
    rows = train(cfg_for(run_name="feats"), progress=False)["metrics"]
    check_skips(rows, seen, plan)
    TRIALS.append("NaN projector features at step 3: TRD not finite, step skipped and logged, run finished")


class Poisoned:
    "A `TargetCache` whose entry `cid` has `value` in one element of `field`."
    def __init__(self, cache, cid, field, value): self.cache, self.cid, self.field, self.value = cache, cid, field, value
    def __getattr__(self, name): return getattr(self.cache, name)
    def __len__(self): return len(self.cache)
    def __iter__(self):
        for e in self.cache:
            if e["id"] == self.cid:
                e = dict(e); t = e[self.field].clone(); t.view(-1)[t.numel() // 2] = self.value; e[self.field] = t
            yield e


@pytest.mark.parametrize("field, value", [("y", float("nan")), ("w", float("inf")), ("latents", float("nan")),
                                          ("prompt", float("-inf"))])
def test_non_finite_cached_target_is_refused(field, value, cfg_for, reference, monkeypatch):
    real = P.open_cache
    cid = open_cache(reference["cache"]).ids[2]
    monkeypatch.setattr(P, "open_cache", lambda path, *a, **kw: Poisoned(real(path, *a, **kw), cid, field, value))
    cfg = cfg_for(run_name=f"poison-{field}")
    with pytest.raises(ValueError, match=rf"clip '{cid}' field '{field}' holds NaN/Inf"):
        train(cfg, progress=False)
    assert not (Path(cfg.run_dir) / "metrics.jsonl").exists()
    TRIALS.append(f"{value} in cached {field!r}: load_targets refused naming clip {cid!r} and the field")
