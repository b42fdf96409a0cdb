"""TRD on the CPU: chunked vs reference, forward+backward, float32, op "or" (issue 6: the chunked CPU path
holds no N^2 allocation at any N and stays within 2x of the reference where the reference fits).

Each measurement runs in a fresh process: peak extra resident memory is the high-water mark of the call
alone (Linux `clear_refs` reset of VmHWM, falling back to the process peak), time is the median of `--reps`.

    .venv/bin/python bench/bench_trd_cpu.py                  # the table
    .venv/bin/python bench/bench_trd_cpu.py --one chunked 16384 64   # one JSON line (used by tests/test_trd.py)
"""
import argparse, json, os, resource, statistics, subprocess, sys, time


def status(key: str) -> int:
    "A /proc/self/status field in bytes."
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"): return int(line.split()[1]) * 1024


def measure_one(impl: str, N: int, D: int, reps: int = 1) -> dict:
    "Time and peak extra memory of one TRD forward+backward in this process (call it in a fresh one)."
    import torch
    from sara.trd import trd_chunked, trd_dense, trd_reference
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    fn = {"chunked": trd_chunked, "reference": trd_reference, "dense": trd_dense}[impl]
    g = torch.Generator().manual_seed(0)
    p = torch.randn(1, N, D, generator=g).requires_grad_()
    y = torch.randn(1, N, D, generator=g).requires_grad_()
    w = torch.rand(1, N, generator=g)
    fn(p[:, :256].detach().requires_grad_(), y[:, :256].detach(), w[:, :256], op="or").backward()  # warm-up
    base = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f: f.write("5")
        method = "VmHWM after clear_refs=5"
    except OSError:
        method = "ru_maxrss"
    times = []
    for _ in range(reps):
        p.grad = y.grad = None
        t0 = time.perf_counter()
        loss = fn(p, y, w, op="or")
        loss.backward()
        times.append(time.perf_counter() - t0)
    peak = status("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert p.grad is not None and y.grad is not None and bool(torch.isfinite(loss))
    return dict(impl=impl, N=N, D=D, extra_mib=(peak - base) / 2 ** 20, seconds=statistics.median(times),
                method=method, loss=loss.item())


def run_fresh(impl: str, N: int, D: int, reps: int = 1) -> dict:
    "`measure_one` in a fresh Python process."
    out = subprocess.run([sys.executable, __file__, "--one", impl, str(N), str(D), "--reps", str(reps)],
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"), timeout=900)
    if out.returncode != 0: raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=3, metavar=("IMPL", "N", "D"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="1024,2048,4096,8192")
    ap.add_argument("--chunked-only", default="16384,32768")
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure_one(a.one[0], int(a.one[1]), int(a.one[2]), a.reps))); return
    print(f"TRD fwd+bwd on the CPU ({os.cpu_count()} cores), float32, op=or, D={a.dim}, B=1; median of {a.reps}; fresh process per cell")
    print(f"{'N':>6s} | {'reference s':>11s} {'MiB':>7s} | {'chunked s':>9s} {'MiB':>7s} | {'time ratio':>10s} | N x N fp32 MiB")
    for N in [int(n) for n in a.sizes.split(",")] + [int(n) for n in a.chunked_only.split(",") if n]:
        c = run_fresh("chunked", N, a.dim, a.reps)
        r = run_fresh("reference", N, a.dim, a.reps) if str(N) not in a.chunked_only.split(",") else None
        rs = f"{r['seconds']:11.3f} {r['extra_mib']:7.0f}" if r else f"{'(skipped)':>11s} {'':>7s}"
        ratio = f"{c['seconds'] / r['seconds']:9.2f}x" if r else f"{'':>10s}"
        print(f"{N:6d} | {rs} | {c['seconds']:9.3f} {c['extra_mib']:7.0f} | {ratio} | {N * N * 4 / 2**20:.0f}", flush=True)


if __name__ == "__main__":
    main()
