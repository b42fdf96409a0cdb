"""The whole controlled study (issue 13) at micro size on the CPU: every stage runs on the real code path and records
itself, the runs of every method see the same data, the report's table has the ceiling, the floor and one row per
method, and a finished study is reused (a half-written stage is redone)."""
import json
import math
import re
from pathlib import Path
import numpy as np

import pytest

from sara.study import METRICS, STAGES, get_size, run_study, stage_result


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "micro"
    return root, run_study(root, "micro")


def test_every_stage_recorded(study):
    root, recs = study
    assert list(recs) == list(STAGES)
    for name in STAGES:
        rec = stage_result(root, name)
        assert rec is not None and rec["stage"] == name and rec["size"] == "micro" and rec["wall_s"] >= 0
    assert set(recs["report"]["result"]["walls"]) == set(STAGES) - {"report"}


def test_learned_models_load_as_the_workbench_loads_them(study):
    from sara.vfm import build_vfm
    from sara.wan import build_wan
    root, recs = study
    s = get_size("micro")
    wan = build_wan(str(root / "wan" / "model"))
    assert wan.vae.config.z_dim == s.vae_z_dim and len(wan.vae.config.latents_mean) == s.vae_z_dim
    assert wan.vae.config.latents_std != [1.0] * s.vae_z_dim            # measured on training latents, not the placeholder
    vfm = build_vfm(str(root / "encoder" / "model"))
    assert type(vfm).__name__ == "FrozenVideoMAE" and vfm.geometry.frames_per_clip == s.n_frames - 1
    probe = recs["encoder"]["result"]["probe"]
    assert set(probe) == {"trained", "random"} and set(probe["trained"]) == {"colour", "shape", "motion", "motion_pair"}
    assert math.isfinite(recs["vae"]["result"]["psnr_heldout"])


def test_runs_share_steps_and_data_order(study):
    from sara.train import read_metrics
    root, _ = study
    s = get_size("micro")
    orders = {}
    for m in s.methods:
        for sd in s.seeds:
            rd = root / "train" / "runs" / f"{m}_s{sd}"
            assert (rd / "checkpoint" / "transformer.safetensors").is_file()
            rows = read_metrics(rd / "metrics.jsonl")
            assert rows[-1]["step"] == s.train_steps
            orders[m, sd] = [r["clips"] for r in rows]
    for sd in s.seeds:
        assert len({json.dumps(orders[m, sd]) for m in s.methods}) == 1  # the same seed gives every method the same batches


def test_samples_and_table(study):
    root, recs = study
    s = get_size("micro")
    prompts = json.loads((root / "world" / "heldout.json").read_text())
    for run in ["heldout", "reference", "step0"] + [f"{m}_s{sd}" for m in s.methods for sd in s.seeds]:
        idx = json.loads((root / "sample" / run / "index.json").read_text())
        assert len(idx) == len(prompts) * (1 if run in ("heldout", "reference") else len(s.eval_seeds))
        assert all((root / "sample" / run / e["file"]).is_file() for e in idx)
    table = json.loads((root / "report" / "table.json").read_text())
    assert [r["method"] for r in table] == ["real (ceiling)", "untrained DiT (floor)", *s.methods]
    for r in table:
        for k in METRICS:
            mean, lo, hi = r[k]
            assert 0 <= lo <= mean <= hi <= 1, (r["method"], k, r[k])
        assert r["fd"][0] >= 0
    md = (root / "report" / "table.md").read_text().strip().splitlines()
    assert len(md) == 2 + len(table) and md[0].startswith("| method | n |")
    assert (root / "report" / "grid_p000.png").is_file() and list((root / "report").glob("saliency_*.html"))
    paired = json.loads((root / "report" / "paired.json").read_text())   # every method but SFT against SFT, in pairs
    assert [(r["method"], r["dimension"]) for r in paired] == [(m, k) for m in s.methods if m != "sft" for k in METRICS]
    scores = json.loads((root / "score" / "scores.json").read_text())
    for r in paired:
        a = {(x["prompt_id"], x["seed"]): x[r["dimension"]] for x in scores if x["method"] == r["method"]}
        b = {(x["prompt_id"], x["seed"]): x[r["dimension"]] for x in scores if x["method"] == "sft"}
        assert r["n"] == len(prompts) * len(s.eval_seeds) and abs(r["mean_diff"] - np.mean([a[k] - b[k] for k in a])) < 1e-9
        assert r["lo"] <= r["mean_diff"] <= r["hi"]
    assert (root / "report" / "paired.md").read_text().startswith("| method - sft | pairs |")


def test_finished_study_is_reused_and_half_written_stage_redone(study):
    root, recs = study
    (root / "report" / "done.json").unlink()
    (root / "report" / "stale.txt").write_text("left by a killed run")
    again = run_study(root, "micro")
    for name in STAGES[:-1]: assert again[name]["finished"] == recs[name]["finished"]   # skipped, not redone
    assert not (root / "report" / "stale.txt").exists() and stage_result(root, "report") is not None
    with pytest.raises(ValueError, match=r"another size \(differs in \['train_steps'\]\).*--like .*study\.json"):   # names the fix
        run_study(root, "micro", "report", train_steps=5)


def test_pack_carries_run_weights_to_another_machine(study, tmp_path):
    """pack_results includes each run's weights export (cut into parts under the device's file limit), and a study
    unpacked elsewhere rebuilds every run with the same weights."""
    import torch
    from sara.study import load_study_run, pack_results, unpack_results
    root, _ = study
    s = get_size("micro")
    written = pack_results(root, tmp_path / "out", max_bytes=1 << 16)
    parts = [p for p in written if p.name.startswith("checkpoints.tar.")]
    assert len(parts) > 1 and all(p.stat().st_size <= 1 << 16 for p in parts)   # cut into parts under max_bytes
    unpack_results(tmp_path / "out", tmp_path / "elsewhere")
    for m in s.methods:
        for sd in s.seeds:
            run = f"{m}_s{sd}"
            _, a = load_study_run(root, s, run, torch.device("cpu"))
            _, b = load_study_run(tmp_path / "elsewhere", s, run, torch.device("cpu"))
            for (k, x), (_, y) in zip(a.dit.state_dict().items(), b.dit.state_dict().items()): assert torch.equal(x, y), k


def test_jepa_objective_learns_on_a_tiny_batch():
    """The feature-prediction objective against a fixed target (EMA momentum 1) lowers its loss on 8 micro clips, and
    returns the target encoder as a transformers VideoMAEModel (what stage_encoder saves and build_vfm loads)."""
    import torch
    from sara.study import pretrain_encoder, train_frames
    s = get_size("micro", enc_objective="jepa", enc_ema=1.0, enc_steps=30, enc_warmup=1, mask_ratio=0.5)
    torch.set_num_threads(2)
    enc, hist = pretrain_encoder(s, train_frames(s, 8), torch.device("cpu"))
    assert type(enc).__name__ == "VideoMAEModel"
    assert hist[-1]["loss"] < 0.9 * hist[0]["loss"], hist


def test_vae_and_encoder_stages_pause_and_resume(tmp_path, monkeypatch, capsys):
    """A budget that runs out after 2 of 4 steps pauses the vae and the encoder stage (exit 3 on the command line, no
    done.json, the state kept by the next run's cleaning, everything else of the half-written folder removed); the next
    runs resume and save bitwise the weights and history of uninterrupted stages (CPU); a state carried into a study of
    another recipe is refused, naming the file and the field."""
    import itertools
    import shutil
    import torch
    from safetensors.torch import load_file
    import sara.study as st
    torch.set_num_threads(2)
    s = get_size("micro", vae_steps=4, enc_steps=4)
    straight, paused = tmp_path / "straight", tmp_path / "paused"
    run_study(straight, s, "world,vae,encoder")
    run_study(paused, s, "world")
    monkeypatch.setattr(st, "_clock", itertools.count().__next__)      # one second per reading: 2 steps within 1.5 s
    args = ["--size", "micro", "--root", str(paused), "--budget", "1.5", "--set", "vae_steps=4", "enc_steps=4", "--stage"]
    for stage in ("vae", "encoder"):
        with pytest.raises(SystemExit) as e: st.study_cli(args + [stage])
        assert e.value.code == 3 and f"{stage}: paused at step 2 of 4" in capsys.readouterr().out
        d = paused / stage
        assert stage_result(paused, stage) is None and torch.load(d / "train_state.pt", weights_only=True)["step"] == 2
        (d / "stale.txt").write_text("left by the paused run")
        st.study_cli(args + [stage])                                        # resumes at step 2 and finishes
        assert f"{stage}: resuming at step 2 of 4" in capsys.readouterr().out
        assert not (d / "stale.txt").exists() and not (d / "train_state.pt").exists()
        rec, ref = stage_result(paused, stage)["result"], stage_result(straight, stage)["result"]
        assert rec["pauses"] == [2] and len(rec["loop_s"]) == 2 and ref["pauses"] == []
        assert (d / "history.json").read_text() == (straight / stage / "history.json").read_text()
    for f in ("vae/vae/diffusion_pytorch_model.safetensors", "encoder/model/model.safetensors"):
        a, b = load_file(str(straight / f)), load_file(str(paused / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    # a paused VAE carried into a study whose VAE recipe differs is refused by name
    other = tmp_path / "other"
    run_study(other, s, "world", vae_lr=2e-3)
    (other / "vae").mkdir()
    monkeypatch.setattr(st, "_clock", itertools.count().__next__)
    with pytest.raises(st.StagePaused): run_study(paused, s, "vae", force=True, budget_s=1.5)
    shutil.copy(paused / "vae" / "train_state.pt", other / "vae" / "train_state.pt")
    with pytest.raises(ValueError, match=r"other/vae/train_state.pt: saved by a run with vae_lr=0.001, this run has vae_lr=0.002"):
        run_study(other, s, "vae", vae_lr=2e-3)


def test_more_seeds_merge_into_one_study(study, tmp_path, capsys):
    """A second folder with another seed and the first's VAE and encoder carried in merges with the first into one study
    (`sara-study --merge`): its table has both seeds' samples, the paired comparison both seeds' pairs; a folder with its
    own VAE (another front) is refused by name."""
    import shutil
    from sara import study as st
    root, recs = study
    front = tmp_path / "front"
    for name in ("vae", "encoder"): shutil.copytree(root / name, front / name)
    more = tmp_path / "more"
    run_study(more, "micro", carry=front, seeds=[1])
    assert stage_result(more, "vae")["result"] == recs["vae"]["result"]      # carried, not retrained
    merged = tmp_path / "merged"
    st.study_cli(["--merge", f"{root},{more}", "--root", str(merged)])
    assert '"seeds": [0, 1]' in capsys.readouterr().out
    s = get_size("micro")
    n = len(json.loads((root / "world" / "heldout.json").read_text())) * len(s.eval_seeds)
    table = {r["method"]: r for r in json.loads((merged / "report" / "table.json").read_text())}
    assert table["real (ceiling)"]["n"] == n and all(table[m]["n"] == 2 * n for m in s.methods)
    paired = json.loads((merged / "report" / "paired.json").read_text())
    assert {r["n"] for r in paired} == {2 * n} and all(set(r["by_seed"]) == {"0", "1"} for r in paired)
    # the second seed as a rerun of the first: --compare reads its table against the first's intervals, cell by cell
    st.study_cli(["--size", "micro", "--root", str(more), "--stage", "report", "--set", "seeds=[1]", "--compare", str(root / "report" / "table.json")])
    out = capsys.readouterr().out
    assert re.search(r"\[compare\] \d+ of 28 cells inside the intervals of ", out), out   # 4 rows x 7 columns
    # and pairs its samples with the recorded ones: only the real clips and the untrained DiT share a training seed
    # with seed 0's study, and on the CPU they are the same samples, so every paired difference holds 0
    m = re.search(r"\[compare\] paired: (\d+) of (\d+) rerun - recorded differences hold 0", out)
    assert m and m[1] == m[2] and int(m[1]) > 0, out
    rep = json.loads((more / "report" / "replicate.json").read_text())
    assert {c["method"] for c in rep["cells"]} == {"real (ceiling)", "untrained DiT (floor)"} and all(c["mean_diff"] == 0 for c in rep["cells"])
    mine = tmp_path / "mine"; mine.mkdir(); (mine / "notes.txt").write_text("a user's file")   # not a merged study: refused, kept
    with pytest.raises(SystemExit) as e: st.study_cli(["--merge", f"{root},{more}", "--root", str(mine)])
    assert e.value.code == 1 and "not a merged study" in capsys.readouterr().err and (mine / "notes.txt").is_file()
    own = tmp_path / "own"                      # a copy of the second folder as seed 2, with a VAE record of its own: another front
    shutil.copytree(more, own)
    meta = json.loads((own / "study.json").read_text()); meta["size"]["seeds"] = [2]; (own / "study.json").write_text(json.dumps(meta))
    rec = json.loads((own / "vae" / "done.json").read_text()); rec["result"]["psnr_heldout"] += 1.0
    (own / "vae" / "done.json").write_text(json.dumps(rec))
    with pytest.raises(SystemExit) as e: st.study_cli(["--merge", f"{root},{own}", "--root", str(tmp_path / "m2")])
    assert e.value.code == 1 and "another vae" in capsys.readouterr().err and not (tmp_path / "m2").exists()


def test_killed_stage2_run_resumes_exactly(study, tmp_path):
    """With `train_ckpt_every`, a Stage 2 run killed part-way (its checkpoints on disk, no export) resumes from its latest
    checkpoint when the train stage runs again (the next device call), and ends with the weights of a run never stopped."""
    import shutil
    import torch
    from safetensors.torch import load_file
    from sara import study as st
    from sara.config import make_config
    from sara.train import train
    root, recs = study
    s = get_size("micro", train_ckpt_every=1)
    front = tmp_path / "front"
    for name in ("world", "text", "vae", "encoder"): shutil.copytree(root / name, front / name)
    more = tmp_path / "more"
    run_study(more, s, "world,text,vae,encoder,wan,cache,stage1", carry=front)     # the front carried; wan, cache, stage1 rebuilt
    cfg = make_config(st.run_params(more, s, "sara", 0))
    train(cfg, progress=False, stop_after=2)                                       # killed after 2 of the 4 steps
    assert not st.run_finished(Path(cfg.run_dir)) and (Path(cfg.run_dir) / "checkpoints").is_dir()
    assert st.run_params(more, s, "sara", 0)["resume"] == "latest" and st.run_params(more, s, "sft", 0)["resume"] == ""
    assert st.run_params(more, s, "sft", 0)["checkpoint_every"] == 1
    run_study(more, s, "train")
    steps = [json.loads(line)["step"] for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, s.train_steps + 1))
    assert not list(Path(cfg.run_dir).glob("previous-*"))    # resumed in place: a fresh start would have moved steps 1-2 aside
    for run in ("sara_s0", "sft_s0"):   # the same weights as the fixture's runs, trained without a stop or a checkpoint
        a = load_file(str(root / "train" / "runs" / run / "checkpoint" / "transformer.safetensors"))
        b = load_file(str(more / "train" / "runs" / run / "checkpoint" / "transformer.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run


def test_vae_step_time_bench_writes_its_json(tmp_path):
    """bench/vae_step_time.py (the probe that fixes the VAE race's steps, part 6) at micro size: a table row and a JSON
    entry per width x batch, positive seconds per step; an unknown --like file is refused by name."""
    import subprocess, sys
    out = tmp_path / "step.json"
    r = subprocess.run([sys.executable, "bench/vae_step_time.py", "--size", "micro", "--bases", "4,6", "--batches", "1",
                        "--short", "1", "--long", "2", "--repeat", "1", "--warmup", "1", "--clips", "2", "--json", str(out)],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())
    # seconds per step are a difference of two timings: on a loaded CI machine at 1 vs 2 steps their sign is noise (the
    # script says so), so only their form is checked here; bench/README holds the device's measured values
    assert sorted(got) == ["4x1", "6x1"] and all(isinstance(v, float) and math.isfinite(v) for v in got.values())
    assert len([l for l in r.stdout.splitlines() if re.match(r"\| [46] \| 1 \|", l)]) == 2
    bad = subprocess.run([sys.executable, "bench/vae_step_time.py", "--size", "micro", "--like", str(tmp_path / "none.json")],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert bad.returncode != 0 and "none.json" in bad.stderr


def test_vae_recon_figure(study, tmp_path):
    "bench/vae_recon_figure.py on the micro study's VAE and world: a PNG of real and reconstructed rows; a clip out of range is refused by name."
    import importlib.util
    from PIL import Image
    spec = importlib.util.spec_from_file_location("vae_recon_figure", Path(__file__).parents[1] / "bench" / "vae_recon_figure.py")
    fig = importlib.util.module_from_spec(spec); spec.loader.exec_module(fig)
    root, _ = study
    out = tmp_path / "rec.png"
    fig.main(["--vae", str(root / "vae" / "vae"), "--world", str(root / "world"), "--clips", "0", "--frames", "0,1", "--out", str(out)])
    s = get_size("micro")
    assert Image.open(out).size == (2 * (s.size + 4) + 4, 2 * s.size + 3 * 4 + 12) and not list(tmp_path.glob("*.tmp.png"))
    with pytest.raises(SystemExit, match=r"out of range for .*world \(2 clips of 5 frames\): \[99, 8, 12, 16\]"):
        fig.main(["--vae", str(root / "vae" / "vae"), "--world", str(root / "world"), "--clips", "99", "--out", str(out)])


def test_stage2_processes_append_log_and_sum_walls(study, tmp_path):
    """Stage 2 through `sara-train` processes (workers > 1, the device path) on the CPU. A run whose earlier process was
    killed (a `launch.json` left behind, its log last written 40 s after its start) is run again: its wall.json counts
    both processes, and its log keeps the killed process's lines above the new process's header."""
    import os
    import shutil
    import time
    from sara import study as st
    root, _ = study
    s = get_size("micro", workers=2)
    front = tmp_path / "front"
    for name in ("world", "text", "vae", "encoder"): shutil.copytree(root / name, front / name)
    more = tmp_path / "more"
    run_study(more, s, "world,text,vae,encoder,wan,cache,stage1", carry=front)
    killed = more / "train" / "runs" / f"{s.methods[0]}_s{s.seeds[0]}"
    killed.mkdir(parents=True)
    started = time.time() - 100
    (killed / st.LAUNCH).write_text(json.dumps(dict(started=started, parts=[])))
    (killed / "log.txt").write_text("the killed process's last line\n"); os.utime(killed / "log.txt", (started + 40, started + 40))
    rec = run_study(more, s, "train")["train"]
    assert rec["result"]["launched"] == len(s.methods) * len(s.seeds)
    w = json.loads((killed / "wall.json").read_text())
    assert len(w["processes"]) == 2 and abs(w["processes"][0] - 40) < 0.01 and abs(w["wall_s"] - sum(w["processes"])) < 0.02
    log = (killed / "log.txt").read_text()
    assert log.startswith("the killed process's last line\n=== sara-train, process 2 of this run")
    assert not (killed / st.LAUNCH).exists()
    other = more / "train" / "runs" / f"{s.methods[1]}_s{s.seeds[0]}"   # a fresh run: one process
    assert len(json.loads((other / "wall.json").read_text())["processes"]) == 1
    assert (other / "log.txt").read_text().startswith("=== sara-train, process 1 of this run")
    assert rec["result"]["wall_s"][killed.name] == w["wall_s"]


def test_stage2_determinism_bench(tmp_path):
    """bench/stage2_determinism.py (bench/README part 7) at micro size on the CPU: a table row per mode, both repeats
    identical (the CPU's kernels are deterministic), positive step times; an unknown mode is refused by name."""
    import subprocess, sys
    cmd = [sys.executable, "bench/stage2_determinism.py", "--size", "micro", "--steps", "3", "--batch", "1"]
    r = subprocess.run(cmd + ["--modes", "default,deterministic"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [l.split(" | ") for l in r.stdout.splitlines() if l.startswith("| default |") or l.startswith("| deterministic |")]
    assert len(rows) == 2 and all(row[1] == "True" and row[2] == "None" and float(row[4]) > 0 for row in rows), r.stdout
    bad = subprocess.run(cmd + ["--modes", "default,fast"], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert bad.returncode == 2 and "unknown ['fast']" in bad.stderr


def test_compare_runs_bench(study, tmp_path):
    """bench/compare_runs.py (bench/stage2_repeat.sh's check): a study's runs against a copy of themselves are identical;
    a changed loss names its first step, a changed exported tensor is seen; folders without a common run are refused."""
    import importlib.util, shutil
    from safetensors.torch import load_file, save_file
    spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).parents[1] / "bench" / "compare_runs.py")
    cr = importlib.util.module_from_spec(spec); spec.loader.exec_module(cr)
    root, _ = study
    runs, copy = root / "train" / "runs", tmp_path / "runs"
    shutil.copytree(runs, copy)
    same = cr.compare(runs, copy)
    assert same and all(r["first_diff_step"] is None and r["max_diff"] == 0 and r["same_weights"] for r in same)
    name = same[0]["run"]
    m = copy / name / "metrics.jsonl"
    rows = [json.loads(l) for l in m.read_text().splitlines()]
    rows[1]["fm"] += 1e-7
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = copy / name / "checkpoint" / "transformer.safetensors"
    t = load_file(str(w)); k = next(iter(t)); t[k] = t[k] + 1; save_file(t, str(w))
    got = {r["run"]: r for r in cr.compare(runs, copy)}
    assert got[name]["first_diff_step"] == rows[1]["step"] and got[name]["max_diff"] > 0 and not got[name]["same_weights"]
    assert all(r["same_weights"] for n, r in got.items() if n != name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no run is in both"):
        cr.compare(runs, tmp_path / "empty")
