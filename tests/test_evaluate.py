"Integration tests of evaluation: two toy runs end to end through the papermill notebook, fixed noise, judge, study, VBench's standard naming, VideoPhy-2."
import json, os, subprocess, sys, types
from pathlib import Path

import pytest
import torch

from sara.config import make_config, site_settings
from sara.data import load_video
from sara.toy import make_toy_world
from sara.evaluate import (aggregate_scores, build_pipeline, evaluate_runs, judge_videos, load_run, load_suite, make_rubric,
                           make_study, noise_seed, parse_score, run_vbench, sample_videos, sign_test, study_pairs, tally_study,
                           vbench_info_path, vbench_suite, TEXT_FOLLOWING, VBENCH_DIMENSIONS)
from sara.sampling import sample_name
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


def _papermill(tmp_path, *params):
    "Run nbs/evaluate.ipynb through papermill's command line (cwd nbs/, as the README says) with `-p` pairs."
    cmd = [sys.executable, "-m", "papermill", "--cwd", str(ROOT / "nbs"), str(ROOT / "nbs" / "evaluate.ipynb"), str(tmp_path / "ev.ipynb"),
           *[x for k, v in zip(params[::2], params[1::2]) for x in ("-p", k, str(v))], "--log-level", "ERROR"]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _is_toy_prompt(p):
    from sara.toy import parse_toy_name
    return all(parse_toy_name(e) for e in p["entities"]) and not any(w in p["prompt"] for w in ("dog", "sofa", "cat"))


def test_notebook_end_to_end_with_bad_inputs(runs, tmp_path):
    """papermill runs nbs/evaluate.ipynb on two toy runs plus a run without checkpoint, a suite dimension the default suite
    does not have and a tiny random judge; the prompts are toy prompts, the report names each run's method and routing
    and overlays the training curves."""
    out = tmp_path / "eval"
    vp = tmp_path / "videophy2_test.csv"   # VideoPhy-2's test-set columns (caption, is_hard); two prompts, one sampled
    vp.write_text('caption,is_hard\n"A ball rolls off a table and bounces on the floor.",1\nWater pours into a glass.,0\n')
    (runs["sara"] / "toy_scores.json").write_text(json.dumps({"fg_flow_epe": {"mean": 0.4, "lo": 0.3, "hi": 0.5}}))
    r = _papermill(tmp_path, "run_dirs", f"{runs['sft']},{runs['sara']},{runs['broken']}", "out_dir", out,
                   "dimensions", "smell", "n_prompts", 2, "steps", 2, "judge_model", "tiny",
                   "rubric", "entity_presence,interactions,motion_quality", "vbench_dimensions", "color",
                   "vbench_prompts", 1, "videophy2_file", vp, "videophy2_n", 1, "n_boot", 200)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    probs = "\n".join(rep["problems"])
    assert "has no checkpoint export" in probs and "broken" in probs             # run without checkpoint
    assert "suite 'data' has no dimensions" in probs and "ignored: smell" in probs  # a dimension the suite does not have
    assert "were not a score" in probs                                           # judge answers that are not scores
    assert "VBench color" in probs and "not run" in probs                       # VBench reported, not zeroed
    assert set(rep["benchmarks"]) == {"vbench", "videophy2", "rubric", "toy", "study"}
    assert all(v == "ran" or v.startswith("not run: ") for v in rep["benchmarks"].values()), rep["benchmarks"]
    assert rep["benchmarks"]["vbench"].startswith("not run") and rep["benchmarks"]["videophy2"].startswith("not run: ")
    assert rep["benchmarks"]["toy"] == rep["benchmarks"]["rubric"] == rep["benchmarks"]["study"] == "ran"
    assert rep["sampling"]["sft"]["model_family"] == "tiny" and rep["sampling"]["sft"]["steps"] == 2
    assert rep["judge"]["decoding"] == "greedy" and rep["baseline"] == "sft"
    assert [r["method"] for r in rep["paired"]] == ["sara"] * 3 and all(r["baseline"] == "sft" for r in rep["paired"])
    rows = {row[0]: dict(zip(rep["columns"], row)) for row in rep["rows"]}
    assert rows["sara"]["toy:fg_flow_epe"] == "0.4000 [0.3000, 0.5000]" and rows["sft"]["toy:fg_flow_epe"] == "n/a"
    assert rows["sara"]["vbench:total"].startswith("not run: needs")            # never a total with missing dimensions
    assert rows["sara"]["videophy2:joint"].startswith("not run: no VideoPhy-2-AutoEval checkpoint")
    (vb_prompt,) = vbench_suite(["color"], 1)[0]                                   # VBench's standard names, same noise per run
    for m in ("sft", "sara"):
        idx = json.loads((out / "vbench" / "videos" / m / "index.json").read_text())
        assert [e["file"] for e in idx] == [f"{vb_prompt['prompt']}-{i}.mp4" for i in range(5)]
        assert [e["noise_seed"] for e in idx] == [noise_seed(vb_prompt["prompt"], i) for i in range(5)]
        assert len(json.loads((out / "videophy2" / "videos" / m / "index.json").read_text())) == 1
    assert set(rows) == {"sft", "sara", "broken"}
    assert all(v == "not sampled (see problems)" or v.startswith("not run: ") for k, v in rows["broken"].items() if k != "method")
    info = {i["run"]: i for i in rep["run_info"]}                                # method, routing, saliency from each config.json
    assert [(info[m]["method"], info[m]["routing"], info[m]["saliency"]) for m in ("sft", "sara", "broken")] == [
        ("sft", "none", "not used"), ("sara", "or", "masks"), ("unknown", "unknown", "unknown")]
    assert rep["runs"]["rows"][1][:4] == ["sara", "sara", "or", "masks"] and info["sara"]["steps"] == 2
    assert rep["title"] == "Comparison of sft (sft), sara (sara, or routing on masks saliency), broken (unknown)"
    assert rep["suite"] == "data" and all(_is_toy_prompt(p) for p in rep["prompts"]), rep["prompts"]
    assert rep["prompts"] == load_suite("data", n_prompts=2, run_dir=runs["sft"])[0]
    for m in ("sft", "sara"):
        assert 0 < float(rows[m]["pixel_stability"]) <= 1
        assert "unparsed" in rows[m]["judge:entity_presence"] or rows[m]["judge:entity_presence"][0].isdigit()
        assert rows[m]["vbench:color"].startswith("not run")
        idx = json.loads((out / "samples" / m / "index.json").read_text())
        assert [e["prompt_id"] for e in idx] == ["toy-000", "toy-001"]
        assert all(load_video(out / "samples" / m / e["file"]).shape == (17, 3, 64, 64) for e in idx)
    recs = json.loads((out / "judge_records.json").read_text())
    assert len(recs) == 2 * 2 * 3 and all(r["score"] is None or 1 <= r["score"] <= 5 for r in recs)
    assert all(r["status"] != "unparsed" or r["score"] is None for r in recs)   # unparsed is never scored 0
    page = (out / "study" / "index.html").read_text()
    assert "sft" not in page and "sara" not in page and len(json.loads((out / "study" / "key.json").read_text())["trials"]) == 2
    html = (out / "report.html").read_text()
    assert "<h2>Runs</h2>" in html and "Training curves" in html
    assert "Methods x metrics" in html and "plotly" in html.lower() and "Frames (rubric)" in html and "Frames (vbench)" in html and "Frames (videophy2)" in html
    nb = json.loads((tmp_path / "ev.ipynb").read_text())
    figs = [o["data"] for c in nb["cells"] for o in c.get("outputs", []) if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figs and all("sara-fig-" in "".join(f.get("text/html", "")) for f in figs)   # each figure also as HTML (nbconvert)
    (curves,) = [f["application/vnd.plotly.v1+json"] for f in figs
                 if f["application/vnd.plotly.v1+json"]["layout"]["title"]["text"] == "Training curves"]
    traces = [(t["name"], t["xaxis"]) for t in curves["data"]]                  # one trace per run and metric (fm | TRD)
    assert sorted(traces) == sorted((n, ax) for n in ("sft (sft)", "sara (sara, or routing on masks saliency)") for ax in ("x", "x2"))
    assert all(len(t["x"]) == 2 for t in curves["data"])                         # both steps of each run


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
    assert row["p_pooled"] == pytest.approx(2 / 32) and row["raters"][0]["p_value"] == pytest.approx(2 / 32)
    assert row["p_value"] == 1.0                                                   # one rater: no evidence across raters
    assert sign_test(5, 5) == pytest.approx(2 / 32)
    # raters kept apart: one prolific rater for beta and five raters for alpha by one choice each
    files = [tmp_path / "c.json"]
    for k in range(5):
        t, v = list(key["trials"].items())[k]
        files.append(tmp_path / f"r{k}.json")
        files[-1].write_text(json.dumps(dict(study=key["study"], rater=f"s{k}", choices=[dict(trial=t, choice="left" if v["left"] == "alpha" else "right")])))
    (row,) = tally_study(files, tmp_path / "study" / "key.json")
    assert (row["wins_a"], row["wins_b"], row["raters_a"], row["raters_b"]) == (5, 5, 5, 1)
    assert row["p_pooled"] == 1.0 and row["p_value"] == pytest.approx(sign_test(5, 6))


def test_vbench_bridge_reports_what_did_not_run():
    res = run_vbench(".", ["color", "subject_consistency"], "/tmp", weights_dir="")
    assert res["ran"] == {} and set(res["not_run"]) == {"color", "subject_consistency"}
    res = run_vbench(".", ["color", "scene"], "/tmp", backend=lambda d, v, o: 0.5 if d == "color" else 1 / 0)
    assert res["ran"] == {"color": 0.5} and "ZeroDivisionError" in res["not_run"]["scene"]
    prompts, problems = load_suite("vbench", ["color", "nope"])
    assert any("no dimension 'nope'" in p for p in problems)
    assert prompts or any("vbench" in p for p in problems)


def _import_vbench():
    "The installed vbench package (0.1.5); its utils import decord at module level, which only decodes videos."
    pytest.importorskip("vbench", reason="pip install --no-deps vbench==0.1.5 decord==0.6.0")
    import vbench, vbench.utils
    return vbench, vbench.utils


def _touch_samples(folder, prompts, naming):
    folder.mkdir(parents=True, exist_ok=True)
    for p in prompts:
        for s in p.get("seeds", [0]): (folder / sample_name(p, s, naming)).write_bytes(b"")


def test_vbench_standard_naming_against_the_package(tmp_path):
    "Our names and prompt mapping, read by VBench's own standard-mode loader: each dimension finds exactly its prompts' 5 videos."
    vbench, vu = _import_vbench()
    dims = ["color", "object_class", "human_action", "temporal_flickering", "overall_consistency", "subject_consistency"]
    prompts, problems = vbench_suite(dims, n_prompts=3)
    assert problems == [] and vbench_info_path().is_file()
    _touch_samples(tmp_path / "videos", prompts, "vbench")
    full = vu.load_json(str(vbench_info_path()))
    vb = vbench.VBench("cpu", str(vbench_info_path()), str(tmp_path / "out"))
    for d in dims:
        info = vb.build_full_info_json(str(tmp_path / "videos"), d, [d], mode="vbench_standard")
        videos, per_prompt = vu.load_dimension_info(info, dimension=d, lang="en")
        ours = [p["prompt"] for p in prompts if d in p["dimensions"]]
        found = {e["prompt"]: e["video_list"] for e in per_prompt if e["video_list"]}
        assert sorted(found) == sorted(ours) and len(ours) == 3
        assert all(len(v) == 5 for v in found.values())                      # VBench reads indices 0..4 per prompt
        assert all(vu.get_prompt_from_filename(v) == p for p, vs in found.items() for v in vs)
        assert ours == [e["prompt_en"] for e in full if d in e["dimension"]][:3]  # VBench's own order
    tf = next(p for p in prompts if "temporal_flickering" in p["dimensions"])
    assert len(tf["seeds"]) == 25                                              # before VBench's static filter
    assert {len(p["seeds"]) for p in prompts if "temporal_flickering" not in p["dimensions"]} == {5}


def test_vbench_rejects_the_old_naming(tmp_path):
    "The former `<dim>-<i>_s<seed>.mp4` names: standard mode finds none of them and custom_input refuses color / object_class."
    vbench, vu = _import_vbench()
    old = [dict(p, id=f"color-{i:03d}") for i, p in enumerate(vbench_suite(["color"], 2)[0])]
    _touch_samples(tmp_path / "old", old, "id")
    vb = vbench.VBench("cpu", str(vbench_info_path()), str(tmp_path / "out"))
    info = vb.build_full_info_json(str(tmp_path / "old"), "color", ["color"], mode="vbench_standard")
    assert vu.load_dimension_info(info, dimension="color", lang="en")[0] == []
    with pytest.raises(AssertionError, match="not supported for custom input"):
        vb.build_full_info_json(str(tmp_path / "old"), "color", ["color", "object_class"], mode="custom_input")
    assert vu.get_prompt_from_filename("color-000_s0.mp4") == "color-000_s0"   # the prompt VBench would have scored


def test_paired_statistics_use_the_pairing():
    "A small shift hidden under large prompt-to-prompt spread: the paired interval excludes 0, unpaired intervals overlap."
    import numpy as np
    from sara.evaluate import bootstrap_ci, paired_bootstrap
    rng = np.random.default_rng(1)
    base = rng.normal(3, 1.0, 30)                                          # prompt difficulty, shared by both methods
    a = {k: base[k] + 0.3 + rng.normal(0, 0.05) for k in range(30)}
    b = {k: base[k] for k in range(30)}
    pr = paired_bootstrap(a, b, n_boot=2000)
    assert pr["n"] == 30 and 0 < pr["lo"] < 0.3 < pr["hi"] < 0.6 and pr["p"] < 0.001
    _, alo, ahi = bootstrap_ci(list(a.values()), 2000); _, blo, bhi = bootstrap_ci(list(b.values()), 2000)
    assert alo < bhi                                                       # unpaired: the intervals overlap
    assert paired_bootstrap({**a, "only_a": 9.0}, b)["n"] == 30                # unmatched keys are dropped


def test_toy_runs_get_toy_prompts(runs, tmp_path):
    "The default suite of a toy run: prompts of its toy world (new clips of the demo world; held-out study-world prompts), never the dog/sofa suite."
    from sara.config import save_config
    from sara.data import read_manifest
    from sara.toy import make_toy_dataset, toy_prompts
    prompts, problems = load_suite("data", n_prompts=3, run_dir=runs["sft"])
    train_caps = {r.caption for r in read_manifest(runs["base"] / "data" / "manifest.jsonl")}
    dog_sofa = {p for d in TEXT_FOLLOWING.values() for p, _ in d}
    assert problems == [] and len(prompts) == 3 and all(_is_toy_prompt(p) for p in prompts)
    assert not {p["prompt"] for p in prompts} & (train_caps | dog_sofa)
    make_toy_dataset(tmp_path / "study", 2, n_frames=17, size=64, with_flow=False)   # a run on the study world: config.json is enough
    cfg = make_config(dict(run_name="st", data_root=str(tmp_path / "study"), runs_dir=str(tmp_path)), settings=site_settings(ROOT, env={}))
    save_config(cfg, tmp_path / "st" / "config.json")
    prompts, problems = load_suite("data", n_prompts=2, run_dir=tmp_path / "st")
    assert [p["prompt"] for p in prompts] == [p["caption"] for p in toy_prompts(2, 0, 17, 64, split="held_out")]
    assert all(p["held_out"] and _is_toy_prompt(p) for p in prompts)


def test_missing_run_folder_is_an_error(runs, tmp_path):
    "A run folder that does not exist (a typo) stops the evaluation naming it, in the API and the papermill notebook; no report is written."
    typo = runs["base"] / "runs" / "sarra"
    with pytest.raises(FileNotFoundError, match="sarra"): evaluate_runs([str(runs["sft"]), str(typo)], tmp_path / "api")
    assert not (tmp_path / "api").exists()
    r = _papermill(tmp_path, "run_dirs", f"{runs['sft']},{typo}", "out_dir", tmp_path / "nb", "steps", 1)
    assert r.returncode != 0 and "do not exist" in r.stderr and str(typo) in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "nb" / "report.json").exists()
