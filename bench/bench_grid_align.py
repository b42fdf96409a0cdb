"""Space alignment on the toy world (issue 12): pool the finer target grid onto the DiT grid (the workbench's choice)
against the earlier choice, interpolating the DiT tokens up to the target grid.

Both modes use the exact time correspondence of `sara.grids` (latent 0 dropped, each latent facing its two
tubelets), so they differ in space only. Each trains the same tiny DiT + projector (same seed, data order, noise and
timesteps) with the TRD loss alone (op "uniform", margin 0) on the toy cache that `make demo` uses, and reports:

* `trd own`: the loss each mode optimises, mean of the last 20 steps (its own grid: 4x4 vs 8x8 per tubelet);
* `trd coarse`: the TRD of the trained model on the common coarse grid (p pooled back where it was upsampled; y
  pooled 2x2): the same yardstick for both;
* `N`, `pairs`: tokens and token pairs per clip the loss sees; `ms/step`: median step time on this CPU.

    .venv/bin/python bench/bench_grid_align.py --steps 200
"""
import argparse, statistics, time
from pathlib import Path

import torch
import torch.nn.functional as F

from sara.config import make_config, site_settings
from sara.grids import GridMap, align_dit, align_target
from sara.train import build_models, collate_targets, load_targets, trainable_parameters
from sara.trd import trd_loss
from sara.wan import dit_grid, flow_matching_pair, sample_sigmas

ROOT = Path(__file__).resolve().parents[1]


def upsample_space(p: torch.Tensor,  # B, N, D on (T', h, w)
                   grid: tuple,      # (T', h, w)
                   size: tuple,      # (H', W') target size
                  ) -> torch.Tensor:  # B, T' H' W', D
    "The removed choice: bilinear (align_corners=False) interpolation of DiT tokens up to the target grid."
    B, N, D = p.shape
    T, h, w = grid
    v = p.reshape(B, T, h, w, D).permute(0, 1, 4, 2, 3).reshape(B * T, D, h, w)
    v = F.interpolate(v, size=size, mode="bilinear", align_corners=False)
    return v.reshape(B, T, D, *size).permute(0, 1, 3, 4, 2).flatten(1, 3)


def run(mode: str, steps: int, cfg, targets) -> dict:
    torch.manual_seed(0)
    models = build_models(cfg, torch.device("cpu"), target_dim=targets[0]["y"].shape[-1])
    opt = torch.optim.AdamW(trainable_parameters(models), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    order = torch.randint(0, len(targets), (steps, cfg.batch_size), generator=torch.Generator().manual_seed(1))
    own, coarse, times = [], [], []
    for s in range(steps):
        batch = collate_targets([targets[int(j)] for j in order[s]], torch.device("cpu"))
        t0 = time.perf_counter()
        x0 = batch["latents"]
        sig, ts = sample_sigmas(models.wan.scheduler, x0.shape[0], gen)
        x_t, _ = flow_matching_pair(x0, torch.randn(x0.shape, generator=gen), sig)
        _, feats = models.trainee()(x_t, ts, batch["prompt"])
        gm = GridMap(cfg.n_frames, dit_grid(models.dit, x0.shape), batch["grid"])
        y_c = align_target(batch["y"], gm)                                     # B, T' h w, D
        p_c = align_dit(feats, gm)                                             # B, T' h w, D
        if mode == "pool":
            loss = trd_loss(p_c, y_c, op="uniform", margin=0.0, impl="reference")
            with torch.no_grad(): c = loss.detach()
        else:
            p_up = upsample_space(p_c, gm.common, gm.target[1:])              # B, T' H' W', D
            loss = trd_loss(p_up, batch["y"], op="uniform", margin=0.0, impl="reference")
            with torch.no_grad():   # the same yardstick: back onto the coarse grid
                back = align_target(p_up, gm)
                c = trd_loss(back, y_c, op="uniform", margin=0.0, impl="reference")
        opt.zero_grad(); loss.backward(); opt.step()
        times.append(time.perf_counter() - t0)
        own.append(loss.item()); coarse.append(c.item())
    n = gm.n_tokens if mode == "pool" else gm.target[0] * gm.target[1] * gm.target[2]
    return dict(mode=mode, N=n, pairs=n * n, own=statistics.mean(own[-20:]), coarse=statistics.mean(coarse[-20:]),
                first=own[0], ms=1e3 * statistics.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = make_config(dict(run_name="bench-grid", method="videorepa", lr=1e-3, batch_size=2),
                      settings=site_settings(ROOT))
    targets, folder = load_targets(cfg, progress=False)
    print(f"toy cache {folder}: {len(targets)} clips, target grid {tuple(targets[0]['y'].shape[:3])}, {a.steps} steps, "
          f"TRD only (uniform, margin 0), lr {cfg.lr}")
    print(f"{'mode':<9} {'N':>5} {'pairs':>8} | {'trd step 1':>10} {'trd own':>8} {'trd coarse':>10} | {'ms/step':>7}")
    for mode in ("pool", "upsample"):
        r = run(mode, a.steps, cfg, targets)
        print(f"{r['mode']:<9} {r['N']:>5} {r['pairs']:>8} | {r['first']:>10.4f} {r['own']:>8.4f} {r['coarse']:>10.4f} | {r['ms']:>7.1f}")


if __name__ == "__main__":
    main()
