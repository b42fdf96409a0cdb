"Integration tests of evaluation: two toy runs end to end through the papermill notebook, fixed noise, judge, study, VBench bridge."
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from sara.config import make_config, site_settings
from sara.data import load_video
from sara.toy import make_toy_world
from sara.evaluate import (aggregate_scores, build_pipeline, judge_videos, load_run, load_suite, make_rubric, make_study,
                           noise_seed, parse_score, run_vbench, sample_videos, sign_test, study_pairs, tally_study)
from sara.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "Two finished 2-step toy runs (sft, sara) on a 2-clip toy world, and an empty run folder."
    base = tmp_path_factory.mktemp("eval")
    make_toy_world(base / "data", n_clips=2)
    out = {}
    for m in ("sft", "sara"):
        cfg = make_config(dict(run_name=m, steps=2, runs_dir=str(base / "runs"), method=m, data_root=str(base / "data"),
                               cache_dir=str(base / "cache"), checkpoint_every=0), settings=site_settings(ROOT, env={}))
        train(cfg, progress=False)
        out[m] = Path(cfg.run_dir)
    (base / "runs" / "broken").mkdir()
    out["broken"], out["base"] = base / "runs" / "broken", base
    return out


def test_notebook_end_to_end_with_bad_inputs(runs, tmp_path):
    "papermill runs nbs/evaluate.ipynb on two toy runs plus a run without checkpoint, an unknown suite dimension and a tiny random judge."
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "papermill", "--cwd", str(ROOT / "nbs"), str(ROOT / "nbs" / "evaluate.ipynb"), str(tmp_path / "ev.ipynb"),
           "-p", "run_dirs", f"{runs['sft']},{runs['sara']},{runs['broken']}", "-p", "out_dir", str(out),
           "-p", "dimensions", "interaction,smell", "-p", "n_prompts", "2", "-p", "steps", "2", "-p", "judge_model", "tiny",
           "-p", "rubric", "entity_presence,interactions,motion_quality", "-p", "vbench_dimensions", "color",
           "-p", "n_boot", "200", "--log-level", "ERROR"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    probs = "\n".join(rep["problems"])
    assert "has no checkpoint export" in probs and "broken" in probs             # run without checkpoint
    assert "no dimension 'smell'" in probs                                       # unknown suite dimension
    assert "were not a score" in probs                                           # judge answers that are not scores
    assert "VBench color" in probs and "not run" in probs                       # VBench reported, not zeroed
    rows = {row[0]: dict(zip(rep["columns"], row)) for row in rep["rows"]}
    assert set(rows) == {"sft", "sara", "broken"}
    assert all(v == "n/a" for k, v in rows["broken"].items() if k != "method")
    for m in ("sft", "sara"):
        assert 0 < float(rows[m]["pixel_stability"]) <= 1
        assert "unparsed" in rows[m]["judge:entity_presence"] or rows[m]["judge:entity_presence"][0].isdigit()
        assert rows[m]["vbench:color"].startswith("not run")
        idx = json.loads((out / "samples" / m / "index.json").read_text())
        assert [e["prompt_id"] for e in idx] == ["interaction-000", "interaction-001"]
        assert all(load_video(out / "samples" / m / e["file"]).shape == (17, 3, 64, 64) for e in idx)
    recs = json.loads((out / "judge_records.json").read_text())
    assert len(recs) == 2 * 2 * 3 and all(r["score"] is None or 1 <= r["score"] <= 5 for r in recs)
    assert all(r["status"] != "unparsed" or r["score"] is None for r in recs)   # unparsed is never scored 0
    page = (out / "study" / "index.html").read_text()
    assert "sft" not in page and "sara" not in page and len(json.loads((out / "study" / "key.json").read_text())["trials"]) == 2
    html = (out / "report.html").read_text()
    assert "Methods x metrics" in html and "plotly" in html.lower() and "Frames:" in html
    nb = json.loads((tmp_path / "ev.ipynb").read_text())
    assert any("application/vnd.plotly" in json.dumps(c.get("outputs", [])) for c in nb["cells"])


def test_fixed_noise_per_prompt(runs, tmp_path):
    "Same prompt and seed: identical noise for every run, identical videos for the same run; other seeds differ."
    from sara.text import build_text_encoder
    prompts, _ = load_suite("text_following", ["attribute_binding"], n_prompts=1)
    cfg, models = load_run(runs["sara"])
    pipe, te = build_pipeline(models, cfg), build_text_encoder(cfg.text_model)
    kw = dict(steps=2, n_frames=5, height=32, width=32, guidance_scale=2.0)
    a = sample_videos(pipe, te, prompts, tmp_path / "a", seeds=[0, 1], **kw)
    b = sample_videos(pipe, te, prompts, tmp_path / "b", seeds=[0], **kw)
    assert a[0]["noise_seed"] == b[0]["noise_seed"] == noise_seed(prompts[0]["id"], 0) != a[1]["noise_seed"]
    va, vb, v1 = (load_video(d / e["file"]) for d, e in ((tmp_path / "a", a[0]), (tmp_path / "b", b[0]), (tmp_path / "a", a[1])))
    assert torch.equal(va, vb) and not torch.equal(va, v1)


def test_missing_checkpoint_message(runs):
    with pytest.raises(FileNotFoundError, match="has no checkpoint export"): load_run(runs["broken"])


def test_validation_sampling_during_training(runs):
    "sara.train.run_validation calls sample_clips: validation videos appear in the run folder."
    cfg = make_config(dict(run_name="val", steps=1, runs_dir=str(runs["base"] / "runs"), method="sft", data_root=str(runs["base"] / "data"),
                           cache_dir=str(runs["base"] / "cache"), checkpoint_every=0, validate_every=1, validation_clips=1,
                           validation_steps=1), settings=site_settings(ROOT, env={}))
    train(cfg, progress=False)
    idx = json.loads((Path(cfg.run_dir) / "validation" / "step_000001" / "index.json").read_text())
    assert len(idx) == 1 and (Path(cfg.run_dir) / "validation" / "step_000001" / idx[0]["file"]).stat().st_size > 0


def test_judge_harness_scores_and_unparsed(tmp_path):
    "A judge that answers a score for some questions and prose for others: prose is unparsed, not 0."
    from sara.data import write_video
    write_video(tmp_path / "v.mp4", torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    entries = [dict(file="v.mp4", prompt="a cat", entities=["cat"], method=m, prompt_id="p", seed=0) for m in ("x", "y")]
    rub = make_rubric(["entity_presence", "motion_quality"])
    judge = lambda frames, text: "Score: 4" if "appear" in text else "The video is pleasant."
    recs = judge_videos(entries, tmp_path, judge, rub)
    agg = {(r["method"], r["dimension"]): r for r in aggregate_scores(recs, n_boot=100)}
    assert agg[("x", "entity_presence")]["mean"] == 4 and agg[("x", "entity_presence")]["n"] == 1
    assert agg[("x", "motion_quality")]["n"] == 0 and agg[("x", "motion_quality")]["unparsed"] == 1
    with pytest.raises(ValueError, match="unknown rubric dimension"): make_rubric(["vibes"])
    assert parse_score("7") is None and parse_score("Score: 3") == 3


def test_study_kit_and_sign_test(tmp_path):
    from sara.data import write_video
    entries, folders = {}, {}
    for m, c in (("alpha", 0), ("beta", 200)):
        folders[m] = tmp_path / m
        entries[m] = []
        for k in range(6):
            write_video(folders[m] / f"p{k}.mp4", torch.full((3, 3, 16, 16), c + k, dtype=torch.uint8))
            entries[m].append(dict(file=f"p{k}.mp4", prompt_id=f"p{k}", seed=0, prompt=f"prompt {k}"))
    page = make_study(study_pairs(entries, folders), tmp_path / "study", seed=1)
    text = page.read_text()
    assert "alpha" not in text and "beta" not in text and "Download choices" in text
    key = json.loads((tmp_path / "study" / "key.json").read_text())
    sides = [t["left"] for t in key["trials"].values()]
    assert len(sides) == 6 and 0 < sides.count("alpha") < 6                     # left/right is randomised
    choices = [dict(trial=t, choice="left" if v["left"] == "beta" else "right") for t, v in key["trials"].items()]
    choices[0]["choice"] = "tie"
    (tmp_path / "c.json").write_text(json.dumps(dict(study=key["study"], rater="r1", choices=choices)))
    (row,) = tally_study([tmp_path / "c.json"], tmp_path / "study" / "key.json")
    assert (row["method_a"], row["wins_a"], row["wins_b"], row["ties"]) == ("alpha", 0, 5, 1)
    assert row["p_value"] == pytest.approx(2 / 32)
    assert sign_test(5, 5) == pytest.approx(2 / 32)


def test_vbench_bridge_reports_what_did_not_run():
    res = run_vbench(".", ["color", "subject_consistency"], "/tmp", weights_dir="")
    assert res["ran"] == {} and set(res["not_run"]) == {"color", "subject_consistency"}
    res = run_vbench(".", ["color", "scene"], "/tmp", backend=lambda d, v, o: 0.5 if d == "color" else 1 / 0)
    assert res["ran"] == {"color": 0.5} and "ZeroDivisionError" in res["not_run"]["scene"]
    prompts, problems = load_suite("vbench", ["color", "nope"])
    assert any("no dimension 'nope'" in p for p in problems)
    assert prompts or any("vbench" in p for p in problems)
