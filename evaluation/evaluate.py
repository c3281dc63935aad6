"""SR evaluation table of the paper's Table 2 protocol (§5.1): full-reference and no-reference metrics.

Scores a folder of SR outputs, against a folder of HR ground truths (paired by file STEM, e.g.
`sr/x12.png` <-> `hr/x12.jpg`, never by sorted position) and/or without reference. Columns, in the
order of Table 2:

    PSNR  SSIM  LPIPS  DISTS  |  LIQE  MUSIQ  MANIQA  TOPIQ          (full-reference | no-reference)

all computed with pyiqa:
    PSNR, SSIM  on the Y channel of YCbCr, the SR-paper convention:
                create_metric('psnr', test_y_channel=True, color_space='ycbcr') (pyiqa's own default Y is
                YIQ), no border crop;
    LPIPS       'lpips' (AlexNet);   DISTS 'dists';
    LIQE        'liqe';   MUSIQ 'musiq' (KonIQ);   TOPIQ 'topiq_nr' (KonIQ);
    MANIQA      'maniqa-pipal', the variant used by the public evaluation scripts of the OSEDiff/SeeSR
                line of papers that Table 2 compares against (pass 'maniqa' for the KonIQ model).
Q-Insight (a Table 2 column) is omitted: it is an MLLM scorer that pyiqa does not provide.

Upper-case names are the table columns above; any other name is passed to pyiqa.create_metric as is
(e.g. `--metrics PSNR maniqa clipiqa`).

Weights: everything except PSNR/SSIM downloads weights on first use (pyiqa's own files to
$TORCH_HOME/hub/pyiqa, torchvision backbones to $TORCH_HOME/hub/checkpoints, some from the Hugging Face
hub). pyiqa fixes the cache path when it is imported, so set TORCH_HOME before running. On a machine
without network the command notices at once (a 2-second check) and works offline, instead of retrying hub
downloads for about a minute per metric (--offline forces it). A metric that cannot be created is reported
as unavailable WITH the reason and the rest of the table is still produced; a run that evaluates nothing
(no SR name matches an HR name, or no metric could be computed) exits with status 2 and says why.

Commands:
    python -m evaluation.evaluate --sr-dir out/sr --hr-dir data/hr --csv out/metrics.csv   # FR + NR table
    python -m evaluation.evaluate --sr-dir out/realset80 --csv out/realset80.csv          # NR only (no HR)
    python -m evaluation.evaluate --sr-dir out/sr --hr-dir data/hr --metrics PSNR SSIM    # weight-free subset

Writes: the CSV (one row per image, name + one column per metric, a final MEAN row) and prints the
markdown table of the means.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from common.data import filter2d, gaussian_family_kernel, list_images, load_image, quantize
from common.training import RunError, renamed_flags, run_script

# bitsandbytes (pulled in by diffusers, transformers and pyiqa) logs a warning about an optional 4-bit CPU
# kernel when it is imported; nothing here uses 4-bit weights.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# Table 2 column -> (pyiqa name, create_metric kwargs, needs a reference, lower is better, decimals)
METRIC_SPECS: dict[str, tuple[str, dict, bool, bool, int]] = {
    "PSNR": ("psnr", {"test_y_channel": True, "color_space": "ycbcr"}, True, False, 2),
    "SSIM": ("ssim", {"test_y_channel": True, "color_space": "ycbcr"}, True, False, 4),
    "LPIPS": ("lpips", {}, True, True, 4),
    "DISTS": ("dists", {}, True, True, 4),
    "LIQE": ("liqe", {}, False, False, 4),
    "MUSIQ": ("musiq", {}, False, False, 2),
    "MANIQA": ("maniqa-pipal", {}, False, False, 4),
    "TOPIQ": ("topiq_nr", {}, False, False, 4),
}
DEFAULT_METRICS: tuple[str, ...] = tuple(METRIC_SPECS)  # Table 2 order without Q-Insight
NOT_IN_PYIQA = {"Q-Insight": "Q-Insight is an MLLM-based scorer that pyiqa does not provide (omitted)"}


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) -> (N,1,H,W) luma Y = 0.299 R + 0.587 G + 0.114 B (BT.601)."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
    return (images.float() * weights).sum(1, keepdim=True)


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Weights-free sharpness: mean gradient magnitude of the luma Y (BT.601), (N,3,H,W) in [0,1] -> (N,).

    Sobel derivatives divided by 8 (so a unit step edge gives 0.5 per pixel across it), sqrt(gx^2 + gy^2)
    averaged over the interior pixels. Blur lowers it, sharpening and noise raise it: compare it with the
    HR's value, not by itself.
    """
    y = _luma(images)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=images.device) / 8
    gx = torch.nn.functional.conv2d(y, sobel.view(1, 1, 3, 3))
    gy = torch.nn.functional.conv2d(y, sobel.t().reshape(1, 1, 3, 3))
    return (gx ** 2 + gy ** 2).sqrt().mean((1, 2, 3))


def _neighbour_steps(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|horizontal| and |vertical| neighbour differences of the luma Y in 0-255 levels, (N,3,H,W) in [0,1] ->
    (N,1,H,W-1), (N,1,H-1,W)."""
    y = _luma(images.clamp(0, 1)) * 255
    return (y[..., :, 1:] - y[..., :, :-1]).abs(), (y[..., 1:, :] - y[..., :-1, :]).abs()


def detail_energy(images: torch.Tensor) -> torch.Tensor:
    """High-frequency energy HF (N,): mean |horizontal neighbour difference| + mean |vertical neighbour
    difference| of the luma Y in 0-255 levels, (N,3,H,W) in [0,1]. Compared with the HR's and bicubic's HF it
    tells real detail (between the two) from over-sharpening or speckle (above the HR's)."""
    dx, dy = _neighbour_steps(images)
    return dx.mean((1, 2, 3)) + dy.mean((1, 2, 3))


def local_std(images: torch.Tensor, window: int = 5) -> torch.Tensor:
    """(N,3,H,W) in [0,1] -> (N,1,H,W): standard deviation of the luma Y (0-255 levels) in the window x window
    neighbourhood of each pixel (edges replicated). Low where the image is flat."""
    y = torch.nn.functional.pad(_luma(images.clamp(0, 1)) * 255, (window // 2,) * 4, mode="replicate")
    mean = torch.nn.functional.avg_pool2d(y, window, 1)
    var = torch.nn.functional.avg_pool2d(y * y, window, 1) - mean * mean
    return var.clamp_min(0).sqrt()


def flat_mask(hr: torch.Tensor, max_std: float = 2.0, window: int = 5) -> torch.Tensor:
    """(N,1,H,W) bool: where the HR is flat, i.e. its `local_std` is below `max_std` levels: sky, walls, skin,
    still water."""
    return local_std(hr, window) < max_std


def _flat_step_sums(sr: torch.Tensor, hr: torch.Tensor, max_std: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per direction (horizontal, vertical): the sum of the SR's |neighbour differences| of Y over the pixel
    pairs that are both flat in the HR (`flat_mask`), and the number of such pairs, each (N,)."""
    dx, dy = _neighbour_steps(sr)
    flat = flat_mask(hr, max_std)
    pairs = ((dx, flat[..., :, 1:] & flat[..., :, :-1]), (dy, flat[..., 1:, :] & flat[..., :-1, :]))
    return [((step * both).sum((1, 2, 3)), both.sum((1, 2, 3)).float()) for step, both in pairs]


def flat_detail(sr: torch.Tensor, hr: torch.Tensor, max_std: float = 2.0) -> torch.Tensor:
    """Speckle per image (N,): `detail_energy` of the SR counted only between neighbouring pixels that are both
    flat in the HR (`flat_mask`). The HR's own value is the reference (a few levels of grain); an SR that paints
    texture onto flat regions scores far above it. 0 where the HR has no flat pixel pair. A crop whose few flat
    pixels are islands between textures weighs as much here as a crop of sky: `flat_detail_pooled` does not."""
    return sum(total / count.clamp_min(1) for total, count in _flat_step_sums(sr, hr, max_std))


def flat_detail_pooled(sr: torch.Tensor, hr: torch.Tensor, max_std: float = 2.0) -> torch.Tensor:
    """Speckle of a set (a scalar): like `flat_detail`, but every flat pixel pair of the whole set counts once,
    wherever it lies, so the set's flat REGIONS (sky, skin, walls) decide it, not a crop with a handful of flat
    pixels between textures (whose HR value alone ranges 0.8-3.3 levels on the mini held-out crops)."""
    return sum(total.sum() / count.sum().clamp_min(1) for total, count in _flat_step_sums(sr, hr, max_std))


def spectral_peak(images: torch.Tensor, exclude: int = 2, window: int = 5) -> torch.Tensor:
    """Periodic-artefact score (N,) of (N,3,H,W) images: the largest magnitude of the luma's 2-D spectrum over
    the mean magnitude of its window x window neighbours (the spectrum wraps around), frequencies with |k| <=
    `exclude` cycles per image in both axes (the picture's layout) left out. A repeated pattern (a grid, a
    checkerboard, a seam every tile) puts its energy into isolated frequencies and scores far above a
    photograph, whose edges spread theirs along lines and whose texture fills whole regions of the spectrum;
    compare a policy's value with its SFT's."""
    y = _luma(images.float())[:, :1]
    mag = torch.fft.fft2(y - y.mean((-2, -1), keepdim=True)).abs()
    h, w = y.shape[-2:]
    pad = window // 2
    around = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(mag, (pad,) * 4, mode="circular"), window, 1)
    around = (around * window**2 - mag) / (window**2 - 1)  # the neighbours without the frequency itself
    # floored at the spectrum of 8-bit rounding noise (std 1/sqrt(12) levels), so a smooth image's empty high
    # frequencies do not turn float noise into peaks
    ratio = mag / around.clamp_min((h * w / 12) ** 0.5 / 255)
    low = ((torch.fft.fftfreq(h) * h).abs()[:, None] <= exclude) & ((torch.fft.fftfreq(w) * w).abs()[None] <= exclude)
    return ratio[:, 0].masked_fill(low, 0).flatten(1).max(1).values


def bicubic_down(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N,3,H,W) -> (N,3,*size): bicubic with antialiasing, the downscale an SR is checked against its LR with
    (`lr_consistency`; infer.back_project corrects towards it). Not clamped."""
    return torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


def lr_consistency(sr: torch.Tensor, lr: torch.Tensor, eight_bit: bool = False) -> torch.Tensor:
    """PSNR in dB (N,) between the SR downscaled to the LR's size (`bicubic_down`; `eight_bit`: quantised to 8
    bits like a saved LR) and the LR, RGB in [0,1]: does the output explain its input? A faithful 4x SR of a
    plain-blurred LR reaches 30+ dB; an SR that moved the content scores far lower whatever its sharpness."""
    down = bicubic_down(sr.float(), lr.shape[-2:]).clamp(0, 1)
    mse = ((quantize(down) if eight_bit else down) - lr.float()).pow(2).mean((1, 2, 3))
    return -10 * torch.log10(mse.clamp_min(1e-10))


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Noise standard deviation estimate (N,) in [0,1] units: Immerkaer's 3x3 mask M (zero on planes), robust
    version. For white noise of std s, Y * M has std 6 s; the MEDIAN of |Y * M| over the pixels
    (0.6745 x its std for a Gaussian) is dominated by the flat areas, so image texture raises it little."""
    mask = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], device=images.device)
    response = torch.nn.functional.conv2d(_luma(images), mask.view(1, 1, 3, 3)).abs().flatten(1)
    return response.median(dim=1).values / (0.6745 * 6)


def blockiness(images: torch.Tensor, block: int = 8) -> torch.Tensor:
    """JPEG blocking (N,): mean |step| of Y across the 8x8 block borders over the mean |step| elsewhere,
    averaged over both directions. 1 = no grid; JPEG at low quality gives 2 to 15."""
    y = _luma(images)
    ratios = []
    for d in (y[..., :, 1:] - y[..., :, :-1], (y[..., 1:, :] - y[..., :-1, :]).transpose(-1, -2)):
        border = (torch.arange(d.shape[-1], device=d.device) % block) == block - 1
        ratios.append(d.abs()[..., border].mean((1, 2, 3)) / d.abs()[..., ~border].mean((1, 2, 3)).clamp_min(1e-6))
    return (ratios[0] + ratios[1]) / 2


def texture_fidelity(sr: torch.Tensor, hr: torch.Tensor, sigmas: Sequence[float] = (0.8, 1.6),
                     c1: float = 1e-4, c2: float = 1e-4) -> torch.Tensor:
    """A weights-free analogue of DISTS as a fidelity in [0, 1] (1 = same image): (N,3,H,W) x2 -> (N,).

    DISTS compares deep features with two terms per feature map: "texture" = similarity of their global
    means and standard deviations, "structure" = their correlation. Here the feature maps are the luma Y
    and its band-pass details Y - G_sigma * Y (one per sigma), with equal weights instead of learned ones:

        l(a, b) = (2 mu_a mu_b + c1) / (mu_a^2 + mu_b^2 + c1) * (2 sd_a sd_b + c2) / (sd_a^2 + sd_b^2 + c2)
        s(a, b) = (2 cov_ab + c2) / (sd_a^2 + sd_b^2 + c2)
        F = (s(Y_sr, Y_hr) + mean over maps of l) / 2, clamped at 0

    So coarse content must match (s on Y) while detail only has to have the HR's amount (l on the bands):
    a sample that re-synthesises texture in other places keeps a high F, a blurred one loses it. SSIM
    ranks those two the other way round, which makes an SSIM-trained fidelity reward smoothing
    (README "OARS in miniature").
    """
    y_sr, y_hr = _luma(sr), _luma(hr)
    maps = [(y_sr, y_hr)]
    for sigma in sigmas:  # band-pass detail: the image minus its Gaussian blur (radius ceil(3 sigma))
        kernel = gaussian_family_kernel(2 * math.ceil(3 * sigma) + 1, sigma, sigma)
        maps.append((y_sr - filter2d(y_sr, kernel), y_hr - filter2d(y_hr, kernel)))

    def stats(a, b):
        mu_a, mu_b = a.mean((1, 2, 3)), b.mean((1, 2, 3))
        var_a, var_b = a.var((1, 2, 3), unbiased=False), b.var((1, 2, 3), unbiased=False)
        cov = ((a - mu_a.view(-1, 1, 1, 1)) * (b - mu_b.view(-1, 1, 1, 1))).mean((1, 2, 3))
        return mu_a, mu_b, var_a, var_b, cov

    texture = []
    for a, b in maps:
        mu_a, mu_b, var_a, var_b, _ = stats(a, b)
        sd_a, sd_b = var_a.sqrt(), var_b.sqrt()
        texture.append((2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
                       * (2 * sd_a * sd_b + c2) / (var_a + var_b + c2))
    _, _, var_a, var_b, cov = stats(y_sr, y_hr)
    structure = (2 * cov + c2) / (var_a + var_b + c2)
    return ((structure + torch.stack(texture).mean(0)) / 2).clamp(min=0.0)


def snb_quality(images: torch.Tensor) -> torch.Tensor:
    """A weights-free no-reference quality score in [1, 5] from Sharpness, Noise and Blocking ("SNB").

        s = log(sharpness / 0.02) - 0.5 noise_sigma / 0.01 - log(max(blockiness, 1))
        Q = 1 + 4 sigmoid(2 s)

    Fine detail raises it; noise (0.5 per 1% of noise std) and JPEG blocks lower it. Mean scores on 64x64
    crops of the training photos: clean HR 2.8, unsharp-masked HR 2.8, JPEG q8-40 of the HR 2.6, bicubic 4x
    upscales of degraded LR 2.4, blurred HR 2.4, blurred upscales 2.1, noisy HR (std 1-7%) 1.8, JPEG of
    upscales 1.6, noisy upscales 1.5.
    It stands in for the MLLM quality scorer of the paper's annotation stage 1 where no learned metric can
    be downloaded (the mini presets); it judges a 64x64 crop, not aesthetics.
    """
    s = (torch.log(sharpness(images).clamp_min(1e-6) / 0.02) - 0.5 * noise_sigma(images) / 0.01
         - torch.log(blockiness(images).clamp_min(1.0)))
    return 1 + 4 * torch.sigmoid(2 * s)


def pair_by_stem(sr_paths: Sequence[Path], hr_paths: Sequence[Path]) -> tuple[list[tuple[Path, Path]], list[Path], list[Path]]:
    """Pair SR and HR files by file stem (name without extension).

    Returns:
        pairs: [(sr, hr)] sorted by stem; sr_only: SR files without HR; hr_only: HR files without SR.
    Raises:
        ValueError if two files in one folder share a stem (e.g. a.png and a.jpg): the pairing would be
        ambiguous.
    """
    def by_stem(paths: Sequence[Path], what: str) -> dict[str, Path]:
        table: dict[str, Path] = {}
        for p in map(Path, paths):
            if p.stem in table:
                raise ValueError(f"{what} folder has two files with the stem {p.stem!r}: {table[p.stem]} and {p}; keep one")
            table[p.stem] = p
        return table

    sr, hr = by_stem(sr_paths, "SR"), by_stem(hr_paths, "HR")
    pairs = [(sr[s], hr[s]) for s in sorted(sr.keys() & hr.keys())]
    sr_only = [sr[s] for s in sorted(sr.keys() - hr.keys())]
    hr_only = [hr[s] for s in sorted(hr.keys() - sr.keys())]
    return pairs, sr_only, hr_only


def create_metric(column: str, device: str | torch.device = "cpu"):
    """The pyiqa metric of a Table 2 column ("SSIM" -> Y-channel SSIM, see METRIC_SPECS) or of any pyiqa
    name. Raises whatever pyiqa raises when the weights cannot be loaded (callers report it)."""
    import pyiqa  # imported here so that TORCH_HOME / HF_HUB_OFFLINE set by the caller take effect

    name, kwargs = METRIC_SPECS[column][:2] if column in METRIC_SPECS else (column, {})
    return pyiqa.create_metric(name, device=torch.device(device), as_loss=False, **kwargs)


def short_reason(error: BaseException, limit: int = 160) -> str:
    """One line 'Type: message', shortened, plus a hint when weights could not be fetched."""
    message = " ".join(str(error).split())
    if len(message) > limit:
        message = message[: limit - 3] + "..."
    reason = f"{type(error).__name__}: {message}"
    kind = type(error).__name__
    if isinstance(error, OSError) or any(k in kind for k in ("URLError", "EntryNotFound", "Connection", "HTTP", "Offline")):
        reason += (
            " [weights missing and not downloadable: pyiqa/torchvision files live in $TORCH_HOME/hub,"
            " Hugging Face files in $HF_HOME; fetch them once with network]"
        )
    return reason


def evaluate_folders(
    sr_dir: str | Path,
    hr_dir: str | Path | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    device: str = "cpu",
) -> tuple[list[dict[str, float | str]], dict[str, float], dict[str, str]]:
    """Score every SR image of `sr_dir`, against `hr_dir` when given.

    SR and HR are paired by file stem. SR images without an HR partner are still scored by the
    no-reference metrics (their FR cells are NaN) and HR images without an SR output are reported; both
    lists are announced with a warning. Full-reference metrics without any HR folder are unavailable.

    Args:
        sr_dir: folder of SR outputs.
        hr_dir: folder of HR ground truths (None: no-reference metrics only).
        metrics: column names (METRIC_SPECS keys, Table 2 order) or raw pyiqa metric names.
        device: torch device for the metric networks.

    Returns:
        rows: one dict per SR image, {"name": stem, metric: float (NaN = not computed)}, sorted by name.
        means: {metric: mean over the images that have a value} for the available metrics.
        unavailable: {metric: reason} for metrics that could not be created or run.

    Raises:
        FileNotFoundError / ValueError (from data.list_images) if a folder is missing or holds no image;
        ValueError if a pair differs in size or a folder has two files with the same stem.
    """

    sr_paths = list_images(sr_dir)  # raises naming the folder if it is missing or holds no image
    hr_for: dict[str, Path] = {}
    if hr_dir is not None:
        hr_paths = list_images(hr_dir)
        pairs, sr_only, hr_only = pair_by_stem(sr_paths, hr_paths)
        hr_for = {sr.stem: hr for sr, hr in pairs}
        if sr_only or hr_only:
            warnings.warn(
                f"evaluate: {len(sr_only)} SR image(s) without HR in {hr_dir} (no-reference metrics only): "
                f"{[p.name for p in sr_only]}; {len(hr_only)} HR image(s) without SR output in {sr_dir}: "
                f"{[p.name for p in hr_only]}",
                stacklevel=2,
            )
    sr_paths = sorted(sr_paths, key=lambda p: Path(p).stem)

    # 1. create the metrics; a failure (e.g. missing weights) makes the column unavailable, not a crash
    created: dict[str, object] = {}
    unavailable: dict[str, str] = {}
    for column in metrics:
        if column in NOT_IN_PYIQA:
            unavailable[column] = NOT_IN_PYIQA[column]
            continue
        try:
            metric = create_metric(column, device)
        except Exception as error:  # noqa: BLE001 - any failure is reported, the table goes on
            unavailable[column] = short_reason(error)
            continue
        if metric.metric_mode == "FR" and hr_dir is None:
            unavailable[column] = "full-reference metric: no HR folder given"
            continue
        created[column] = metric

    # 2. score image by image (sizes may differ between pairs)
    rows: list[dict[str, float | str]] = []
    for sr_path in sr_paths:
        stem = Path(sr_path).stem
        row: dict[str, float | str] = {"name": stem, **{c: math.nan for c in metrics}}
        sr = load_image(sr_path)[None].to(device)  # (1, 3, H, W) in [0, 1]
        hr = None
        if stem in hr_for:
            hr = load_image(hr_for[stem])[None].to(device)
            if hr.shape != sr.shape:
                raise ValueError(
                    f"evaluate: size mismatch for pair {sr_path} {tuple(sr.shape[-2:])} and {hr_for[stem]} "
                    f"{tuple(hr.shape[-2:])} (H, W); SR and HR must have the same size"
                )
        for column, metric in list(created.items()):
            if metric.metric_mode == "FR" and hr is None:
                continue  # no reference for this image
            try:
                with torch.no_grad():
                    value = metric(sr, hr) if metric.metric_mode == "FR" else metric(sr)
            except Exception as error:  # noqa: BLE001
                unavailable[column] = f"failed on {Path(sr_path).name}: {short_reason(error)}"
                del created[column]
                continue
            row[column] = float(torch.as_tensor(value).flatten()[0])
        rows.append(row)

    for column in unavailable:  # a metric that failed midway must not leave partial numbers behind
        for row in rows:
            row[column] = math.nan

    means: dict[str, float] = {}
    for column in metrics:
        if column in unavailable:
            continue
        values = [float(r[column]) for r in rows if not math.isnan(float(r[column]))]
        means[column] = sum(values) / len(values) if values else math.nan
    return rows, means, unavailable


def write_csv(path: str | Path, rows: Sequence[dict], means: dict[str, float], metrics: Sequence[str]) -> Path:
    """Write one row per image (name + one column per metric) and a final MEAN row.

    Empty cells = not computed (metric unavailable, or FR metric for an image without HR). Values are
    written with 6 decimals.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def cell(value) -> str:
        return "" if value is None or math.isnan(float(value)) else f"{float(value):.6f}"

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", *metrics])
        for row in rows:
            writer.writerow([row["name"], *(cell(row.get(m)) for m in metrics)])
        writer.writerow(["MEAN", *(cell(means.get(m)) for m in metrics)])
    return path


def markdown_table(
    means: dict[str, float],
    unavailable: dict[str, str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    label: str = "Method",
) -> str:
    """Markdown table of the means in Table 2 layout (arrows: higher/lower is better), with footnotes.

    Unavailable metrics show "n/a" and their reason in a footnote.
    """
    def arrow(m: str) -> str:
        return ("↓" if METRIC_SPECS[m][3] else "↑") if m in METRIC_SPECS else ""

    def fmt(m: str) -> str:
        if m in unavailable or m not in means or math.isnan(means[m]):
            return "n/a"
        return f"{means[m]:.{METRIC_SPECS[m][4] if m in METRIC_SPECS else 4}f}"

    lines = [
        "| " + " | ".join(["Method", *(m + arrow(m) for m in metrics)]) + " |",
        "|" + "---|" * (len(metrics) + 1),
        "| " + " | ".join([label, *(fmt(m) for m in metrics)]) + " |",
    ]
    notes = [f"- {m}: unavailable ({reason})" for m, reason in unavailable.items()]
    if "Q-Insight" not in metrics:
        notes.append("- Q-Insight (Table 2) omitted: not provided by pyiqa.")
    return "\n".join(lines + [""] + notes)


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """Whether the weights' host answers within `timeout` seconds (a TCP connection, nothing sent)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sr-dir", required=True, help="folder of SR outputs")
    parser.add_argument("--hr-dir", default=None, help="folder of HR ground truths (omit for no-reference only)")
    parser.add_argument("--csv", default=None, help="per-image CSV to write (with a MEAN row)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="columns or pyiqa names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--label", default="Method", help="row label of the markdown table")
    parser.add_argument("--offline", action="store_true",
                        help="no download attempts (HF_HUB_OFFLINE=1); set by itself when the hub is unreachable")
    argv = sys.argv[1:] if argv is None else list(argv)
    known = {o for action in parser._actions for o in action.option_strings}
    args = parser.parse_args(renamed_flags(argv, known))
    if args.offline or (os.environ.get("HF_HUB_OFFLINE") != "1" and not hub_reachable()):
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        rows, means, unavailable = evaluate_folders(args.sr_dir, args.hr_dir, args.metrics, args.device)
    except (FileNotFoundError, ValueError) as err:
        raise RunError(str(err)) from None
    full_reference = [m for m in means if METRIC_SPECS.get(m, (None, None, False))[2]]
    if args.hr_dir and full_reference and not any(math.isfinite(r[m]) for r in rows for m in full_reference):
        raise RunError(f"--hr-dir {args.hr_dir}: no SR image in --sr-dir {args.sr_dir} has an HR partner of the same file "
                       f"name (stem), so no full-reference metric was computed")
    if not any(math.isfinite(v) for v in means.values()):
        raise RunError(f"nothing was evaluated: every metric is unavailable ({'; '.join(unavailable.values())})")
    if args.csv:
        print(f"wrote {write_csv(args.csv, rows, means, args.metrics)} ({len(rows)} images)", file=sys.stderr)
    print(markdown_table(means, unavailable, args.metrics, args.label))
    return 0


if __name__ == "__main__":
    run_script(main)
