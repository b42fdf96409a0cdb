"""Seconds per step of the study's VAE training loop (`sara.study.train_vae`) against its batch size, on this machine.

The Wan VAE's step is latency-bound at the study's size (it encodes and decodes latent frame by latent frame), so a
larger batch may cost little more per step and show the VAE more clips in the same time: the cheapest way to the
issue's 30 dB. Each row times `train_vae` itself (no copy of its loop) for `--short` and `--long` steps on the same
in-memory clips and takes the difference, so set-up cancels; a discarded warm-up run of each configuration first lets
cuDNN's algorithm search (`cudnn.benchmark`) happen outside the timed runs (without it, part 5's first row, batch 8,
read 1.086 s/step against the study loop's own 0.29); repeated `--repeat` times, the configurations interleaved,
medians reported. `--bases` times other widths (`StudySize.vae_base_dim`); `--json` writes {"<base>x<batch>": s/step}
for a script to size a run by. Usage (a GPU; CPU works at `--size micro`):

    python bench/vae_step_time.py --batches 8,16,32 --short 5 --long 25 --repeat 2
    python bench/vae_step_time.py --bases 32,48 --batches 8 --json /tmp/vae_step.json
"""
import argparse, dataclasses, statistics, time

import torch

from sara.study import get_size, like_size, train_frames, train_vae, write_json


def time_steps(s, frames, dev, steps: int) -> float:  # seconds of `train_vae` for `steps` steps, the device synchronised
    s = dataclasses.replace(s, vae_steps=steps)
    if dev.type == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_vae(s, frames, dev)
    if dev.type == "cuda": torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="default")
    ap.add_argument("--like", default="", help="a study.json: take its StudySize fields (as sara-study --like)")
    ap.add_argument("--batches", default="8,16,32", help="VAE batch sizes to time (comma-separated)")
    ap.add_argument("--short", type=int, default=5, help="steps of the short run")
    ap.add_argument("--long", type=int, default=25, help="steps of the long run (the row is their difference)")
    ap.add_argument("--repeat", type=int, default=2, help="repeats (batches interleaved); medians reported")
    ap.add_argument("--clips", type=int, default=64, help="in-memory clips to draw batches from")
    ap.add_argument("--bases", default="", help="VAE base widths to time (comma-separated; default: the size's vae_base_dim)")
    ap.add_argument("--warmup", type=int, default=3, help="steps of the discarded warm-up run of each configuration")
    ap.add_argument("--json", default="", help="also write {'<base>x<batch>': seconds per step} to this file")
    a = ap.parse_args(argv)
    if a.long <= a.short: raise SystemExit(f"--long ({a.long}) must exceed --short ({a.short})")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    like = like_size(a.like) if a.like else {}
    base = get_size(a.size, **like)
    frames = train_frames(base, a.clips)                                   # N, T, 3, H, W uint8
    if dev.type == "cuda": frames = frames.pin_memory()
    batches = [int(b) for b in a.batches.split(",")]
    bases = [int(b) for b in a.bases.split(",")] if a.bases else [base.vae_base_dim]
    cfgs = [(w, b) for w in bases for b in batches]
    sizes = {c: get_size(a.size, **{**like, 'vae_base_dim': c[0], 'vae_batch': c[1]}) for c in cfgs}
    for c in cfgs: time_steps(sizes[c], frames, dev, a.warmup)   # cuDNN's algorithm search, outside the timings
    per = {c: [] for c in cfgs}
    mem = {}
    for _ in range(a.repeat):
        for c in cfgs:
            if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
            t = time_steps(sizes[c], frames, dev, a.long) - time_steps(sizes[c], frames, dev, a.short)
            per[c].append(t / (a.long - a.short))
            if dev.type == "cuda": mem[c] = torch.cuda.max_memory_allocated() / 2 ** 30
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    print(f"VAE step time, {name}, size {a.size} ({base.size} px, {base.n_frames} frames), steps {a.long} - {a.short}, "
          f"{a.repeat} repeats after a warm-up of {a.warmup}, medians")
    print("| base | batch | s / step | clips / s | step time vs the first row | 2500 steps, minutes | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    med = {c: statistics.median(per[c]) for c in cfgs}
    for c in cfgs:
        m = med[c]
        print(f"| {c[0]} | {c[1]} | {m:.3f} | {c[1] / m:.1f} | {m / med[cfgs[0]]:.2f} | {2500 * m / 60:.1f} | {mem.get(c, float('nan')):.2f} |")
    for c in cfgs:   # a difference of two timings: on a busy machine with few steps it can come out at or below zero
        if med[c] <= 0: print(f"base {c[0]}, batch {c[1]}: {med[c]:.4f} s / step is noise (the {a.long}-step run was not slower than the {a.short}-step one); raise --long or --repeat")
    if a.json:
        write_json(a.json, {f"{w}x{b}": round(med[(w, b)], 4) for w, b in cfgs})   # atomic


if __name__ == "__main__":
    main()
