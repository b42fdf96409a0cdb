"""How large the toy world's shapes are for the study's target encoder (issue 13): for shape radius ranges (fractions of
the frame side), the share of encoder tokens (tubelet 2, patch 16, 128 px, 17 frames) that an entity covers by at least
a quarter, and how often a clip tells a collision or shows an occlusion. Prints a table; about 20 s on a CPU.

    python bench/toy_radius_stats.py
"""
import time
import numpy as np
from sara.masks import reduce_to_grid
from sara.toy import TOY_RADIUS, toy_batch, toy_scenes


def stats(radius: tuple, n_scenes: int = 512, n_clips: int = 64) -> dict:
    t = time.perf_counter(); sc = toy_scenes(n_scenes, 0, 17, 128, radius=radius); sim = time.perf_counter() - t
    told = np.mean([any(e["type"] == "collide" and e.get("told") for e in s["events"]) for s in sc])
    occ = np.mean([any(e["type"] == "occlude" for e in s["events"]) for s in sc])
    b = toy_batch(n_clips, 3000, 17, 128, split="all", masks=True, radius=radius)
    fg = np.mean([(reduce_to_grid(m[:, 1:].float(), 2, 16).max(0).values >= 0.25).float().mean().item() for m in b["masks"]])
    return dict(radius=radius, fg_tokens=fg, collide_told=told, occlude=occ, sim_s=sim)


if __name__ == "__main__":
    print("| radius (of the side) | foreground tokens | clips with a told collision | with an occlusion | simulate 512 s |")
    print("| --- | --- | --- | --- | --- |")
    for r in (TOY_RADIUS, (0.12, 0.16), (0.14, 0.19)):
        s = stats(r)
        print(f"| {r[0]:.2f}-{r[1]:.2f} | {s['fg_tokens']:.3f} | {s['collide_told']:.2f} | {s['occlude']:.2f} | {s['sim_s']:.1f} |")
