"""Benchmark of the precompute pass (issue 3): throughput and cost per clip of each stage.

CPU mode (default): the real code path (`sara.precompute.precompute`) over the toy world with the tiny models;
prints clips/s of a fresh pass, of a resume pass (verification only), and the cost per clip of each stage
(decode, VAE, text, VFM, masks, write, verify). Model loading is timed separately, not counted in clips/s.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/bench_precompute.py
    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/bench_precompute.py --repeat 3 --shard-size 4

VFM mode (`--vfm-size`): a V-JEPA 2 encoder of ViT-L size (hidden 1024, 24 layers, 16 heads) or ViT-g size (hidden
1408, 40 layers, 22 heads, mlp_ratio 48/11) built from its config with random weights, run through
`sara.vfm.FrozenVFM` in bf16 over `--frames` frames at `--size` px; prints ms per clip (CUDA events), clips/s, tokens,
peak memory, and the host-side cost of storing one y (device -> host copy, sha256, safetensors write) in float32 and
bf16. Needs only torch and transformers (no diffusers, no PyAV):

    PYTHONPATH=. python bench/bench_precompute.py --vfm-size vitl --frames 64 --size 256 --device cuda
    PYTHONPATH=. python bench/bench_precompute.py --vfm-size vitg --frames 64 --size 256 --device cuda --batch 1 2 4
"""
import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VFM_SIZES = {  # V-JEPA 2 encoder shapes (patch 16, tubelet 2)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0),
    "vitl": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4.0),
    "vitg": dict(hidden_size=1408, num_hidden_layers=40, num_attention_heads=22, mlp_ratio=48 / 11),
}
STAGES = ("decode", "masks", "flow", "vae", "text", "vfm", "write")


# ------------------------------------------------------------------ CPU: the real pass at toy scale

def bench_cpu(args):
    from sara.config import site_settings
    from sara.precompute import build_precompute_models, make_precompute_config, open_cache, precompute
    torch.set_num_threads(args.threads) if args.threads else None
    data_root = Path(args.data_root).resolve()
    params = dict(data_root=str(data_root), device=args.device, progress=False, shard_size=args.shard_size,
                  n_frames=args.frames, height=args.size, width=args.size, y_dtype=args.y_dtype, limit=args.clips,
                  wan_model="tiny", vfm_model="tiny", text_model="minilm")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_precompute_config(dict(params, cache_dir=tmp), settings=site_settings(ROOT))
        t0 = time.perf_counter()
        models = build_precompute_models(cfg)
        t_models = time.perf_counter() - t0
        rows = []
        for r in range(args.repeat):
            cfg.name = f"run{r}"
            timings = {}
            t0 = time.perf_counter()
            folder = precompute(cfg, models=models, timings=timings)
            wall = time.perf_counter() - t0
            n = len(open_cache(folder))
            vt = {}
            t1 = time.perf_counter()
            precompute(cfg, models=models, timings=vt)       # resume: verify only
            resume = time.perf_counter() - t1
            timings.pop("verify", None)
            rows.append(dict(n=n, wall=wall, resume=resume, verify=vt.get("verify", 0.0), **timings,
                             bytes=sum(p.stat().st_size for p in Path(folder).glob("shard_*.safetensors"))))
    print(f"\nprecompute on {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; toy world {data_root.relative_to(ROOT) if data_root.is_relative_to(ROOT) else data_root}, "
          f"{args.frames} frames at {args.size} px, tiny Wan VAE / tiny V-JEPA 2 / MiniLM, shard_size {args.shard_size}, "
          f"y {args.y_dtype}; model loading {t_models:.2f} s (not counted); the median of {args.repeat} pass(es); "
          f"load average at start {load:.2f}")
    mid = sorted(rows, key=lambda r: r["wall"])[len(rows) // 2]  # the pass with the median wall time: its stages add up
    med = lambda k: mid.get(k, 0.0)
    n = mid["n"]
    print(f"\n{'pass':<28} {'clips':>5} {'wall s':>8} {'clips/s':>8}")
    print(f"{'fresh (encode + write)':<28} {n:>5} {med('wall'):>8.3f} {n / med('wall'):>8.2f}")
    print(f"{'resume (verify, skip all)':<28} {n:>5} {med('resume'):>8.3f} {n / med('resume'):>8.2f}")
    print(f"\n{'stage':<10} {'ms/clip':>9} {'share':>7}")
    total = med("wall")
    for k in STAGES:
        print(f"{k:<10} {1e3 * med(k) / n:>9.2f} {med(k) / total:>7.1%}")
    other = total - sum(med(k) for k in STAGES)
    print(f"{'other':<10} {1e3 * other / n:>9.2f} {other / total:>7.1%}   (index updates, planning, bookkeeping)")
    print(f"{'verify':<10} {1e3 * med('verify') / n:>9.2f} {'':>7}   (resume pass: shard checksums)")
    print(f"\ncache size {rows[0]['bytes'] / 2**20:.2f} MiB for {n} clips ({rows[0]['bytes'] / n / 2**10:.0f} KiB/clip)")


# ------------------------------------------------------------------ VFM at V-JEPA 2 sizes (GPU)

def cuda_ms(fn, reps, device):
    "Median ms of `fn` (CUDA events on CUDA, perf_counter elsewhere)."
    ts = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); fn(); b.record(); torch.cuda.synchronize(device)
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter(); fn(); ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)


def store_ms(y: torch.Tensor, dtype: torch.dtype, reps: int = 3) -> tuple[float, float, int]:
    "Host cost of storing one y: (device->host copy ms, sha256 + safetensors write ms, bytes)."
    from safetensors.torch import save_file
    copy, write = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(reps):
            t0 = time.perf_counter()
            h = y.to(dtype).cpu().contiguous()
            if y.is_cuda: torch.cuda.synchronize()
            t1 = time.perf_counter()
            hashlib.sha256(h.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            f = Path(tmp) / f"y{i}.safetensors"
            save_file({"clip/y": h}, str(f)); os.replace(f, Path(tmp) / "y.safetensors")
            t2 = time.perf_counter()
            copy.append(1e3 * (t1 - t0)); write.append(1e3 * (t2 - t1))
    return statistics.median(copy), statistics.median(write), h.numel() * h.element_size()


def bench_vfm(args):
    from transformers import VJEPA2Config, VJEPA2Model
    from sara.vfm import FrozenVFM  # lazy: only torch + transformers
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = VJEPA2Config(**VFM_SIZES[args.vfm_size], patch_size=16, tubelet_size=2, crop_size=args.size,
                       frames_per_clip=args.frames, pred_hidden_size=64, pred_num_attention_heads=2,
                       pred_num_hidden_layers=1, pred_num_mask_tokens=2, attn_implementation=args.attn)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = VJEPA2Model(cfg)
    vfm = FrozenVFM(model.to(dtype)).to(device)  # the normalisation buffers too
    t_build = time.perf_counter() - t0
    n_params = sum(p.numel() for p in vfm.model.encoder.parameters())
    grid = vfm.geometry.grid(args.frames, args.size, args.size)
    N = grid[0] * grid[1] * grid[2]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    import transformers
    print(f"\nV-JEPA 2 {args.vfm_size}-sized encoder (random weights), {n_params / 1e6:.0f} M params, {args.dtype}, "
          f"attn {vfm.model.config._attn_implementation}; {args.frames} frames at {args.size} px -> grid {grid} = {N} tokens, "
          f"D = {vfm.dim}; device {name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"build {t_build:.1f} s")
    print(f"\n{'batch':>5} {'ms/step':>9} {'ms/clip':>9} {'clips/s':>8} {'peak GiB':>9}")
    y = None
    for B in args.batch:
        video = torch.rand(B, args.frames, 3, args.size, args.size, device=device) * 2 - 1  # B, T, C, H, W
        try:
            for _ in range(args.warmup): y = vfm(video)
            if device.type == "cuda": torch.cuda.synchronize(device); torch.cuda.reset_peak_memory_stats(device)
            ms = cuda_ms(lambda: vfm(video), args.reps, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            print(f"{B:>5} {ms:>9.2f} {ms / B:>9.2f} {1e3 * B / ms:>8.2f} {peak:>9.2f}")
        except torch.OutOfMemoryError:
            print(f"{B:>5} OOM"); break
        finally:
            del video
    if y is not None:
        y1 = y[0]  # T', H', W', D
        print(f"\nstoring one y {tuple(y1.shape)} (host side, per clip):")
        print(f"{'dtype':<9} {'MiB':>7} {'to host ms':>11} {'sha256+write ms':>16}")
        for dt, label in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
            c, w, nbytes = store_ms(y1, dt)
            print(f"{label:<9} {nbytes / 2**20:>7.1f} {c:>11.2f} {w:>16.2f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vfm-size", choices=sorted(VFM_SIZES), default=None, help="VFM mode: time a V-JEPA 2 encoder of this size")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip (CPU default 17, VFM mode 64)")
    ap.add_argument("--size", type=int, default=None, help="frame side in px (CPU default 64, VFM mode 256)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], help="VFM mode: clips per forward")
    ap.add_argument("--reps", type=int, default=10, help="VFM mode: timed forwards")
    ap.add_argument("--warmup", type=int, default=2, help="VFM mode: untimed forwards first")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="VFM mode: parameter / compute dtype")
    ap.add_argument("--attn", default="sdpa", help="VFM mode: attention implementation (sdpa | eager)")
    ap.add_argument("--data-root", default=str(ROOT / "data" / "toy"), help="CPU mode: the clip folder")
    ap.add_argument("--clips", type=int, default=0, help="CPU mode: first N clips (0 = all)")
    ap.add_argument("--shard-size", type=int, default=4, help="CPU mode: clips per shard")
    ap.add_argument("--repeat", type=int, default=3, help="CPU mode: passes (the median is shown)")
    ap.add_argument("--threads", type=int, default=0, help="CPU mode: torch threads (0 = default)")
    ap.add_argument("--y-dtype", default="float32", choices=("float32", "bfloat16"), help="CPU mode: stored dtype of y")
    args = ap.parse_args(argv)
    if args.vfm_size:
        args.frames, args.size = args.frames or 64, args.size or 256
        bench_vfm(args)
    else:
        args.frames, args.size = args.frames or 17, args.size or 64
        bench_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
