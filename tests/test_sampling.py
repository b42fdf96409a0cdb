"sara.sampling: Wan2.2's per-model defaults, the A14B guidance split through WanPipeline, and the one-way import graph."
import ast, copy, json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sara.sampling import SAMPLING_DEFAULTS, WAN22_NEG_PROMPT, build_pipeline, model_family, sample_videos, sampling_defaults

ROOT = Path(__file__).resolve().parents[1]


def _imports(module: str) -> set:
    "Every sara module `sara/<module>.py` imports, at top level or inside functions (lazy imports count too)."
    out = set()
    for node in ast.walk(ast.parse((ROOT / "sara" / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: out.add((node.module or "").split(".")[0] or "__init__")
            elif (node.module or "").startswith("sara."): out.add(node.module.split(".")[1])
            elif node.module == "sara": out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sara.")}
    return out


def _reach(start: str) -> set:
    "Modules reachable from `start` in sara's import graph."
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in _imports(m):
            if n not in seen and (ROOT / "sara" / f"{n}.py").exists(): seen.add(n); todo.append(n)
    return seen


def test_import_graph_one_way():
    "train -> checkpoints -> evaluate: training never reaches evaluation, sampling reaches neither, evaluate is in no cycle."
    assert "evaluate" not in _reach("train"), "sara.train imports sara.evaluate (directly or through another module)"
    assert not {"train", "evaluate"} & _reach("sampling"), "sara.sampling must sit below train and evaluate"
    assert "sampling" in _imports("train") and "sampling" in _imports("evaluate")
    assert "evaluate" not in _reach("evaluate"), "an import cycle through sara.evaluate"


def test_wan22_defaults(tmp_path):
    "TI2V-5B: 50 steps, guidance 5, 24 fps, 121 frames at 704x1280, shift 5; A14B: 40 steps, 4.0/3.0, 16 fps, 81 frames, shift 12."
    five, a14 = tmp_path / "ti2v", tmp_path / "a14b"
    five.mkdir(); (five / "model_index.json").write_text(json.dumps({"expand_timesteps": True}))
    a14.mkdir(); (a14 / "model_index.json").write_text(json.dumps({"boundary_ratio": 0.875}))
    s5, s14 = sampling_defaults(str(five)), sampling_defaults(str(a14))
    assert (model_family(str(five)), model_family(str(a14)), model_family("tiny")) == ("ti2v-5b", "a14b", "tiny")
    assert {k: s5[k] for k in ("steps", "guidance_scale", "guidance_scale_2", "fps", "n_frames", "height", "width", "shift")} == \
        dict(steps=50, guidance_scale=5.0, guidance_scale_2=None, fps=24, n_frames=121, height=704, width=1280, shift=5.0)
    assert {k: s14[k] for k in ("steps", "guidance_scale", "guidance_scale_2", "fps", "n_frames", "height", "width", "shift")} == \
        dict(steps=40, guidance_scale=4.0, guidance_scale_2=3.0, fps=16, n_frames=81, height=720, width=1280, shift=12.0)
    assert s5["negative_prompt"] == s14["negative_prompt"] == WAN22_NEG_PROMPT and WAN22_NEG_PROMPT.startswith("色调艳丽")
    assert sampling_defaults(str(five), steps=8, fps=12)["steps"] == 8                         # overridable
    tiny = sampling_defaults("tiny", dict(n_frames=17, height=64, width=64))
    assert (tiny["steps"], tiny["n_frames"], tiny["negative_prompt"]) == (SAMPLING_DEFAULTS["tiny"]["steps"], 17, "")
    with pytest.raises(ValueError, match="unknown sampling setting"): sampling_defaults("tiny", tiny, guidance=3)
    with pytest.raises(ValueError, match="4k\\+1"): sampling_defaults("tiny", dict(n_frames=16, height=64, width=64))


def test_a14b_guidance_split_and_index(tmp_path):
    "Two tiny experts with a boundary: the high-noise expert runs above it, guidance_scale_2 is accepted, settings land in index.json."
    from sara.text import build_text_encoder
    from sara.wan import build_wan
    wan = build_wan("tiny", seed=0, shift=3.0)
    wan.transformer_2, wan.boundary_ratio = copy.deepcopy(wan.transformer), 0.5
    calls = {"high": 0, "low": 0}
    wan.transformer.register_forward_hook(lambda *a: calls.__setitem__("high", calls["high"] + 1))
    wan.transformer_2.register_forward_hook(lambda *a: calls.__setitem__("low", calls["low"] + 1))
    pipe = build_pipeline(SimpleNamespace(wan=wan), SimpleNamespace(wan_model="tiny"))
    te = build_text_encoder("minilm")
    es = sample_videos(pipe, te, [dict(id="p", prompt="a ball falls")], tmp_path, seeds=[0], steps=4, n_frames=5, height=32,
                       width=32, guidance_scale=4.0, guidance_scale_2=3.0, negative_prompt="static", fps=16)
    assert calls["high"] > 0 and calls["low"] > 0                                         # both experts sampled
    idx = json.loads((tmp_path / "index.json").read_text())
    assert idx == es and (idx[0]["guidance_scale"], idx[0]["guidance_scale_2"], idx[0]["negative_prompt"], idx[0]["fps"]) == (4.0, 3.0, "static", 16)
