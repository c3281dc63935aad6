"""Super-resolve images with the final OARS policy: SFT weights + merged RL LoRA (paper §4, last paragraph).

"During inference, we merge the learned LoRA parameters Delta_NR from the final stage into the backbone
weights obtained from the cold start (SFT) stage." The LoRA was trained on the BASE weights (rl_fr.py,
rl_nr.py) and is added to the SFT weights here: W = W_SFT + (alpha/r) * B A.

Tiny or mini preset (CPU, seconds):
    python infer.py --model tiny --input lr.png --out out/sr --steps 4
    python infer.py --model mini --sft mini --input lr.png --out out/sr          # a trained model
Full scale (one GPU, 40 steps as §5.1; --model defaults to Qwen/Qwen-Image-Edit-2509):
    python infer.py --sft out/sft --lora out/nr.safetensors --input data/RealSR/test_LR --out out/sr
    # optional: --hr data/RealSR/test_HR  (writes the metric table of the paper's Table 2, see evaluate.py)

Writes one PNG per input with the same stem, exactly `scale` times the input size. Inputs whose output
would exceed --process-size are processed in overlapping tiles blended with a smooth window.
A folder run reports unreadable files, keeps going, and exits non-zero at the end.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import backbone as B
from common import presets
from common import training as T
from common.data import ImageReadError, list_images, load_image, save_image
from evaluation import evaluate

# The smallest LR side we accept: below it the VL encoder and the VAE see almost nothing.
MIN_LR_SIDE = 8


@dataclass
class Args:
    input: str
    """an LR image file or a folder of them"""
    out: str = "out/sr"
    """output folder (one PNG per input, same stem); must not be the input folder or inside it"""
    model: str = B.REAL_MODEL
    """the BASE weights: Qwen/Qwen-Image-Edit-2509 (paper) or its local diffusers folder; 'mini' (the trained
    laptop preset, with --sft mini) or 'tiny'"""
    sft: str | None = None
    """transformer weights from train_sft.py (folder or .safetensors), or 'mini'; None keeps the base weights"""
    lora: tuple[str, ...] = ()
    """LoRA files to merge, each PATH or PATH:SCALE (rl_fr.py / rl_nr.py output); repeatable"""
    steps: int = 40
    """Euler steps (paper §5.1: 40 at inference)"""
    seed: int = 0
    """noise seed (the same for every image, so one image's result does not depend on the others)"""
    scale: int = 4
    """upscaling factor (the model is trained for 4x)"""
    process_size: int | None = None
    """largest output tile side in pixels processed at once; larger outputs are tiled. Default: 512 (paper) for the
    real model, the size the mini preset was trained on (64) for --model mini, which cannot run larger tiles"""
    tile_overlap: int | None = None
    """overlap between output tiles in pixels (default: a quarter of the tile: 64 real, 16 mini)"""
    color_fix: str = "none"
    """'adain' | 'wavelet' | 'none': match colours to the bicubic upscale (not in the paper: off by default)"""
    back_projection: int | None = None
    """iterations of back-projection after sampling (not in the paper; Irani & Peleg 1991): the output's low
    frequencies are corrected until its bicubic downscale matches the LR; the detail generated above the LR's
    resolution stays. 0 = the model's own output. Default: 0 for the real model, 4 for --model mini"""
    flat_gate: float | None = None
    """LR-guided flat-region gate after back-projection (not in the paper): where the LR's bicubic upscale is
    locally flat (5x5 std of its Y below TAU levels of 255), the output's detail over that upscale is scaled by
    std / TAU, so sky and skin get no grain the LR does not show. 0 = off. Default: 0 for the real model, 4 for
    --model mini"""
    dtype: str = "auto"
    """'fp32' | 'bf16' | 'auto' (bf16 on a GPU, fp32 on the CPU)"""
    device: str = "auto"
    """'auto' (CUDA when available), 'cuda', 'cpu'"""
    prompt: str = B.DEFAULT_PROMPT
    """the "enhance" instruction c"""
    hr_dir: str | None = None
    """optional HR folder: evaluate the outputs against it (paired by file name) and print the table"""
    metrics: list[str] = field(default_factory=lambda: list(evaluate.DEFAULT_METRICS))
    """with --hr-dir: evaluate.py columns or pyiqa names (default: Table 2's; `PSNR SSIM piqe` need no downloads)"""


def parse_args(argv: list[str] | None = None) -> Args:
    args, p = T.parse_dataclass_args(Args, argv, __doc__.split("\n")[0])
    if args.color_fix not in COLOR_FIXES:
        p.error(f"--color-fix {args.color_fix}: choose one of {', '.join(COLOR_FIXES)}")
    if args.dtype not in ("fp32", "bf16", "auto"):
        p.error(f"--dtype {args.dtype}: choose fp32, bf16 or auto")
    if args.back_projection is None:
        args.back_projection = presets.MINI_BACK_PROJECTION if args.model == "mini" else 0
    if args.back_projection < 0:
        p.error(f"--back-projection {args.back_projection}: must be >= 0 (0 = off)")
    if args.flat_gate is None:
        args.flat_gate = presets.MINI_FLAT_GATE if args.model == "mini" else 0.0
    if args.flat_gate < 0:
        p.error(f"--flat-gate {args.flat_gate}: must be >= 0 (0 = off)")
    if args.steps < 2:
        p.error(f"--steps {args.steps}: at least 2 (the paper uses 40 at inference)")
    trained = presets.MINI_TRAINED_SIZE if args.model == "mini" else None
    if args.process_size is None:
        args.process_size = trained or 512
    if trained and args.process_size > trained:  # never run the mini preset at a size it cannot handle
        p.error(f"--process-size {args.process_size}: the mini preset was trained on {trained} px outputs and turns "
                f"larger tiles into a uniform mosaic; leave the default ({trained}: larger images are tiled)")
    if args.tile_overlap is None:
        args.tile_overlap = args.process_size // 4
    if args.process_size % 16 or args.process_size < 64:
        p.error(f"--process-size {args.process_size}: must be a multiple of 16 and >= 64")
    if not 0 <= args.tile_overlap < args.process_size // 2:
        p.error(f"--tile-overlap {args.tile_overlap}: must be in [0, process_size/2)")
    return Args(**{**vars(args), "lora": tuple(args.lora)})


def parse_lora_arg(spec: str) -> tuple[Path, float]:
    """'out/nr.safetensors' -> (path, 1.0); 'out/nr.safetensors:0.5' -> (path, 0.5)."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return Path(path), float(scale)
        except ValueError:
            pass
    return Path(spec), 1.0


def load_policy(model: str, sft: str | None = None, loras: tuple[str, ...] = (), dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> B.Backbone:
    """Base weights -> optional SFT transformer weights -> LoRA files merged (paper §4: Delta_NR into SFT).

    Everything is loaded in `dtype` on `device` directly; the SFT weights stream in one tensor at a time and
    each LoRA product is added in float32 one weight at a time (backbone.merge_lora_files), so one-GPU
    inference of the 20B model needs its bf16 weights once, on the GPU."""
    bb = B.load_backbone(model, dtype=dtype, device=device)
    if sft:
        B.load_transformer_weights(bb.transformer, sft, model)
    B.merge_lora_files(bb.transformer, [parse_lora_arg(s) for s in loras])
    return bb


# ----------------------------------------------------------------------------------------------------
# Colour correction (common in diffusion SR: StableSR/OSEDiff/SeeSR; the OARS paper does not use one)
# ----------------------------------------------------------------------------------------------------


def adain_color_fix(sr: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel mean/std of `sr` (B,3,H,W) matched to `ref` (same shape)."""
    sm, ss = sr.mean((-2, -1), keepdim=True), sr.std((-2, -1), keepdim=True) + eps
    rm, rs = ref.mean((-2, -1), keepdim=True), ref.std((-2, -1), keepdim=True) + eps
    return ((sr - sm) / ss * rs + rm).clamp(0, 1)


def _wavelet_low(x: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Low-frequency part by repeated dilated 3x3 blurs (a trous wavelet), (B,3,H,W) -> same."""
    kernel = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel.expand(3, 1, 3, 3)
    for i in range(levels):
        d = 2 ** i
        x = F.conv2d(F.pad(x, (d, d, d, d), mode="replicate"), kernel, groups=3, dilation=d)
    return x


def wavelet_color_fix(sr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """High frequencies of `sr` + low frequencies (colour, tone) of `ref`."""
    return (sr - _wavelet_low(sr) + _wavelet_low(ref)).clamp(0, 1)


COLOR_FIXES = {"adain": adain_color_fix, "wavelet": wavelet_color_fix, "none": lambda sr, ref: sr}


def back_project(sr: torch.Tensor, lr: torch.Tensor, iterations: int) -> torch.Tensor:
    """Iterative back-projection: sr (B,3,H,W) <- sr + up(lr - down(sr)), `iterations` times, with down
    evaluate.bicubic_down (the downscale of evaluate.lr_consistency) and up the bicubic upscale (unclamped: the
    residual is signed). Each pass moves down(sr) towards lr; what it adds is an upscaled LR-size image, so the
    detail above the LR's resolution is the model's. lr: (B,3,h,w), H/h = W/w = the scale."""
    scale = sr.shape[-1] // lr.shape[-1]
    for _ in range(iterations):
        residual = lr - evaluate.bicubic_down(sr, lr.shape[-2:])
        sr = sr + F.interpolate(residual, scale_factor=scale, mode="bicubic", align_corners=False)
    return sr.clamp(0, 1)


def flat_gate(sr: torch.Tensor, lr: torch.Tensor, tau: float, window: int = 5) -> torch.Tensor:
    """LR-guided flat-region gate: sr (B,3,H,W) <- up + (sr - up) * min(1, std / tau), up the bicubic upscale
    of lr (B,3,h,w) and std its `evaluate.local_std` (Y, 0-255, window x window). Where the LR shows texture
    (std >= tau) the output is unchanged; where it is flat (sky, skin, walls) the output's detail over the
    upscale fades out, because a generator's grain there is noise the LR does not support. Not in the paper."""
    up = B.upscale(lr.float(), sr.shape[-1] // lr.shape[-1])
    keep = (evaluate.local_std(up, window) / tau).clamp(0, 1)
    return (up + (sr - up) * keep).clamp(0, 1)


def post_process(sr: torch.Tensor, lr: torch.Tensor, back_projection: int, gate: float) -> torch.Tensor:
    """The steps after sampling, neither in the paper (0 = off): `back_project` with that many iterations, then
    `flat_gate` with tau `gate`. sr (B,3,H,W), lr (B,3,h,w)."""
    if back_projection:
        sr = back_project(sr, lr, back_projection)
    if gate:
        sr = flat_gate(sr, lr, gate)
    return sr


# ----------------------------------------------------------------------------------------------------
# One image: pad to the backbone's size multiple at the output, tile if large, crop back to scale x input
# ----------------------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets (multiples of `align`) of tiles of size `tile` covering [0, length), overlapping
    by at least about `overlap`. `length - tile` must be a multiple of `align`."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [align * round(i * (length - tile) / (n - 1) / align) for i in range(n)]


def _blend_window(h: int, w: int) -> torch.Tensor:
    """Smooth (1,1,h,w) weight, highest in the middle, never zero (so every pixel gets weight)."""
    wy = torch.hann_window(h + 2, periodic=False)[1:-1]
    wx = torch.hann_window(w + 2, periodic=False)[1:-1]
    return (wy[:, None] * wx[None, :])[None, None]


class _Share:
    """A progress bar's share: `update(1)` per Euler step advances `bar` by 1 / (tiles x steps) of an image."""

    def __init__(self, bar, fraction: float):
        self.bar, self.fraction = bar, fraction

    def update(self, n: int = 1) -> None:
        # the shares' float sum may pass the total by a rounding step (tqdm then warns): never past it
        self.bar.update(min(n * self.fraction, self.bar.total - self.bar.n))


@torch.no_grad()
def super_resolve_image(bb: B.Backbone, lr: torch.Tensor, args: Args, generator: torch.Generator,
                        bar=None) -> torch.Tensor:
    """LR (3,h,w) in [0,1] -> SR (3, scale*h, scale*w) in [0,1]; `bar` (tqdm, counting images) advances every
    Euler step, so a large image shows its progress and an ETA."""
    s = args.scale
    h, w = lr.shape[-2:]
    if min(h, w) < MIN_LR_SIDE:
        raise ValueError(f"image is {w}x{h}; the smallest side must be at least {MIN_LR_SIDE} px")
    # pad the LR so that the output sides are multiples of bb.size_multiple (16 for the 8x VAE with its
    # 2x2 packing), repeating the edge
    multiple = bb.size_multiple
    unit = multiple // math.gcd(multiple, s)
    ph, pw = (-h) % unit, (-w) % unit
    x = F.pad(lr[None], (0, pw, 0, ph), mode="replicate")[0] if ph or pw else lr
    H, W = x.shape[-2] * s, x.shape[-1] * s
    tile = args.process_size
    ys = tile_starts(H, tile, args.tile_overlap, align=multiple)
    xs = tile_starts(W, tile, args.tile_overlap, align=multiple)
    out = torch.zeros(1, 3, H, W)
    weight = torch.zeros(1, 1, H, W)
    th, tw = min(tile, H), min(tile, W)
    win = _blend_window(th, tw) if len(ys) * len(xs) > 1 else torch.ones(1, 1, th, tw)
    for y in ys:
        for x0 in xs:
            patch = x[:, y // s:(y + th) // s, x0 // s:(x0 + tw) // s]
            progress = _Share(bar, 1 / (len(ys) * len(xs) * args.steps)) if bar is not None else None
            sr = B.super_resolve(bb, patch.to(bb.device), args.steps, 1, generator, args.prompt, s,
                                 progress).float().cpu()
            out[:, :, y:y + th, x0:x0 + tw] += sr * win
            weight[:, :, y:y + th, x0:x0 + tw] += win
    out = out / weight
    padded_lr = x[None].float()
    out = COLOR_FIXES[args.color_fix](out, B.upscale(padded_lr, s))
    # parse_args resolves both defaults (None: 0, or MINI_BACK_PROJECTION / MINI_FLAT_GATE for mini)
    out = post_process(out, padded_lr, args.back_projection, args.flat_gate)
    return out[0, :, :h * s, :w * s]


def list_inputs(src: Path, out_dir: Path) -> list[Path]:
    """The input images, refused in ONE line before any work when the outputs would overwrite an input (the output
    folder is the input folder, or inside it) or when two inputs share a stem (x.png and x.jpg would both be
    written to x.png)."""
    if src.is_dir():
        try:
            inputs = list_images(src)
        except ValueError as err:  # no image in the folder
            raise T.RunError(f"--input {err}") from None
        if out_dir.resolve() == src.resolve() or src.resolve() in out_dir.resolve().parents:
            raise T.RunError(f"--out {out_dir}: is the input folder or inside it ({src}); the outputs (same stems, "
                             f".png) would overwrite or mix with the inputs. Choose another folder.")
    elif src.is_file():
        inputs = [src]
        if (out_dir / f"{src.stem}.png").resolve() == src.resolve():
            raise T.RunError(f"--out {out_dir}: the output {out_dir / (src.stem + '.png')} would overwrite the input")
    else:
        raise T.RunError(f"--input {src}: no such file or folder")
    stems: dict[str, Path] = {}
    for path in inputs:
        if path.stem in stems:
            raise T.RunError(f"--input {src}: {stems[path.stem].name} and {path.name} share the stem {path.stem!r} "
                             f"and would both be written to {path.stem}.png; rename one")
        stems[path.stem] = path
    return inputs


def check_writable(folder: Path) -> None:
    """Create `folder` and write a file in it, before the model loads; one line if that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise T.RunError(f"--out {folder}: cannot write there ({err.strerror or err}); choose a writable folder") \
            from None


def device_and_dtype(args: Args) -> tuple[str, torch.dtype]:
    """--device and --dtype resolved: 'auto' = CUDA when available; bf16 on a GPU, float32 on the CPU."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.startswith("cuda"))
    return device, torch.bfloat16 if bf16 else torch.float32


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args)
    out_dir = Path(args.out)
    inputs = list_inputs(Path(args.input), out_dir)  # every check before the model loads
    check_writable(out_dir)
    bb = load_policy(args.model, args.sft, args.lora, dtype, device)
    failures: list[str] = []
    bar = tqdm(total=len(inputs), desc="super-resolving", unit="img")
    for path in inputs:
        try:
            lr = load_image(path)
            generator = torch.Generator().manual_seed(args.seed)  # same seed per image: reproducible alone
            bar.set_postfix_str(f"{path.name} {lr.shape[-1] * args.scale}x{lr.shape[-2] * args.scale}")
            sr = super_resolve_image(bb, lr, args, generator, bar)
            save_image(sr, out_dir / f"{path.stem}.png")
        except (ImageReadError, ValueError) as err:
            failures.append(f"{path}: {err}")
            tqdm.write(f"skipped {path}: {err}", file=sys.stderr)
    bar.close()
    print(f"wrote {len(inputs) - len(failures)} image(s) to {out_dir}")
    if args.hr_dir:
        evaluate.main(["--sr-dir", str(out_dir), "--hr-dir", args.hr_dir, "--csv", str(out_dir / "metrics.csv"),
                       "--metrics", *args.metrics])
    if failures:
        print(f"{len(failures)} input(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    T.run_script(main)
