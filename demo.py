"""The whole OARS pipeline end to end on the tiny preset, on a CPU, in a few minutes (`make demo`).

Every stage runs as a user would run it: the real command lines in subprocesses, nothing private.

    0. data      real photographs shipped with scikit-image -> HR crops; LR made with data.py's
                 Real-ESRGAN degradation (a held-out test set, and "real" LQ inputs for the NR stage)
    1. cold start      train_sft.py                     (Eq.5)
    2. COMPASS         train_compass.py annotate / train / eval   (Eq.1-3, weights-free metrics; §3.3)
    3. FR RL           rl_fr.py  (F = SSIM vs HR, Q from the trained tiny COMPASS, in-process)
    4. NR RL           rl_nr.py  --lora fr.safetensors, reward from the tiny COMPASS served by
                       `transformers serve` on 127.0.0.1 (started and stopped here)
    5. inference       infer.py  --sft ... --lora ...   (merged into the SFT weights) + metric table
    6. report          out/demo/report.md with the numbers and pictures of every stage

    python demo.py            # full demo (< 10 min on 2 cores)
    python demo.py --quick    # shortened (CI)

The tiny models have random initial weights and a few hundred thousand parameters: the pictures are not
super-resolved photographs. What the demo shows is that every stage runs, and that each learning signal
moves the right way (SFT loss down, COMPASS learns its answer format and ranking, RL rewards per step).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import list_images, load_image, save_image

ROOT = Path(__file__).resolve().parent
PY = sys.executable
# No hub access is assumed: metrics whose weights are not cached are reported unavailable at once.
STAGE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# scikit-image sample photographs that ship inside the wheel (no download)
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "text", "coins", "grass", "gravel", "brick"]


def run(cmd: list[str], log: Path, title: str) -> None:
    """Run one stage's command line; its output goes to `log`; fail with the log's tail."""
    tqdm.write(f"  $ {' '.join(cmd[1:])}")
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([PY, *cmd[1:]] if cmd[0] == "python" else cmd, cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT, env=STAGE_ENV)
    if proc.returncode != 0:
        raise SystemExit(f"{title} failed (exit {proc.returncode}); last lines of {log}:\n"
                         + log.read_text()[-3000:])
    tqdm.write(f"    done in {time.time() - t:.0f} s (log: {log})")


# ====================================================================================================
# 0. data
# ====================================================================================================


def make_data(root: Path, hr_size: int, n_train: int, n_test: int, n_lq: int) -> dict[str, Path]:
    from skimage import data as skdata

    dirs = {k: root / k for k in ("hr_train", "hr_test", "lr_test", "hr_annot", "lr_annot", "hr_heldout",
                                  "lr_heldout", "lq", "hr_lq")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    images = []
    for name in PHOTOS:
        img = torch.from_numpy(np.asarray(getattr(skdata, name)())).float() / 255
        img = img[..., None].expand(-1, -1, 3) if img.ndim == 2 else img[..., :3]
        img = img.permute(2, 0, 1)
        side = min(img.shape[1:])  # centre square, then area-resize to hr_size
        top, left = (img.shape[1] - side) // 2, (img.shape[2] - side) // 2
        img = F.interpolate(img[None, :, top:top + side, left:left + side], size=(hr_size, hr_size), mode="area")[0]
        images.append((name, img))
    splits = {"hr_train": images[:n_train], "hr_test": images[n_train:n_train + n_test],
              "hr_lq": images[n_train + n_test:n_train + n_test + n_lq]}
    splits["hr_annot"] = splits["hr_train"]      # COMPASS labels on the training photos
    splits["hr_heldout"] = splits["hr_test"]     # ... and its held-out pairs on the test photos
    for split, items in splits.items():
        for name, img in items:
            save_image(img, dirs[split] / f"{name}.png")
    # LR by the Real-ESRGAN second-order degradation of data.py (its command line), fixed seeds
    for hr, lr, seed in (("hr_test", "lr_test", 1), ("hr_annot", "lr_annot", 2), ("hr_heldout", "lr_heldout", 3),
                         ("hr_lq", "lq", 4)):
        run(["python", "data.py", "--hr-folder", str(dirs[hr]), "--out-folder", str(dirs[lr]), "--seed", str(seed)],
            root / f"degrade_{lr}.log", f"degradation of {hr}")
    return dirs


# ====================================================================================================
# 2. COMPASS training data: SR candidates of several "methods" for every LR, annotated by the pipeline
# ====================================================================================================


def make_sr_candidates(lr_dir: Path, sr_dir: Path, out: Path, sft: Path, steps: int) -> None:
    """Methods of different quality per LR: bicubic, blurred, noisy, sharpened, and the tiny base / SFT models."""
    for path in list_images(lr_dir):
        lr = load_image(path)
        up = F.interpolate(lr[None], scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)[0]
        blur = F.avg_pool2d(up[None], 5, 1, 2, count_include_pad=False)[0]
        g = torch.Generator().manual_seed(hash(path.stem) % 2**31)
        variants = {"bicubic": up, "blur": blur, "noisy": (up + 0.08 * torch.randn(up.shape, generator=g)).clamp(0, 1),
                    "sharpen": (up + 1.5 * (up - blur)).clamp(0, 1)}
        for method, img in variants.items():
            save_image(img, sr_dir / method / f"{path.stem}.png")
    for method, extra in (("tiny_base", []), ("tiny_sft", ["--sft", str(sft)])):
        run(["python", "infer.py", "--model", "tiny", "--input", str(lr_dir), "--output", str(sr_dir / method),
             "--steps", str(steps), *extra], out / f"candidates_{method}_{lr_dir.name}.log", f"{method} candidates")


# ====================================================================================================
# 6. report
# ====================================================================================================


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def epoch_means(log: list[dict], per_epoch: int) -> list[float]:
    """Mean reward of each complete epoch (`per_epoch` consecutive steps), NaN-safe."""
    values = [e["reward_mean"] for e in log]
    out = []
    for i in range(0, len(values) - per_epoch + 1, per_epoch):
        chunk = [v for v in values[i:i + per_epoch] if v == v]
        out.append(float(np.mean(chunk)) if chunk else float("nan"))
    return out


def plot_curves(fr: list[dict], nr: list[dict], sft_losses: list[float], path: Path) -> None:
    """SFT loss per step; RL reward per LR image across its visits (one line per image, so the trend of
    each image is visible although every step draws a different image), and the kept-group fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot(sft_losses, lw=1)
    axes[0].set(title="1. SFT loss (Eq.5)", xlabel="step")
    for ax, log, title in ((axes[1], fr, "3. FR RL reward per image (Eq.4, F = SSIM)"),
                           (axes[2], nr, "4. NR RL reward per image (COMPASS)")):
        per_image: dict[str, list[tuple[int, float]]] = {}
        for e in log:
            for name, value in e.get("group_rewards", {}).items():
                per_image.setdefault(name, []).append((e["step"], value))
        for name, points in sorted(per_image.items()):
            ax.plot(*zip(*points), "o-", ms=3, lw=1, label=name)
        ax.set(title=title, xlabel="RL step", ylabel="mean reward of the K rollouts")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def per_image_change(log: list[dict]) -> tuple[float, int, int]:
    """Mean over images of (reward at the last visit - reward at the first visit), and how many images
    went up / were visited at least twice."""
    per_image: dict[str, list[float]] = {}
    for e in log:
        for name, value in e.get("group_rewards", {}).items():
            per_image.setdefault(name, []).append(value)
    deltas = [v[-1] - v[0] for v in per_image.values() if len(v) > 1]
    return (float(np.mean(deltas)) if deltas else float("nan")), sum(d > 0 for d in deltas), len(deltas)


def comparison_grid(lr_dir: Path, columns: list[tuple[str, Path]], hr_dir: Path, path: Path) -> None:
    """One row per test image: LR (bicubic) | SFT | FR | NR | HR."""
    rows = []
    for lr_path in list_images(lr_dir):
        lr = load_image(lr_path)
        tiles = [F.interpolate(lr[None], scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)[0]]
        tiles += [load_image(folder / f"{lr_path.stem}.png") for _, folder in columns]
        tiles.append(load_image(hr_dir / f"{lr_path.stem}.png"))
        rows.append(torch.cat(tiles, dim=-1))
    grid = torch.cat(rows, dim=-2)
    save_image(F.interpolate(grid[None], scale_factor=2, mode="nearest")[0], path)  # 2x: tiles are 64 px


def metric_row(csv_path: Path) -> dict[str, str]:
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return next(r for r in rows if r.get("name", "").upper() == "MEAN")


def write_report(out: Path, dirs: dict[str, Path], timings: dict[str, float], quick: bool) -> Path:
    sft_log = json.loads((out / "sft" / "train_log.json").read_text())
    losses = sft_log["losses"]
    k = max(1, len(losses) // 10)
    fr, nr = read_jsonl(out / "fr" / "rewards.jsonl"), read_jsonl(out / "nr" / "rewards.jsonl")
    plot_curves(fr, nr, losses, out / "curves.png")
    comparison_grid(dirs["lr_test"], [("SFT", out / "sr_sft"), ("FR", out / "sr_fr"), ("NR", out / "sr_nr")],
                    dirs["hr_test"], out / "comparison.png")
    compass_rows = list(csv.DictReader(open(out / "compass_eval" / "sriqa_accuracy.csv")))
    parse = json.loads((out / "compass_parse.json").read_text())

    def half(log: list[dict], key: str) -> tuple[float, float]:
        h = max(1, len(log) // 2)
        first = [e[key] for e in log[:h] if e[key] == e[key]]
        last = [e[key] for e in log[h:] if e[key] == e[key]] or first
        return float(np.mean(first)), float(np.mean(last))

    lines = [
        "# OARS demo report (tiny preset)", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')}{' with --quick' if quick else ''}. Every stage ran as its "
        "command line (see `*.log`). The tiny models have random initial weights: the signals, not the "
        "pictures, are what to read here.", "",
        "## Stage times", "", "| stage | seconds |", "|---|---|",
        *[f"| {s} | {t:.0f} |" for s, t in timings.items()], "",
        "## 1. Cold start (train_sft.py, Eq.5)", "",
        f"- flow-matching loss, mean of the first {k} steps: **{np.mean(losses[:k]):.4f}**, "
        f"of the last {k} steps: **{np.mean(losses[-k:]):.4f}** ({len(losses)} steps)",
        f"- NaN/Inf steps skipped: {sft_log['nonfinite_skipped']}", "",
        "## 2. COMPASS reward model (train_compass.py)", "",
        f"- annotated pairs for training: {parse['train_records']}; held-out pairs: {parse['heldout_records']}",
        f"- answer-format parse rate of the trained model on held-out pairs: **{parse['parse_rate']:.1%}** "
        f"(untrained tiny model: {parse['parse_rate_untrained']:.1%})",
        "- pairwise preference accuracy on the held-out pairs (SRIQA-Bench layout, MOS = Eq.4 of the labels):", "",
        "| type | method | Reg-Acc | Gen-Acc | All-Acc | note |", "|---|---|---|---|---|---|",
        *[f"| {r['type']} | {r['method']} | {r.get('Reg-Acc', '')} | {r.get('Gen-Acc', '')} | {r.get('All-Acc', '')} | "
          f"{r.get('note', '')} |" for r in compass_rows], "",
        "## 3-4. Online RL (rl_fr.py, rl_nr.py; NFT, Eq.6-8)", "",
        "| stage | steps | reward mean, first half | reward mean, second half | per image, last - first visit "
        "| kept-group fraction | invalid rewards |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, log in (("FR (F = SSIM vs HR)", fr), ("NR (COMPASS served)", nr)):
        a, b = half(log, "reward_mean")
        delta, up, seen = per_image_change(log)
        lines.append(f"| {name} | {len(log)} | {a:.4f} | {b:.4f} | {delta:+.4f} ({up} of {seen} up) | "
                     f"{np.mean([e['kept_fraction'] for e in log]):.2f} | {int(sum(e['invalid'] for e in log))} |")
    # one step = one LR image; an epoch sees every training image once, so epoch means are comparable
    n_fr, n_nr = len(list_images(dirs["lr_annot"])), len(list_images(dirs["lq"]))
    lines += ["", f"Reward mean per epoch (FR: {n_fr} images per epoch, NR: {n_nr}); the per-step values "
              "below depend on which image the step drew:", "",
              "| epoch | FR reward | NR reward |", "|---|---|---|"]
    fr_ep, nr_ep = epoch_means(fr, n_fr), epoch_means(nr, n_nr)
    for i in range(max(len(fr_ep), len(nr_ep))):
        cell = lambda v, i: f"{v[i]:.4f}" if i < len(v) else ""  # noqa: E731
        lines.append(f"| {i + 1} | {cell(fr_ep, i)} | {cell(nr_ep, i)} |")
    lines += ["", "| step | FR reward | FR kept | NR reward | NR kept |", "|---|---|---|---|---|"]
    for i in range(max(len(fr), len(nr))):
        fv = f"{fr[i]['reward_mean']:.4f} | {fr[i]['kept_fraction']:.2f}" if i < len(fr) else " | "
        nv = f"{nr[i]['reward_mean']:.4f} | {nr[i]['kept_fraction']:.2f}" if i < len(nr) else " | "
        lines.append(f"| {i + 1} | {fv} | {nv} |")
    lines += ["", "![curves](curves.png)", "", "## 5. Inference and metrics (infer.py --sft ... --lora ...)", "",
              "Test images: LR | SFT | SFT + FR LoRA | SFT + NR LoRA | HR", "", "![comparison](comparison.png)", ""]
    metric_rows = {name: metric_row(out / f"sr_{key}" / "metrics.csv") for name, key in
                   (("SFT", "sft"), ("SFT + FR", "fr"), ("SFT + NR", "nr"))}
    cols = [c for c in next(iter(metric_rows.values())) if c != "name"]
    lines += ["| policy | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in metric_rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{float(row[c]):.4f}" if row[c] else "n/a" for c in cols) + " |")
    lines += ["", "Metrics other than PSNR/SSIM need downloaded weights and show as n/a offline "
              "(see `sr_*/metrics.log`)."]
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
    a = p.parse_args(argv)
    out = Path(a.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    q = a.quick
    n = dict(sft_steps=20 if q else 120, compass_epochs=20 if q else 40, fr_steps=6 if q else 24,
             nr_steps=2 if q else 10, group=4 if q else 8, infer_steps=4 if q else 10)
    timings: dict[str, float] = {}
    stages = tqdm(total=6, desc="OARS demo", unit="stage")

    def stage(name: str):
        stages.set_postfix_str(name)
        tqdm.write(f"\n== {name}")
        timings[name] = time.time()

    def done(name: str):
        timings[name] = time.time() - timings[name]
        stages.update(1)

    stage("0. data")
    dirs = make_data(out / "data", hr_size=64, n_train=6, n_test=2, n_lq=2)
    done("0. data")

    stage("1. cold start (SFT)")
    run(["python", "train_sft.py", "--model", "tiny", "--hr-dir", str(dirs["hr_train"]), "--crop-size", "64",
         "--batch-size", "2", "--steps", str(n["sft_steps"]), "--lr", "1e-3", "--warmup-steps", "5",
         "--sample-every", str(n["sft_steps"]), "--sample-steps", "4", "--save-every", str(n["sft_steps"]),
         "--out", str(out / "sft")], out / "sft.log", "SFT")
    done("1. cold start (SFT)")

    stage("2. COMPASS reward model")
    for split in ("annot", "heldout"):
        sr_dir = out / "data" / f"sr_{split}"
        make_sr_candidates(dirs[f"lr_{split}"], sr_dir, out, out / "sft", n["infer_steps"])
        run(["python", "train_compass.py", "annotate", "--lr-dir", str(dirs[f"lr_{split}"]), "--sr-dir", str(sr_dir),
             "--gt-dir", str(dirs[f"hr_{split}"]), "--out", str(out / "data" / f"compass_{split}.jsonl"),
             "--root", str(out / "data"), "--fidelity-metric", "ssim", "--anchor", "piqe", "--anchor-mapping",
             "minmax", "--compare", "nr", "--device", "cpu"],
            out / f"annotate_{split}.log", f"annotation ({split})")
    run(["python", "train_compass.py", "train", "--model", "tiny", "--data", str(out / "data" / "compass_annot.jsonl"),
         "--root", str(out / "data"), "--out", str(out / "compass"), "--epochs", str(n["compass_epochs"]),
         "--global-batch", "4", "--per-device-batch", "4", "--lr", "5e-3", "--warmup-steps", "5", "--device", "cpu"],
        out / "compass_train.log", "COMPASS training")
    from train_compass import load_records, write_sriqa_layout

    write_sriqa_layout(load_records(out / "data" / "compass_heldout.jsonl", out / "data"), out / "data",
                       out / "data" / "sriqa_heldout", generative=lambda method: method.startswith("tiny"))
    run(["python", "train_compass.py", "eval", "--model", str(out / "compass"), "--sriqa-root",
         str(out / "data" / "sriqa_heldout"), "--out", str(out / "compass_eval"), "--baselines", "PSNR", "SSIM",
         "--device", "cpu"], out / "compass_eval.log", "COMPASS evaluation")
    record_parse_rate(out)
    done("2. COMPASS reward model")

    rl_common = ["--model", "tiny", "--crop-size", "64", "--group-size", str(n["group"]), "--rollout-batch",
                 str(n["group"]), "--train-batch", str(n["group"]), "--rollout-steps", "4", "--lr", "3e-2",
                 "--sample-every", "4", "--save-every", "4"]
    stage("3. full-reference RL")
    run(["python", "rl_fr.py", *rl_common, "--lr-dir", str(dirs["lr_annot"]), "--hr-dir", str(dirs["hr_annot"]),
         "--fidelity", "ssim", "--reward-model", str(out / "compass"), "--steps", str(n["fr_steps"]),
         "--out", str(out / "fr.safetensors")], out / "rl_fr.log", "FR RL")
    done("3. full-reference RL")

    stage("4. non-reference RL (COMPASS served on 127.0.0.1)")
    import serving

    with serving.serve_locally(out / "compass", log_path=out / "compass_server.log") as url:
        tqdm.write(f"  reward server: {url} (transformers serve, pid-managed)")
        run(["python", "rl_nr.py", *rl_common, "--lora", str(out / "fr.safetensors"), "--lr-dir", str(dirs["lq"]),
             "--reward-url", url, "--reward-model-name", str(out / "compass"), "--reward-concurrency", "4",
             "--steps", str(n["nr_steps"]), "--out", str(out / "nr.safetensors")], out / "rl_nr.log", "NR RL")
    done("4. non-reference RL (COMPASS served on 127.0.0.1)")

    stage("5. inference + metrics")
    for key, lora in (("sft", []), ("fr", ["--lora", str(out / "fr.safetensors")]),
                      ("nr", ["--lora", str(out / "nr.safetensors")])):
        (out / f"sr_{key}").mkdir()
        run(["python", "infer.py", "--model", "tiny", "--sft", str(out / "sft"), *lora, "--input", str(dirs["lr_test"]),
             "--output", str(out / f"sr_{key}"), "--steps", str(n["infer_steps"]), "--hr", str(dirs["hr_test"])],
            out / f"sr_{key}" / "metrics.log", f"inference {key}")
    done("5. inference + metrics")

    stage("6. report")
    report = write_report(out, dirs, {k: v for k, v in timings.items() if k != "6. report"}, q)
    done("6. report")
    stages.close()
    print(f"\nreport: {report}")
    return report


def record_parse_rate(out: Path) -> None:
    """Share of held-out pairs whose generated answer parses, trained vs untrained tiny COMPASS."""
    import reward

    records = read_jsonl(out / "data" / "compass_heldout.jsonl")
    root = out / "data"
    lr = [reward_image(root / r["lr"]) for r in records]
    sr = [reward_image(root / r["sr"]) for r in records]
    rates = {}
    for key, model_name in (("parse_rate", str(out / "compass")), ("parse_rate_untrained", "tiny")):
        model, processor = reward.load_compass(model_name)
        scores = reward.LocalScorer(model, processor, synthetic=True, mode="text").score(lr, sr)
        rates[key] = float(scores.valid.float().mean())
    rates.update(train_records=len(read_jsonl(out / "data" / "compass_annot.jsonl")), heldout_records=len(records))
    (out / "compass_parse.json").write_text(json.dumps(rates, indent=1))


def reward_image(path: Path):
    from data import to_pil

    return to_pil(load_image(path))


if __name__ == "__main__":
    main()
