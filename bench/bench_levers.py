"""Training-speed levers of the Stage 2 step at Wan2.2-TI2V-5B, 480x832, 81 frames, batch 1 (issue 15).

One run measures the sft and sara steps (`sara.train.step_losses` + backward + AdamW, random weights, bf16 weights as
`bench_train_step.py`) for today's GPU step (checkpointing every block, diffusers' default attention, no compilation,
fused AdamW, every module in bf16), for each lever alone, and for the best combination of the single-lever rows; it
prints the table (median step time, tokens/s, MFU against 989 TFLOP/s and against a bf16 matmul measured in the same
run, peak memory), the chosen default, and what `sara.train.resolve_levers` would pick on this GPU; writes JSON.

    PYTHONPATH=. python3 bench/bench_levers.py --out levers.json                  # the table: 30 blocks, ~6 min on one H200
    PYTHONPATH=. python3 bench/bench_levers.py --native --out levers.json         # + TI2V-5B at 704x1280x121 with the choice
    python3 bench/bench_levers.py --device cpu --dit small --layers 2 --frames 9 --height 64 --width 64   # CPU smoke, seconds

The lever rows keep one DiT and reset it between rows (checkpointing off, default attention, blocks uncompiled, the
float32 modules cast back); compiled rows pay their compilation in the warm-up steps (not timed; reported as
`first_s`). `--budget` seconds stops before a row that would not finish in time (the rest are listed as skipped).
"""
import argparse, json, math, os, statistics, sys, time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import TI2V_5B, dit_model_flops, matmul_tflops   # noqa: E402

PEAK_BF16 = 989e12        # H100 / H200 SXM dense bf16
MEM_LIMIT_GIB = 80.0      # the default must fit an H100 80GB (issue 15)
SMALL = dict(TI2V_5B, num_attention_heads=2, attention_head_dim=32, ffn_dim=128, text_dim=64, freq_dim=32)  # CPU smoke
TODAY = dict(grad_checkpointing="full", attention_backend="", compile="off", fused_adamw=True, fp32_modules=False)
SINGLE = [("checkpointing off", dict(grad_checkpointing="off")),            # in order of interest: the budget may cut the tail
          ("checkpointing selective", dict(grad_checkpointing="selective")),
          ("attention _native_cudnn", dict(attention_backend="_native_cudnn")),
          ("compile regional", dict(compile="regional")),
          ("fp32 modules", dict(fp32_modules=True)),
          ("attention _native_flash", dict(attention_backend="_native_flash")),
          ("attention _native_efficient", dict(attention_backend="_native_efficient")),
          ("attention flash", dict(attention_backend="flash")),          # needs the flash-attn package
          ("attention _flash_3", dict(attention_backend="_flash_3")),    # needs flash-attn 3 (Hopper)
          ("AdamW not fused", dict(fused_adamw=False))]                 # today's default ("") is diffusers' native SDPA
CUDA_ONLY = {"attention _native_cudnn": "cuDNN", "attention _native_flash": "CUDA", "attention flash": "CUDA",
             "attention _flash_3": "CUDA", "attention _native_efficient": "CUDA"}   # on the CPU, compile uses the eager backend and AdamW torch's CPU fused kernel


def reset(dit):
    "Undo every lever on `dit` (the next row starts from the plain model)."
    from sara.train import set_fp32_modules
    dit.disable_gradient_checkpointing(); dit.reset_attention_backend(); set_fp32_modules(dit, False)
    for b in dit.blocks: b._compiled_call_impl = None


def combine(rows: list, base: str = "today") -> dict:
    """The best combination of the single-lever sft rows: per lever the fastest setting whose row fits MEM_LIMIT_GIB;
    selective checkpointing and compilation do not compose (torch's selective checkpoint caches matmul outputs that the
    compiled block overwrites; `sara.train.apply_levers` refuses the pair): the faster of their two rows is kept."""
    ok = {r["name"]: r for r in rows if r["method"] == "sft" and r.get("ms")}
    if base not in ok: return dict(TODAY)
    best = dict(TODAY)
    for lever in ("grad_checkpointing", "attention_backend", "compile", "fused_adamw"):
        cands = [(ok[base]["ms"], TODAY[lever])] + [(r["ms"], r["levers"][lever]) for n, r in ok.items()
                 if r["levers"][lever] != TODAY[lever] and sum(r["levers"][k] != TODAY[k] for k in TODAY) == 1
                 and (r["peak_gib"] or 0) <= MEM_LIMIT_GIB]
        best[lever] = min(cands, key=lambda c: c[0])[1]
    fp = ok.get("fp32 modules")   # correctness lever (diffusers' convention): on unless it costs more than 3 %
    best["fp32_modules"] = bool(fp and fp["ms"] <= 1.03 * ok[base]["ms"])
    if best["grad_checkpointing"] == "selective" and best["compile"] != "off":   # refused by sara.train (SAC_COMPILE)
        sel, comp = ok.get("checkpointing selective"), ok.get("compile " + best["compile"])
        if sel and comp and sel["ms"] < comp["ms"]: best["compile"] = "off"      # keep the faster of the two measured rows
        else: best["grad_checkpointing"] = TODAY["grad_checkpointing"]
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dit", default="ti2v-5b", choices=["ti2v-5b", "small"], help="small: a narrow DiT for the CPU smoke test")
    ap.add_argument("--layers", type=int, default=None, help="fewer DiT blocks (smoke test only; the table needs all 30)")
    ap.add_argument("--frames", type=int, default=81); ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832); ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=10); ap.add_argument("--vfm-dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5); ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--methods", default="sft,sara")
    ap.add_argument("--rows", default="", help="comma-separated lever rows to run (default: all); 'today' and 'best' always")
    ap.add_argument("--native", action="store_true", help="also time the chosen levers at 704x1280, 121 frames (sft)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; rows that would start later are skipped")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from sara.config import RunConfig
    from sara.train import AUTO_CUDA, Models, apply_levers, make_adamw, resolve_levers, step_losses
    from sara.wan import Projector, WanParts
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)

    dev = torch.device(args.device); cuda = dev.type == "cuda"
    if cuda and not args.layers and args.dit == "ti2v-5b": assert args.block < TI2V_5B["num_layers"]
    dt = torch.bfloat16
    cfg = dict(TI2V_5B if args.dit == "ti2v-5b" else SMALL, **({"num_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    with torch.device(dev): dit = WanTransformer3DModel(**cfg)
    dit.to(dt).train()
    n_params = sum(p.numel() for p in dit.parameters())
    args.block = min(args.block, cfg["num_layers"] - 1)   # the smoke test's 2 blocks
    C = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mm = matmul_tflops() if cuda else float("nan")
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    vae = SimpleNamespace(config=SimpleNamespace(scale_factor_temporal=4))    # what step_losses reads of the VAE

    def inputs(frames, height, width):
        lat = (args.batch, cfg["in_channels"], (frames - 1) // 4 + 1, height // 16, width // 16)
        grid = (2 * (lat[2] - 1), lat[3] // 2, lat[4] // 2)   # V-JEPA 2 (tubelet 2) on frames 1..T-1 at half the size: DiT's h, w
        g = torch.Generator(device=dev).manual_seed(0)
        N = math.prod(grid)
        return dict(latents=torch.randn(lat, device=dev, dtype=dt, generator=g),
                    prompt=torch.randn(args.batch, 512, cfg["text_dim"], device=dev, dtype=dt, generator=g),
                    y=torch.randn(args.batch, N, args.vfm_dim, device=dev, dtype=dt, generator=g),
                    w=torch.rand(args.batch, N, device=dev, generator=g), grid=grid), lat[2] * (lat[3] // 2) * (lat[4] // 2)

    def measure(name, levers, method, batch, n_tok, steps):
        "One row: the median of `steps` timed steps after `args.warmup`; OOM and unavailable backends become the error."
        row = dict(name=name, method=method, levers=dict(levers), tokens=n_tok)
        t0 = time.perf_counter()
        try:
            reset(dit)
            apply_levers(dit, dict(levers, why=[]), compile_backend="inductor" if cuda else "eager", log=None)
            rc = RunConfig(method=method, op="or", block=args.block, lam=0.5, trd_impl="auto")
            torch.manual_seed(0)
            proj = Projector(C, args.vfm_dim).to(dev, dt).train()
            models = Models(wan=WanParts(transformer=dit, vae=vae, scheduler=sched), projector=proj, block=args.block)
            params = [*dit.parameters(), *(proj.parameters() if method != "sft" else [])]
            opt = make_adamw(params, RunConfig(lr=1e-5), fused=levers["fused_adamw"])
            noise_gen = torch.Generator().manual_seed(1)
            if cuda: torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(args.warmup + steps):
                if cuda: torch.cuda.synchronize()
                t = time.perf_counter()
                losses = step_losses(batch, models, rc, noise_gen)
                opt.zero_grad(set_to_none=True); losses["total"].backward(); opt.step()
                if cuda: torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            med = statistics.median(times[args.warmup:])
            flops = dit_model_flops(cfg, n_tok, 512, args.batch)
            row.update(ms=med * 1e3, first_s=times[0], tokens_s=args.batch * n_tok / med, mfu=flops / med / PEAK_BF16,
                       mfu_mm=flops / med / (mm * 1e12) if cuda else None,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                       fm=losses["fm"].item(), trd=losses["trd"].item())
        except Exception as e:   # an OOM, a backend this image lacks: recorded, the table goes on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        finally:
            opt = proj = models = losses = None   # noqa: F841  (free the row's optimizer states before the next row)
            for p in dit.parameters(): p.grad = None
            if cuda: torch.cuda.empty_cache()
        row["wall_s"] = time.perf_counter() - t0
        return row

    batch, n_tok = inputs(args.frames, args.height, args.width)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}; DiT {n_params/1e9:.2f} B params, "
          f"{cfg['num_layers']} blocks, width {C}, {n_tok} tokens ({args.height}x{args.width}, {args.frames} frames, batch "
          f"{args.batch}); TRD grid {batch['grid']} D={args.vfm_dim}; bf16 matmul {mm:.0f} TFLOP/s", flush=True)
    wanted = set(filter(None, args.rows.split(",")))
    plan = [("today", TODAY)] + [(n, dict(TODAY, **d)) for n, d in SINGLE if not wanted or n in wanted]
    rows, skipped, row_s = [], [], []

    def run_rows(todo, reserve=0.0):
        "Measure the rows in order; skip one that would end later than the budget less `reserve` seconds."
        for name, levers in todo:
            for method in args.methods.split(","):
                left = args.budget - reserve - (time.perf_counter() - t_start)
                need = (max(row_s) if row_s else 0) * (3 if levers["compile"] != "off" else 1)
                if not cuda and name in CUDA_ONLY: skipped.append(f"{name}/{method} (CPU: {CUDA_ONLY[name]})"); continue
                if need > left: skipped.append(f"{name}/{method} (budget: {left:.0f} s left)"); continue
                r = measure(name, levers, method, batch, n_tok, args.steps)
                rows.append(r); row_s.append(r["wall_s"] if levers["compile"] == "off" else r["wall_s"] / 3)
                print(f"  {name:26s} {method:5s} " + (f"{r['ms']:8.1f} ms  peak {r['peak_gib'] or 0:6.2f} GiB  first step {r['first_s']:6.1f} s"
                      if "ms" in r else r["error"]), flush=True)

    run_rows(plan[:1])
    run_rows(plan[1:], reserve=6 * max(row_s, default=0) * len(args.methods.split(",")))   # room for the best rows (may compile)
    best = combine(rows)
    run_rows([("best", best)])
    brow = {r["method"]: r for r in rows if r["name"] == "best" and "ms" in r}
    if "sft" in brow and (brow["sft"]["peak_gib"] or 0) > MEM_LIMIT_GIB and best["grad_checkpointing"] != "full":
        best = dict(best, grad_checkpointing="selective" if best["grad_checkpointing"] == "off" else "full")
        print(f"best combination peaks above {MEM_LIMIT_GIB} GiB: again with grad_checkpointing={best['grad_checkpointing']}")
        run_rows([("best (fits)", best)])
    if args.native and args.budget - (time.perf_counter() - t_start) < 4 * (max(row_s) if row_s else 0):
        skipped.append("best @704x1280x121/sft (budget)")
    elif args.native:
        nb, nt = inputs(121, 704, 1280)
        r = measure("best @704x1280x121", best, "sft", nb, nt, max(2, args.steps - 2))
        if "OutOfMemory" in r.get("error", "") and best["grad_checkpointing"] != "full":   # the fallback the run would take
            r = measure("best @704x1280x121", dict(best, grad_checkpointing="full"), "sft", nb, nt, max(2, args.steps - 2))
        rows.append(r)
        print(f"  704x1280x121 sft: " + (f"{r['ms']:.1f} ms, peak {r['peak_gib']:.2f} GiB, {nt} tokens" if "ms" in r else r["error"]))

    print(f"\nWan2.2-TI2V-5B config ({cfg['num_layers']} blocks), {args.height}x{args.width}, {args.frames} frames, batch "
          f"{args.batch}, bf16 weights, median of {args.steps} steps after {args.warmup} warm-up; MFU: model FLOPs (3x forward) "
          f"per second / 989 TFLOP/s, and / the measured matmul rate")
    print(f"{'levers':26s} {'method':6s} | {'step ms':>8s} {'tokens/s':>9s} {'MFU':>6s} {'MFU mm':>7s} {'peak GiB':>9s} | vs today")
    base = {r["method"]: r for r in rows if r["name"] == "today" and "ms" in r}
    for r in rows:
        if "ms" not in r: print(f"{r['name']:26s} {r['method']:6s} | {r['error']}"); continue
        rel = f"{r['ms'] / base[r['method']]['ms']:6.3f}x" if r["method"] in base else ""
        mfu_mm = f"{r['mfu_mm']:7.1%}" if r["mfu_mm"] is not None else f"{'-':>7s}"
        pk = f"{r['peak_gib']:9.2f}" if r["peak_gib"] is not None else f"{'-':>9s}"
        print(f"{r['name']:26s} {r['method']:6s} | {r['ms']:8.1f} {r['tokens_s']:9.0f} {r['mfu']:6.1%} {mfu_mm} {pk} | {rel}")
    for s in skipped: print(f"skipped: {s}")
    final = {r["method"]: r for r in rows if r["name"].startswith("best") and "@" not in r["name"] and "ms" in r}
    print(f"\nchosen default (GPU): {best}")
    if "sft" in final and "sara" in final:
        s, a = final["sft"], final["sara"]
        print(f"sara vs sft with it: {a['ms'] / s['ms'] - 1:+.1%} time, {(a['peak_gib'] or 0) - (s['peak_gib'] or 0):+.2f} GiB")
    auto = None
    if cuda:
        reset(dit)
        auto = resolve_levers(RunConfig(), dev, dit, tokens=args.batch * n_tok)
        same = {k: auto[k] for k in best} == best
        print(f"sara.train.resolve_levers on this GPU: { {k: auto[k] for k in best} } ({'matches' if same else 'DIFFERS: update AUTO_CUDA / ACT_VALUES in nbs/train.ipynb'})")
        for w in auto["why"]: print("  " + w)
        print(f"AUTO_CUDA today: {AUTO_CUDA}")
    if args.out:
        out = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, params=n_params,
                   config=cfg, frames=args.frames, height=args.height, width=args.width, batch=args.batch, tokens=n_tok,
                   matmul_tflops=mm if cuda else None, rows=rows, skipped=skipped, chosen=best,
                   resolve_levers=None if auto is None else {k: auto[k] for k in (*best, "why")},
                   wall_s=time.perf_counter() - t_start)
        tmp = Path(args.out + ".tmp"); tmp.write_text(json.dumps(out, indent=1, default=str)); os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
