"""Tests of evaluate.py on synthetic SR/HR folders (no weights needed: PSNR, SSIM, entropy)."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import load_image
from evaluation import evaluate
from evaluation.evaluate import DEFAULT_METRICS, evaluate_folders, markdown_table, pair_by_stem, write_csv

ROOT = Path(__file__).resolve().parents[1]

# stem -> (H, W); sizes differ between pairs, so pairing by sorted index would fail or mismatch
SIZES = {"b_img": (48, 64), "a_img": (64, 48), "c10": (40, 40)}


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def folders(tmp_path):
    """HR = random images; SR = HR + Gaussian noise (a different level per image).

    SR has an extra "0_extra" image without HR (sorts first, so a by-index pairing would shift) and HR has
    "zz_hr_only" without SR output.
    """
    rng = np.random.default_rng(0)
    hr_dir, sr_dir = tmp_path / "hr", tmp_path / "sr"
    for i, (stem, (h, w)) in enumerate(SIZES.items()):
        hr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        sr = np.clip(hr.astype(np.float64) + rng.normal(0, 5 + 10 * i, size=hr.shape), 0, 255).astype(np.uint8)
        _write(hr_dir / f"{stem}.png", hr)
        _write(sr_dir / f"{stem}.png", sr)
    _write(sr_dir / "0_extra.png", rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    _write(hr_dir / "zz_hr_only.png", rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    return sr_dir, hr_dir


def test_columns_follow_table2_order():
    assert DEFAULT_METRICS == ("PSNR", "SSIM", "LPIPS", "DISTS", "LIQE", "MUSIQ", "MANIQA", "TOPIQ")


def test_pair_by_stem_ignores_order_and_extension():
    sr = [Path("s/b.png"), Path("s/a.png"), Path("s/extra.png")]
    hr = [Path("h/a.jpg"), Path("h/only_hr.png"), Path("h/b.png")]
    pairs, sr_only, hr_only = pair_by_stem(sr, hr)
    assert pairs == [(Path("s/a.png"), Path("h/a.jpg")), (Path("s/b.png"), Path("h/b.png"))]
    assert sr_only == [Path("s/extra.png")] and hr_only == [Path("h/only_hr.png")]
    with pytest.raises(ValueError, match="'a'"):
        pair_by_stem([Path("s/a.png"), Path("s/a.jpg")], hr)


def test_psnr_ssim_match_pyiqa_and_pairing(folders):
    import pyiqa

    sr_dir, hr_dir = folders
    with pytest.warns(UserWarning, match=r"0_extra.*zz_hr_only"):
        rows, means, unavailable = evaluate_folders(sr_dir, hr_dir, metrics=("PSNR", "SSIM"))
    assert unavailable == {}
    assert [r["name"] for r in rows] == ["0_extra", "a_img", "b_img", "c10"]
    psnr = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    ssim = pyiqa.create_metric("ssim", test_y_channel=True, color_space="ycbcr", device="cpu")
    by_name = {r["name"]: r for r in rows}
    for stem in SIZES:
        sr = load_image(sr_dir / f"{stem}.png")[None]
        hr = load_image(hr_dir / f"{stem}.png")[None]
        assert by_name[stem]["PSNR"] == pytest.approx(psnr(sr, hr).item(), rel=1e-6)
        assert by_name[stem]["SSIM"] == pytest.approx(ssim(sr, hr).item(), rel=1e-6)
    # more noise -> lower PSNR (noise 5, 15, 25 for b_img, a_img, c10): the pairs are the right ones
    assert by_name["b_img"]["PSNR"] > by_name["a_img"]["PSNR"] > by_name["c10"]["PSNR"]
    # the SR image without HR has no FR value, and the mean is over the 3 pairs
    assert math.isnan(by_name["0_extra"]["PSNR"])
    assert means["PSNR"] == pytest.approx(sum(by_name[s]["PSNR"] for s in SIZES) / 3)


def test_no_reference_path_and_fr_without_hr(folders):
    import pyiqa

    sr_dir, _ = folders
    rows, means, unavailable = evaluate_folders(sr_dir, None, metrics=("PSNR", "entropy"))
    assert "no HR folder" in unavailable["PSNR"] and "PSNR" not in means
    entropy = pyiqa.create_metric("entropy", device="cpu")
    for row in rows:
        expected = entropy(load_image(sr_dir / f"{row['name']}.png")[None]).item()
        assert row["entropy"] == pytest.approx(expected, rel=1e-6)
        assert math.isnan(row["PSNR"])
    assert means["entropy"] == pytest.approx(np.mean([r["entropy"] for r in rows]))


def test_size_mismatch_names_the_pair(tmp_path):
    _write(tmp_path / "sr" / "x.png", np.zeros((32, 32, 3), np.uint8))
    _write(tmp_path / "hr" / "x.png", np.zeros((32, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"x\.png.*x\.png"):
        evaluate_folders(tmp_path / "sr", tmp_path / "hr", metrics=("PSNR",))


def test_csv_mean_row_equals_mean_of_rows(folders, tmp_path):
    sr_dir, hr_dir = folders
    with pytest.warns(UserWarning):
        rows, means, _ = evaluate_folders(sr_dir, hr_dir, metrics=("PSNR", "SSIM"))
    path = write_csv(tmp_path / "out" / "metrics.csv", rows, means, ("PSNR", "SSIM"))
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == ["0_extra", "a_img", "b_img", "c10", "MEAN"]
    assert table[0]["PSNR"] == ""  # no HR for 0_extra: empty cell, not a number
    for column in ("PSNR", "SSIM"):
        values = [float(r[column]) for r in table[:-1] if r[column] != ""]
        assert len(values) == 3
        assert float(table[-1][column]) == pytest.approx(np.mean(values), abs=1e-6)


def test_markdown_table_layout():
    text = markdown_table({"PSNR": 22.3612, "SSIM": 0.64812, "LPIPS": 0.30951}, {"DISTS": "URLError: offline"},
                          metrics=("PSNR", "SSIM", "LPIPS", "DISTS"), label="OARS")  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "| Method | PSNR↑ | SSIM↑ | LPIPS↓ | DISTS↓ |"
    assert lines[2] == "| OARS | 22.36 | 0.6481 | 0.3095 | n/a |"
    assert "- DISTS: unavailable (URLError: offline)" in text
    assert "Q-Insight" in text


@pytest.mark.slow
def test_missing_weights_reported_not_crash(folders, tmp_path):
    """Offline with an empty weight cache: MANIQA and LPIPS are unavailable with a reason, PSNR/SSIM still
    computed; run as a subprocess because pyiqa fixes its cache path (TORCH_HOME) when imported."""
    sr_dir, hr_dir = folders
    env = dict(os.environ, HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch_home"), HF_HOME=str(tmp_path / "hf"))
    out_csv = tmp_path / "m.csv"
    cmd = [sys.executable, "-m", "evaluation.evaluate", "--sr-dir", str(sr_dir), "--hr-dir", str(hr_dir), "--csv", str(out_csv),
           "--metrics", "PSNR", "SSIM", "LPIPS", "MANIQA", "--device", "cpu", "--label", "test"]  # fmt: skip
    proc = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "| Method | PSNR↑ | SSIM↑ | LPIPS↓ | MANIQA↑ |" in lines
    row = next(line for line in lines if line.startswith("| test |")).split("|")
    assert row[2].strip() != "n/a" and row[3].strip() != "n/a"  # PSNR, SSIM computed
    assert row[4].strip() == "n/a" and row[5].strip() == "n/a"  # LPIPS, MANIQA unavailable
    maniqa_note = next(line for line in lines if line.startswith("- MANIQA: unavailable ("))
    assert "Error" in maniqa_note and "weights missing" in maniqa_note
    assert any(line.startswith("- LPIPS: unavailable (") for line in lines)
    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert table[-1]["name"] == "MEAN" and table[-1]["PSNR"] != "" and table[-1]["MANIQA"] == ""


def test_short_reason_is_one_short_line():
    reason = evaluate.short_reason(OSError("line one\n" + "x" * 500))
    assert "\n" not in reason and reason.startswith("OSError: line one x") and "weights" in reason
    assert len(reason) < 400


def test_detail_energy_flat_detail_and_lr_consistency_by_hand():
    grey = torch.full((1, 3, 8, 8), 0.5)
    stripes = grey.clone()
    stripes[..., 1::2] = 0.0  # columns 0.5, 0, 0.5, ...: every horizontal step is 0.5 x 255 levels
    assert float(evaluate.detail_energy(grey)) == 0.0
    assert float(evaluate.detail_energy(stripes)) == pytest.approx(127.5)  # + 0 vertically
    # an HR that is flat everywhere: the speckle of the stripes is their whole HF; of the grey SR, 0
    assert float(evaluate.flat_detail(stripes, grey)) == pytest.approx(127.5)
    assert float(evaluate.flat_detail(grey, grey)) == 0.0
    # a textured HR has no flat pixel: nothing is counted
    assert not evaluate.flat_mask(stripes).any() and float(evaluate.flat_detail(stripes, stripes)) == 0.0
    # pooled over a set, each flat pair counts once: the textured second HR adds no pair, so the set's speckle
    # is the first image's 127.5, where the per-image mean halves it
    srs, hrs = torch.cat([stripes, stripes]), torch.cat([grey, stripes])
    assert evaluate.flat_detail(srs, hrs).tolist() == pytest.approx([127.5, 0.0])
    assert float(evaluate.flat_detail_pooled(srs, hrs)) == pytest.approx(127.5)
    # two fully flat HRs (the same pair counts): pooled = the mean of the two images' values
    assert float(evaluate.flat_detail_pooled(torch.cat([stripes, grey]), torch.cat([grey, grey]))) == pytest.approx(63.75)
    half = torch.cat([grey[..., :4], stripes[..., 4:]], -1)  # flat left half, far from the texture
    mask = evaluate.flat_mask(half)
    assert mask[..., :2].all() and not mask[..., 5:].any()
    # the LR explained to 0.1 per pixel: MSE 0.01 -> 20 dB
    sr, lr = torch.full((1, 3, 32, 32), 0.5), torch.full((1, 3, 8, 8), 0.6)
    assert float(evaluate.lr_consistency(sr, lr)) == pytest.approx(20.0, abs=1e-4)


def test_spectral_peak_finds_a_periodic_pattern_and_not_a_photographs_edges():
    from mini import photos
    from mini import reward_checks as RC

    # hand-worked: a cosine of 16 cycles across a 64 px image is two isolated frequencies; its neighbours hold
    # nothing, so the score is the line's magnitude over the 8-bit noise floor
    x = torch.arange(64).float()
    wave = (0.5 + 0.2 * torch.cos(2 * torch.pi * 16 * x / 64))[None, None, None].expand(1, 3, 64, 64)
    expected = 0.2 * 64 * 64 / 2 / ((64 * 64 / 12) ** 0.5 / 255)
    assert float(evaluate.spectral_peak(wave)) == pytest.approx(expected, rel=1e-3)
    hr = photos.random_crops(photos.HELDOUT, 8, 64, torch.Generator().manual_seed(5))
    photo, grid = evaluate.spectral_peak(hr), evaluate.spectral_peak(RC.pattern(hr, amplitude=0.03))
    blurred = evaluate.spectral_peak(RC.blur(hr))
    assert float(photo.max()) < 6 and float(blurred.max()) < 6  # edges and smoothness are not peaks
    assert float(grid.min()) > float(photo.max()) and float(grid.mean()) > 3 * float(photo.mean())  # a faint grid is
