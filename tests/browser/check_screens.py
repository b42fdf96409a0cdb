"Check the browser test's screenshots: each heatmap region is rendered (not blank) and changed where it must."
import json, sys
from pathlib import Path

import numpy as np
from PIL import Image

# (before, after, what): pairs of screenshots of the same plotly subplot region that must differ
CHANGES = [("10_saliency_before", "11_saliency_after_slider", "saliency heatmap after the frame slider"),
           ("20_routing_frame_before", "22_routing_frame_after_slider", "frame + w overlay after the frame slider"),
           ("23_routing_Sp_after_slider", "24_routing_Sp_after_click", "S_p row after the token click"),
           ("25_routing_W_after_click", "27_routing_W_after_op_and", "W row after switching the operator to 'and'")]


def load(art: Path, name: str) -> np.ndarray:
    f = art / f"{name}.png"
    if not f.is_file(): sys.exit(f"FAIL: screenshot {f} is missing")
    return np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)


def main(art: Path):
    res = json.loads((art / "result.json").read_text())
    if not res.get("ok"): sys.exit(f"FAIL: browser run failed: {res.get('error')}")
    problems = []
    for a, b, what in CHANGES:
        x, y = load(art, a), load(art, b)
        for name, im in ((a, x), (b, y)):
            if im.std() < 5: problems.append(f"{name}.png looks blank (pixel std {im.std():.1f}): no heatmap rendered")
        if x.shape != y.shape: problems.append(f"{a}/{b}: region sizes differ {x.shape} vs {y.shape}"); continue
        diff = np.abs(x - y).mean(-1)
        frac = float((diff > 10).mean())
        print(f"{what}: {frac:.1%} of the pixels changed ({a}.png -> {b}.png)")
        if frac < 0.02: problems.append(f"{what}: only {frac:.2%} of the pixels changed between {a}.png and {b}.png")
    r = res["routing"]
    if not (res["saliency"]["heatmap_changed"] and r["Sp_changed_by_click"] and r["W_changed_by_op"]):
        problems.append(f"DOM checks failed: {res['saliency']} {r}")
    if res.get("page_errors"): print("page errors (not fatal):", res["page_errors"])
    if problems: sys.exit("FAIL: " + "; ".join(problems))
    print(f"PASS: screenshots in {art}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
