"""A run killed with SIGKILL (not a clean stop) after a checkpoint, then resumed, leaves every log and the
weights exactly as an uninterrupted run: each step logged once (JSONL and TensorBoard)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import training as T
from common.commands import run_command

ROOT = Path(__file__).resolve().parents[1]


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """Steps of one scalar as TensorBoard shows them (a resumed writer's purge_step applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def in_process(cmd: list[str], log: Path) -> None:
    """`python <cmd>` in this process, on one torch thread as the killed subprocess runs (so the runs agree to the
    bit): no second start of the libraries for the uninterrupted and the resumed runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_command(cmd, log)
    finally:
        torch.set_num_threads(threads)


def run_killed_then_resumed(cmd: list[str], logged_steps, checkpoint: Path, min_steps: int) -> None:
    """Start `python <cmd>`; SIGKILL it once `checkpoint` exists and `logged_steps()` reaches `min_steps`, so
    the killed run has logged steps after its last checkpoint; then run `cmd --resume latest` to the end (in this
    process)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and logged_steps() >= min_steps:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    assert logged_steps() >= min_steps  # the killed run logged steps that the resumed run trains again
    in_process([*cmd, "--resume", "latest"], checkpoint.parents[2] / "resumed.log")


@pytest.mark.slow
def test_rl_run_killed_after_a_checkpoint_resumes_with_exact_logs(tmp_path):
    hr = tmp_path / "hr"
    hr.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(hr / f"{i}.png")
    common = ["rl_fr.py", "--model", "tiny", "--reward-model", "tiny", "--hr-dir", str(hr), "--crop-size", "64",
              "--group-size", "4", "--rollout-batch", "4", "--rollout-steps", "3", "--sample-every", "0",
              "--lr", "1e-2", "--fidelity", "ssim", "--steps", "9", "--save-every", "4"]
    in_process([*common, "--out", str(tmp_path / "a.safetensors")], tmp_path / "a.log")
    b = tmp_path / "b"
    log = b / "rewards.jsonl"
    run_killed_then_resumed([*common, "--out", str(tmp_path / "b.safetensors")],
                            lambda: log.read_text().count("\n") if log.exists() else 0,
                            b / "checkpoints" / "step_000004", min_steps=5)
    logs = {}
    for name in ("a", "b"):
        logs[name] = [json.loads(x) for x in (tmp_path / name / "rewards.jsonl").read_text().splitlines()]
        assert [e["step"] for e in logs[name]] == list(range(1, 10)), name
        assert tensorboard_steps(tmp_path / name / "tb", "rl/reward_mean") == list(range(1, 10)), name
    assert np.allclose([e["reward_mean"] for e in logs["a"]], [e["reward_mean"] for e in logs["b"]], atol=1e-5)
    wa, _, sa = T.load_checkpoint(tmp_path / "a" / "checkpoints" / "step_000009")
    wb, _, sb = T.load_checkpoint(b / "checkpoints" / "step_000009")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert sa["invalid_total"] == sb["invalid_total"]


@pytest.mark.slow
def test_sft_run_killed_after_a_checkpoint_resumes_with_exact_logs(tmp_path):
    hr = tmp_path / "hr"
    hr.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(hr / f"{i}.png")
    common = ["train_sft.py", "--model", "tiny", "--hr-dir", str(hr), "--crop-size", "64",
              "--batch-size", "2", "--lr", "1e-3", "--warmup-steps", "1", "--sample-every", "0", "--log-every", "1",
              "--steps", "12", "--save-every", "4"]
    in_process([*common, "--out", str(tmp_path / "a")], tmp_path / "a.log")

    def tensorboard_losses() -> int:  # the SFT loss log is written at the end; TensorBoard at every step
        try:
            return len(tensorboard_steps(b / "tb", "train/loss"))
        except Exception:  # noqa: BLE001 - no event file or no scalar yet
            return 0

    b = tmp_path / "b"
    run_killed_then_resumed([*common, "--out", str(b)], tensorboard_losses, b / "checkpoints" / "step_000004",
                            min_steps=6)
    la = json.loads((tmp_path / "a" / "train_log.json").read_text())["losses"]
    lb = json.loads((b / "train_log.json").read_text())["losses"]
    assert len(la) == 12 and lb == la  # the full history, each step once
    steps = tensorboard_steps(b / "tb", "train/loss")
    assert steps == list(range(1, 13)), (steps, sorted(p.name for p in (b / "tb").iterdir()))
    from safetensors.torch import load_file

    wa, wb = load_file(str(tmp_path / "a" / "transformer.safetensors")), load_file(str(b / "transformer.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resumed_writer_is_read_after_the_killed_runs_events(tmp_path):
    """TensorBoard reads event files in name order, and the name starts with the creating second: a run resumed
    within the second its killed predecessor started (tiny steps) must still be read last, or the purge keeps the
    killed run's steps."""
    killed = T.summary_writer(tmp_path, 0)
    for step in (1, 2, 3):
        killed.add_scalar("loss", 10.0 * step, step)
    killed.close()  # "killed": steps 2 and 3 were logged after its checkpoint at step 1
    # as written by another process whose pid sorts after ours (events.out.tfevents.<seconds>.<host>.<pid>.<n>)
    (file,) = tmp_path.iterdir()
    parts = file.name.split(".")
    file.rename(tmp_path / ".".join([*parts[:-2], "999999999", parts[-1]]))
    resumed = T.summary_writer(tmp_path, 1)
    for step in (2, 3):
        resumed.add_scalar("loss", float(step), step)
    resumed.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 10.0), (2, 2.0), (3, 3.0)]
