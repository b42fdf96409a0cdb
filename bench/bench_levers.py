"""Training-speed levers of the Stage 2 step at Wan2.2-TI2V-5B, 480x832, 81 frames, batch 1 (issue 15).

One run measures the sft and sara steps (`sara.train.step_losses` + backward + AdamW, random weights, bf16 weights as
`bench_train_step.py`) for today's GPU step (checkpointing every block, diffusers' default attention, no compilation,
fused AdamW, every module in bf16), for each lever alone, and for the best combination of the measured rows; it
prints the table (median step time, tokens/s, MFU against 989 TFLOP/s and against a bf16 matmul measured in the same
run, peak memory), the chosen default, and what `sara.train.resolve_levers` would pick on this GPU; writes JSON.

    PYTHONPATH=. python3 bench/bench_levers.py --out levers.json                  # the table: 30 blocks, ~6 min on one H200
    PYTHONPATH=. python3 bench/bench_levers.py --native --out levers.json         # + TI2V-5B at 704x1280x121 with the choice
    python3 bench/bench_levers.py --device cpu --dit small --layers 2 --frames 9 --height 64 --width 64   # CPU smoke, seconds

Rows run in this order, so that a short budget keeps the new ones: compile regional + checkpointing off, compile
regional + `blocks:K` (the first K blocks checkpointed; K is what `sara.train.resolve_levers` picks for a GPU with
`--mem-gib` free, 80 by default: an H100), with `--native` the GPU default that `resolve_levers` picks on this GPU at
704x1280x121, then today's step, each lever alone, and the best combination of all of them (`combine`: the fastest
measured row under 80 GiB, completed by the single levers it leaves as today's).

The lever rows keep one DiT and reset it between rows (checkpointing off, default attention, blocks uncompiled, the
float32 modules cast back). A compiled row keeps warming up (after `--warmup` steps, up to `--max-warmup`) until two
consecutive steps agree within 3 %: compilation and recompilation stay out of the timed steps; the first step's time is
`first_s` (the compilation) and the warm-up times are `warm_s`. `--budget` seconds stops before a row that would not
finish in time (the rest are listed as skipped).
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
STABLE = 0.03            # a compiled row is warm when two consecutive steps differ by less than this fraction
NEW = [("compile regional + checkpointing off", dict(compile="regional", grad_checkpointing="off")),   # issue 15's missing rows
       ("compile regional + blocks:K", dict(compile="regional", grad_checkpointing="blocks:K"))]   # K from --blocks / --mem-gib
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


def composes(levers: dict) -> bool:
    "False for selective checkpointing with compilation (torch's selective checkpoint caches matmul outputs that the compiled block overwrites; `sara.train.apply_levers` refuses the pair)."
    return not (levers["grad_checkpointing"] == "selective" and levers["compile"] != "off")


def combine(rows: list, base: str = "today") -> dict:
    """The GPU default the table supports, from its sft rows at the table's size (rows of another size, "@", and earlier
    "best" rows left out) that peak <= MEM_LIMIT_GIB. First the fastest such measured row, whatever levers it changes
    (compile regional + checkpointing off is one row): a measured combination beats an unmeasured one. Then each lever
    that row leaves as today's takes the fastest single-lever setting (one lever changed from today, faster than today
    and fitting) if it composes with the rest (`composes`). fp32 modules (diffusers' convention): on unless their row
    costs more than 3 % over today's, and on when the row is missing (not measured: the convention, as `RunConfig`)."""
    ok = {r["name"]: r for r in rows if r["method"] == "sft" and r.get("ms") and "@" not in r["name"]
          and not r["name"].startswith("best")}
    if base not in ok: return dict(TODAY)
    fits = [r for r in ok.values() if (r["peak_gib"] or 0) <= MEM_LIMIT_GIB and composes(r["levers"])]
    top = min(fits, key=lambda r: r["ms"])          # today's row at worst
    best = {k: top["levers"][k] for k in TODAY}
    single = [r for r in fits if sum(r["levers"][k] != TODAY[k] for k in TODAY) == 1]
    for lever in ("grad_checkpointing", "attention_backend", "compile", "fused_adamw"):
        if best[lever] != TODAY[lever]: continue    # set by the measured row
        cands = [(ok[base]["ms"], TODAY[lever])] + [(r["ms"], r["levers"][lever]) for r in single if r["levers"][lever] != TODAY[lever]]
        value = min(cands, key=lambda c: c[0])[1]
        if composes(dict(best, **{lever: value})): best[lever] = value
    fp = ok.get("fp32 modules")
    best["fp32_modules"] = bool(fp is None or fp["ms"] <= 1.03 * ok[base]["ms"])
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
    ap.add_argument("--native", action="store_true", help="also time the GPU default (resolve_levers on this GPU) at 704x1280, 121 frames (sft)")
    ap.add_argument("--native-size", default="121x704x1280", help="frames x height x width of --native (smaller: the CPU check)")
    ap.add_argument("--mem-gib", type=float, default=MEM_LIMIT_GIB, help="free GPU memory the blocks:K row is chosen for (resolve_levers)")
    ap.add_argument("--blocks", type=int, default=None, help="K of the blocks:K row (default: resolve_levers' choice at --mem-gib)")
    ap.add_argument("--max-warmup", type=int, default=10, help="most warm-up steps of a compiled row (it stops when two steps agree)")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds; rows that would start later are skipped")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from sara.config import RunConfig
    from sara.train import AUTO_CUDA, Models, apply_levers, checkpointed_blocks, make_adamw, resolve_levers, step_losses
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
            times, warm = [], args.warmup

            def warming():   # compiled rows: until two consecutive steps agree (compilation, recompilation done)
                if levers["compile"] == "off" or len(times) >= args.max_warmup: return False
                return len(times) < 2 or abs(times[-1] - times[-2]) > STABLE * min(times[-2:])
            while True:
                if cuda: torch.cuda.synchronize()
                t = time.perf_counter()
                losses = step_losses(batch, models, rc, noise_gen)
                opt.zero_grad(set_to_none=True); losses["total"].backward(); opt.step()
                if cuda: torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                if len(times) == warm and warming(): warm += 1   # one more warm-up step
                if len(times) >= warm + steps: break
            med = statistics.median(times[warm:])
            flops = dit_model_flops(cfg, n_tok, 512, args.batch)
            row.update(ms=med * 1e3, first_s=times[0], warm_s=times[1:warm], tokens_s=args.batch * n_tok / med, mfu=flops / med / PEAK_BF16,
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
    rows, skipped, row_s = [], [], []
    K = args.blocks
    if K is None:   # what `auto` picks under regional compilation on a CUDA GPU with --mem-gib free (no GPU is asked)
        pick = resolve_levers(RunConfig(compile="regional"), torch.device("cuda"), dit, tokens=args.batch * n_tok,
                              free_gib=args.mem_gib)
        K = checkpointed_blocks(pick["grad_checkpointing"], cfg["num_layers"])
        print(f"blocks:K for a GPU with {args.mem_gib:.0f} GiB free: {pick['why'][0]}")
        if K is None: skipped.append(f"compile regional + blocks:K ({pick['grad_checkpointing']} at {args.mem_gib:.0f} GiB: no K to measure)")
    print(f"K = {K}", flush=True)
    new = [(n.replace("blocks:K", f"blocks:{K}"), {**TODAY, **d, "grad_checkpointing": d["grad_checkpointing"].replace("blocks:K", f"blocks:{K}")})
           for n, d in NEW if (not wanted or n in wanted) and (K is not None or "blocks:K" not in n)]
    plan = [("today", TODAY)] + [(n, dict(TODAY, **d)) for n, d in SINGLE if not wanted or n in wanted]

    def write(best=None, auto=None, final=False):
        "The JSON so far (after every row: a call that ends by its time limit keeps the rows it measured)."
        if not args.out: return
        out = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, params=n_params,
                   config=cfg, frames=args.frames, height=args.height, width=args.width, batch=args.batch, tokens=n_tok,
                   matmul_tflops=mm if cuda else None, blocks_k=K, mem_gib=args.mem_gib, rows=rows, skipped=skipped, chosen=best,
                   resolve_levers=None if auto is None else {k: auto[k] for k in (*best, "why")},
                   complete=final, wall_s=time.perf_counter() - t_start)
        tmp = Path(args.out + ".tmp"); tmp.write_text(json.dumps(out, indent=1, default=str)); os.replace(tmp, args.out)
        if final: print(f"wrote {args.out}")

    def run_rows(todo, reserve=0.0):
        "Measure the rows in order; skip one that would end later than the budget less `reserve` seconds."
        for name, levers in todo:
            for method in args.methods.split(","):
                left = args.budget - reserve - (time.perf_counter() - t_start)
                need = (max(row_s) if row_s else 0) * (3 if levers["compile"] != "off" else 1)
                if not cuda and name in CUDA_ONLY: skipped.append(f"{name}/{method} (CPU: {CUDA_ONLY[name]})"); continue
                if need > left: skipped.append(f"{name}/{method} (budget: {left:.0f} s left)"); continue
                r = measure(name, levers, method, batch, n_tok, args.steps)
                rows.append(r); row_s.append(r["wall_s"] if levers["compile"] == "off" else r["wall_s"] / 3); write()
                print(f"  {name:38s} {method:5s} " + (f"{r['ms']:8.1f} ms  peak {r['peak_gib'] or 0:6.2f} GiB  first step "
                      f"{r['first_s']:6.1f} s, {len(r['warm_s']) + 1} warm-up" if "ms" in r else r["error"]), flush=True)

    def native_row():
        "The GPU default (`resolve_levers` on this GPU, its free memory) at TI2V-5B's native 704x1280x121, sft."
        f, h, w = map(int, args.native_size.split("x")); tag = f"{h}x{w}x{f}"
        if args.budget - (time.perf_counter() - t_start) < 4 * (max(row_s) if row_s else 0):
            skipped.append(f"default @{tag}/sft (budget)"); return
        nb, nt = inputs(f, h, w)
        reset(dit)
        if cuda: torch.cuda.empty_cache()
        auto = resolve_levers(RunConfig(), dev, dit, tokens=args.batch * nt)
        levers = {k: auto[k] for k in TODAY}
        print(f"  {tag} ({nt} tokens), resolve_levers on this {'GPU' if cuda else 'CPU'}: {levers}; " + "; ".join(auto["why"]), flush=True)
        r = measure(f"default @{tag}", levers, "sft", nb, nt, max(2, args.steps - 2))
        r["why"] = auto["why"]
        if "OutOfMemory" in r.get("error", "") and levers["grad_checkpointing"] != "full":   # the estimate was wrong: say so, measure full
            rows.append(r); print(f"  {tag} sft with {levers['grad_checkpointing']}: {r['error']}")
            r = measure(f"default @{tag} (full)", dict(levers, grad_checkpointing="full"), "sft", nb, nt, max(2, args.steps - 2))
        rows.append(r); write()
        print(f"  {tag} sft: " + (f"{r['ms']:.1f} ms, peak {r['peak_gib'] or 0:.2f} GiB, {nt} tokens, first step {r['first_s']:.1f} s"
                                         if "ms" in r else r["error"]), flush=True)

    run_rows(new)                 # the new rows first: a short budget keeps them
    if args.native: native_row()
    run_rows(plan[:1])
    run_rows(plan[1:], reserve=6 * max(row_s, default=0) * len(args.methods.split(",")))   # room for the best rows (may compile)
    best = combine(rows)
    run_rows([("best", best)])
    brow = {r["method"]: r for r in rows if r["name"] == "best" and "ms" in r}
    if "sft" in brow and (brow["sft"]["peak_gib"] or 0) > MEM_LIMIT_GIB and best["grad_checkpointing"] != "full":
        more = (f"blocks:{K}" if K and best["compile"] != "off" else "selective") if best["grad_checkpointing"] == "off" else "full"
        best = dict(best, grad_checkpointing=more)
        print(f"best combination peaks above {MEM_LIMIT_GIB} GiB: again with grad_checkpointing={best['grad_checkpointing']}")
        run_rows([("best (fits)", best)])

    print(f"\nWan2.2-TI2V-5B config ({cfg['num_layers']} blocks), {args.height}x{args.width}, {args.frames} frames, batch "
          f"{args.batch}, bf16 weights, median of {args.steps} steps after {args.warmup} warm-up (compiled rows: until two steps "
          f"agree within {STABLE:.0%}); MFU: model FLOPs (3x forward) "
          f"per second / 989 TFLOP/s, and / the measured matmul rate")
    print(f"{'levers':38s} {'method':6s} | {'step ms':>8s} {'tokens/s':>9s} {'MFU':>6s} {'MFU mm':>7s} {'peak GiB':>9s} | vs today")
    base = {r["method"]: r for r in rows if r["name"] == "today" and "ms" in r}
    for r in rows:
        if "ms" not in r: print(f"{r['name']:38s} {r['method']:6s} | {r['error']}"); continue
        rel = f"{r['ms'] / base[r['method']]['ms']:6.3f}x" if r["method"] in base and "@" not in r["name"] else ""   # other clip sizes: no ratio
        mfu_mm = f"{r['mfu_mm']:7.1%}" if r["mfu_mm"] is not None else f"{'-':>7s}"
        pk = f"{r['peak_gib']:9.2f}" if r["peak_gib"] is not None else f"{'-':>9s}"
        print(f"{r['name']:38s} {r['method']:6s} | {r['ms']:8.1f} {r['tokens_s']:9.0f} {r['mfu']:6.1%} {mfu_mm} {pk} | {rel}")
    for s in skipped: print(f"skipped: {s}")
    final = {r["method"]: r for r in rows if r["name"].startswith("best") and "@" not in r["name"] and "ms" in r}
    print(f"\nchosen default (GPU): {best}")
    if "sft" in final and "sara" in final:
        s, a = final["sft"], final["sara"]
        print(f"sara vs sft with it: {a['ms'] / s['ms'] - 1:+.1%} time, {(a['peak_gib'] or 0) - (s['peak_gib'] or 0):+.2f} GiB")
    for name, _ in new:   # issue 15's target: sara within 3 % and 1 GiB of sft
        pair = {r["method"]: r for r in rows if r["name"] == name and "ms" in r}
        if "sft" in pair and "sara" in pair:
            print(f"sara vs sft, {name}: {pair['sara']['ms'] / pair['sft']['ms'] - 1:+.1%} time, "
                  f"{(pair['sara']['peak_gib'] or 0) - (pair['sft']['peak_gib'] or 0):+.2f} GiB")
    auto = None
    if cuda:
        reset(dit)
        auto = resolve_levers(RunConfig(), dev, dit, tokens=args.batch * n_tok)
        same = {k: auto[k] for k in best} == best
        print(f"sara.train.resolve_levers on this GPU: { {k: auto[k] for k in best} } ({'matches' if same else 'DIFFERS: update AUTO_CUDA / ACT_VALUES(_COMPILED) in nbs/train.ipynb'})")
        for w in auto["why"]: print("  " + w)
        print(f"AUTO_CUDA today: {AUTO_CUDA}")
    write(best, auto, final=True)
    return rows


if __name__ == "__main__":
    main()
