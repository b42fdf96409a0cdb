"""Held-out clips of the study's world and their reconstructions through a study VAE, as one PNG (rows: real, VAE;
columns: frames), with each clip's PSNR. Usage (CPU, about 2 minutes for 24 clips at base width 48):

    python bench/vae_recon_figure.py --vae .h13/front6/vae/vae --world runs/study5/world --out bench/study_2026-11-30d/vae_recon.png
"""
import argparse

import torch
from PIL import Image, ImageDraw

from sara.study import psnr, reconstruct


def grid(real: torch.Tensor, rec: torch.Tensor, frames: list[int], ps: list[float], gap: int = 4) -> Image.Image:  # uint8 (B, T, 3, H, W) each
    "Real and reconstructed frames, two rows per clip, with the clip's PSNR (`ps`) over the reconstruction row."
    B, _, _, H, W = real.shape
    img = Image.new("RGB", (len(frames) * (W + gap) + gap, B * (2 * H + 3 * gap + 12)), "white")
    d = ImageDraw.Draw(img)
    for b in range(B):
        y0 = b * (2 * H + 3 * gap + 12)
        d.text((gap, y0), f"held-out clip {b}: real (top), VAE (bottom), PSNR {ps[b]:.2f} dB", fill="black")
        for j, t in enumerate(frames):
            for r, src in enumerate((real, rec)):
                img.paste(Image.fromarray(src[b, t].permute(1, 2, 0).numpy()), (gap + j * (W + gap), y0 + 12 + r * (H + gap)))
    return img


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", required=True, help="a diffusers AutoencoderKLWan folder (a study's vae/vae)")
    ap.add_argument("--world", required=True, help="a study's world/ folder (heldout.safetensors)")
    ap.add_argument("--clips", default="0,1", help="held-out clips to show (comma-separated indices)")
    ap.add_argument("--frames", default="0,4,8,12,16", help="frames to show")
    ap.add_argument("--out", required=True, help="the PNG to write")
    a = ap.parse_args(argv)
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file
    from pathlib import Path
    held = load_file(str(Path(a.world) / "heldout.safetensors"))["frames"]                 # N, T, 3, H, W uint8
    idx = [int(i) for i in a.clips.split(",")]
    frames = [int(t) for t in a.frames.split(",")]
    bad = [i for i in idx if not 0 <= i < len(held)] + [t for t in frames if not 0 <= t < held.shape[1]]
    if bad: raise SystemExit(f"--clips/--frames out of range for {a.world} ({len(held)} clips of {held.shape[1]} frames): {bad}")
    vae = AutoencoderKLWan.from_pretrained(a.vae, torch_dtype=torch.float32).eval()
    real = held[idx]
    rec = reconstruct(vae, real, torch.device("cpu"))
    ps = [psnr(r, x) for r, x in zip(rec, real)]
    tmp = Path(a.out).with_suffix(".tmp.png")
    grid(real, rec, frames, ps).save(tmp); tmp.replace(a.out)
    print(f"{a.out}: clips {idx}, PSNR {[round(p, 2) for p in ps]}")


if __name__ == "__main__":
    main()
