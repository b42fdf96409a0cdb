"""Two folders of Stage 2 runs of one study (bench/stage2_repeat.sh): is each run the same, step by step and weight by weight?

    python bench/compare_runs.py <study A>/train/runs <study B>/train/runs

Prints a Markdown table: per run in both, the logged steps, the first step whose loss terms (fm, trd, loss, grad_norm)
differ, the largest difference, and whether the exported weights (checkpoint/*.safetensors) are equal tensor by tensor.
"""
import json, sys
from pathlib import Path

TERMS = ("fm", "trd", "loss", "grad_norm")


def rows(run: Path) -> list[dict]:  # the run's metrics lines
    f = run / "metrics.jsonl"
    if not f.is_file(): raise SystemExit(f"{f}: no metrics (not a finished Stage 2 run)")
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]


def same_weights(a: Path, b: Path) -> bool:  # every exported tensor of run a equal to run b's (False without an export)
    "Tensor by tensor: the files' bytes differ between identical runs (their JSON header's metadata order varies)."
    import torch
    from safetensors.torch import load_file
    fa, fb = sorted(p.name for p in (a / "checkpoint").glob("*.safetensors")), sorted(p.name for p in (b / "checkpoint").glob("*.safetensors"))
    if not fa or fa != fb: return False
    for f in fa:
        ta, tb = load_file(str(a / "checkpoint" / f)), load_file(str(b / "checkpoint" / f))
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta): return False
    return True


def compare(a: Path, b: Path) -> list[dict]:
    names = sorted({p.name for p in a.iterdir() if p.is_dir()} & {p.name for p in b.iterdir() if p.is_dir()})
    if not names: raise SystemExit(f"no run is in both {a} and {b}")
    out = []
    for n in names:
        ra, rb = rows(a / n), rows(b / n)
        diffs = [(x["step"], max(abs(x[t] - y[t]) for t in TERMS if t in x)) for x, y in zip(ra, rb)]
        first = next((s for s, d in diffs if d != 0), None)
        out.append(dict(run=n, steps=len(diffs), first_diff_step=first, max_diff=max((d for _, d in diffs), default=0.0),
                        same_weights=same_weights(a / n, b / n)))
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2: raise SystemExit("usage: compare_runs.py <runs folder A> <runs folder B>")
    res = compare(Path(argv[0]), Path(argv[1]))
    print("| run | logged steps | first differing step | largest difference (fm, trd, loss, grad_norm) | same exported weights |")
    print("| --- | --- | --- | --- | --- |")
    for r in res: print(f"| {r['run']} | {r['steps']} | {r['first_diff_step']} | {r['max_diff']:.3g} | {r['same_weights']} |")
    return res


if __name__ == "__main__": main()
