"""Data parallelism of `sara.train` on 2 CPU processes (torchrun, gloo): each process takes its share of the global batch.

A run on G processes with `batch_size` b must see, step by step, the clips, noise and timesteps of a one-process run
with `batch_size` b x G (the ranks of one context-parallel group share theirs instead)."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sara.train import batch_order, read_metrics, train

ROOT = Path(__file__).parents[1]
# Wraps `collate_targets` to record, per process, the clip ids each step's batch holds; then the ordinary CLI.
RECORDER = """
import json, os, sys
import sara.train as T
out, rank, collate = sys.argv[1], int(os.environ["RANK"]), T.collate_targets
def recording(items, device):
    with open(os.path.join(out, f"clips_rank{rank}.jsonl"), "a") as f: f.write(json.dumps([it["id"] for it in items]) + "\\n")
    return collate(items, device)
T.collate_targets = recording
T.train_cli(sys.argv[2:])
"""


def torchrun(tmp: Path, port: int, cfg, run_name: str, *args: str) -> list[list[list[str]]]:
    "Run `sara.train` on 2 CPU processes through the recorder; the clip ids of every step, per rank."
    out = tmp / run_name; out.mkdir()
    (tmp / "recorder.py").write_text(RECORDER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(tmp / "recorder.py"), str(out), "--cache_dir", cfg.cache_dir, "--cache", "latest",
           "--runs_dir", cfg.runs_dir, "--run_name", run_name, "--device", "cpu", "--checkpoint_every", "0", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [[json.loads(l) for l in (out / f"clips_rank{k}.jsonl").read_text().splitlines()] for k in (0, 1)]


def named(dit: dict, proj: dict) -> dict:
    return {**{f"dit.{k}": v for k, v in dit.items()}, **{f"projector.{k}": v for k, v in proj.items()}}


def weights(run_dir: Path) -> dict:
    "The exported weights of a finished run."
    return named(*(load_file(run_dir / "checkpoint" / f"{n}.safetensors") for n in ("transformer", "projector")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    "One process, batch 4, 3 steps of videorepa (uniform TRD: every loss is a plain mean over the batch)."
    from sara.config import make_config, site_settings
    runs = tmp_path_factory.mktemp("runs")
    cfg = make_config(dict(run_name="one", method="videorepa", steps=3, batch_size=4, runs_dir=str(runs), cache_dir=cache_dir,
                           checkpoint_every=0, device="cpu"), settings=site_settings(ROOT, env={}))
    out = train(cfg, progress=False)
    return cfg, out


def test_two_processes_split_the_global_batch(reference, tmp_path):
    """(a) 2 processes with batch 2 take disjoint halves whose union is the 1-process batch-4 step's clips, every step;
    (b) the logged losses are the global batch's (fm, trd, loss, grad_norm within 1e-5 relative) and the weights after
    3 DDP steps match the 1-process run's (|difference| <= 5e-6, 5 % of the lr = 1e-4 that AdamW moves a weight by in one step; measured 4.9e-7)."""
    cfg, one = reference
    ids = [t["id"] for t in one["targets"]]
    ranks = torchrun(tmp_path, 29631, cfg, "two", "--method", "videorepa", "--steps", "3", "--batch_size", "2")
    ref_clips = [[ids[j] for j in row["clips"]] for row in one["metrics"]]
    assert [len(s) for s in ranks[0]] == [len(s) for s in ranks[1]] == [2, 2, 2]
    for step, (r0, r1, both) in enumerate(zip(*ranks, ref_clips)):
        assert r0 + r1 == both, (step, r0, r1, both)                 # rank 0 the first half, rank 1 the second
        assert not set(r0) & set(r1) or len(set(both)) < 4, step     # disjoint (unless an epoch boundary repeats a clip)
    assert ranks[0] != ranks[1]
    two = read_metrics(Path(cfg.runs_dir) / "two" / "metrics.jsonl")
    assert [r["clips"] for r in two] == [r["clips"] for r in one["metrics"]]   # the log names the global batch
    for x, y in zip(one["metrics"], two):
        for k in ("fm", "trd", "loss", "grad_norm"): assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])
    a, b = weights(Path(one["run_dir"])), weights(Path(cfg.runs_dir) / "two")
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    moved = max((a[k].float() - w.float()).abs().max().item() for k, w in weights_at_start(cfg, one).items())
    assert diff <= 5e-6 < moved, (diff, moved)


def weights_at_start(cfg, one: dict) -> dict:
    "The models' initial weights (rebuilt from the seed), to show that the weights moved far more than the runs differ."
    from sara.train import build_models, trained_weights
    return named(*trained_weights(build_models(cfg, torch.device("cpu"), target_dim=one["targets"][0]["y"].shape[-1]), False))


def test_context_parallel_ranks_share_the_batch(reference, tmp_path):
    "(c) context_parallel=2 on 2 processes: one data-parallel rank, both processes see the same clips (the batch-2 order)."
    cfg, one = reference
    ids = [t["id"] for t in one["targets"]]
    ranks = torchrun(tmp_path, 29633, cfg, "cp", "--method", "videorepa", "--steps", "2", "--batch_size", "2",
                     "--context_parallel", "2")
    assert ranks[0] == ranks[1] == [[ids[j] for j in b] for b in batch_order(len(ids), 2, 2, cfg.seed)]
