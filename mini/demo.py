"""The whole OARS pipeline end to end on the trained mini presets, on a CPU, in a few minutes (`make demo`).

Every stage runs as a user would run it: the real command lines (run in this process by common/commands.py,
which pays the libraries' imports once), nothing private; with --served-reward the reward server is a process
of its own.

    0. data      photographs that ship inside installed packages (photos.py): HR crops of the training
                 photos (cold start, FR RL), LR inputs made by data.py's Real-ESRGAN pipeline at the mini ranges
                 ("real LQ" for the NR RL; miniature.LQ_DEGRADATION), and a held-out test set from the held-out
                 photos (plain LR: miniature.HELDOUT_LR)
    1. cold start      train_sft.py on the mini BASE (Eq.5) for a few steps: the loss falls. The shipped
                       mini SFT (`--sft mini`) is this same command run for 3500 steps by
                       mini/build_backbone.py; the stages below use it
    2. COMPASS         train_compass.py annotate (Eq.1-3) on held-out groups and evaluation/sriqa.py (Table 1 layout) of the
                       shipped mini COMPASS (trained by mini/build_compass.py)
    3. FR RL           rl_fr.py --model mini: LoRA on the BASE, F = SSIM to the HR, Q from the mini COMPASS
    4. NR RL           rl_nr.py --lora fr.safetensors, every reward from the mini COMPASS, in-process (the
                       expected values over the score digits, as the paper's vLLM server gives them through
                       logprobs); --served-reward: served by `transformers serve` on 127.0.0.1 instead (started
                       and stopped here; it returns no logprobs, so the client parses the greedy text)
    5. inference       infer.py --model mini --sft mini --lora ...  (the LoRA merged into the SFT weights)
    6. report          out/demo/report.md: every stage's numbers, the policies before / after RL on the fixed
                       held-out set with fixed noise, the pictures

    python demo.py            # full demo (< 10 min on 2 cores)
    python demo.py --quick    # shortened (CI)
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

import reward
from common import backbone as B
from common import presets
from common.commands import run_command
from common.data import degrade, item_seed, list_images, load_image, save_image
from evaluation.sriqa import write_sriqa_layout
from mini import photos, serving
from mini.build_compass import GENERATIVE, annotate_command, compass_data
from mini.build_compass import Args as BuildArgs  # its defaults: how the shipped COMPASS was built
from mini.miniature import LQ_DEGRADATION, HeldOut, evaluate_policy, policy
from train_compass import load_records

# No hub access is assumed: metrics whose weights are not cached are reported unavailable at once. The
# libraries' own warnings and loading bars stay quiet (their handlers write to the terminal, not the logs).
STAGE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: list[str], log: Path, title: str) -> None:
    """Run one stage's command line (`python ...`); its output goes to `log`; fail with the log's tail."""
    tqdm.write(f"  $ {' '.join(cmd)}")
    try:
        seconds = run_command(cmd[1:], log, env=STAGE_ENV)
    except SystemExit as err:
        raise SystemExit(f"{title}: {err}") from None
    tqdm.write(f"    done in {seconds:.0f} s (log: {log})")


# ====================================================================================================
# 0. data
# ====================================================================================================


def make_data(root: Path, n_train: int, n_lq: int, n_test: int) -> dict[str, Path]:
    """HR crops (96 px) of the training photos, degraded LR of other training crops, held-out LR/HR."""
    dirs = {k: root / k for k in ("hr_train", "lq", "lr_test", "hr_test")}
    g = torch.Generator().manual_seed(11)
    for i, crop in enumerate(photos.random_crops(photos.TRAIN, n_train, 96, g)):
        save_image(crop, dirs["hr_train"] / f"train{i:03d}.png")
    for i, crop in enumerate(photos.random_crops(photos.TRAIN, n_lq, 64, g)):  # "real LQ": no HR is kept
        lq = degrade(crop[None], LQ_DEGRADATION, generator=torch.Generator().manual_seed(item_seed(12, 0, i)))[0]
        save_image(lq, dirs["lq"] / f"lq{i:03d}.png")
    test = HeldOut.make(n_test)
    for i in range(n_test):
        save_image(test.lr[i], dirs["lr_test"] / f"test{i:02d}.png")
        save_image(test.hr[i], dirs["hr_test"] / f"test{i:02d}.png")
    return dirs


# ====================================================================================================
# 6. report
# ====================================================================================================


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def plot_curves(fr: list[dict], nr: list[dict], sft_losses: list[float], path: Path) -> None:
    """SFT loss per step; the mean rollout reward of each RL step with its running mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(sft_losses, lw=1)
    axes[0].set(title="1. SFT loss (Eq.5), from the mini base", xlabel="step")
    for ax, log, title in ((axes[1], fr, "3. FR RL reward (Eq.4, F = SSIM)"), (axes[2], nr, "4. NR RL reward (COMPASS)")):
        steps = [e["step"] for e in log]
        values = np.array([e["reward_mean"] for e in log])
        ax.plot(steps, values, "o", ms=3, alpha=0.5, label="one step (one LR image)")
        window = max(1, len(values) // 6)
        ax.plot(steps, np.convolve(values, np.ones(window) / window, mode="same"), lw=2, label=f"running mean ({window})")
        ax.set(title=title, xlabel="RL step", ylabel="mean reward of the K rollouts")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def comparison_grid(lr_dir: Path, columns: list[Path], hr_dir: Path, path: Path) -> None:
    """One row per test image: LR (nearest) | bicubic | SFT | SFT + FR | SFT + NR | HR, at 2x."""
    rows = []
    for lr_path in list_images(lr_dir):
        lr = load_image(lr_path)
        tiles = [F.interpolate(lr[None], scale_factor=4, mode="nearest")[0],
                 F.interpolate(lr[None], scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)[0]]
        tiles += [load_image(folder / f"{lr_path.stem}.png") for folder in columns]
        tiles.append(load_image(hr_dir / f"{lr_path.stem}.png"))
        rows.append(torch.cat(tiles, dim=-1))
    grid = torch.cat(rows, dim=-2)
    save_image(F.interpolate(grid[None], scale_factor=2, mode="nearest")[0], path)


def policy_table(before_after: dict[str, dict[str, list[float]]]) -> list[str]:
    """Markdown: the policies on the held-out set (mean over the crops), and the change against SFT."""
    cols = ("R", "R_FR", "F", "Q_SR", "SNB", "PIQE", "SSIM", "PSNR", "sharpness", "LRcons", "peak", "SSIM_out", "LRcons_out")
    means = {name: {c: float(np.nanmean(m[c])) for c in cols} for name, m in before_after.items()}
    lines = ["| policy | " + " | ".join(c + (" ↓" if c == "PIQE" else "") for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for name, m in means.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    sft, fr, final = (means[name] for name in means)
    lines += ["", "R = Eq.4 from the mini COMPASS alone (the NR stage's reward); R_FR = Eq.4 with F = SSIM to the HR "
              "(the FR stage's reward, `--fidelity ssim`).", "",
              f"Each RL stage against its own reward, on the held-out set: FR raises R_FR {sft['R_FR']:.4f} -> "
              f"{fr['R_FR']:.4f} ({fr['R_FR'] - sft['R_FR']:+.4f}); NR raises R {fr['R']:.4f} -> {final['R']:.4f} "
              f"({final['R'] - fr['R']:+.4f}; SFT {sft['R']:.4f}).",
              "", f"Final policy (SFT + NR LoRA) against SFT: COMPASS reward {final['R'] - sft['R']:+.4f}, SNB "
              f"{final['SNB'] - sft['SNB']:+.4f}, PIQE {final['PIQE'] - sft['PIQE']:+.2f} (lower is better), SSIM "
              f"{final['SSIM'] - sft['SSIM']:+.4f}, PSNR {final['PSNR'] - sft['PSNR']:+.2f} dB, LR consistency "
              f"{final['LRcons'] - sft['LRcons']:+.2f} dB, spectral peak x{final['peak'] / sft['peak']:.2f} "
              "(a periodic artefact raises it: evaluate.spectral_peak). The _out columns read the samples as "
              "`infer.py --model mini` delivers them (back-projection and flat gate, mini defaults): final policy "
              f"SSIM {final['SSIM_out']:.4f} ({final['SSIM_out'] - sft['SSIM_out']:+.4f}), LR consistency "
              f"{final['LRcons_out']:.2f} dB."]
    return lines


def write_report(out: Path, dirs: dict[str, Path], timings: dict[str, float], quick: bool,
                 before_after: dict[str, dict[str, list[float]]], views: tuple[int, int]) -> Path:
    sft_log = json.loads((out / "sft" / "train_log.json").read_text())
    losses = sft_log["losses"]
    k = max(1, len(losses) // 5)
    fr, nr = read_jsonl(out / "fr" / "rewards.jsonl"), read_jsonl(out / "nr" / "rewards.jsonl")
    plot_curves(fr, nr, losses, out / "curves.png")
    comparison_grid(dirs["lr_test"], [out / "sr_sft", out / "sr_fr", out / "sr_nr"], dirs["hr_test"],
                    out / "comparison.png")
    compass_rows = list(csv.DictReader(open(out / "compass_eval" / "sriqa_accuracy.csv")))

    def halves(log: list[dict]) -> tuple[float, float]:
        h = max(1, len(log) // 2)
        return float(np.nanmean([e["reward_mean"] for e in log[:h]])), \
            float(np.nanmean([e["reward_mean"] for e in log[h:]] or [np.nan]))

    lines = [
        "# OARS demo report (mini presets)", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')}{' with --quick' if quick else ''}. Every stage ran as its "
        "command line (see `*.log`), on the mini presets: small configs of the real classes with weights trained on "
        "a CPU by mini/build_backbone.py and mini/build_compass.py. Inputs are 16x16 LR crops, outputs 64x64. "
        f"Mini COMPASS readings are means over flips/rotations of the (LR, SR) pair: {views[0]} in the RL stages "
        f"(--reward-views), {views[1]} in the evaluations of stages 2 and 6 (--eval-views).", "",
        "## Stage times", "", "| stage | seconds |", "|---|---|",
        *[f"| {s} | {t:.0f} |" for s, t in timings.items()], "",
        "## 1. Cold start (train_sft.py from the mini base, Eq.5)", "",
        f"- flow-matching loss, mean of the first {k} steps: **{np.mean(losses[:k]):.4f}**, "
        f"of the last {k} steps: **{np.mean(losses[-k:]):.4f}** ({len(losses)} steps; the shipped mini SFT ran "
        "3500 steps of this command)", "",
        "## 2. COMPASS reward model (shipped mini COMPASS, train_compass.py annotate, evaluation/sriqa.py)", "",
        "Pairwise preference accuracy on held-out groups (photos never trained on; MOS = 20 x Eq.4 of the labels "
        "that `annotate` made; PSNR and SSIM see the HR, COMPASS does not):", "",
        "| type | method | Reg-Acc | Gen-Acc | All-Acc | pairs | note |", "|---|---|---|---|---|---|---|",
        *[f"| {r['type']} | {r['method']} | {r['Reg-Acc']} | {r['Gen-Acc']} | {r['All-Acc']} | {r['pairs_all']} | "
          f"{r['note']} |" for r in compass_rows], "",
        "## 3-4. Online RL (rl_fr.py, rl_nr.py; NFT, Eq.6-8)", "",
        "| stage | steps | reward, first half of the steps | second half | kept-group fraction | invalid rewards |",
        "|---|---|---|---|---|---|",
    ]
    nr_how = "served" if json.loads((out / "nr" / "args.json").read_text()).get("reward_url") else "in-process"
    for name, log in (("FR (F = SSIM vs HR, Q from COMPASS)", fr), (f"NR (COMPASS {nr_how})", nr)):
        a, b = halves(log)
        lines.append(f"| {name} | {len(log)} | {a:.4f} | {b:.4f} | {np.mean([e['kept_fraction'] for e in log]):.2f} | "
                     f"{int(sum(e['invalid'] for e in log))} |")
    lines += ["", "Training-step rewards are noisy (each step draws one LR image); the held-out evaluation below is "
              "the measure.", "", "![curves](curves.png)", "",
              "## 5-6. The policies before and after RL, on the held-out set", "",
              f"{len(before_after['SFT']['R'])} held-out crops, fixed noise, 40 Euler steps; R / F / Q_SR = the mini "
              "COMPASS (Eq.4; no HR), SNB and PIQE = weights-free no-reference metrics, SSIM / PSNR (Y) against the HR.",
              "", *policy_table(before_after), "",
              "Test images: LR | bicubic | SFT | SFT + FR LoRA | SFT + NR LoRA | HR", "", "![comparison](comparison.png)",
              ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ====================================================================================================
# main
# ====================================================================================================


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/demo")
    p.add_argument("--quick", action="store_true", help="shortened settings (CI)")
    p.add_argument("--reward-views", type=int, default=1,
                   help="the RL stages' mini COMPASS readings are means over this many flips/rotations of each "
                        "pair (1 = the paper's single reading)")
    p.add_argument("--eval-views", type=int, default=presets.MINI_COMPASS_VIEWS,
                   help="the same for the evaluations (stages 2 and 6); 8 = the shipped evaluation's reading")
    p.add_argument("--served-reward", action="store_true",
                   help="NR stage: score through a local `transformers serve` of the mini COMPASS instead of "
                        "in-process. That server returns no logprobs, so the client parses the greedy text: a "
                        "coarser reward than the expected digit values read in-process and from vLLM (mini/README)")
    a = p.parse_args(argv)
    for library in (transformers.logging, diffusers_logging):  # see STAGE_ENV
        library.set_verbosity_error()
        library.disable_progress_bar()
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    q = a.quick
    # RL steps: chosen on a validation set of 16 crops of the TRAINING photos (never on the held-out photos of
    # stage 6; mini/README "What the demo does and shows"): FR 96 steps raised its own reward (Eq.4, F = SSIM)
    # and SSIM there, 48 did not; NR 16 steps raised the COMPASS reward and kept SSIM, 24-32 steps cost
    # 0.01-0.02 SSIM
    n = dict(sft_steps=6 if q else 40, fr_steps=3 if q else 96, nr_steps=2 if q else 16, group=4 if q else 8,
             infer_steps=4 if q else 40, test=2 if q else 8, groups=2 if q else 6)
    timings: dict[str, float] = {}
    stages = tqdm(total=8, desc="OARS demo", unit=" stage")  # stages 0-7

    def stage(name: str):
        stages.set_postfix_str(name)
        tqdm.write(f"\n== {name}")
        timings[name] = time.time()

    def done(name: str):
        timings[name] = time.time() - timings[name]
        stages.update(1)

    stage("0. data")
    dirs = make_data(out / "data", n_train=16 if q else 48, n_lq=8 if q else 32, n_test=n["test"])
    done("0. data")

    stage("1. cold start (SFT)")
    run(["python", "train_sft.py", "--model", "mini", "--hr-dir", str(dirs["hr_train"]), "--crop-size", "64",
         "--batch-size", "8", "--steps", str(n["sft_steps"]), "--lr", "1e-4", "--warmup-steps", "5",
         "--log-every", "1", "--sample-every", str(n["sft_steps"]), "--sample-steps", "20", "--save-every",
         str(n["sft_steps"]), "--out", str(out / "sft")], out / "sft.log", "SFT")
    done("1. cold start (SFT)")

    stage("2. COMPASS reward model")

    groups = out / "data" / "compass_heldout"
    compass_data(groups, photos.HELDOUT, n["groups"], 13, B.load_backbone("mini"), "mini",
                 degradation=BuildArgs.lr_degradation)  # the LRs of the COMPASS build's groups
    run(["python", *annotate_command(groups, groups / "heldout.jsonl")], out / "annotate.log", "annotation")
    write_sriqa_layout(load_records(groups / "heldout.jsonl", groups), groups, out / "data" / "sriqa_heldout",
                       generative=lambda method: method in GENERATIVE)
    run(["python", "-m", "evaluation.sriqa", "--reward-model", "mini", "--sriqa-root", str(out / "data" / "sriqa_heldout"),
         "--out", str(out / "compass_eval"), "--baselines", "PSNR", "SSIM", "--device", "cpu", "--reward-views",
         str(a.eval_views)],
        out / "compass_eval.log", "COMPASS evaluation")
    done("2. COMPASS reward model")

    k = str(n["group"])
    rl_common = ["--model", "mini", "--crop-size", "64", "--group-size", k, "--rollout-batch", k, "--train-batch", k,
                 "--rollout-steps", "6", "--sample-every", "8", "--save-every", "8", "--reward-views",
                 str(a.reward_views)]
    stage("3. full-reference RL")
    run(["python", "rl_fr.py", *rl_common, "--hr-dir", str(dirs["hr_train"]), "--fidelity", "ssim",
         "--reward-model", "mini", "--steps", str(n["fr_steps"]), "--out", str(out / "fr.safetensors")],
        out / "rl_fr.log", "FR RL")
    done("3. full-reference RL")

    nr_stage = f"4. non-reference RL (mini COMPASS {'served on 127.0.0.1' if a.served_reward else 'in-process'})"
    stage(nr_stage)
    nr = ["python", "rl_nr.py", *rl_common, "--lora", str(out / "fr.safetensors"), "--lr-dir", str(dirs["lq"]),
          "--steps", str(n["nr_steps"]), "--out", str(out / "nr.safetensors")]
    if a.served_reward:
        with serving.serve_locally(presets.MINI_COMPASS, log_path=out / "compass_server.log") as url:
            tqdm.write(f"  reward server: {url} (transformers serve, pid-managed)")
            run([*nr, "--reward-url", url, "--reward-model-name", str(presets.MINI_COMPASS), "--reward-concurrency",
                 "4"], out / "rl_nr.log", "NR RL")
    else:
        run([*nr, "--reward-model", "mini"], out / "rl_nr.log", "NR RL")
    done(nr_stage)

    stage("5. inference")
    for key, lora in (("sft", []), ("fr", ["--lora", str(out / "fr.safetensors")]),
                      ("nr", ["--lora", str(out / "nr.safetensors")])):
        (out / f"sr_{key}").mkdir()
        run(["python", "infer.py", "--model", "mini", "--sft", "mini", *lora, "--input", str(dirs["lr_test"]),
             "--out", str(out / f"sr_{key}"), "--steps", str(n["infer_steps"]), "--hr-dir", str(dirs["hr_test"]),
             "--metrics", "PSNR", "SSIM", "piqe"],  # the weights-free ones: nothing to download
            out / f"sr_{key}" / "metrics.log", f"inference {key}")
    done("5. inference")

    stage("6. before / after RL on the held-out set")

    held_out, scorer = HeldOut.make(n["test"] * 2), reward.make_scorer("mini", views=a.eval_views)
    before_after = {name: evaluate_policy(policy("mini", lora), held_out, scorer, n["infer_steps"])[0]
                    for name, lora in (("SFT", None), ("SFT + FR LoRA", str(out / "fr.safetensors")),
                                       ("SFT + NR LoRA", str(out / "nr.safetensors")))}
    (out / "before_after.json").write_text(json.dumps(before_after, indent=1))
    done("6. before / after RL on the held-out set")

    stage("7. report")
    report = write_report(out, dirs, {k: v for k, v in timings.items() if k != "7. report"}, q, before_after,
                          (a.reward_views, a.eval_views))
    done("7. report")
    stages.close()
    print(f"\nreport: {report}")
    return report


if __name__ == "__main__":
    main()
