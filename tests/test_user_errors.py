"""What a user types: no mistake costs finished work, every mistake gets one clear line, one vocabulary of flags."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import infer
import rl_fr
import rl_nr
import train_compass
import train_sft
from baselines import flow_grpo
from common import backbone as B
from common import training as T
from evaluation import evaluate, sriqa
from mini import build_backbone, sr_eval
from realsr_r1 import train_realsr_r1
from refreward_sr import refreward, train_refreward

ROOT = Path(__file__).resolve().parents[1]
RL = ["--model", "tiny", "--reward-model", "tiny", "--crop-size", "64", "--group-size", "4", "--rollout-batch", "4",
      "--rollout-steps", "3", "--sample-every", "0", "--fidelity", "ssim", "--lr", "1e-2"]


def _photos(folder: Path, names=("a.png", "b.png"), size=16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# no lost work
# ---------------------------------------------------------------------------------------------------


def test_infer_never_writes_over_its_inputs(tmp_path):
    lr = _photos(tmp_path / "lr")
    before = _snapshot(lr)
    for out in (lr, lr / "sr"):  # the input folder itself, or a folder inside it
        with pytest.raises(T.RunError, match="is the input folder or inside it"):
            infer.main(["--model", "tiny", "--input", str(lr), "--out", str(out), "--steps", "2"])
    with pytest.raises(T.RunError, match="would overwrite the input"):
        infer.main(["--model", "tiny", "--input", str(lr / "a.png"), "--out", str(lr), "--steps", "2"])
    _photos(lr, ("a.jpg",))
    with pytest.raises(T.RunError, match=r"a.jpg and a.png share the stem 'a'|a.png and a.jpg share the stem 'a'"):
        infer.main(["--model", "tiny", "--input", str(lr), "--out", str(tmp_path / "sr"), "--steps", "2"])
    (lr / "a.jpg").unlink()
    assert _snapshot(lr) == before and not (tmp_path / "sr").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(T.RunError, match="--out .*file/sr: cannot write there"):
        infer.main(["--model", "tiny", "--input", str(lr), "--out", str(tmp_path / "file" / "sr"), "--steps", "2"])


def test_infer_outputs_are_ordinary_files(tmp_path):
    lr = _photos(tmp_path / "lr", ("a.png",))
    assert infer.main(["--model", "tiny", "--input", str(lr), "--out", str(tmp_path / "sr"), "--steps", "2"]) == 0
    mode = (tmp_path / "sr" / "a.png").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not the private 0600 of a temporary file


def test_a_finished_run_is_never_replaced_by_accident(tmp_path):
    hr = _photos(tmp_path / "hr", ("a.png", "b.png"), 96)
    out = tmp_path / "fr.safetensors"
    rl_fr.main([*RL, "--hr-dir", str(hr), "--steps", "2", "--save-every", "1", "--out", str(out)])
    meta = B.safe_open(str(out), framework="pt").metadata()
    assert meta["oars_step"] == "2" and json.loads(meta["oars_args"])["steps"] == 2
    before = _snapshot(tmp_path / "fr") | {"final": out.read_bytes()}
    with pytest.raises(T.RunError, match=r"fr.safetensors already holds a run; pass --resume latest .* or --overwrite"):
        rl_fr.main([*RL, "--hr-dir", str(hr), "--steps", "3", "--out", str(out)])
    assert _snapshot(tmp_path / "fr") | {"final": out.read_bytes()} == before  # nothing touched
    # resumed, it keeps the settings it was started with (args.json); only where / how long / how often may change
    with pytest.raises(T.RunError, match=r"--resume latest: .*fr was started with --lr 0.01 \(now 0.02\), --seed 0 "
                                         r"\(now 1\); resume it with its settings, or pass --overwrite"):
        rl_fr.main([*RL[:-1], "2e-2", "--seed", "1", "--hr-dir", str(hr), "--steps", "3", "--out", str(out),
                    "--resume", "latest"])
    assert _snapshot(tmp_path / "fr") | {"final": out.read_bytes()} == before
    rl_fr.main([*RL, "--hr-dir", str(hr), "--steps", "3", "--save-every", "3", "--out", str(out), "--resume", "latest"])
    assert len((tmp_path / "fr" / "rewards.jsonl").read_text().splitlines()) == 3  # steps 1-2 kept, step 3 added
    rl_fr.main([*RL, "--hr-dir", str(hr), "--steps", "1", "--out", str(out), "--overwrite"])
    assert len((tmp_path / "fr" / "rewards.jsonl").read_text().splitlines()) == 1
    assert [p.name for p in T.list_checkpoints(tmp_path / "fr" / "checkpoints")] == ["step_000001"]


def test_resume_compares_settings_as_written(tmp_path):
    """The args.json check reads the run's settings back as JSON: a tuple flag equals its saved list; the flags
    a resume may change are not compared; another learning rate is refused."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "step_000001" / "state.json").write_text("{}")
    settings = {"sizes": (64, 128), "lr": 0.1, "steps": 10, "device": "cpu"}
    (run / "args.json").write_text(json.dumps(settings))
    T.claim_run_dir(run, "latest", False, None, {**settings, "steps": 20, "device": "cuda"})
    with pytest.raises(T.RunError, match=r"started with --lr 0.1 \(now 0.2\); resume it with its settings"):
        T.claim_run_dir(run, "latest", False, None, {**settings, "lr": 0.2})


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    hr = _photos(tmp_path / "hr", ("a.png", "b.png"), 96)
    out = tmp_path / "fr.safetensors"
    cmd = [sys.executable, "rl_fr.py", *RL, "--hr-dir", str(hr), "--steps", "500", "--save-every", "100", "--out",
           str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "fr" / "rewards.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Resume with:" in err and "--resume latest" in err and "Traceback" not in err
    saved = T.list_checkpoints(tmp_path / "fr" / "checkpoints")
    assert len(saved) == 1 and not out.exists()  # a checkpoint of the step it stopped at; no final file yet
    step = int(saved[0].name.split("_")[1])
    assert 2 <= step < 500 and len(log.read_text().splitlines()) == step


# ---------------------------------------------------------------------------------------------------
# one clear line per mistake, before expensive work
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("main, argv, message", [
    (rl_fr.main, ["--steps", "0"], "--steps 0: must be at least 1"),
    (rl_fr.main, ["--steps", "-3"], "--steps -3: must be at least 1"),
    (rl_fr.main, ["--lr", "-1"], "--lr -1.0: must be > 0"),
    (rl_fr.main, ["--scale", "0"], "--scale 0: must be at least 1"),
    (rl_fr.main, ["--group-size", "1"], "--group-size must be >= 2"),
    (train_sft.main, ["--hr-dir", "x", "--steps", "-2"], "--steps -2: must be at least 1"),
    (train_sft.main, ["--hr-dir", "x", "--lr", "0"], "--lr 0.0: must be > 0"),
    (train_sft.main, ["--hr-dir", "x", "--degradation", "paper"], "--degradation paper: choose one of realesrgan, mini"),
    (train_sft.main, ["--hr-dir", "x", "--lr-schedule", "linear"], "--lr-schedule linear: choose constant or cosine"),
    (train_compass.main, ["annotate"], "the following arguments are required: --lr-dir, --sr-dir"),
    (train_compass.main, ["train"], "the following arguments are required: --data"),
    (sriqa.main, [], "the following arguments are required: --sriqa-root"),
])
def test_bad_counts_rates_and_missing_inputs_name_the_flag(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_unknown_models_and_damaged_files_are_one_line_naming_them(tmp_path):
    with pytest.raises(T.RunError, match=r"--model minii: no such folder.*--model mini.*--model tiny"):
        B.load_backbone("minii")
    good = B.load_backbone("tiny").transformer
    B.add_lora(good, 4, 8)
    B.save_lora(good, tmp_path / "lora.safetensors")
    data = (tmp_path / "lora.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(T.RunError, match=r"--lora .*cut.safetensors: not a readable safetensors file"):
        infer.load_policy("tiny", None, (str(tmp_path / "cut.safetensors"),))
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "transformer.safetensors").write_bytes(data[:100])
    with pytest.raises(T.RunError, match=r"--sft .*transformer.safetensors: not a readable safetensors file"):
        infer.load_policy("tiny", str(tmp_path / "sft"))


def test_a_mistake_is_one_line_on_stderr_with_status_2(tmp_path):
    """Through a real script start (training.run_script): no traceback, one line, before any model loads."""
    lr = _photos(tmp_path / "lr")
    proc = subprocess.run([sys.executable, "infer.py", "--model", "tiny", "--input", str(lr), "--out", str(lr)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --out")


def test_evaluate_refuses_to_report_nothing(tmp_path):
    sr, hr = _photos(tmp_path / "sr", ("a.png",), 32), _photos(tmp_path / "hr", ("b.png",), 32)
    with pytest.raises(T.RunError, match="no SR image in --sr-dir .* has an HR partner of the same file name"):
        evaluate.main(["--sr-dir", str(sr), "--hr-dir", str(hr), "--metrics", "PSNR", "SSIM", "--offline"])
    with pytest.raises(T.RunError, match="nothing was evaluated: every metric is unavailable"):
        evaluate.main(["--sr-dir", str(sr), "--metrics", "no_such_metric", "--offline"])


# ---------------------------------------------------------------------------------------------------
# --help and one vocabulary
# ---------------------------------------------------------------------------------------------------

ARGUMENT_CLASSES = [rl_fr.Args, train_sft.Args, infer.Args, train_compass.TrainArgs, train_compass.AnnotateArgs,
                    sriqa.EvalArgs, train_refreward.TrainArgs, flow_grpo.Options, refreward.Options,
                    train_realsr_r1.SFTArgs, train_realsr_r1.GRPOArgs, train_realsr_r1.EvalArgs, sr_eval.Args,
                    build_backbone.Args]


@pytest.mark.parametrize("cls", ARGUMENT_CLASSES, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_option_has_help_text(cls):
    docs = T.field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{cls.__name__}: options without help text: {missing}"


def test_help_shows_defaults_and_rl_nr_only_its_own_options(capsys):
    with pytest.raises(SystemExit):
        rl_nr.main(["--help"])
    text = capsys.readouterr().out
    assert "--lr-dir" in text and "--hr-dir" not in text and "--fidelity " not in text
    assert "(default: 24)" in text and "Flow-GRPO options" in text and "RefReward-SR as the RL reward" in text


def test_old_flag_spellings_still_work_with_a_warning(capsys):
    args = infer.parse_args(["--input", "x", "--output", "o", "--hr", "h"])
    assert (args.out, args.hr_dir) == ("o", "h")
    err = capsys.readouterr().err
    assert "--output is deprecated and will be removed; use --out" in err and "--hr is deprecated" in err
    ev = sriqa.parse_dataclass_args(sriqa.EvalArgs, ["--sriqa-root", "s", "--server", "http://h", "--views", "8"])[0]
    assert (ev.reward_url, ev.reward_views) == ("http://h", 8)
    assert T.renamed_flags(["--sr", "out/sr", "--hr-dir", "h"], {"--sr-dir", "--hr-dir"}) == ["--sr-dir", "out/sr",
                                                                                            "--hr-dir", "h"]
    assert "--sr is deprecated and will be removed; use --sr-dir" in capsys.readouterr().err
