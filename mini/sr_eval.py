"""Does the mini SR keep the picture? The SR bars of the mini backbone, on 64x64 crops and whole 256x256 photos.

Every model runs as `infer.py --model mini` runs it with default flags (tiles of the trained size, blended),
one 40-step sample per LR, on two LR kinds:

    plain   Gaussian blur sigma 0.8 HR px + bicubic 4x down, 8 bit (data.plain_degrade(hr, 0.8))
    mini    data.MINI_DEGRADATION, one fixed generator per image

and reports, per set / LR kind / method (bicubic, the HR through the VAE, the HR, and each model given as
NAME=MODEL[:SFT]):

    SSIM, PSNR   on Y (evaluation.evaluate's pyiqa metrics)
    LR-cons      evaluate.lr_consistency: PSNR of the SR downscaled back vs its LR (does it explain its input?)
    HF           evaluate.detail_energy: mean |neighbour difference| of Y, 0-255 (real detail sits between
                 bicubic's and the HR's; above 1.5 x the HR's is over-sharpening)
    speckle      evaluate.flat_detail_pooled: HF only between pixels where the HR is flat (5x5 std of Y < 2
                 levels), every such pair of the set counted once (its flat regions decide); the HR's own value
                 is the reference
    speckle/img  evaluate.flat_detail averaged over the images (each image weighs the same, however few
                 flat pixels it has: the measure of the tables before the pooled one)
    s/img        seconds per image (whole photos: per 256x256 output)

Splits: 'heldout' (photos.HELDOUT, the default: report these) and 'val' (crops of the TRAINING photos from
a stream of their own: choose recipes on these, never on held-out photos).

    python -m mini.sr_eval --method sft=mini:mini --out out/sr_eval
    python -m mini.sr_eval --split val --method new=out/m/backbone:out/m/sft/transformer.safetensors
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import infer
from common import backbone as B
from common import data
from common import training as T
from evaluation import evaluate
from mini import photos

VAL_PHOTOS = ("astronaut", "chelsea", "rocket", "I06")
"""Whole TRAINING photos for the 'val' split at 256x256 (a face, fur, sky, a street)."""
PHOTO_SIZE = 256


@dataclass
class Args:
    method: tuple[str, ...] = ()
    """NAME=MODEL[:SFT]: a model as infer.py's --model and --sft take them (e.g. sft=mini:mini), repeatable"""
    vae: str | None = None
    """replace every model's VAE by this folder (save_pretrained), e.g. a decoder fine-tune"""
    split: str = "heldout"
    """'heldout' (photos.HELDOUT: report) or 'val' (training photos: choose recipes)"""
    crops: int = 32
    """64x64 crops per LR kind"""
    crop_seed: int = 100
    """seed of the crops (and of the mini LRs' degradations)"""
    photos: bool = True
    """also the whole photos at 256x256 (LR 64x64)"""
    kinds: str = "plain,mini"
    """LR kinds, comma-separated: plain, mini"""
    steps: int = 40
    """Euler steps (paper §5.1: 40)"""
    seed: int = 0
    """sampling noise seed (as infer.py --seed)"""
    back_projection: int | None = None
    """as infer.py --back-projection (iterations of back-projection onto the LR after sampling; 0 = off);
    default: infer.py's for --model mini"""
    flat_gate: float | None = None
    """as infer.py --flat-gate (LR-guided flat-region gate after back-projection; 0 = off); default: infer.py's
    for --model mini"""
    threads: int = 2
    """torch threads"""
    out: str = "out/sr_eval"
    """folder for results.json, table.md and one PNG per set and LR kind"""


def make_sets(split: str, crops: int, crop_seed: int, with_photos: bool) -> dict[str, torch.Tensor]:
    """{"crops": (crops,3,64,64), "photos": (4,3,256,256)} HR images of the split."""
    names = photos.TRAIN if split == "val" else photos.HELDOUT
    g = torch.Generator().manual_seed(crop_seed + (10000 if split == "val" else 0))  # never the build's crops
    sets = {"crops": photos.random_crops(names, crops, 64, g)}
    if with_photos:
        which = VAL_PHOTOS if split == "val" else photos.HELDOUT
        sets["photos"] = torch.stack([F.interpolate(photos.load_photo(n)[None], size=(PHOTO_SIZE, PHOTO_SIZE),
                                                    mode="area")[0] for n in which])
    return sets


def make_lr(hr: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """The LR of each HR crop: 'plain' (Gaussian blur 0.8 + bicubic 4x down) or a data.DEGRADATIONS name ('mini':
    data.MINI_DEGRADATION, 'realesrgan': the paper's ranges), one generator per image from `seed`."""
    if kind == "plain":
        return data.plain_degrade(hr, 0.8)
    return data.degrade_each(hr, data.DEGRADATIONS[kind], seed)


def load_method(spec: str, vae: str | None) -> tuple[str, B.Backbone]:
    name, _, rest = spec.partition("=")
    model, _, sft = rest.partition(":")
    bb = infer.load_policy(model, sft or None)
    if vae:
        from diffusers import AutoencoderKLQwenImage

        bb.vae = B.single_frame_convs(AutoencoderKLQwenImage.from_pretrained(vae)).eval().requires_grad_(False)
    return name, bb


def run_model(bb: B.Backbone, lr: torch.Tensor, steps: int, seed: int, back_projection: int | None = None,
              flat_gate: float | None = None) -> tuple[torch.Tensor, float]:
    """Each LR as infer.py runs it with default flags for --model mini; (SR, seconds per image)."""
    flags = [] if back_projection is None else ["--back-projection", str(back_projection)]
    flags += [] if flat_gate is None else ["--flat-gate", str(flat_gate)]
    args = infer.parse_args(["--input", "-", "--model", "mini", "--steps", str(steps), "--seed", str(seed), *flags])
    t0 = time.time()
    out = torch.stack([infer.super_resolve_image(bb, x, args, torch.Generator().manual_seed(seed)) for x in lr])
    return out, (time.time() - t0) / len(lr)


def main(argv: list[str] | None = None) -> dict:
    args, parser = T.parse_dataclass_args(Args, argv, __doc__.split("\n")[0])
    if args.split not in ("heldout", "val"):
        parser.error(f"--split {args.split}: choose heldout or val")
    kinds = args.kinds.split(",")
    if not set(kinds) <= {"plain", "mini"}:
        parser.error(f"--kinds {args.kinds}: choose from plain, mini")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [load_method(s, args.vae) for s in args.method]
    vae = models[0][1].vae if models else infer.load_policy("mini").vae
    ssim, psnr = evaluate.create_metric("SSIM"), evaluate.create_metric("PSNR")
    results, pictures = {}, {}
    for set_name, hr in make_sets(args.split, args.crops, args.crop_seed, args.photos).items():
        with torch.no_grad():  # the VAE is fully convolutional: a whole 256x256 photo at once
            recon = B.vae_decode(vae, B.vae_encode(vae, hr))
        for kind in kinds:
            lr = make_lr(hr, kind, args.crop_seed + 7)
            srs = {"bicubic": (B.upscale(lr).clamp(0, 1), 0.0), "VAE": (recon, 0.0), "HR": (hr, 0.0)}
            for name, bb in models:
                srs[name] = run_model(bb, lr, args.steps, args.seed, args.back_projection, args.flat_gate)
            key = f"{set_name}/{kind}"
            results[key] = {name: {"SSIM": float(ssim(sr, hr).mean()), "PSNR": float(psnr(sr, hr).mean()),
                                   "LRcons": float(evaluate.lr_consistency(sr, lr).mean()),
                                   "HF": float(evaluate.detail_energy(sr).mean()),
                                   "speckle": float(evaluate.flat_detail_pooled(sr, hr)),
                                   "speckle_img": float(evaluate.flat_detail(sr, hr).mean()),
                                   "sec_per_image": round(secs, 2)}
                            for name, (sr, secs) in srs.items()}
            for name, row in results[key].items():
                print(f"{key:14s} {name:10s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
            columns = ["bicubic", *(n for n, _ in models), "HR"]
            n = min(8, len(hr))
            grid = torch.cat([torch.cat([srs[c][0][i] for c in columns], -1) for i in range(n)], -2)
            pictures[key] = F.interpolate(grid[None], scale_factor=2 if set_name == "crops" else 1, mode="nearest")[0]
    record = {"args": {k: getattr(args, k) for k in Args.__dataclass_fields__}, "results": results}
    T.atomic_write_text(json.dumps(record, indent=1), out / "results.json")
    lines = ["| set/LR | method | SSIM | PSNR | LR-cons | HF | speckle | speckle/img | s/img |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {key} | {name} | {r['SSIM']:.3f} | {r['PSNR']:.2f} | {r['LRcons']:.2f} | {r['HF']:.2f} | "
              f"{r['speckle']:.2f} | {r['speckle_img']:.2f} | {r['sec_per_image']} |"
              for key, rows in results.items() for name, r in rows.items()]
    T.atomic_write_text("\n".join(lines) + "\n", out / "table.md")
    for key, picture in pictures.items():  # rows = images; columns = bicubic | models | HR
        data.save_image(picture, out / f"{key.replace('/', '_')}.png")
    return results


if __name__ == "__main__":
    main()
