"""train_sft.py on the tiny preset: loss falls, resume is exact, torchrun with 2 CPU processes, bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_sft
from common import training as T
from mini import serving

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("hr")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).resize((96, 96)).save(d / f"{name}.png")
    return d


def _run(hr_dir, out, *extra):
    train_sft.main(["--model", "tiny", "--hr-dir", str(hr_dir), "--crop-size", "64", "--lr", "1e-3",
                    "--warmup-steps", "1", "--out", str(out), "--sample-every", "0", "--batch-size", "2",
                    "--log-every", "5", *extra])


def test_loss_falls_and_outputs_are_written(hr_dir, tmp_path):
    _run(hr_dir, tmp_path / "sft", "--steps", "40", "--save-every", "20")
    log = json.loads((tmp_path / "sft" / "train_log.json").read_text())
    losses = log["losses"]
    assert len(losses) == 40
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)
    weights = load_file(str(tmp_path / "sft" / "transformer.safetensors"))
    from common import backbone as B

    base = B.load_backbone("tiny").transformer.state_dict()
    assert weights.keys() == base.keys()
    assert any(not torch.equal(weights[k], base[k]) for k in base)  # trained
    assert [p.name for p in T.list_checkpoints(tmp_path / "sft" / "checkpoints")] == ["step_000020", "step_000040"]
    assert list((tmp_path / "sft" / "tb").iterdir())  # TensorBoard event file


@pytest.mark.parametrize("reuse", ["1", "3"])
def test_resume_continues_exactly(hr_dir, tmp_path, reuse):
    """10 steps, stop, resume to 20 == 20 steps in one go (weights, optimizer state, data, noise); with
    --reuse 3 the resumed run rebuilds its pool of encoded pairs mid-cycle (10 is not a multiple of 3)."""
    _run(hr_dir, tmp_path / "full", "--steps", "20", "--save-every", "10", "--reuse", reuse)
    _run(hr_dir, tmp_path / "split", "--steps", "10", "--save-every", "10", "--reuse", reuse)
    # a half-written checkpoint from a kill during saving must be ignored
    (tmp_path / "split" / "checkpoints" / "step_000015.tmp").mkdir()
    _run(hr_dir, tmp_path / "split", "--steps", "20", "--save-every", "10", "--resume", "latest", "--reuse", reuse)
    a, opt_a, state_a = T.load_checkpoint(tmp_path / "full" / "checkpoints" / "step_000020")
    b, opt_b, state_b = T.load_checkpoint(tmp_path / "split" / "checkpoints" / "step_000020")
    assert state_a["step"] == state_b["step"] == 20
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a if k.startswith("optim."))
    assert any(k.startswith("optim.") for k in opt_a)
    la = json.loads((tmp_path / "full" / "train_log.json").read_text())["losses"]
    lb = json.loads((tmp_path / "split" / "train_log.json").read_text())["losses"]
    assert lb == la  # the resumed run carries the first 10 losses in its checkpoint: one full history


def test_reuse_pool_fetches_every_r_steps_and_draws_from_the_last_r_batches():
    """Hand-worked: batches are lists of ints; fetch j returns [10j, 10j+1]; R = 2."""
    fetched = []

    def fetch():
        fetched.append(len(fetched))
        return [10 * fetched[-1], 10 * fetched[-1] + 1]

    plain = T.ReusePool(1, fetch, list, torch.Generator().manual_seed(0))
    assert [plain(s) for s in range(3)] == [[0, 1], [10, 11], [20, 21]]  # R = 1: each step its own batch, in order
    fetched.clear()
    pool = T.ReusePool(2, fetch, list, torch.Generator().manual_seed(0))
    drawn = [pool(s) for s in range(7)]
    assert fetched == [0, 1, 2, 3]  # fetches at steps 0, 2, 4, 6
    allowed = {0: {0, 1}, 1: {0, 1}, 2: {0, 1, 10, 11}, 3: {0, 1, 10, 11}, 4: {10, 11, 20, 21},
               5: {10, 11, 20, 21}, 6: {20, 21, 30, 31}}  # the pool holds the last 2 batches
    for step, items in enumerate(drawn):
        assert len(items) == 2 and len(set(items)) == 2 and set(items) <= allowed[step], (step, items)
    # resume at step 5: the loader restarts at batch 1 (first_batch) and prefill rebuilds batches 1 and 2
    assert [pool.first_batch(s) for s in (0, 1, 2, 3, 5, 7)] == [0, 0, 0, 0, 1, 2]
    assert plain.first_batch(7) == 7  # R = 1: the loader resumes at the step itself, nothing to prefill
    with pytest.raises(ValueError, match="--reuse 0"):
        T.ReusePool(0, fetch, list, torch.Generator())


def test_run_script_exit_code_and_torchrun_exit_without_teardown(tmp_path):
    """run_script: main()'s int result is the exit code (anything else: 0). Under torchrun (WORLD_SIZE > 1)
    the process ends by os._exit: what main printed is flushed, but the interpreter's teardown (here an
    atexit handler, in a real run gloo's threads) never runs."""
    for result, code in ((3, 3), (None, 0), (Path("out"), 0), ({"a": 1}, 0)):
        with pytest.raises(SystemExit) as exc:
            T.run_script(lambda: result)
        assert exc.value.code == code
    script = ("import atexit\nfrom common import training\n"
              "atexit.register(print, 'teardown ran')\n"
              "def main():\n    print('work done', end='')\n    return 5\n"
              "training.run_script(main)\n")
    root = Path(__file__).resolve().parents[1]
    for world, teardown in (("2", False), ("1", True)):
        proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "WORLD_SIZE": world})
        assert proc.returncode == 5 and proc.stdout.startswith("work done"), proc
        assert ("teardown ran" in proc.stdout) == teardown, proc.stdout


def test_bad_data_folder_errors_name_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in"):
        _run(tmp_path / "empty", tmp_path / "o", "--steps", "1")
    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(small / "little.png")
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(small / "fine.png")
    with pytest.raises(ValueError, match="little.png.*smaller than crop_size=64"):
        _run(small, tmp_path / "o", "--steps", "1")


@pytest.mark.parametrize("extra, message", [(["--plain-fraction", "1.5"], "--plain-fraction 1.5"),
                                            (["--plain-fraction", "0.5", "--lr-dir", "x"], "--lr-dir"),
                                            (["--degradation", "mini", "--lr-dir", "x"], "--lr-dir"),
                                            (["--plain-sigma-min", "2", "--plain-sigma-max", "1"],
                                             "--plain-sigma-min/max 2.0/1.0")])
def test_bad_plain_fraction_names_the_flag(hr_dir, extra, message, capsys):
    with pytest.raises(SystemExit):
        train_sft.parse_args(["--hr-dir", str(hr_dir), *extra])
    assert message in capsys.readouterr().err


def test_nonfinite_loss_is_skipped_and_bounded(hr_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train_sft, "flow_matching_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="NaN/Inf in 3 steps"):
        _run(hr_dir, tmp_path / "nan", "--steps", "5", "--max-nonfinite", "2")


def test_lr_factor_warmup_then_constant_or_cosine_by_hand():
    const = train_sft.Args(hr_dir="x", steps=100, warmup_steps=10)
    cos = train_sft.Args(hr_dir="x", steps=100, warmup_steps=10, lr_schedule="cosine")
    assert train_sft.lr_factor(0, const) == pytest.approx(0.1) and train_sft.lr_factor(4, const) == pytest.approx(0.5)
    assert train_sft.lr_factor(50, const) == 1.0 and train_sft.lr_factor(99, const) == 1.0
    # cosine: (1 + cos(pi s / 100)) / 2 times the warm-up ramp
    assert train_sft.lr_factor(0, cos) == pytest.approx(0.1)
    assert train_sft.lr_factor(50, cos) == pytest.approx(0.5)
    assert train_sft.lr_factor(25, cos) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert train_sft.lr_factor(100, cos) == pytest.approx(0.0, abs=1e-12)


def test_timestep_sampling_modes():
    g = torch.Generator().manual_seed(0)
    for mode in ("uniform", "logit_normal", "shifted"):
        t = train_sft.sample_timesteps(4000, mode, g)
        assert 0 < t.min() and t.max() < 1
    assert abs(train_sft.sample_timesteps(4000, "uniform", g).mean() - 0.5) < 0.03
    assert train_sft.sample_timesteps(4000, "shifted", g).mean() > 0.6  # shift 3 moves mass toward noise


@pytest.mark.slow
def test_torchrun_two_processes_stay_in_sync(hr_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(serving.free_port()),
           "train_sft.py", "--model", "tiny", "--hr-dir", str(hr_dir), "--crop-size", "64", "--steps", "4",
           "--batch-size", "1", "--lr", "1e-3", "--out", str(out), "--save-every", "4", "--sample-every", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt, opt, state = T.load_checkpoint(out / "checkpoints" / "step_000004")
    # both ranks' noise generators were saved and differ (per-rank seeds)
    assert not torch.equal(opt["generator.0"], opt["generator.1"])
    assert (out / "transformer.safetensors").exists()
    assert "2 ranks in sync" in proc.stdout


@pytest.mark.slow
def test_torchrun_fsdp_matches_single_process(hr_dir, tmp_path):
    """--fsdp shards the transformer over 2 processes; a resumed sharded run continues exactly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["train_sft.py", "--model", "tiny", "--hr-dir", str(hr_dir), "--crop-size", "64", "--batch-size", "1",
              "--lr", "1e-3", "--sample-every", "0", "--save-every", "2", "--fsdp"]
    run = lambda out, *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(serving.free_port()), *common, "--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    full = run(tmp_path / "a", "--steps", "4")
    assert full.returncode == 0, full.stderr[-3000:]
    # every rank wrote its own shards (no gather of the weights and AdamW state to rank 0)
    step2 = tmp_path / "a" / "checkpoints" / "step_000002"
    assert {p.name for p in step2.iterdir()} == {
        "model.rank0.safetensors", "model.rank1.safetensors", "optimizer.rank0.safetensors",
        "optimizer.rank1.safetensors", "rng.safetensors", "state.json"}
    # the run killed after its step-2 checkpoint: a folder holding only that checkpoint, resumed to step 4
    # (one torchrun fewer than running the first half again; the checkpoint is the same bytes)
    shutil.copytree(step2, tmp_path / "b" / "checkpoints" / "step_000002")
    resumed = run(tmp_path / "b", "--steps", "4", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    a = load_file(str(tmp_path / "a" / "transformer.safetensors"))
    b = load_file(str(tmp_path / "b" / "transformer.safetensors"))
    from common import backbone as B

    base = B.load_backbone("tiny").transformer.state_dict()
    assert a.keys() == base.keys()  # full, unsharded weights that infer.py --sft loads
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], base[k]) for k in a)


@pytest.mark.slow
def test_fsdp_rank0_loading_equals_the_full_model_bit_for_bit(hr_dir, tmp_path):
    """--fsdp: rank 1 builds the transformer on the meta device and receives its shards from rank 0; after one step
    at a learning rate far below float32's resolution (1e-30) the gathered transformer equals the preset's weights
    exactly."""
    from common import backbone as B

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(serving.free_port()), "train_sft.py", "--model", "tiny", "--hr-dir", str(hr_dir), "--crop-size", "64",
           "--batch-size", "1", "--steps", "1", "--lr", "1e-30", "--fsdp", "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathered = load_file(str(tmp_path / "o" / "transformer.safetensors"))
    preset = B.load_backbone("tiny").transformer.state_dict()
    assert gathered.keys() == preset.keys() and all(torch.equal(gathered[k], preset[k]) for k in preset)
