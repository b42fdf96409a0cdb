"""Seconds per step of the study's VAE training loop (`sara.study.train_vae`) against its batch size, on this machine.

The Wan VAE's step is latency-bound at the study's size (it encodes and decodes latent frame by latent frame), so a
larger batch may cost little more per step and show the VAE more clips in the same time: the cheapest way to the
issue's 30 dB. Each row times `train_vae` itself (no copy of its loop) for `--short` and `--long` steps on the same
in-memory clips and takes the difference, so set-up and cuDNN's algorithm search cancel; repeated `--repeat` times,
the batches interleaved, medians reported. Usage (a GPU; CPU works at `--size micro`):

    python bench/vae_step_time.py --batches 8,16,32 --short 5 --long 25 --repeat 2
"""
import argparse, dataclasses, statistics, time

import torch

from sara.study import get_size, train_frames, train_vae


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
    ap.add_argument("--batches", default="8,16,32", help="VAE batch sizes to time (comma-separated)")
    ap.add_argument("--short", type=int, default=5, help="steps of the short run")
    ap.add_argument("--long", type=int, default=25, help="steps of the long run (the row is their difference)")
    ap.add_argument("--repeat", type=int, default=2, help="repeats (batches interleaved); medians reported")
    ap.add_argument("--clips", type=int, default=64, help="in-memory clips to draw batches from")
    a = ap.parse_args(argv)
    if a.long <= a.short: raise SystemExit(f"--long ({a.long}) must exceed --short ({a.short})")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = get_size(a.size)
    frames = train_frames(base, a.clips)                                   # N, T, 3, H, W uint8
    if dev.type == "cuda": frames = frames.pin_memory()
    batches = [int(b) for b in a.batches.split(",")]
    per = {b: [] for b in batches}
    mem = {}
    for _ in range(a.repeat):
        for b in batches:
            s = get_size(a.size, vae_batch=b)
            if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
            t = time_steps(s, frames, dev, a.long) - time_steps(s, frames, dev, a.short)
            per[b].append(t / (a.long - a.short))
            if dev.type == "cuda": mem[b] = torch.cuda.max_memory_allocated() / 2 ** 30
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    print(f"VAE step time, {name}, size {a.size} ({base.size} px, {base.n_frames} frames), steps {a.long} - {a.short}, "
          f"{a.repeat} repeats, medians")
    print("| batch | s / step | clips / s | step time vs the first batch | 2500 steps, minutes | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    ref = statistics.median(per[batches[0]])
    for b in batches:
        m = statistics.median(per[b])
        print(f"| {b} | {m:.3f} | {b / m:.1f} | {m / ref:.2f} | {2500 * m / 60:.1f} | {mem.get(b, float('nan')):.2f} |")


if __name__ == "__main__":
    main()
