"""infer.py end to end on the tiny preset: odd sizes, modes, 16-bit, tiling, LoRA merge, bad inputs."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import infer
from common import backbone as B
from common import presets
from common import training as T
from common.data import load_image
from evaluation import evaluate

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _write(path, arr, mode=None):
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


@pytest.fixture()
def inputs(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "lr"
    d.mkdir()
    _write(d / "odd.png", (rng.random((21, 30, 3)) * 255).astype(np.uint8))
    _write(d / "gray.jpg", (rng.random((24, 20)) * 255).astype(np.uint8))
    _write(d / "rgba.png", (rng.random((17, 19, 4)) * 255).astype(np.uint8))
    _write(d / "deep.png", (rng.random((20, 22)) * 65535).astype(np.uint16))  # 16-bit gray
    Image.fromarray((rng.random((18, 26, 3)) * 255).astype(np.uint8)).save(d / "photo.webp")
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(d / "scan.tif")
    return d


def test_folder_of_mixed_inputs_gives_exact_4x_outputs(inputs, tmp_path):
    out = tmp_path / "sr"
    rc = infer.main(["--model", "tiny", "--input", str(inputs), "--out", str(out), "--steps", "2"])
    assert rc == 0
    for src in inputs.iterdir():
        lr = load_image(src)
        sr = load_image(out / f"{src.stem}.png")
        assert sr.shape == (3, 4 * lr.shape[1], 4 * lr.shape[2]), src.name


def test_hr_folder_is_evaluated_with_the_chosen_metrics(tmp_path):
    """--hr scores the outputs against the HR of the same stem; --metrics picks the columns (here weights-free)."""
    rng = np.random.default_rng(1)
    lr_dir, hr_dir, out = tmp_path / "lr", tmp_path / "hr", tmp_path / "sr"
    lr_dir.mkdir(), hr_dir.mkdir()
    for name in ("a", "b"):
        _write(lr_dir / f"{name}.png", (rng.random((16, 16, 3)) * 255).astype(np.uint8))
        _write(hr_dir / f"{name}.png", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
    assert infer.main(["--model", "tiny", "--input", str(lr_dir), "--out", str(out), "--steps", "2", "--hr-dir", str(hr_dir),
                       "--metrics", "PSNR", "piqe"]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["name", "PSNR", "piqe"] and [r.split(",")[0] for r in rows[1:]] == ["a", "b", "MEAN"]
    sr, hr = load_image(out / "a.png"), load_image(hr_dir / "a.png")
    from evaluation import evaluate

    psnr = float(evaluate.create_metric("PSNR")(sr[None], hr[None]))
    assert float(rows[1].split(",")[1]) == pytest.approx(psnr, abs=1e-3)  # the PSNR of THIS pair


def test_bad_file_is_reported_and_others_are_written(inputs, tmp_path):
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _write(inputs / "tiny.png", np.zeros((4, 40, 3), np.uint8))  # smaller than MIN_LR_SIDE
    out = tmp_path / "sr"
    proc = subprocess.run([sys.executable, "infer.py", "--model", "tiny", "--input", str(inputs), "--out", str(out),
                           "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "broken.png" in proc.stderr and "tiny.png" in proc.stderr and "at least 8 px" in proc.stderr
    assert len(list(out.glob("*.png"))) == 6  # every good input still written


def test_missing_input_and_empty_folder(tmp_path):
    with pytest.raises(T.RunError, match="--input .*nothing_here: no such file or folder"):
        infer.main(["--model", "tiny", "--input", str(tmp_path / "nothing_here")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.RunError, match="--input no images in"):
        infer.main(["--model", "tiny", "--input", str(tmp_path / "empty")])


def test_tile_starts_cover_and_align():
    assert infer.tile_starts(200, 256, 32) == [0]
    starts = infer.tile_starts(672, 256, 64, align=16)
    assert starts[0] == 0 and starts[-1] == 672 - 256
    assert all(s % 16 == 0 for s in starts)
    assert all(b - a <= 256 - 64 for a, b in zip(starts, starts[1:]))  # overlap >= 64


def test_tiled_output_is_exact_size_and_seamless_in_weights():
    bb = B.load_backbone("tiny")
    lr = torch.rand(3, 40, 70)
    args = infer.Args(input="", steps=2, process_size=128, tile_overlap=32)
    sr = infer.super_resolve_image(bb, lr, args, torch.Generator().manual_seed(0))
    assert sr.shape == (3, 160, 280)
    assert torch.isfinite(sr).all() and sr.min() >= 0 and sr.max() <= 1
    # a single tile covering everything equals the untiled path
    big = infer.Args(input="", steps=2, process_size=512)
    one = infer.super_resolve_image(bb, lr[:, :32, :32], big, torch.Generator().manual_seed(0))
    ref = B.super_resolve(bb, lr[:, :32, :32], 2, generator=torch.Generator().manual_seed(0))[0]
    assert torch.allclose(one, ref, atol=1e-5)


def test_color_fixes_match_reference_statistics():
    sr = torch.rand(1, 3, 32, 32) * 0.5
    ref = torch.rand(1, 3, 32, 32) * 0.2 + 0.6
    fixed = infer.adain_color_fix(sr, ref)
    assert torch.allclose(fixed.mean((-2, -1)), ref.mean((-2, -1)), atol=1e-3)
    wave = infer.wavelet_color_fix(sr, ref)
    assert abs(wave.mean() - ref.mean()) < abs(sr.mean() - ref.mean()) / 4


def test_progress_shares_never_pass_the_bar_total():
    import io

    from tqdm import tqdm

    bar = tqdm(total=1, file=io.StringIO())
    share = infer._Share(bar, 0.1)
    for _ in range(11):  # 1.1 of the image: the bar stops at its total
        share.update(1)
    assert bar.n == pytest.approx(1, abs=1e-12) and bar.n <= 1


def test_back_projection_makes_the_output_explain_its_lr_and_keeps_the_detail():
    # hand-worked: a flat 0.2 output of a flat 0.5 LR; bicubic keeps constants, so one pass gives 0.5 exactly
    flat = infer.back_project(torch.full((1, 3, 16, 16), 0.2), torch.full((1, 3, 4, 4), 0.5), 1)
    assert torch.allclose(flat, torch.full_like(flat, 0.5), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(2, 3, 16, 16, generator=g) * 0.6 + 0.2
    detail = 0.1 * torch.randn(2, 3, 64, 64, generator=g)
    sr = (B.upscale(lr) + detail).clamp(0, 1)  # an output: the LR's content plus detail of its own
    sr[:, :, :32] = sr[:, :, :32] * 0.5  # ... that lost the top half's brightness
    assert torch.equal(infer.back_project(sr, lr, 0), sr)
    cons = [evaluate.lr_consistency(infer.back_project(sr, lr, k), lr) for k in (0, 1, 2, 4)]
    assert all(bool((b > a + 3).all()) for a, b in zip(cons, cons[1:])) and bool((cons[-1] > 35).all()), cons
    once = infer.back_project(sr, lr, 1)
    assert abs(float(once[:, :, :32].mean() - B.upscale(lr)[:, :, :32].mean())) < 0.01  # brightness back
    kept = torch.corrcoef(torch.stack([(once - B.upscale(lr)).flatten(), detail.flatten()]))[0, 1]
    assert kept > 0.75  # and the output's own detail stays
    # on by default only for the mini preset; the real model's output is the paper's
    assert infer.parse_args(["--input", "x", "--model", "mini"]).back_projection == presets.MINI_BACK_PROJECTION > 0
    assert infer.parse_args(["--input", "x"]).back_projection == 0
    with pytest.raises(SystemExit):
        infer.parse_args(["--input", "x", "--back-projection", "-1"])


def test_flat_gate_takes_the_detail_off_flat_lr_regions_only():
    # an LR whose left half is flat grey and whose right half is a checkerboard of 0.2 / 0.8
    lr = torch.full((1, 3, 8, 16), 0.5)
    lr[..., 8:] = 0.2 + 0.6 * ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float()
    up = B.upscale(lr)
    grain = 0.05 * torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    gated = infer.flat_gate(up + grain, lr, 4.0)
    # hand-worked: where the upscale is constant its local std is 0, so the output is the upscale exactly
    assert torch.allclose(gated[..., :, :24], up[..., :, :24], atol=1e-6)
    # where it is textured (std far above 4 levels) the output keeps all its detail
    assert torch.allclose(gated[..., :, 40:], (up + grain)[..., :, 40:].clamp(0, 1), atol=1e-6)
    # between (the edge of the flat half): the detail is scaled by std / tau
    std = evaluate.local_std(up)
    between = (std > 0.01) & (std < 4)
    assert between.sum() >= 32
    expected = (up + grain * std / 4).clamp(0, 1)
    assert torch.allclose(gated[between.expand_as(gated)], expected[between.expand_as(gated)], atol=1e-5)
    # on by default only for the mini preset; the real model's output is the paper's
    assert infer.parse_args(["--input", "x", "--model", "mini"]).flat_gate == presets.MINI_FLAT_GATE > 0
    assert infer.parse_args(["--input", "x"]).flat_gate == 0
    with pytest.raises(SystemExit):
        infer.parse_args(["--input", "x", "--flat-gate", "-1"])


def test_lora_and_sft_weights_change_output(tmp_path):
    """--sft loads weights, --lora PATH:SCALE merges; scale 0 gives back the unmerged policy."""
    bb = B.load_backbone("tiny")
    B.add_lora(bb.transformer, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora = B.save_lora(bb.transformer, tmp_path / "nr.safetensors")
    from safetensors.torch import save_file

    sft = B.load_backbone("tiny").transformer
    with torch.no_grad():
        sft.proj_out.bias.add_(0.1)
    save_file(sft.state_dict(), str(tmp_path / "transformer.safetensors"))

    lr = torch.rand(3, 16, 16)
    run = lambda pol: B.super_resolve(pol, lr, 2, generator=torch.Generator().manual_seed(0))  # noqa: E731
    base = run(infer.load_policy("tiny"))
    with_sft = run(infer.load_policy("tiny", sft=str(tmp_path)))
    zero = run(infer.load_policy("tiny", sft=str(tmp_path), loras=(f"{lora}:0",)))
    merged = run(infer.load_policy("tiny", sft=str(tmp_path), loras=(str(lora),)))
    assert not torch.allclose(base, with_sft, atol=1e-4)
    assert torch.allclose(zero, with_sft, atol=1e-6)
    assert not torch.allclose(merged, with_sft, atol=1e-4)
    assert infer.parse_lora_arg("a/b.safetensors:0.5") == (__import__("pathlib").Path("a/b.safetensors"), 0.5)


def test_device_and_dtype_resolve_auto_as_the_docs_say(monkeypatch):
    """--dtype auto is bf16 on a GPU and float32 on the CPU; an explicit --dtype wins; --device auto is CUDA when
    available (infer.py and the RealSR-R1 eval's OARS row share this)."""
    resolve = lambda *flags: infer.device_and_dtype(infer.parse_args(["--input", "x", *flags]))  # noqa: E731
    assert resolve("--device", "cpu") == ("cpu", torch.float32)
    assert resolve("--device", "cuda") == ("cuda", torch.bfloat16)
    assert resolve("--device", "cpu", "--dtype", "bf16") == ("cpu", torch.bfloat16)
    assert resolve("--device", "cuda", "--dtype", "fp32") == ("cuda", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve() == ("cuda", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve() == ("cpu", torch.float32)
