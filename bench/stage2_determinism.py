"""Is a Stage 2 step of the study's DiT bitwise repeatable on a GPU, and what does deterministic mode cost?

The study's rerun (bench/README part 7) found Stage 2 not repeatable: the same run's loss differed in the 6th digit at
step 8. This probe trains the study's default-size DiT (`sara.study.dit_config`) from one seed on fixed random latents,
text and timesteps (flow matching, bf16 autocast, AdamW), twice per mode, each mode in its own process (the cuBLAS
workspace setting must precede CUDA's start), and prints whether the two repeats end with identical weights, the largest
loss difference, and the median step time. Modes: default; deterministic (`sara.train.deterministic_algorithms`, what
`RunConfig.deterministic` turns on: torch's deterministic algorithms, `CUBLAS_WORKSPACE_CONFIG=:4096:8`, cuDNN without
autotuning); deterministic with the math attention backend only.

    python bench/stage2_determinism.py --steps 40 --batch 64      # needs a GPU and diffusers
"""
import argparse, json, statistics, subprocess, sys, time

MODES = ("default", "deterministic", "deterministic_math")


def train_once(steps: int, batch: int, mode: str, size: str = "default") -> dict:  # {losses, step_s, digest}
    import hashlib
    import torch
    from diffusers import WanTransformer3DModel
    from sara.study import dit_config, get_size
    s = get_size(size)
    dev = "cuda" if torch.cuda.is_available() else "cpu"   # the CPU only for a smoke run
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    torch.manual_seed(0)
    dit = WanTransformer3DModel(**dit_config(s)).to(dev).train()
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-4)
    g = torch.Generator(device=dev).manual_seed(1)
    lat_t, lat_hw = (s.n_frames - 1) // 4 + 1, s.size // 8
    x0 = torch.randn(batch, s.vae_z_dim, lat_t, lat_hw, lat_hw, device=dev, generator=g)   # (B, C, T', H', W')
    txt = torch.randn(batch, 16, 384, device=dev, generator=g)                              # (B, L, 384)
    losses, times = [], []
    import contextlib
    backend = torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]) if mode == "deterministic_math" else contextlib.nullcontext()
    with backend:
        for k in range(steps):
          sync(); t0 = time.perf_counter()
          sig = torch.rand(batch, device=dev, generator=g)                                      # (B,)
          noise = torch.randn(x0.shape, device=dev, generator=g)
          xt = (1 - sig.view(-1, 1, 1, 1, 1)) * x0 + sig.view(-1, 1, 1, 1, 1) * noise
          with torch.autocast(dev, dtype=torch.bfloat16):
              v = dit(hidden_states=xt, timestep=sig * 1000, encoder_hidden_states=txt, return_dict=False)[0]
          loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
          opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
          losses.append(loss.item()); sync(); times.append(time.perf_counter() - t0)
    h = hashlib.sha256()
    for p in dit.parameters(): h.update(p.detach().float().cpu().numpy().tobytes())
    return dict(losses=losses, step_s=statistics.median(times[3:] or times), digest=h.hexdigest()[:16])


def child(steps: int, batch: int, mode: str, size: str):
    from sara.train import deterministic_algorithms   # what RunConfig.deterministic turns on, CUBLAS_WORKSPACE_CONFIG included
    try:
        with deterministic_algorithms(mode != "default"): runs = [train_once(steps, batch, mode, size) for _ in range(2)]
    except Exception as e: print(json.dumps(dict(mode=mode, error=f"{type(e).__name__}: {str(e)[:300]}"))); return
    a, b = runs
    print(json.dumps(dict(mode=mode, same_weights=a["digest"] == b["digest"],
                          max_loss_diff=max(abs(x - y) for x, y in zip(a["losses"], b["losses"])),
                          first_diff_step=next((k + 1 for k, (x, y) in enumerate(zip(a["losses"], b["losses"])) if x != y), None),
                          step_s=round(statistics.median([a["step_s"], b["step_s"]]), 4), last_loss=a["losses"][-1])))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40); ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mode", default="", help="(internal) run one mode in this process")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--size", default="default", help="the study size whose DiT is trained (micro: a CPU smoke run)")
    a = ap.parse_args(argv)
    if a.mode: return child(a.steps, a.batch, a.mode, a.size)
    bad = [m for m in a.modes.split(",") if m not in MODES]
    if bad: ap.error(f"--modes: unknown {bad}; known: {', '.join(MODES)}")
    rows = []
    for m in a.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--batch", str(a.batch), "--size", a.size, "--mode", m],
                             capture_output=True, text=True)   # a process per mode: cuBLAS reads its workspace setting once
        line = [l for l in out.stdout.splitlines() if l.startswith("{")]
        rows.append(json.loads(line[-1]) if line else dict(mode=m, error=(out.stderr or "no output")[-300:]))
    base = next((r["step_s"] for r in rows if r["mode"] == "default" and "step_s" in r), None)
    print(f"| mode | same weights after {a.steps} steps (2 repeats) | first differing step | largest loss difference | median step s | vs default |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r: print(f"| {r['mode']} | error: {r['error']} | | | | |"); continue
        ratio = f"{r['step_s'] / base:.2f}x" if base else "-"
        print(f"| {r['mode']} | {r['same_weights']} | {r['first_diff_step']} | {r['max_loss_diff']:.3g} | {r['step_s']:.4f} | {ratio} |")


if __name__ == "__main__": main()
