"""Image I/O, Real-ESRGAN second-order degradation and the datasets of OARS.

What this file holds (read top to bottom):

1. Image I/O used by every stage (training, evaluation, inference):
   `list_images`, `load_image`, `save_image`, `to_tensor`, `to_pil`, `ImageReadError`.
   Images are float32 tensors (3, H, W) in [0, 1]. Grey, palette, CMYK, 16-bit and alpha
   images are all turned into RGB; alpha is composited over WHITE (a transparent pixel
   becomes white, as an image viewer on a white page shows it).
2. The Real-ESRGAN "second-order" degradation (Wang et al. 2021, "Real-ESRGAN", §3) that
   turns a clean HR image into a realistic LR one: blur -> resize -> noise -> JPEG, twice,
   then a final resize to H/4 x W/4 with a sinc filter and JPEG in random order.
   The OARS paper (§3.1, §5.1) uses "Real-ESRGAN-style random degradations" to make the
   synthetic LR inputs of COMPASS-20K (from DIV2K) and the cold-start / full-reference RL
   training pairs (from LSDIR). Every default equals the Real-ESRGAN x4plus recipe.
   `degrade(hr, cfg, generator)` runs it on a batch of tensors; each step is a small pure
   function (kernels, `filter2d`, `resize`, `add_gaussian_noise`, `add_poisson_noise`,
   `jpeg`, `quantize`) that can be copied alone.
3. Datasets: `HRFolderDataset` (HR crops degraded on the fly), `PairedFolderDataset`
   (LR/HR folders paired by file stem), `LRFolderDataset` (LR only), and `collate`.

Command (make synthetic LR images from a folder of HR images, e.g. DIV2K for COMPASS-20K):

    python data.py --hr-folder DIV2K_train_HR --out-folder DIV2K_x4_lr --seed 0
    python data.py --hr-folder LSDIR/HR --out-folder pairs --crop-size 512 --save-hr

It writes one 8-bit PNG per input image, named by the input's stem (with --save-hr also the
HR crop that the LR was made from, in OUT/hr/ beside OUT/lr/).

Choices made where the paper is silent (all documented at the code that makes them):
- JPEG is real PIL encode/decode per image (exact libjpeg, 4:2:0 chroma subsampling, integer
  quality = round(U(30, 95))). It is NOT differentiable; Real-ESRGAN uses a differentiable
  JPEG approximation (DiffJPEG) only because it runs on GPU batches, not for gradients.
- All randomness comes from one `torch.Generator`: the same seed gives the same LR on any
  machine and in any DataLoader worker. Dataset item i at epoch e uses seed (seed, e, i).
- HR crops are taken BEFORE degradation (512x512 -> 128x128 LR), as the diffusion SR line
  (StableSR, SeeSR, OSEDiff) does. Real-ESRGAN's unsharp-masked GT is a GAN-training detail
  and is not applied.
- Plateau kernels draw beta ~ U(1, 2), as the recipe's parameter table states. (The original
  code draws it like the generalized-Gaussian beta, 50% U(lo, 1) / 50% U(1, hi), which with
  the range (1, 2) makes beta exactly 1 half of the time; see `_draw_beta`.)
- Alpha is composited over white; 16-bit files keep 16-bit precision; EXIF rotation applied.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps

# =====================================================================================
# 1. Image I/O (shared by training, evaluation and inference)
# =====================================================================================

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
"""File suffixes `list_images` accepts (compared case-insensitively)."""

SAVE_FORMATS: dict[str, str] = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
"""Suffix -> PIL format that `save_image` writes."""

_EXIF_ORIENTATION_TAG = 0x0112  # 274, "Orientation" in the EXIF standard


class ImageReadError(ValueError):
    """An image file is missing, unreadable, truncated or corrupt. The message names the file."""


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files directly inside `folder` (not recursive).

    Accepted suffixes: `IMAGE_EXTENSIONS`, any letter case (".PNG" counts).
    Raises FileNotFoundError if the folder does not exist, ValueError if it holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder not found: {folder} (check the path; it must be a directory)"
        )
    paths = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        raise ValueError(
            f"no images in {folder}: expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
            "(any case); sub-folders are not searched"
        )
    return paths


def _source_is_16bit_colour(img: Image.Image) -> bool:
    """True if `img` (opened, not yet loaded) is a 16-bit-per-channel colour PNG/TIFF.

    PIL has no 16-bit RGB mode: it opens such files as 8-bit "RGB"/"RGBA" and drops the low
    byte while decoding. The raw mode of the decoder tile ("RGB;16B", "RGBA;16N", ...) still
    tells us what the file holds. (The tile list is emptied by `img.load()`.)
    """
    if img.mode not in ("RGB", "RGBA"):
        return False
    for tile in getattr(img, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None  # PIL tile: (codec, extents, offset, args)
        rawmode = args[0] if isinstance(args, tuple) else args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _apply_exif_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W, C) array, as ImageOps.exif_transpose does."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:  # transpose
        return arr.transpose(1, 0, 2)
    if orientation == 6:  # rotate 90 degrees clockwise
        return np.rot90(arr, k=-1)
    if orientation == 7:  # transverse
        return np.rot90(arr, k=-1)[::-1]
    if orientation == 8:  # rotate 90 degrees counter-clockwise
        return np.rot90(arr, k=1)
    return arr


def _array_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, C) float array in [0, 1] with C in {1, 2, 3, 4} -> float32 tensor (3, H, W).

    C=2 (grey+alpha) and C=4 (RGB+alpha) are composited over white:
        out = colour * alpha + 1 * (1 - alpha)
    so a fully transparent pixel becomes white and an opaque one keeps its colour.
    """
    arr = np.clip(arr.astype(np.float32, copy=False), 0.0, 1.0)
    if arr.shape[2] in (2, 4):
        colour, alpha = arr[:, :, :-1], arr[:, :, -1:]
        arr = colour * alpha + (1.0 - alpha)  # alpha over white
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)  # grey -> RGB
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image of any common mode -> float32 tensor (3, H, W) in [0, 1].

    Mode handling (8-bit values are divided by 255, 16-bit by 65535):
      "1", "L"                -> grey, repeated to RGB
      "P" (palette)           -> RGBA if the palette has transparency, else RGB
      "LA", "PA", "La", "RGBA", "RGBa" -> alpha composited over white
      "I;16", "I;16B/L/N"     -> 16-bit grey (full 16-bit precision kept)
      "I" (32-bit int)        -> read as 16-bit grey (PNG/TIFF 16-bit grey opens as "I" in
                                 some Pillow versions); values above 65535 are clipped
      "F" (32-bit float)      -> taken as already in [0, 1] and clipped
      "CMYK", "YCbCr", "LAB", "HSV", ... -> PIL's conversion to RGB (ICC profiles ignored)
    """
    mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    if mode == "P":
        has_alpha = "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
    if mode in ("PA", "La", "RGBa"):
        img, mode = img.convert("RGBA"), "RGBA"

    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "I":
        arr = np.asarray(img).astype(np.float64) / 65535.0
    elif mode == "F":
        arr = np.asarray(img).astype(np.float32)
    elif mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.asarray(img).astype(np.float32) / 255.0
    else:  # CMYK, YCbCr, LAB, HSV, RGBX, ...
        arr = np.asarray(img.convert("RGB")).astype(np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return _array_to_tensor(arr)


def _read_16bit_colour(path: Path, orientation: int) -> torch.Tensor | None:
    """Full-precision read of a 16-bit colour PNG/TIFF with OpenCV, or None if cv2 is absent."""
    try:
        import cv2  # optional: installed with pyiqa (opencv-python-headless)
    except ImportError:
        return None
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # (H, W, 3|4) uint16, BGR(A) order
    if arr is None or arr.dtype != np.uint16 or arr.ndim != 3:
        return None
    arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) -> RGB(A)
    arr = _apply_exif_orientation(arr, orientation)  # cv2 ignores EXIF with IMREAD_UNCHANGED
    return _array_to_tensor(arr.astype(np.float32) / 65535.0)


def load_image(path: str | Path) -> torch.Tensor:
    """Read an image file -> float32 tensor (3, H, W) in [0, 1].

    - EXIF orientation is applied (ImageOps.exif_transpose): a portrait phone photo stored
      sideways with Orientation=6 comes back upright, i.e. with H and W swapped.
    - 8-bit and 16-bit files keep their precision (16-bit colour PNG/TIFF needs OpenCV,
      which pyiqa installs; without it PIL's 8-bit reading is used).
    - Grey, palette, CMYK and alpha images become RGB; alpha is composited over white.
    - The whole file is decoded here (img.load()), so a truncated download fails now,
      with the path in the message, instead of producing a grey half-image later.
    Raises ImageReadError (a ValueError) naming the path for missing/unreadable/corrupt files.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(
            f"image file not found: {path} (check the path, or re-list the folder)"
        )
    # Some libraries switch on PIL's global LOAD_TRUNCATED_IMAGES, which silently pads a
    # truncated file with grey. Decode strictly here and put the global back afterwards.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            sixteen_bit_colour = _source_is_16bit_colour(img)  # before getexif(): PNG's loads
            orientation = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
            if sixteen_bit_colour:
                tensor = _read_16bit_colour(path, orientation)
                if tensor is not None:
                    return tensor
            img.load()  # force the full decode: truncation and corruption surface here
            img = ImageOps.exif_transpose(img)
            return to_tensor(img)
    except ImageReadError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageReadError(
            f"cannot read image {path}: {type(err).__name__}: {err}. The file is corrupt, "
            "truncated or not an image: re-download or re-export it, or remove it from the "
            "folder."
        ) from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def to_pil(tensor: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [0, 1] -> 8-bit RGB PIL image (values clipped, then rounded)."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"to_pil expects a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    arr = quantize(tensor.detach().float().cpu()).mul(255.0).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy())


_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


def save_image(tensor: torch.Tensor, path: str | Path, quality: int = 95) -> Path:
    """Write a (3, H, W) tensor in [0, 1] as an 8-bit PNG, JPEG or WebP (chosen by suffix).

    The file is written to a temporary file in the same folder and moved into place with
    os.replace, so a crash never leaves a half-written image under the final name. Parent
    folders are created. `quality` applies to JPEG/WebP. Values outside [0, 1] are clipped.
    Returns the path written.
    """
    path = Path(path)
    fmt = SAVE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot save {path}: unsupported suffix {path.suffix!r}; use one of "
            f"{', '.join(SAVE_FORMATS)}"
        )
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(
            f"cannot save {path}: expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise ValueError(f"cannot save {path}: the tensor holds NaN or Inf values")
    img = to_pil(tensor)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {} if fmt == "PNG" else {"quality": int(quality)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=fmt, **options)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private (0600); an image is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as `load_image` returns it (EXIF rotation applied).

    Reads the header only (fast). Raises ImageReadError naming the path if it cannot.
    """
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception as err:
        raise ImageReadError(
            f"cannot read image {path}: {type(err).__name__}: {err}. Re-export or remove it."
        ) from err
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


# =====================================================================================
# 2. Real-ESRGAN second-order degradation (Wang et al. 2021, §3; x4plus recipe)
# =====================================================================================
# Tensors are (B, 3, H, W) float in [0, 1]. Every random number is drawn from the
# torch.Generator passed in, never from the global RNG, so one seed -> one LR image.

KERNEL_TYPES: tuple[str, ...] = (
    "iso",  # isotropic Gaussian
    "aniso",  # anisotropic (rotated) Gaussian
    "generalized_iso",  # generalized Gaussian exp(-0.5 d^beta), isotropic
    "generalized_aniso",
    "plateau_iso",  # plateau 1 / (1 + d^beta), isotropic
    "plateau_aniso",
)
"""Blur kernel families of Real-ESRGAN (d = squared Mahalanobis distance to the centre)."""

RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
"""Interpolation modes a random resize picks from (uniformly)."""

STAGES: tuple[str, ...] = (
    "blur1", "resize1", "noise1", "jpeg1",  # first degradation pass
    "blur2", "resize2", "noise2",  # second pass
    "final_sinc", "final_jpeg",  # final stage (its resize to H/scale always runs)
)
"""Names for `DegradationConfig.stages`. The final resize and the 8-bit quantisation always run."""


@dataclass(frozen=True)
class DegradationConfig:
    """All parameters of the second-order degradation. Defaults = Real-ESRGAN x4plus.

    Ranges (lo, hi) are sampled uniformly. Override fields with keyword arguments, e.g.
    `DegradationConfig(stages=("jpeg1",))` runs only the first JPEG (plus the final resize
    and quantisation), `DegradationConfig(jpeg_range=(90, 95))` makes JPEG mild.
    """

    stages: tuple[str, ...] = STAGES
    """Stages that run (see `STAGES`); a stage left out is skipped entirely."""
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    """Odd kernel sizes, one drawn uniformly per kernel."""
    kernel_pad_to: int = 21
    """Every kernel is zero-padded to this size (so a batch of kernels stacks)."""

    # ---- first pass ----
    blur_prob: float = 1.0
    """Probability that the first blur runs (Real-ESRGAN always blurs first)."""
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    """Probabilities of `KERNEL_TYPES` for the first blur."""
    sinc_prob: float = 0.1
    """Probability that the first blur kernel is a sinc (ringing) kernel instead."""
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    """Gaussian-family sigma range (pixels), drawn per axis for anisotropic kernels."""
    betag_range: tuple[float, float] = (0.5, 4.0)
    """Generalized-Gaussian shape beta: 50% U(lo, 1), 50% U(1, hi)."""
    betap_range: tuple[float, float] = (1.0, 2.0)
    """Plateau shape beta, U(lo, hi)."""
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)
    """Probabilities of (up, down, keep) for the first resize."""
    resize_range: tuple[float, float] = (0.15, 1.5)
    """First resize factor: up ~ U(1, hi), down ~ U(lo, 1)."""
    gaussian_noise_prob: float = 0.5
    """Probability of Gaussian noise (otherwise Poisson noise)."""
    noise_range: tuple[float, float] = (1.0, 30.0)
    """Gaussian noise sigma in 8-bit levels (divided by 255)."""
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    """Poisson noise scale."""
    gray_noise_prob: float = 0.4
    """Probability that the noise is the same in all three channels (luminance noise)."""
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    """JPEG quality range (rounded to an integer per image)."""

    # ---- second pass ----
    blur_prob2: float = 0.8
    """Probability that the second blur runs."""
    kernel_probs2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    """Probabilities of `KERNEL_TYPES` for the second blur."""
    sinc_prob2: float = 0.1
    """Probability that the second blur kernel is a sinc kernel."""
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    """Second blur sigma range."""
    betag_range2: tuple[float, float] = (0.5, 4.0)
    """Second blur generalized-Gaussian beta range."""
    betap_range2: tuple[float, float] = (1.0, 2.0)
    """Second blur plateau beta range."""
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    """Probabilities of (up, down, keep) for the second resize."""
    resize_range2: tuple[float, float] = (0.3, 1.2)
    """Second resize factor, RELATIVE TO THE FINAL LR SIZE: size = int(H / scale * s)."""
    gaussian_noise_prob2: float = 0.5
    """Probability of Gaussian (vs Poisson) noise in the second pass."""
    noise_range2: tuple[float, float] = (1.0, 25.0)
    """Second Gaussian noise sigma in 8-bit levels."""
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    """Second Poisson noise scale."""
    gray_noise_prob2: float = 0.4
    """Probability of grey (luminance) noise in the second pass."""

    # ---- final stage ----
    final_sinc_prob: float = 0.8
    """Probability that the final stage uses a sinc filter (else a delta, i.e. no filter)."""
    final_sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)
    """Final sinc cutoff frequency range (radians), for every kernel size."""
    final_jpeg_range: tuple[float, float] = (30.0, 95.0)
    """Final JPEG quality range."""
    final_jpeg_first_prob: float = 0.5
    """Probability of the order JPEG -> resize -> sinc (else resize -> sinc -> JPEG)."""

    # ---- sinc kernels of the blur stages ----
    sinc_cutoff_small: tuple[float, float] = (math.pi / 3, math.pi)
    """Blur-stage sinc cutoff range for kernel sizes below `sinc_large_from`."""
    sinc_cutoff_large: tuple[float, float] = (math.pi / 5, math.pi)
    """Blur-stage sinc cutoff range for kernel sizes >= `sinc_large_from`."""
    sinc_large_from: int = 13
    """Kernel size from which the wider (lower) sinc cutoff range applies."""
    resize_modes: tuple[str, ...] = RESIZE_MODES
    """Interpolation modes every resize picks from uniformly."""

    def __post_init__(self) -> None:
        # Fail at construction, naming the field, rather than deep inside `degrade`.
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"DegradationConfig.stages: unknown {unknown}; valid: {STAGES}")
        for name in ("kernel_probs", "kernel_probs2"):
            probs = getattr(self, name)
            if len(probs) != len(KERNEL_TYPES) or abs(sum(probs) - 1.0) > 1e-6:
                raise ValueError(
                    f"DegradationConfig.{name}={probs}: need {len(KERNEL_TYPES)} probabilities "
                    f"(for {KERNEL_TYPES}) summing to 1"
                )
        for name in ("resize_probs", "resize_probs2"):
            probs = getattr(self, name)
            if len(probs) != 3 or abs(sum(probs) - 1.0) > 1e-6 or min(probs) < 0:
                raise ValueError(
                    f"DegradationConfig.{name}={probs}: need 3 probabilities (up, down, keep) "
                    "summing to 1"
                )
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_prob", "_prob2")) and not 0.0 <= value <= 1.0:
                raise ValueError(f"DegradationConfig.{f.name}={value}: must be in [0, 1]")
            is_range = f.name.endswith(("_range", "_range2", "sigma", "sigma2", "_cutoff"))
            is_range = is_range or f.name.startswith("sinc_cutoff")
            if is_range and (len(value) != 2 or value[0] > value[1]):
                raise ValueError(f"DegradationConfig.{f.name}={value}: need (lo, hi), lo <= hi")
        bad = [k for k in self.kernel_sizes if k % 2 == 0 or k < 1 or k > self.kernel_pad_to]
        if bad:
            raise ValueError(
                f"DegradationConfig.kernel_sizes: {bad} must be odd and <= kernel_pad_to="
                f"{self.kernel_pad_to}"
            )
        if self.kernel_pad_to % 2 == 0:
            raise ValueError(f"DegradationConfig.kernel_pad_to={self.kernel_pad_to}: must be odd")
        bad_modes = [m for m in self.resize_modes if m not in RESIZE_MODES]
        if bad_modes or not self.resize_modes:
            raise ValueError(f"DegradationConfig.resize_modes: use a subset of {RESIZE_MODES}")


MINI_DEGRADATION = DegradationConfig(
    resize_range=(0.6, 1.4), resize_range2=(0.9, 1.1),
    noise_range=(1.0, 8.0), noise_range2=(1.0, 4.0),
    poisson_scale_range=(0.05, 0.8), poisson_scale_range2=(0.05, 0.4),
    jpeg_range=(80.0, 95.0), final_jpeg_range=(80.0, 95.0),
    blur_sigma=(0.2, 2.0), blur_sigma2=(0.2, 1.0),
    final_sinc_cutoff=(0.75 * math.pi, math.pi),
    sinc_cutoff_small=(0.5 * math.pi, math.pi), sinc_cutoff_large=(0.4 * math.pi, math.pi),
)
"""The Real-ESRGAN pipeline scaled to the mini world's 64 -> 16 px crops (every stage still runs).

With the paper's ranges (`DegradationConfig()`, sized for 256 -> 64 px crops) the second random resize of
a 16 px LR goes down to int(16 x 0.3) = 4 px and the noise buries what is left: the LR keeps no 8-16 px
content, and an SFT trained on it learns to ignore its input. Here: narrower resizes, noise at 1/4-1/6 of
the paper's, JPEG quality >= 80, milder sinc cutoffs (the final sinc acts at LR scale; at the paper's pi/3
it alone costs ~7.7 dB on 16 px crops). Real runs keep the paper's defaults."""

DEGRADATIONS: dict[str, DegradationConfig] = {"realesrgan": DegradationConfig(), "mini": MINI_DEGRADATION}
"""Named degradation configs (`train_sft.py --degradation`)."""


# ---- random draws, all from the generator ----------------------------------------------

def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    """One float ~ U(lo, hi) from `generator`."""
    u = torch.rand((), generator=generator, dtype=torch.float64, device=generator.device)
    return float(lo + (hi - lo) * u.item())


def _uniform_batch(generator: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    """(n,) float32 ~ U(lo, hi) on the generator's device."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
    return (lo + (hi - lo) * u).float()


def _bernoulli(generator: torch.Generator, p: float) -> bool:
    """True with probability p."""
    return _uniform(generator, 0.0, 1.0) < p


def _choice(generator: torch.Generator, items: Sequence, probs: Sequence[float] | None = None):
    """One element of `items`, uniformly or with probabilities `probs`."""
    weights = torch.tensor(
        probs if probs is not None else [1.0] * len(items), dtype=torch.float64
    ).to(generator.device)
    return items[int(torch.multinomial(weights, 1, generator=generator).item())]


def _draw_beta(generator: torch.Generator, lo: float, hi: float) -> float:
    """Shape parameter beta of the generalized-Gaussian / plateau kernels.

    If the range straddles 1 (generalized Gaussian, (0.5, 4)), Real-ESRGAN picks the side
    first, 50% U(lo, 1) (heavier tails than a Gaussian) and 50% U(1, hi) (flatter top), so
    both shapes are equally likely although (1, 4) is longer than (0.5, 1). Otherwise
    (plateau, (1, 2)) beta ~ U(lo, hi).
    """
    if lo < 1.0 < hi:
        return _uniform(generator, lo, 1.0) if _bernoulli(generator, 0.5) else _uniform(generator, 1.0, hi)
    return _uniform(generator, lo, hi)


# ---- kernels ----------------------------------------------------------------------------

def _kernel_grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer offsets from the kernel centre: x (columns) and y (rows), each (size, size)."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def gaussian_family_kernel(
    size: int,
    sigma_x: float,
    sigma_y: float,
    theta: float = 0.0,
    beta: float = 1.0,
    shape: str = "gaussian",
) -> torch.Tensor:
    """A normalised (size, size) blur kernel of the Gaussian family.

    Covariance  S = R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T   (rotated ellipse)
    distance    d = [x y] S^-1 [x y]^T                              (squared Mahalanobis)
    shape:
      "gaussian"     k = exp(-d / 2)
      "generalized"  k = exp(-d^beta / 2)   beta < 1: heavy tails, beta > 1: flat top
      "plateau"      k = 1 / (1 + d^beta)
    The kernel is divided by its sum, so blurring keeps the mean brightness.
    Isotropic kernels: sigma_x = sigma_y (theta is then irrelevant).
    Returns float32 (size, size).
    """
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    if sigma_x <= 0 or sigma_y <= 0:
        raise ValueError(f"kernel sigmas must be > 0, got ({sigma_x}, {sigma_y})")
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
    inv = torch.linalg.inv(cov)
    xx, yy = _kernel_grid(size)
    d = inv[0, 0] * xx * xx + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy * yy
    if shape == "gaussian":
        k = torch.exp(-0.5 * d)
    elif shape == "generalized":
        k = torch.exp(-0.5 * d.pow(beta))
    elif shape == "plateau":
        k = 1.0 / (1.0 + d.pow(beta))
    else:
        raise ValueError(f"unknown kernel shape {shape!r}: use gaussian, generalized or plateau")
    return (k / k.sum()).float()


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """A normalised (size, size) circular low-pass ("2-D sinc") kernel.

    The ideal low-pass filter with a circular pass band of radius `cutoff` (radians per
    pixel, pi = Nyquist) has impulse response
        k(r) = cutoff * J1(cutoff * r) / (2 pi r),    k(0) = cutoff^2 / (4 pi)
    (J1 = Bessel function of the first kind). Truncating it to a small window gives the
    ringing / overshoot artefacts of sharpened or over-compressed real images.
    Returns float32 (size, size), sum 1 (it has negative lobes).
    """
    if size % 2 != 1:
        raise ValueError(f"kernel size must be odd, got {size}")
    xx, yy = _kernel_grid(size)
    r = torch.sqrt(xx * xx + yy * yy)
    r_safe = torch.where(r == 0, torch.ones_like(r), r)  # avoid 0/0 at the centre
    k = cutoff * torch.special.bessel_j1(cutoff * r_safe) / (2 * math.pi * r_safe)
    k = torch.where(r == 0, torch.full_like(r, cutoff**2 / (4 * math.pi)), k)
    return (k / k.sum()).float()


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a (k, k) kernel (k odd) to (size, size), keeping it centred."""
    k = kernel.shape[-1]
    if k > size:
        raise ValueError(f"kernel of size {k} cannot be padded to a smaller size {size}")
    p = (size - k) // 2
    return F.pad(kernel, (p, p, p, p))


def delta_kernel(size: int = 21) -> torch.Tensor:
    """(size, size) kernel with a single 1 at the centre: filtering with it changes nothing."""
    k = torch.zeros(size, size)
    k[size // 2, size // 2] = 1.0
    return k


def random_blur_kernel(
    generator: torch.Generator,
    kernel_sizes: Sequence[int] = (7, 9, 11, 13, 15, 17, 19, 21),
    kernel_probs: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
    sigma_range: tuple[float, float] = (0.2, 3.0),
    betag_range: tuple[float, float] = (0.5, 4.0),
    betap_range: tuple[float, float] = (1.0, 2.0),
    sinc_prob: float = 0.1,
    sinc_cutoff_small: tuple[float, float] = (math.pi / 3, math.pi),
    sinc_cutoff_large: tuple[float, float] = (math.pi / 5, math.pi),
    sinc_large_from: int = 13,
    pad_to: int = 21,
) -> torch.Tensor:
    """Draw one blur kernel as Real-ESRGAN does; returns float32 (pad_to, pad_to), sum 1.

    size ~ uniform over `kernel_sizes`. With probability `sinc_prob` a sinc kernel (cutoff
    from the small-kernel range if size < sinc_large_from, else the wider range; a small
    window cannot represent a very low cutoff). Otherwise a Gaussian-family kernel of type
    drawn with `kernel_probs` over `KERNEL_TYPES`: sigma_x ~ U(sigma_range); anisotropic
    types also draw sigma_y ~ U(sigma_range) and theta ~ U(-pi, pi).
    """
    size = int(_choice(generator, list(kernel_sizes)))
    if _bernoulli(generator, sinc_prob):
        lo, hi = sinc_cutoff_small if size < sinc_large_from else sinc_cutoff_large
        kernel = sinc_kernel(size, _uniform(generator, lo, hi))
        return pad_kernel(kernel, pad_to)
    kind = _choice(generator, KERNEL_TYPES, kernel_probs)
    sigma_x = _uniform(generator, *sigma_range)
    if kind.endswith("aniso"):
        sigma_y = _uniform(generator, *sigma_range)
        theta = _uniform(generator, -math.pi, math.pi)
    else:
        sigma_y, theta = sigma_x, 0.0
    if kind.startswith("generalized"):
        shape, beta = "generalized", _draw_beta(generator, *betag_range)
    elif kind.startswith("plateau"):
        shape, beta = "plateau", _draw_beta(generator, *betap_range)
    else:
        shape, beta = "gaussian", 1.0
    kernel = gaussian_family_kernel(size, sigma_x, sigma_y, theta, beta, shape)
    return pad_kernel(kernel, pad_to)


def random_sinc_kernel(
    generator: torch.Generator,
    kernel_sizes: Sequence[int] = (7, 9, 11, 13, 15, 17, 19, 21),
    cutoff_range: tuple[float, float] = (math.pi / 3, math.pi),
    pad_to: int = 21,
) -> torch.Tensor:
    """Final-stage sinc kernel: size uniform over `kernel_sizes`, cutoff ~ U(cutoff_range)."""
    size = int(_choice(generator, list(kernel_sizes)))
    return pad_kernel(sinc_kernel(size, _uniform(generator, *cutoff_range)), pad_to)


# ---- the operations ------------------------------------------------------------------------

def filter2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve each image with its own kernel, same size out, reflect padding.

    x: (B, C, H, W); kernel: (k, k) shared by the batch or (B, k, k) one per image, k odd.
    Each channel is filtered separately with the image's kernel (a grouped convolution).
    Borders use reflect padding; an image smaller than the padding (possible after a strong
    downscale of a tiny crop) falls back to replicate padding.
    Returns (B, C, H, W).
    """
    b, c, h, w = x.shape
    if kernel.ndim == 2:
        kernel = kernel.expand(b, *kernel.shape)
    k = kernel.shape[-1]
    if kernel.shape[0] != b or k % 2 != 1 or kernel.shape[-2] != k:
        raise ValueError(
            f"filter2d: need kernels (k, k) or (B={b}, k, k) with odd k, got {tuple(kernel.shape)}"
        )
    pad = k // 2
    mode = "reflect" if pad < h and pad < w else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)  # (B, C, H+2p, W+2p)
    weight = kernel.to(x).repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, k, k)
    # conv2d computes cross-correlation; our kernels are point-symmetric (k(-x) = k(x)),
    # so it equals convolution.
    out = F.conv2d(xp.reshape(1, b * c, h + 2 * pad, w + 2 * pad), weight, groups=b * c)
    return out.reshape(b, c, h, w)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, H, W) to (B, C, size[0], size[1]) with "area", "bilinear" or "bicubic".

    No antialiasing (as in Real-ESRGAN): a bilinear/bicubic downscale aliases, which is one
    of the artefacts we want. Bicubic can overshoot [0, 1]; later stages clip.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} unknown: use one of {RESIZE_MODES}")
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode=mode, align_corners=False)


def random_resize(
    x: torch.Tensor,
    generator: torch.Generator,
    probs: tuple[float, float, float] = (0.2, 0.7, 0.1),
    scale_range: tuple[float, float] = (0.15, 1.5),
    modes: Sequence[str] = RESIZE_MODES,
    base_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Random up/down/keep resize of the whole batch (one factor and mode per batch).

    direction ~ (up, down, keep) with `probs`; factor s: up ~ U(1, hi), down ~ U(lo, 1),
    keep = 1; mode uniform over `modes`. New size = int(base * s) per side, where base is
    the current (H, W) or `base_size` (the second pass resizes relative to the final LR size).
    Returns (B, C, H', W').
    """
    direction = _choice(generator, ("up", "down", "keep"), probs)
    if direction == "up":
        s = _uniform(generator, 1.0, scale_range[1])
    elif direction == "down":
        s = _uniform(generator, scale_range[0], 1.0)
    else:
        s = 1.0
    mode = _choice(generator, list(modes))
    base_h, base_w = base_size if base_size is not None else x.shape[-2:]
    return resize(x, (int(base_h * s), int(base_w * s)), mode)


def _rgb_to_luma(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def add_gaussian_noise(
    x: torch.Tensor,
    sigma: torch.Tensor,
    gray: torch.Tensor,
    generator: torch.Generator,
    clip: bool = True,
) -> torch.Tensor:
    """Add white Gaussian noise (sensor read noise).

    x: (B, 3, H, W); sigma: (B,) standard deviations in image units ([0, 1] scale, i.e.
    8-bit levels / 255); gray: (B,) bool, True = one noise field shared by R, G, B
    (luminance noise), False = independent noise per channel (colour noise).
    out = x + sigma * n,  n ~ N(0, 1); clipped to [0, 1] if `clip`.
    """
    b, c, h, w = x.shape
    dev = generator.device
    noise = torch.randn((b, c, h, w), generator=generator, device=dev, dtype=torch.float32)
    gray = gray.to(dev).bool()
    if gray.any():
        gray_noise = torch.randn((b, 1, h, w), generator=generator, device=dev, dtype=torch.float32)
        noise = torch.where(gray.view(b, 1, 1, 1), gray_noise.expand(b, c, h, w), noise)
    out = x + (noise * sigma.to(dev).float().view(b, 1, 1, 1)).to(x)
    return out.clamp(0.0, 1.0) if clip else out


def _poisson_noise(q: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shot noise of 8-bit-quantised images q (B, C, H, W): returns poisson(q * L) / L - q.

    The photon count at full white, L, is per image the number of distinct 8-bit values it
    holds rounded up to a power of two (the heuristic of skimage.util.random_noise, used by
    Real-ESRGAN): an image with fewer grey levels is treated as captured with fewer photons.
    torch.poisson accepts a generator (checked with torch 2.14), so the draw is seeded.
    """
    b = q.shape[0]
    levels = torch.tensor(
        [2.0 ** math.ceil(math.log2(max(1, int(torch.unique(q[i]).numel())))) for i in range(b)],
        dtype=torch.float32,
    ).view(b, 1, 1, 1)
    rates = (q.float().cpu() * levels).to(generator.device)
    counts = torch.poisson(rates, generator=generator).cpu()
    return (counts / levels - q.float().cpu()).to(q)


def add_poisson_noise(
    x: torch.Tensor,
    scale: torch.Tensor,
    gray: torch.Tensor,
    generator: torch.Generator,
    clip: bool = True,
) -> torch.Tensor:
    """Add Poisson (photon shot) noise, whose variance grows with brightness.

    x: (B, 3, H, W); scale: (B,) noise multipliers; gray: (B,) bool, True = noise computed
    on the luma and shared by R, G, B.
    out = x + scale * (poisson(q * L) / L - q), q = x rounded to 8 bits, L = see
    `_poisson_noise`. Clipped to [0, 1] if `clip`.
    """
    b, c, h, w = x.shape
    q = quantize(x)
    noise = _poisson_noise(q, generator)  # colour noise, always drawn
    gray = gray.bool().cpu()
    if gray.any():
        noise_gray = _poisson_noise(quantize(_rgb_to_luma(x)), generator).expand(b, c, h, w)
        noise = torch.where(gray.view(b, 1, 1, 1).to(x.device), noise_gray, noise)
    out = x + noise * scale.to(x).view(b, 1, 1, 1)
    return out.clamp(0.0, 1.0) if clip else out


def random_noise(
    x: torch.Tensor,
    generator: torch.Generator,
    gaussian_prob: float = 0.5,
    sigma_range: tuple[float, float] = (1.0, 30.0),
    poisson_scale_range: tuple[float, float] = (0.05, 3.0),
    gray_prob: float = 0.4,
) -> torch.Tensor:
    """Gaussian noise (prob `gaussian_prob`, sigma ~ U(sigma_range)/255 per image) or Poisson
    noise (scale ~ U(poisson_scale_range) per image); grey noise per image with `gray_prob`.
    The Gaussian/Poisson choice is one per batch, as in Real-ESRGAN. Returns (B, 3, H, W).
    """
    b = x.shape[0]
    use_gaussian = _bernoulli(generator, gaussian_prob)
    lo, hi = sigma_range if use_gaussian else poisson_scale_range
    amount = _uniform_batch(generator, b, lo, hi)
    gray = _uniform_batch(generator, b, 0.0, 1.0) < gray_prob
    if use_gaussian:
        return add_gaussian_noise(x, amount / 255.0, gray, generator)
    return add_poisson_noise(x, amount, gray, generator)


def jpeg(x: torch.Tensor, quality: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Real JPEG compression: encode and decode each image with PIL (libjpeg).

    x: (B, 3, H, W), clipped to [0, 1] and rounded to 8 bits first (as a saved file is);
    quality: (B,) integers in [1, 95] (PIL's default 4:2:0 chroma subsampling).
    Exact but NOT differentiable (no gradient flows through this step) and done per image
    on the CPU. Returns (B, 3, H, W) in [0, 1], multiples of 1/255.
    """
    quality = [round(float(q)) for q in quality]
    if len(quality) != x.shape[0]:
        raise ValueError(f"jpeg: need one quality per image, got {len(quality)} for {x.shape[0]}")
    out = []
    for img, q in zip(x, quality):
        if not 1 <= q <= 100:
            raise ValueError(f"jpeg: quality must be in [1, 100], got {q}")
        buf = io.BytesIO()
        to_pil(img).save(buf, format="JPEG", quality=q)
        buf.seek(0)
        with Image.open(buf) as dec:
            arr = np.asarray(dec.convert("RGB"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
    return torch.stack(out).to(x)


def random_jpeg(
    x: torch.Tensor, generator: torch.Generator, quality_range: tuple[float, float] = (30.0, 95.0)
) -> torch.Tensor:
    """JPEG with quality round(U(quality_range)) drawn per image."""
    quality = _uniform_batch(generator, x.shape[0], *quality_range).round().int().tolist()
    return jpeg(x, quality)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """8-bit quantisation: clamp(round(x * 255), 0, 255) / 255 (what saving a PNG does)."""
    return torch.clamp(torch.round(x * 255.0), 0, 255) / 255.0


# ---- the full pipeline -------------------------------------------------------------------

def _blur_kernels(generator: torch.Generator, cfg: DegradationConfig, b: int, second: bool) -> torch.Tensor:
    """(B, pad_to, pad_to): one random blur kernel per image for the first or second pass."""
    suffix = "2" if second else ""
    return torch.stack([
        random_blur_kernel(
            generator,
            kernel_sizes=cfg.kernel_sizes,
            kernel_probs=getattr(cfg, "kernel_probs" + suffix),
            sigma_range=getattr(cfg, "blur_sigma" + suffix),
            betag_range=getattr(cfg, "betag_range" + suffix),
            betap_range=getattr(cfg, "betap_range" + suffix),
            sinc_prob=getattr(cfg, "sinc_prob" + suffix),
            sinc_cutoff_small=cfg.sinc_cutoff_small,
            sinc_cutoff_large=cfg.sinc_cutoff_large,
            sinc_large_from=cfg.sinc_large_from,
            pad_to=cfg.kernel_pad_to,
        )
        for _ in range(b)
    ])


def degrade(
    hr: torch.Tensor,
    cfg: DegradationConfig = DegradationConfig(),
    generator: torch.Generator | None = None,
    scale: int = 4,
) -> torch.Tensor:
    """Real-ESRGAN second-order degradation: HR (B, 3, H, W) -> LR (B, 3, H/scale, W/scale).

    Input and output in [0, 1]; the output is exactly (H/scale, W/scale) and quantised to
    8 bits. H and W must be divisible by `scale`. Deterministic for a given generator state:
    every random number is drawn from `generator` (None: a fresh, randomly seeded one).
    Per image: blur kernels, noise strength, grey-noise flag, JPEG quality. Per batch (as in
    Real-ESRGAN, because a batch must keep one size): resize factor and mode, Gaussian vs
    Poisson, whether the second blur runs, the final order. Not differentiable (JPEG).
    """
    if hr.ndim != 4 or hr.shape[1] != 3 or not hr.is_floating_point():
        raise ValueError(
            f"degrade: hr must be a float tensor (B, 3, H, W) in [0, 1], got "
            f"{tuple(hr.shape)} {hr.dtype}"
        )
    b, _, h_hr, w_hr = hr.shape
    if scale < 1 or h_hr % scale or w_hr % scale:
        raise ValueError(
            f"degrade: HR size {h_hr}x{w_hr} must be divisible by scale={scale}; crop the HR "
            f"image (e.g. to {h_hr // scale * scale}x{w_hr // scale * scale}) first"
        )
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # OS entropy, not the global RNG
    stages = set(cfg.stages)
    h, w = h_hr // scale, w_hr // scale  # final LR size
    out = hr

    # ---- 1. first degradation pass: blur -> resize -> noise -> JPEG ----
    if "blur1" in stages and _bernoulli(generator, cfg.blur_prob):
        out = filter2d(out, _blur_kernels(generator, cfg, b, second=False))
    if "resize1" in stages:
        out = random_resize(out, generator, cfg.resize_probs, cfg.resize_range, cfg.resize_modes)
    if "noise1" in stages:
        out = random_noise(out, generator, cfg.gaussian_noise_prob, cfg.noise_range,
                           cfg.poisson_scale_range, cfg.gray_noise_prob)
    if "jpeg1" in stages:
        out = random_jpeg(out.clamp(0, 1), generator, cfg.jpeg_range)

    # ---- 2. second pass: blur (p=0.8) -> resize (relative to the LR size) -> noise ----
    if "blur2" in stages and _bernoulli(generator, cfg.blur_prob2):
        out = filter2d(out, _blur_kernels(generator, cfg, b, second=True))
    if "resize2" in stages:
        out = random_resize(out, generator, cfg.resize_probs2, cfg.resize_range2,
                            cfg.resize_modes, base_size=(h, w))
    if "noise2" in stages:
        out = random_noise(out, generator, cfg.gaussian_noise_prob2, cfg.noise_range2,
                           cfg.poisson_scale_range2, cfg.gray_noise_prob2)

    # ---- 3. final stage: {resize to (h, w) + sinc, JPEG} in random order ----
    # The sinc filter models ringing/overshoot; doing it before or after JPEG covers both
    # "sharpened then compressed" and "compressed then resized" real images.
    if "final_sinc" in stages and _bernoulli(generator, cfg.final_sinc_prob):
        sinc = torch.stack([
            random_sinc_kernel(generator, cfg.kernel_sizes, cfg.final_sinc_cutoff, cfg.kernel_pad_to)
            for _ in range(b)
        ])
    else:
        sinc = None  # the delta kernel: filtering with it is the identity, so skip it
    jpeg_first = _bernoulli(generator, cfg.final_jpeg_first_prob)
    mode = _choice(generator, list(cfg.resize_modes))
    if jpeg_first and "final_jpeg" in stages:
        out = random_jpeg(out.clamp(0, 1), generator, cfg.final_jpeg_range)
    out = resize(out, (h, w), mode)
    if sinc is not None:
        out = filter2d(out, sinc)
    if not jpeg_first and "final_jpeg" in stages:
        out = random_jpeg(out.clamp(0, 1), generator, cfg.final_jpeg_range)

    # ---- 4. quantise to 8 bits, as a saved LR file would be ----
    return quantize(out)


def plain_degrade(hr: torch.Tensor, sigma: float | torch.Tensor, scale: int = 4) -> torch.Tensor:
    """The plain LR kind: HR (B, 3, H, W) -> isotropic Gaussian blur of std sigma HR px (one value, or one
    per image) -> bicubic downscale by `scale` -> 8 bits. No noise, no JPEG: the mild end of the
    degradations, and the second LR kind of the mini backbone's evaluation (sigma 1.2)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(hr.shape[0])
    blurred = filter2d(hr, torch.stack([gaussian_family_kernel(21, float(s), float(s)) for s in sigma]))
    h, w = hr.shape[-2:]
    return quantize(resize(blurred, (h // scale, w // scale), "bicubic"))


# =====================================================================================
# 3. Datasets
# =====================================================================================

def degrade_each(hr: torch.Tensor, cfg: DegradationConfig, seed: int) -> torch.Tensor:
    """`degrade` of each image i of a batch with its own generator, seeded item_seed(seed, 0, i): any subset of a
    fixed evaluation set reproduces exactly. hr (B, 3, H, W) -> (B, 3, H/4, W/4)."""
    return torch.cat([degrade(hr[i:i + 1], cfg, torch.Generator().manual_seed(item_seed(seed, 0, i)))
                      for i in range(len(hr))])


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for (seed, epoch, index), stable across processes and machines.

    A hash (not seed + index) so neighbouring items/epochs get unrelated random streams.
    """
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _check_crop(crop_size: int | None, scale: int, arg: str = "crop_size") -> None:
    if crop_size is not None and (crop_size <= 0 or crop_size % scale):
        raise ValueError(f"{arg}={crop_size} must be a positive multiple of scale={scale}")


def _format_names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown


def jsonl_objects(path: Path, errors: list[str]):
    """Yield (where, object) for every line of a JSONL file that holds a JSON object; `where` is FILE:LINE.

    Blank lines are skipped; a line that is not JSON, or not an object, is appended to `errors` (with its
    FILE:LINE) and skipped, so a caller can report every bad line of a file at once.
    """
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            errors.append(f"{where}: not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(obj, dict):
            errors.append(f"{where}: expected a JSON object, got {type(obj).__name__}")
            continue
        yield where, obj


def check_images(paths: Sequence[Path], folder: Path, size_problem: Callable[[Path, int, int], str | None],
                 decode: bool = False, advice: str = "remove them") -> int:
    """Check that every file reads and has a usable size; raise ONE ValueError listing every bad file.

    Reads headers only unless `decode` (then truncated files are caught too). `size_problem(path, w, h)`
    returns a message for an unusable size, or None. Returns the number of files checked.
    """
    problems = []
    for path in paths:
        try:
            if decode:
                _, h, w = load_image(path).shape
            else:
                w, h = _image_size(path)
        except ImageReadError as err:
            problems.append(str(err))
            continue
        problem = size_problem(path, w, h)
        if problem:
            problems.append(problem)
    if problems:
        raise ValueError(
            f"{len(problems)} of {len(paths)} images in {folder} cannot be used "
            f"({advice}):\n  " + "\n  ".join(problems)
        )
    return len(paths)


class HRFolderDataset(torch.utils.data.Dataset):
    """HR images -> (random crop, flip) -> Real-ESRGAN degradation on the fly (a `plain_fraction` of the
    items: `plain_degrade` with sigma ~ U(plain_sigma) instead).

    Item: {"lr": (3, crop/scale, crop/scale), "hr": (3, crop, crop), "name": file stem}.
    crop_size=None uses the whole image, trimmed at the bottom/right to a multiple of
    `scale` (at most scale-1 rows/columns are dropped).
    Reproducible: item i at epoch e draws its crop, flip and degradation from a generator
    seeded with item_seed(seed, e, i). Call `set_epoch(e)` before each epoch (in the main
    process; with DataLoader(persistent_workers=True) workers keep the old epoch).
    An image smaller than the crop raises ValueError naming it; `check()` lists them all.
    """

    def __init__(
        self,
        folder: str | Path,
        crop_size: int | None = 512,
        scale: int = 4,
        flip: bool = True,
        seed: int = 0,
        degradation: DegradationConfig = DegradationConfig(),
        plain_fraction: float = 0.0,
        plain_sigma: tuple[float, float] = (0.6, 1.8),
    ) -> None:
        _check_crop(crop_size, scale)
        if not 0.0 <= plain_fraction <= 1.0:
            raise ValueError(f"plain_fraction={plain_fraction} must lie in [0, 1]")
        self.folder = Path(folder)
        self.paths = list_images(self.folder)
        self.crop_size, self.scale, self.flip, self.seed = crop_size, scale, flip, seed
        self.degradation = degradation
        self.plain_fraction, self.plain_sigma = plain_fraction, plain_sigma
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops/degradations `__getitem__` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def _size_problem(self, path: Path, w: int, h: int) -> str | None:
        c = self.crop_size
        if c is not None and (w < c or h < c):
            return f"{path}: image is {w}x{h} px, smaller than crop_size={c}"
        if c is None and (w < self.scale or h < self.scale):
            return f"{path}: image is {w}x{h} px, smaller than scale={self.scale}"
        return None

    def check(self, decode: bool = False) -> int:
        """Validate every file up front; raise ONE ValueError listing all bad files.

        Reads headers only (fast) unless `decode=True`, which decodes every file fully
        (catches truncated files too). Returns the number of files checked.
        """
        return check_images(self.paths, self.folder, self._size_problem, decode, "remove them or lower crop_size")

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        img = load_image(path)  # (3, H, W); ImageReadError names the path
        _, h, w = img.shape
        problem = self._size_problem(path, w, h)
        if problem:
            raise ValueError(problem + " (remove it or lower crop_size; dataset.check() lists all)")
        # 1. random crop (or trim to a multiple of scale)
        if self.crop_size is None:
            hr = img[:, : h // self.scale * self.scale, : w // self.scale * self.scale]
        else:
            c = self.crop_size
            top = int(torch.randint(0, h - c + 1, (), generator=g))
            left = int(torch.randint(0, w - c + 1, (), generator=g))
            hr = img[:, top: top + c, left: left + c]
        # 2. horizontal flip with probability 1/2
        if self.flip and _bernoulli(g, 0.5):
            hr = hr.flip(-1)
        hr = hr.contiguous()
        # 3. degrade on the fly: (1, 3, H, W) -> (1, 3, H/scale, W/scale); with plain_fraction > 0 that share
        #    of items gets the plain kind (blur + bicubic) instead (no extra random draw when it is 0)
        if self.plain_fraction > 0 and _bernoulli(g, self.plain_fraction):
            lr = plain_degrade(hr[None], _uniform(g, *self.plain_sigma), self.scale)[0]
        else:
            lr = degrade(hr[None], self.degradation, g, self.scale)[0]
        return {"lr": lr, "hr": hr, "name": path.stem}


class PairedFolderDataset(torch.utils.data.Dataset):
    """LR and HR folders paired by file STEM (never by sorted position).

    Item: {"lr": (3, h, w), "hr": (3, scale*h, scale*w), "name": stem}.
    `lr_suffix` / `hr_suffix` are removed from the end of the stems before matching, for
    layouts like RealSR's "Canon_001_LR4.png" / "Canon_001_HR.png" (lr_suffix="_LR4",
    hr_suffix="_HR"). Unmatched stems raise ValueError listing them on each side.
    crop_size (HR pixels, multiple of scale) takes an aligned random crop: LR crop
    crop_size/scale at (top, left), HR crop at (scale*top, scale*left). Optional flip.
    The HR size must be exactly scale x the LR size (ValueError naming the pair).
    """

    def __init__(
        self,
        lr_folder: str | Path,
        hr_folder: str | Path,
        crop_size: int | None = None,
        scale: int = 4,
        flip: bool = False,
        seed: int = 0,
        lr_suffix: str = "",
        hr_suffix: str = "",
    ) -> None:
        _check_crop(crop_size, scale)
        self.lr_folder, self.hr_folder = Path(lr_folder), Path(hr_folder)
        self.crop_size, self.scale, self.flip, self.seed = crop_size, scale, flip, seed
        self.epoch = 0
        lr = self._by_key(list_images(self.lr_folder), lr_suffix, self.lr_folder)
        hr = self._by_key(list_images(self.hr_folder), hr_suffix, self.hr_folder)
        only_lr = sorted(set(lr) - set(hr))
        only_hr = sorted(set(hr) - set(lr))
        if only_lr or only_hr:
            raise ValueError(
                f"LR folder {self.lr_folder} and HR folder {self.hr_folder} do not match by "
                f"file name (stem{', suffixes removed' if lr_suffix or hr_suffix else ''}): "
                f"{len(only_lr)} only in LR: [{_format_names(only_lr)}]; "
                f"{len(only_hr)} only in HR: [{_format_names(only_hr)}]. Rename or remove "
                "them, or set lr_suffix/hr_suffix."
            )
        self.names = sorted(lr)
        self.pairs = [(lr[k], hr[k]) for k in self.names]

    @staticmethod
    def _by_key(paths: list[Path], suffix: str, folder: Path) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for p in paths:
            key = p.stem[: -len(suffix)] if suffix and p.stem.endswith(suffix) else p.stem
            if key in out:
                raise ValueError(
                    f"two files in {folder} share the name {key!r}: {out[key].name} and "
                    f"{p.name}; keep one"
                )
            out[key] = p
        return out

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops/flips `__getitem__` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def _pair_problem(self, i: int, lr_wh: tuple[int, int], hr_wh: tuple[int, int]) -> str | None:
        (lw, lh), (hw, hh) = lr_wh, hr_wh
        lr_path, hr_path = self.pairs[i]
        if (hw, hh) != (lw * self.scale, lh * self.scale):
            return (
                f"pair {self.names[i]!r}: HR {hr_path} is {hw}x{hh} px but LR {lr_path} is "
                f"{lw}x{lh} px; HR must be scale={self.scale} x LR = "
                f"{lw * self.scale}x{lh * self.scale}"
            )
        c = self.crop_size
        if c is not None and (hw < c or hh < c):
            return f"pair {self.names[i]!r}: HR {hr_path} is {hw}x{hh} px, smaller than crop_size={c}"
        return None

    def check(self) -> int:
        """Validate all pairs from file headers; raise ONE ValueError listing every bad pair."""
        problems = []
        for i, (lr_path, hr_path) in enumerate(self.pairs):
            try:
                problem = self._pair_problem(i, _image_size(lr_path), _image_size(hr_path))
            except ImageReadError as err:
                problem = str(err)
            if problem:
                problems.append(problem)
        if problems:
            raise ValueError(
                f"{len(problems)} of {len(self.pairs)} pairs cannot be used:\n  "
                + "\n  ".join(problems)
            )
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        lr_path, hr_path = self.pairs[index]
        lr, hr = load_image(lr_path), load_image(hr_path)
        problem = self._pair_problem(
            index, (lr.shape[2], lr.shape[1]), (hr.shape[2], hr.shape[1])
        )
        if problem:
            raise ValueError(problem)
        g = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        if self.crop_size is not None:
            c, s = self.crop_size // self.scale, self.scale  # LR crop size
            top = int(torch.randint(0, lr.shape[1] - c + 1, (), generator=g))
            left = int(torch.randint(0, lr.shape[2] - c + 1, (), generator=g))
            lr = lr[:, top: top + c, left: left + c]
            hr = hr[:, s * top: s * (top + c), s * left: s * (left + c)]
        if self.flip and _bernoulli(g, 0.5):
            lr, hr = lr.flip(-1), hr.flip(-1)
        return {"lr": lr.contiguous(), "hr": hr.contiguous(), "name": self.names[index]}


class LRFolderDataset(torch.utils.data.Dataset):
    """Unpaired LR images (reference-free RL, inference). Item: {"lr": (3, h, w), "name": stem}."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.paths = list_images(self.folder)

    def __len__(self) -> int:
        return len(self.paths)

    def check(self, min_side: int = 1, decode: bool = False) -> int:
        """Raise ONE ValueError listing every unreadable file or image with a side below `min_side`."""
        def size_problem(path: Path, w: int, h: int) -> str | None:
            return f"{path}: image is {w}x{h} px, smaller than {min_side} px on a side" if min(w, h) < min_side \
                else None

        return check_images(self.paths, self.folder, size_problem, decode, "remove or re-export them")

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        return {"lr": load_image(path), "name": path.stem}


def collate(items: list[dict]) -> dict:
    """Batch dataset items: tensors stacked to (B, ...), other values (names) kept as lists.

    All items must have the same tensor sizes; otherwise ValueError naming the items (use
    batch_size=1 for images of mixed sizes, or set crop_size).
    """
    if not items:
        raise ValueError("collate: empty list of items")
    batch: dict = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            shapes = [tuple(v.shape) for v in values]
            if len(set(shapes)) > 1:
                names = [str(item.get("name", i)) for i, item in enumerate(items)]
                listing = ", ".join(f"{n}: {s}" for n, s in zip(names, shapes))
                raise ValueError(
                    f"collate: {key!r} tensors differ in size ({listing}); use batch_size=1 "
                    "or crop to one size (crop_size)"
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


# =====================================================================================
# Command line: synthesise LR images from an HR folder
# =====================================================================================

def main(argv: Sequence[str] | None = None) -> int:
    """Write Real-ESRGAN-degraded LR PNGs for every image of an HR folder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hr-folder", required=True, help="folder of clean HR images")
    parser.add_argument("--out-folder", required=True, help="where the LR PNGs are written")
    parser.add_argument("--scale", type=int, default=4, help="downscaling factor")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="random HR crop size (default: whole image, trimmed to a multiple of scale)")
    parser.add_argument("--seed", type=int, default=0, help="seed; item i uses item_seed(seed, 0, i)")
    parser.add_argument("--save-hr", action="store_true",
                        help="also save the HR crops; then LR goes to OUT/lr and HR to OUT/hr")
    args = parser.parse_args(argv)

    dataset = HRFolderDataset(args.hr_folder, crop_size=args.crop_size, scale=args.scale,
                              flip=False, seed=args.seed)
    dataset.check()  # list every unusable file before spending time on the others
    out = Path(args.out_folder)
    lr_dir, hr_dir = (out / "lr", out / "hr") if args.save_hr else (out, None)
    for i in range(len(dataset)):
        item = dataset[i]
        save_image(item["lr"], lr_dir / f"{item['name']}.png")
        if hr_dir is not None:
            save_image(item["hr"], hr_dir / f"{item['name']}.png")
    print(f"wrote {len(dataset)} LR images (x{args.scale}) to {lr_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
