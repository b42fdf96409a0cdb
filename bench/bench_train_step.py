"""Stage 2 training step at the real Wan2.2-TI2V-5B transformer configuration (random weights).

Issues 5 and 6: step time, tokens/s and peak memory of one optimisation step (forward, backward, AdamW)
for every method on the one code path (`sara.train.step_losses`), measured side by side in one run:

* sft                flow matching only
* videorepa          + uniform TRD on cached VFM tokens
* moalign            + uniform TRD on a cached motion-subspace target (Dm = --motion-dim)
* sara               + OR-routed TRD on cached VFM tokens and cached saliency
* sara+encoder       as sara, but the frozen V-JEPA 2 runs inside the step (frames 1..80 at half the clip's size,
                     240x416: the grid 40 x 15 x 26 that lines up with the DiT's under `sara.grids`; the ablation
                     that the cache avoids)

plus model-FLOPs utilisation (MFU) of `sft` against the bf16 dense peak (989 TFLOP/s for H100 SXM) and
against a bf16 matmul measured in the same run. Needs CUDA, diffusers, transformers.

    PYTHONPATH=. python3 bench/bench_train_step.py            # 480x832, 81 frames, batch 1
"""
import argparse, math, statistics, time
from types import SimpleNamespace

import torch


TI2V_5B = dict(patch_size=(1, 2, 2), num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48,
               text_dim=4096, freq_dim=256, ffn_dim=14336, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
VJEPA2 = dict(vitl=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4.0),
              vitg=dict(hidden_size=1408, num_hidden_layers=40, num_attention_heads=22, mlp_ratio=48 / 11))


def dit_model_flops(cfg: dict, n_tokens: int, n_text: int, batch: int) -> float:
    "Model FLOPs of one forward+backward of the DiT (3x the forward; recomputation not counted, as MFU does)."
    C, F, L = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"]
    per_token = 2 * (4 * C * C + 2 * C * C + 2 * C * F) + 4 * n_tokens * C + 4 * n_text * C  # self-attn proj, cross q/o, ffn, attn scores
    text_kv = 2 * 2 * C * C * n_text                                                          # cross-attn k/v over the prompt
    return 3 * batch * L * (per_token * n_tokens + text_kv)


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3): a @ b
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=81); ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832); ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=10); ap.add_argument("--vfm", default="vitg", choices=list(VJEPA2))
    ap.add_argument("--motion-dim", type=int, default=32); ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3); ap.add_argument("--layers", type=int, default=None, help="fewer DiT blocks (smoke test)")
    ap.add_argument("--methods", default="sft,videorepa,moalign,sara,sara+encoder")
    args = ap.parse_args()
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import VJEPA2Config, VJEPA2Model
    from sara.config import RunConfig
    from sara.train import Models, step_losses
    from sara.vfm import FrozenVFM
    from sara.wan import Projector, WanParts

    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = dict(TI2V_5B, **({"num_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    with torch.device(dev): dit = WanTransformer3DModel(**cfg)
    dit.to(dt).train(); dit.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in dit.parameters())
    vcfg = VJEPA2Config(crop_size=256, frames_per_clip=64, patch_size=16, tubelet_size=2, **VJEPA2[args.vfm])
    with torch.device(dev): vfm = FrozenVFM(VJEPA2Model(vcfg))
    vfm.to(dt)
    D = vcfg.hidden_size
    lat_shape = (args.batch, 48, (args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    n_tok = lat_shape[2] * (lat_shape[3] // 2) * (lat_shape[4] // 2)
    grid = (2 * (lat_shape[2] - 1), lat_shape[3] // 2, lat_shape[4] // 2)   # V-JEPA 2 (tubelet 2, patch 16) on frames 1..T-1 at half size
    N = math.prod(grid)
    g = torch.Generator(device=dev).manual_seed(0)
    batch = dict(latents=torch.randn(lat_shape, device=dev, dtype=dt, generator=g),
                 prompt=torch.randn(args.batch, 512, 4096, device=dev, dtype=dt, generator=g),
                 y=torch.randn(args.batch, N, D, device=dev, dtype=dt, generator=g),
                 w=torch.rand(args.batch, N, device=dev, generator=g), grid=grid)
    y_motion = torch.randn(args.batch, N, args.motion_dim, device=dev, dtype=dt, generator=g)
    video = torch.rand(args.batch, 2 * grid[0], 3, 16 * grid[1], 16 * grid[2], device=dev, dtype=dt, generator=g) * 2 - 1
    mm = matmul_tflops()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; DiT {n_params/1e9:.2f} B params, "
          f"{cfg['num_layers']} blocks, {n_tok} tokens; VFM {args.vfm} D={D}, grid {grid} = {N} tokens; "
          f"bf16 matmul {mm:.0f} TFLOP/s", flush=True)

    rows = []
    for method in args.methods.split(","):
        run_method = {"sara+encoder": "sara", "moalign": "videorepa"}.get(method, method)
        out_dim = args.motion_dim if method == "moalign" else D
        rc = RunConfig(method=run_method, op="or", block=args.block, lam=0.5, trd_impl="auto")
        torch.manual_seed(0)
        proj = Projector(cfg["num_attention_heads"] * cfg["attention_head_dim"], out_dim).to(dev, dt).train()
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
        vae = SimpleNamespace(config=SimpleNamespace(scale_factor_temporal=4))   # what step_losses reads of the VAE
        models = Models(wan=WanParts(transformer=dit, vae=vae, scheduler=sched), vfm=vfm, text=None, projector=proj, block=args.block)
        params = [*dit.parameters(), *proj.parameters()]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        noise_gen = torch.Generator().manual_seed(1)
        b = dict(batch, y=y_motion if method == "moalign" else batch["y"])
        torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(args.warmup + args.steps):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            if method == "sara+encoder":
                with torch.no_grad(): b = dict(b, y=vfm(video).flatten(1, 3))      # B, N, D recomputed every step
            losses = step_losses(b, models, rc, noise_gen)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            opt.step()
            torch.cuda.synchronize()
            if i >= args.warmup: times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        med = statistics.median(times)
        rows.append((method, med, args.batch * n_tok / med, peak, losses["fm"].item(), losses["trd"].item()))
        print(f"  {method:13s} median {med*1e3:8.1f} ms  peak {peak:6.2f} GiB  (fm {rows[-1][4]:.4f}, trd {rows[-1][5]:.4f})", flush=True)
        del opt, proj, models; torch.cuda.empty_cache()

    base = {r[0]: r for r in rows}.get("sft")
    flops = dit_model_flops(cfg, n_tok, 512, args.batch)
    print(f"\nWan2.2-TI2V-5B config, {args.height}x{args.width}, {args.frames} frames, batch {args.batch}, block {args.block}, "
          f"bf16 params + AdamW, gradient checkpointing; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'method':13s} | {'step ms':>8s} {'tokens/s':>9s} {'peak GiB':>9s} | {'time vs sft':>11s} {'mem vs sft':>10s}")
    for m, t, tps, pk, _, _ in rows:
        rel = f"{t / base[1]:10.3f}x {pk - base[3]:+9.2f}G" if base else ""
        print(f"{m:13s} | {t*1e3:8.1f} {tps:9.0f} {pk:9.2f} | {rel}")
    if base:
        print(f"\nsft model FLOPs/step {flops/1e12:.1f} TFLOP; MFU {flops / base[1] / 989e12:.1%} of 989 TFLOP/s (H100 SXM bf16 dense), "
              f"{flops / base[1] / (mm * 1e12):.1%} of the measured matmul rate")


if __name__ == "__main__":
    main()
