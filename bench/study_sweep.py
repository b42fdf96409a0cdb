"""Recipe sweep of the study's toy VAE and target encoder (issue 13), several recipes at once on the GPUs of one machine.

Each recipe is the study's own stage (`sara-study --stage world,<vae|encoder>`) in its own folder, with some
`StudySize` fields replaced; every recipe of one kind sees the same world, the same held-out clips and the same probe
clips. The VAE is scored by its held-out reconstruction PSNR (the vae stage's own record), the encoder by its linear
probes against the same architecture with random weights (the encoder stage's own record). The sweep then picks one
recipe of each kind by a rule fixed here, before any run:

* VAE: the highest mean held-out PSNR;
* encoder: the largest margin over random weights on the weaker of shape and motion (colour is readable from any
  patch embedding, so it cannot tell encoders apart).

and writes `<root>/chosen/` (world, text, the chosen vae and encoder stage folders) plus `chosen.json` with the
`--set` arguments of the study that uses them:

    python3 bench/study_sweep.py --root /tmp/sweep --carry <folder with world/ and text/> --gpus 0,1
    sara-study --stage wan,cache,stage1 --root /tmp/study --carry /tmp/sweep/chosen --set $(jq -r '.set|join(" ")' /tmp/sweep/chosen.json)

The selection uses the reported held-out clips (VAE) and probe clips (encoder): it is stated with the figures.
"""
import argparse, json, os, shutil, subprocess, sys, time
from pathlib import Path

# recipe name -> StudySize fields replaced (every other field is the default size's); fixed before the sweep ran.
# Part 3 (2026-11-30, the world of sara.toy's radius 0.07-0.10) ran v5b16, v9b8, mae, mae_raw90, mae90_wide, jepa90 and
# jepa90_wide (bench/README.md); part 4 runs the world of StudySize.toy_radius (0.12, 0.16) with the rows marked 4.
VAE_RECIPES = {
    "v5b16": dict(vae_frames=5, vae_batch=16, vae_steps=2000),   # short clips (2 latent frames): 80 frames per step
    "v9b8": dict(vae_frames=9, vae_batch=8, vae_steps=2000),     # 3 latent frames: 72 frames per step (default: 17 x 8 = 136)
    "vfull_b8": dict(vae_frames=0, vae_batch=8, vae_steps=1500),    # 4: part 1's recipe (28.5 dB in part 1's world)
    "vfull_b16": dict(vae_frames=0, vae_batch=16, vae_steps=1500),  # 4: twice the clips per step (the Wan VAE decodes latent frames one by one: steps are latency-bound)
}
ENC_RECIPES = {
    "mae": dict(enc_steps=3000, enc_batch=32),                               # today's objective, 4x the samples
    "mae_raw90": dict(enc_steps=3000, enc_batch=32, enc_norm_pix=False, mask_ratio=0.9),
    "mae90_wide": dict(enc_steps=3000, enc_batch=32, mask_ratio=0.9, enc_hidden=256, enc_layers=6, enc_heads=8),  # 4 too
    "jepa90": dict(enc_steps=3000, enc_batch=32, enc_objective="jepa", mask_ratio=0.9, enc_ema=0.996),
    "jepa90_wide": dict(enc_steps=3000, enc_batch=32, enc_objective="jepa", mask_ratio=0.9, enc_ema=0.996,
                        enc_hidden=256, enc_layers=6, enc_heads=8),
    "mae90_wide_b128": dict(enc_steps=2000, enc_batch=128, mask_ratio=0.9, enc_hidden=256, enc_layers=6, enc_heads=8),  # 4: 2.7x the clips
    "jepa90_wide_b128": dict(enc_steps=2000, enc_batch=128, enc_objective="jepa", mask_ratio=0.9, enc_ema=0.998,
                             enc_hidden=256, enc_layers=6, enc_heads=8),                                             # 4
}


def sets(fields: dict) -> list:  # ["k=json", ...] for `sara-study --set`
    return [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in fields.items()]


def launch(root: Path, kind: str, name: str, fields: dict, carry: str, gpu: str, timeout: int, size: str):
    "Start one recipe's stage in its own folder (a subprocess); returns (Popen, log file)."
    d = root / f"{kind}-{name}"; d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4")
    argv = ["timeout", str(timeout), sys.executable, "-m", "sara.study", "--stage", f"world,{kind}", "--root", str(d),
            "--size", size, "--set", *sets(fields)] + (["--carry", carry] if carry else [])
    log = open(d / "log.txt", "w")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log


def margin(probe: dict) -> float:  # the encoder's rule: worse of (shape, motion) margins over random weights
    """Part 3 and 4's rule used the per-token motion probe; from part 5 on, where the probe has it, `motion_pair` (a
    token and its successor in time: the relation that TRD aligns; per-token motion was near chance for every encoder,
    trained or random, bench/README.md part 4) stands for motion."""
    t, r = probe["trained"], probe["random"]
    m = [t[k] - r[k] for k in ("shape", "motion_pair" if "motion_pair" in t else "motion")]
    return float("-inf") if any(x != x for x in m) else min(m)   # a probe without test tokens (nan) never wins


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True); ap.add_argument("--carry", default="", help="folder with finished world/ text/ stages")
    ap.add_argument("--vae", default=",".join(VAE_RECIPES)); ap.add_argument("--enc", default=",".join(ENC_RECIPES))
    ap.add_argument("--gpus", default="0", help="GPUs the recipes are spread over, round-robin (the VAE recipes first)")
    ap.add_argument("--timeout", type=int, default=420, help="seconds each recipe may run")
    ap.add_argument("--size", default="default"); ap.add_argument("--set", nargs="*", default=[], help="fields for every recipe (tests)")
    a = ap.parse_args(argv)
    root = Path(a.root).resolve(); root.mkdir(parents=True, exist_ok=True)
    base = dict(kv.split("=", 1) for kv in a.set)
    base = {k: json.loads(v) for k, v in base.items()}
    jobs = {}
    t0 = time.perf_counter()
    gpus = [g for g in a.gpus.split(",") if g]
    for kind, table, names in (("vae", VAE_RECIPES, a.vae), ("encoder", ENC_RECIPES, a.enc)):
        for n in [x for x in names.split(",") if x]:
            if n not in table: raise SystemExit(f"unknown {kind} recipe {n!r}; known: {', '.join(table)}")
            gpu = gpus[len(jobs) % len(gpus)]
            jobs[(kind, n)] = launch(root, kind, n, {**table[n], **base}, a.carry, gpu, a.timeout, a.size)
    rows = []
    for (kind, n), (p, log) in jobs.items():
        rc = p.wait(); log.close()
        rec = root / f"{kind}-{n}" / kind / "done.json"
        r = json.loads(rec.read_text()) if rec.is_file() else None
        row = dict(kind=kind, recipe=n, fields={**(VAE_RECIPES if kind == "vae" else ENC_RECIPES)[n], **base}, rc=rc,
                   wall_s=r["wall_s"] if r else None, result=r["result"] if r else None)
        if r and kind == "encoder": row["margin"] = round(margin(r["result"]["probe"]), 4)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "result"}), flush=True)
    ok = lambda k: [r for r in rows if r["kind"] == k and r["result"]]
    best_v = max(ok("vae"), key=lambda r: r["result"]["psnr_heldout"], default=None)
    best_e = max(ok("encoder"), key=lambda r: r["margin"], default=None)
    chosen = root / "chosen"; shutil.rmtree(chosen, ignore_errors=True); chosen.mkdir()
    src = best_v or best_e
    if src:   # world/ and text/ of any recipe folder are the same (same seeds, carried text table)
        d = root / f"{src['kind']}-{src['recipe']}"
        for st in ("world", "text"):
            if (d / st).is_dir(): shutil.copytree(d / st, chosen / st)
    fields = {}
    for b, kind in ((best_v, "vae"), (best_e, "encoder")):
        if b: shutil.copytree(root / f"{kind}-{b['recipe']}" / kind, chosen / kind); fields.update(b["fields"])
    out = dict(vae=best_v and best_v["recipe"], encoder=best_e and best_e["recipe"], set=sets(fields), fields=fields,
               rows=rows, wall_s=round(time.perf_counter() - t0, 1))
    (root / "chosen.json").write_text(json.dumps(out, indent=1, default=str))
    print("| recipe | wall s | result |\n| --- | --- | --- |")
    for r in rows:
        res = r["result"]
        if res is None: txt = f"did not finish (exit {r['rc']})"
        elif r["kind"] == "vae": txt = f"PSNR {res['psnr_heldout']:.2f} dB (worst {res['psnr_min']:.2f}), {res['params'] / 1e6:.2f} M params"
        else:
            pr = res["probe"]
            ks = [k for k in ("colour", "shape", "motion", "motion_pair") if k in pr["trained"]]
            txt = (f"{' / '.join(ks)}: trained " + " / ".join(f"{pr['trained'][k]:.3f}" for k in ks) +
                   ", random " + " / ".join(f"{pr['random'][k]:.3f}" for k in ks) +
                   f", margin {r['margin']:+.3f}, loss {res['first_loss']:.3f} -> {res['final_loss']:.3f}")
        print(f"| {r['kind']} {r['recipe']} | {r['wall_s']} | {txt} |")
    print("chosen:", out["vae"], out["encoder"], " ".join(out["set"]))
    if not (best_v or not a.vae) or not (best_e or not a.enc): raise SystemExit("no recipe of a kind finished: nothing chosen")
    return out


if __name__ == "__main__": main()
