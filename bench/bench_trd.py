"""Benchmark of the routed TRD loss, forward + backward (issue 6, table 1; issue 12, the auto rule).

Implementations: `naive` (the dense formula in the input dtype, as in the issue's 'naive bf16'; not exact for
bf16: its similarities are bf16), `reference` (`sara.trd.trd_reference`: dense, computed in float32 for bf16
inputs), `compile` (`torch.compile` of `naive`), `chunked` (`sara.trd.trd_chunked`), `dense`
(`sara.trd.trd_dense`: the dense formula with float32-output GEMMs, saved difference) and `triton`
(`sara.trd_triton.trd_triton`); the exact ones through `sara.trd.trd_loss(..., impl=name, check_finite=False)`,
the call of the training step (validation once, no finite check: the step checks the loss). After the cells it prints, per size, the exact implementations' times, the
one `impl="auto"` picks (`sara.trd.trd_auto_choice` with the free memory measured at that cell) and its time
over the best exact one and over `naive`; `--json` keeps the measurements and `--replay` prints that table
again from them with the rule as it is now. For each cell: median time of forward+backward (CUDA events),
time per sample, peak extra memory (max_memory_allocated minus what was allocated before the step:
the inputs), achieved TFLOP/s counting 10 N^2 D flops per sample, and that rate over the card's
measured bf16 matmul rate (an 8192^3 bf16 product timed in the same run).

Inputs: p (B, N, D) requires grad, y (B, N, D) frozen (no grad, as the VFM target in training;
`--grad-y` to differentiate it too), w = uniform random saliency, op `or`, margin 0.1.

    PYTHONPATH=. python3 bench/bench_trd.py --json out.json     # the full table and the auto table (about 3 minutes on an H200)
    PYTHONPATH=. python3 bench/bench_trd.py --n 8192 --b 1 --impls naive,triton --dtypes bf16
    python3 bench/bench_trd.py --replay out.json                 # the auto table again, from saved measurements (no GPU)
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

DT = {"bf16": torch.bfloat16, "fp32": torch.float32}
IMPLS = ("naive", "reference", "compile", "chunked", "dense", "triton")
EXACT = ("reference", "chunked", "dense", "triton")  # what impl="auto" chooses among


def naive_trd(p, y, w, op="or", margin=0.1):
    "Dense routed TRD in the input dtype: the N x N matrices are all materialised."
    from sara.routing import pair_weights
    ph, yh = F.normalize(p, dim=-1), F.normalize(y, dim=-1)
    d = torch.relu((ph @ ph.transpose(1, 2) - yh @ yh.transpose(1, 2)).abs() - margin)
    W = pair_weights(w.to(d.dtype), op)
    return (W * d).sum(dtype=torch.float32) / W.sum(dtype=torch.float32)


def get_impl(name):
    if name == "naive": return naive_trd
    if name == "compile": return torch.compile(naive_trd, dynamic=True)
    if name in EXACT:  # as the training step calls it (sara.train: trd_loss(..., impl=cfg.trd_impl, check_finite=False))
        from sara.trd import trd_loss
        return lambda p, y, w, op, margin: trd_loss(p, y, w, op, margin, impl=name, check_finite=False)
    raise ValueError(f"unknown impl {name!r}; allowed: {', '.join(IMPLS)}")


def cuda_time(fn, reps):
    "Median milliseconds of `fn` over `reps` runs, timed with CUDA events."
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def matmul_rate():
    "Measured bf16 matmul TFLOP/s (8192^3, random data)."
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3): a @ b
    torch.cuda.synchronize()
    ms = cuda_time(lambda: a @ b, 20)
    del a, b
    return 2 * 8192 ** 3 / ms / 1e9


def make_inputs(B, N, D, dtype, grad_y, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    p = torch.randn(B, N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    y = torch.randn(B, N, D, device="cuda", generator=g).to(dtype).requires_grad_(grad_y)
    w = torch.rand(B, N, device="cuda", generator=g)
    return p, y, w


def check_correctness(N=4097, D=1024, B=2):
    "triton vs the float64 reference on structured inputs (similarities spread past the margin)."
    from sara.trd import trd_reference
    from sara.trd_triton import trd_triton
    g = torch.Generator(device="cuda").manual_seed(1)
    mk = lambda: (torch.randn(B, N, 8, device="cuda", generator=g) @ torch.randn(8, D, device="cuda", generator=g)
                  + torch.randn(B, N, D, device="cuda", generator=g))
    p0, y0, w = mk(), mk(), torch.rand(B, N, device="cuda", generator=g)
    for name, dt in DT.items():
        for op in ("uniform", "or"):
            p, y = p0.to(dt).clone().requires_grad_(), y0.to(dt).clone().requires_grad_()
            loss = trd_triton(p, y, w, op, 0.1)
            loss.backward()
            p64, y64 = p.detach().double().requires_grad_(), y.detach().double().requires_grad_()
            ref = trd_reference(p64, y64, w.double(), op, 0.1)
            ref.backward()
            r = lambda a, b: float((a.double() - b).norm() / b.norm())
            print(f"check {name:4s} op={op:7s} B={B} N={N} D={D}: loss {loss.item():.6f} ref {ref.item():.6f} "
                  f"rel {abs(loss.item() - ref.item()) / ref.item():.1e}; grad p rel {r(p.grad, p64.grad):.1e}, "
                  f"grad y rel {r(y.grad, y64.grad):.1e}", flush=True)
            del p, y, p64, y64
    torch.cuda.empty_cache()


def bench_cell(fn, B, N, D, dtype, grad_y, budget_s):
    "(ms per step, peak extra bytes, reps, warm-up s, free bytes) of forward+backward, or a string saying why not."
    from sara.trd import trd_free_bytes
    p, y, w = make_inputs(B, N, D, dtype, grad_y)
    free = trd_free_bytes(p.device)  # what impl="auto" would see here (inputs allocated, nothing else)
    def step():
        p.grad = None; y.grad = None
        fn(p, y, w, "or", 0.1).backward()
    try:
        t0 = time.time()
        step(); torch.cuda.synchronize()          # warm-up: compilation, autotuning, allocator
        t1 = time.time()
        p.grad = None; y.grad = None
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(); torch.cuda.synchronize()          # timed by the wall clock only to size the repetitions
        one = time.time() - t1
        peak = torch.cuda.max_memory_allocated() - base
        reps = int(max(2, min(20, budget_s / max(one, 1e-4))))
        ms = cuda_time(step, reps)
        return ms, peak, reps, t1 - t0, free
    except torch.OutOfMemoryError:
        return "OOM"
    except Exception as e:  # a failing impl must not cost the other cells
        return f"error: {type(e).__name__}: {str(e)[:120]}"
    finally:
        del p, y, w
        torch.cuda.empty_cache()


def auto_table(results):
    """Per (dtype, B, N): the exact implementations' ms, the best, `naive`, the auto pick (the rule in
    `sara.trd.trd_auto_choice`, fed the free memory recorded at the cell) and its time over the best exact one, over
    the exact dense formula (the faster of `reference` and `dense`) and over `naive` (bf16 similarities for bf16)."""
    from sara.trd import trd_auto_choice
    cells = {}
    for r in results:
        cells.setdefault((r["dtype"], r["B"], r["N"]), {})[r["impl"]] = r
    cols = [i for i in IMPLS if i in {r["impl"] for r in results} and i != "compile"]
    lines = [f"{'dtype':5s} {'B':>2s} {'N':>6s} | " + " ".join(f"{c:>9s}" for c in cols) +
             f" | {'best':>9s} | {'auto pick':>9s} {'auto/best':>9s} {'auto/dense':>10s} {'auto/naive':>10s}"]
    worst_best = worst_dense = worst_naive = 0.0
    for (dn, B, N), c in cells.items():
        ms = {i: c[i]["ms"] for i in c if isinstance(c[i].get("ms"), float)}
        exact = {i: t for i, t in ms.items() if i in EXACT}
        free = next((c[i]["free"] for i in c if c[i].get("free") is not None), None)
        D = next(iter(c.values()))["D"]
        pick = trd_auto_choice(B, N, DT[dn], "cuda", free, triton=True, D=2 * D)  # p and y both D wide
        best = min(exact, key=exact.get) if exact else None
        row = f"{dn:5s} {B:2d} {N:6d} | " + " ".join(f"{ms[i]:9.2f}" if i in ms else f"{'-':>9s}" for i in cols)
        if best is None or pick not in ms:
            lines.append(row + f" | {'-':>9s} | {pick:>9s} (not measured)")
            continue
        rb = ms[pick] / exact[best]
        rn = ms[pick] / ms["naive"] if "naive" in ms else float("nan")
        dense = [ms[i] for i in ("reference", "dense") if i in ms]  # the dense formula, exact
        rd = ms[pick] / min(dense) if dense else float("nan")
        worst_best = max(worst_best, rb)
        if rd == rd: worst_dense = max(worst_dense, rd)
        if rn == rn: worst_naive = max(worst_naive, rn)
        lines.append(row + f" | {best:>9s} | {pick:>9s} {rb:9.2f} {rd:10.2f} {rn:10.2f}")
    lines.append(f"worst auto/best {worst_best:.2f}, auto/dense (the faster of reference and dense) {worst_dense:.2f}, "
                 f"auto/naive {worst_naive:.2f} (ms per forward+backward step)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1024,2048,4096,8192,16384,32768", help="comma-separated token counts N")
    ap.add_argument("--b", default="1,4", help="comma-separated batch sizes B")
    ap.add_argument("--d", type=int, default=1024, help="feature width D (p and y)")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, from bf16, fp32")
    ap.add_argument("--impls", default="dense,triton,naive,reference,chunked", help=f"comma-separated, from {', '.join(IMPLS)}")
    ap.add_argument("--grad-y", action="store_true", help="y requires grad too")
    ap.add_argument("--tf32", action="store_true", help="let torch's float32 matmuls use TF32 (naive/compile only: the "
                    "sara implementations always multiply float32 in full float32)")
    ap.add_argument("--time-limit", type=float, default=480, help="seconds; later cells are skipped past it")
    ap.add_argument("--cell-budget", type=float, default=0.5, help="seconds of timed repetitions per cell")
    ap.add_argument("--slow-max-n", type=int, default=16384,
                    help="skip naive/reference/compile/chunked cells with B*N above 4x this")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--json", help="write the measurements here (for --replay)")
    ap.add_argument("--replay", help="print the auto table from this --json file and exit (no GPU needed)")
    a = ap.parse_args(argv)
    if a.replay:
        print(auto_table(json.load(open(a.replay))["results"])); return
    if not torch.cuda.is_available(): sys.exit("bench_trd needs a CUDA device")
    start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    Ns = [int(x) for x in a.n.split(",")]
    Bs = [int(x) for x in a.b.split(",")]
    dts = a.dtypes.split(",")
    impls = a.impls.split(",")
    for i in impls:
        if i not in IMPLS: sys.exit(f"unknown impl {i!r}; allowed: {', '.join(IMPLS)}")
    import triton
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"tf32 for naive float32 matmuls: {a.tf32}, y requires grad: {a.grad_y}", flush=True)
    rate = matmul_rate()
    print(f"measured bf16 matmul (8192^3): {rate:.0f} TFLOP/s", flush=True)
    if not a.no_check and "triton" in impls: check_correctness()
    rows, results = [], []
    hdr = f"{'impl':10s} {'dtype':5s} {'B':>2s} {'N':>6s} | {'ms/step':>9s} {'ms/sample':>9s} {'peak extra GiB':>14s} {'TFLOP/s':>8s} {'of mm':>6s} | reps"
    print(hdr, flush=True)
    for dn in dts:
        for N in Ns:
            for B in Bs:
                for impl in impls:
                    tag = f"{impl:10s} {dn:5s} {B:2d} {N:6d} |"
                    left = a.time_limit - (time.time() - start)
                    if impl in ("naive", "reference", "compile", "chunked") and B * N > 4 * a.slow_max_n:
                        line = f"{tag} skipped (B*N above --slow-max-n)"
                    elif left < 10:
                        line = f"{tag} skipped (time limit {a.time_limit:.0f} s reached)"
                    else:
                        r = bench_cell(get_impl(impl), B, N, a.d, DT[dn], a.grad_y, min(a.cell_budget, left / 4))
                        if isinstance(r, str):
                            line = f"{tag} {r}"
                            results.append(dict(impl=impl, dtype=dn, B=B, N=N, D=a.d, ms=r))
                        else:
                            ms, peak, reps, warm, free = r
                            results.append(dict(impl=impl, dtype=dn, B=B, N=N, D=a.d, ms=ms, peak=peak, free=free))
                            tf = 10 * N * N * a.d * B / (ms * 1e-3) / 1e12
                            line = (f"{tag} {ms:9.2f} {ms / B:9.2f} {peak / 2**30:14.3f} {tf:8.0f} "
                                    f"{100 * tf / rate:5.0f}% | {reps} (warm-up {warm:.1f} s)")
                    rows.append(line)
                    print(line, flush=True)
    print(f"\nTRD forward+backward, op=or, margin=0.1, D={a.d}, y requires grad: {a.grad_y}; "
          f"bf16 matmul {rate:.0f} TFLOP/s; wall {time.time() - start:.0f} s")
    print(hdr)
    for l in rows: print(l)
    print("\nimpl=\"auto\" against the measured times (exact implementations: " + ", ".join(EXACT) + ")")
    print(auto_table(results))
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, D=a.d, results=results), f)
        import os; os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
