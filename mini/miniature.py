"""OARS in miniature: the paper's RL claims re-run on the trained mini presets, on a CPU.

The paper's claims are about what RL does to the policy. With the mini backbone (base + SFT) and the mini
COMPASS they can be checked on a laptop, from the same shipped weights, with the same hyper-parameters
for every row of a table and several seeds per row:

    Table 5   FR RL with the LoRA on the BASE (merged into SFT, paper) vs on the SFT weights, each then
              followed by the NR stage: RL on SFT should hack the reward and lose fidelity;
    Table 8   NR RL rewarded by Eq.4 ("compass"), by the gated gain F^(Q_LR/gamma) dQ ("gated") and by
              the gain dQ alone ("gain"): the gain alone should raise Q_SR most and lose most fidelity;
    Table 7   the NR stage with NFT vs Flow-GRPO (same reward; same steps, and Flow-GRPO again with the steps
              that fit in the NFT run's wall time): NFT should get further.

Every RL run is the project's own command line (rl_fr.py, rl_nr.py). Every policy (the SFT weights with
the RL LoRA merged, paper §4) is evaluated on a FIXED held-out set with FIXED noise (`evaluate_policy`):
24 crops of the held-out photos, plain LR (HELDOUT_LR), 40 Euler steps. Columns: PSNR and SSIM (Y)
and sharpness against the HR; the mini COMPASS's F, Q_SR and Eq.4 reward R (it never sees the HR); R_FR, the
FR stage's reward (Eq.4 with F = SSIM to the HR, Q from the mini COMPASS); two
weights-free no-reference metrics, SNB (evaluate.snb_quality, the annotation anchor COMPASS learned from)
and PIQE (pyiqa, independent of it); wall time. Mean +- std over seeds; the report says row by row
whether the paper's sign reproduces.

    python miniature.py                  # 3 seeds, every table (about 15 min on 2 CPU cores)
    python miniature.py --quick          # 1 seed, a few steps (CI)
Writes OUT/report.md, OUT/results.json, a picture per row, and every run's logs and LoRA files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import reward
from common import backbone as B
from common import data, presets
from common import training as T
from common.commands import run_command
from evaluation import evaluate
from infer import load_policy, post_process
from mini import photos
from mini.sr_eval import make_lr


# The held-out evaluation: crops of photos.HELDOUT (never trained on).
EVAL_SEED = 500
HELDOUT_LR = "plain"
"""The held-out LRs (mini.sr_eval.make_lr): 'plain' = Gaussian blur 0.8 + bicubic 4x down, the LR on which the
mini SR bars are set (LR consistency >= 30 dB among them); 'mini' or 'realesrgan' (the paper's ranges, sized for
256 px crops: they leave a 16 px LR none of its 8-16 px content, so a policy cannot keep the picture; the tables
before the z_dim 8 backbone used them)."""
LQ_DEGRADATION = data.MINI_DEGRADATION
"""The NR stage's "real LQ" inputs: data.py's Real-ESRGAN pipeline with every stage, at the ranges scaled to the
mini crops (data.MINI_DEGRADATION; the SFT trained on it)."""
METRICS = ("PSNR", "SSIM", "sharpness", "F", "Q_SR", "R", "R_FR", "SNB", "PIQE")
LOWER_BETTER = {"PIQE"}


# ====================================================================================================
# evaluation of a policy on the fixed held-out set
# ====================================================================================================


@dataclass
class HeldOut:
    """The fixed held-out set: HR crops (N,3,64,64) and their LR (N,3,16,16)."""
    hr: torch.Tensor
    lr: torch.Tensor

    @classmethod
    def make(cls, n: int, seed: int = EVAL_SEED, lr_kind: str = HELDOUT_LR) -> "HeldOut":
        hr = photos.random_crops(photos.HELDOUT, n, 64, torch.Generator().manual_seed(seed))
        return cls(hr, make_lr(hr, lr_kind, seed))


def evaluate_policy(bb: B.Backbone, held_out: HeldOut, scorer, steps: int = 40, seed: int = 0,
                    gamma: float = 7.0) -> tuple[dict[str, list[float]], torch.Tensor]:
    """Per-crop metrics of one policy on the held-out set, and its SR images (N,3,64,64).

    The noise of crop i is fixed (seed + i), so policies differ only by their weights. `scorer` is a
    COMPASS scorer (reward.make_scorer): F, Q_LR, Q_SR from the (LR, SR) pair with the fidelity prompt,
    R = Eq.4 with `gamma` (the non-reference stage's reward); R_FR = Eq.4 with F = SSIM to the HR (the
    full-reference stage's reward with `--fidelity ssim`, as the demo trains it). Every metric reads the
    policy's own samples; LRcons_out and SSIM_out read them as `infer.py --model mini` delivers them
    (back-projection and flat gate at the mini defaults)."""
    sr = B.super_resolve_many(bb, held_out.lr, steps, seed)
    ssim = evaluate.create_metric("SSIM")
    out = {name: [float(v) for v in metric(sr, held_out.hr).flatten()]
           for name, metric in (("PSNR", evaluate.create_metric("PSNR")), ("SSIM", ssim))}
    out["sharpness"] = evaluate.sharpness(sr).tolist()
    out["LRcons"] = evaluate.lr_consistency(sr, held_out.lr).tolist()  # does it still explain its input? (dB)
    # ... and as `infer.py --model mini` delivers it (back-projection, then the flat gate: neither in the paper)
    delivered = post_process(sr, held_out.lr, presets.MINI_BACK_PROJECTION, presets.MINI_FLAT_GATE)
    out["LRcons_out"] = evaluate.lr_consistency(delivered, held_out.lr).tolist()
    out["SSIM_out"] = [float(v) for v in ssim(delivered, held_out.hr).flatten()]
    out["peak"] = evaluate.spectral_peak(sr).tolist()  # a periodic artefact (a grid the reward pays for)?
    out["SNB"] = evaluate.snb_quality(sr).tolist()
    out["PIQE"] = [float(v) for v in evaluate.create_metric("piqe")(sr).flatten()]
    scores = scorer.score([data.to_pil(x) for x in held_out.lr], [data.to_pil(x) for x in sr])
    out["F"], out["Q_LR"], out["Q_SR"] = scores.F.tolist(), scores.q_lr.tolist(), scores.q_sr.tolist()
    out["R"] = reward.compass_reward(scores.F, scores.q_lr, scores.q_sr, gamma).tolist()
    # the full-reference stage's own reward (rl_fr.py --fidelity ssim): Eq.4 with F = the SSIM above (clamped to
    # [0, 1] as reward.FidelityScorer does), Q from COMPASS
    f_ssim = torch.tensor(out["SSIM"]).clamp(0.0, 1.0)
    out["R_FR"] = reward.compass_reward(f_ssim, scores.q_lr, scores.q_sr, gamma).tolist()
    return out, sr


def policy(sft: str = "mini", lora: str | None = None, model: str = "mini") -> B.Backbone:
    """The final policy of the paper: the SFT weights with the RL LoRA merged into them (§4)."""
    return load_policy(model, sft, (lora,) if lora else ())


def mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=float)
    return (float(v.mean()), float(v.std())) if len(v) else (math.nan, math.nan)


# ====================================================================================================
# the runs
# ====================================================================================================


@dataclass
class Settings:
    """Hyper-parameters shared by every row (no per-row tuning)."""
    group_size: int = 8
    rollout_steps: int = 6
    lr: float = 3e-4  # the paper's (§5.1), shared by every row
    fr_steps: int = 48
    nr_steps: int = 32
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_crops: int = 24
    eval_steps: int = 40
    train_images: int = 48
    reward_views: int = 1  # the RL reward's mini COMPASS readings: means over this many flips/rotations
    eval_views: int = presets.MINI_COMPASS_VIEWS  # the same for the held-out evaluation (the shipped reading)
    extra: list[str] = field(default_factory=list)

    def common(self, seed: int) -> list[str]:
        k = str(self.group_size)
        return ["--model", "mini", "--crop-size", "64", "--group-size", k, "--rollout-batch", k, "--train-batch", k,
                "--rollout-steps", str(self.rollout_steps), "--lr", str(self.lr), "--reward-model", "mini",
                "--seed", str(seed), "--sample-every", "0", "--save-every", "1000", "--reward-views",
                str(self.reward_views), *self.extra]


def make_training_data(folder: Path, n: int) -> tuple[Path, Path]:
    """HR crops of the TRAINING photos for the FR stage and degraded LR inputs ("real LQ") for the NR
    stage, from different crops. Written once."""
    hr_dir, lq_dir = folder / "hr", folder / "lq"
    if not hr_dir.exists():
        hr = photos.random_crops(photos.TRAIN, n, 64, torch.Generator().manual_seed(301))
        for i, x in enumerate(hr):
            data.save_image(x, hr_dir / f"{i:04d}.png")
        lq_hr = photos.random_crops(photos.TRAIN, n, 64, torch.Generator().manual_seed(302))
        for i in range(n):
            lq = data.degrade(lq_hr[i:i + 1], LQ_DEGRADATION,
                              generator=torch.Generator().manual_seed(data.item_seed(302, 0, i)))
            data.save_image(lq[0], lq_dir / f"{i:04d}.png")
    return hr_dir, lq_dir


@dataclass
class Row:
    name: str
    table: str
    claim_key: str
    loras: dict[int, Path] = field(default_factory=dict)   # seed -> LoRA file
    seconds: dict[int, float] = field(default_factory=dict)  # seed -> RL wall time, all its stages
    last_stage_seconds: dict[int, float] = field(default_factory=dict)  # seed -> its last stage alone


def made_with(s: Settings) -> dict:
    """What a finished run depends on: the shared settings and the shipped weights it starts from and is
    rewarded by (sha256 of every file of the mini backbone, SFT and COMPASS)."""
    files = [presets.MINI_SFT] + [p for folder in (presets.MINI_BACKBONE, presets.MINI_COMPASS)
                                  for p in sorted(folder.rglob("*")) if p.is_file()]
    return {"settings": json.loads(json.dumps(s.__dict__)),
            "weights": {str(p.relative_to(presets.ROOT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}


def claim_runs_dir(runs_dir: Path, s: Settings) -> None:
    """Reuse finished runs only if they were made with these settings and these weights (the stamp
    `made_with.json` in the folder); otherwise stop with an error naming the folder, never deleting it."""
    stamp = runs_dir / "made_with.json"
    want = json.dumps(made_with(s), indent=1)
    if stamp.exists() and stamp.read_text() == want:
        return
    if stamp.exists() or any(runs_dir.glob("*.safetensors")):
        raise SystemExit(f"{runs_dir} holds runs made with other settings or other mini weights (see {stamp}); "
                         "move the folder away or choose another --out")
    runs_dir.mkdir(parents=True, exist_ok=True)
    T.atomic_write_text(want, stamp)


def run_rows(out: Path, s: Settings, hr_dir: Path, lq_dir: Path, tables: set[str]) -> list[Row]:
    """Train every row for every seed (runs already finished are reused: their LoRA file exists, and the
    folder's stamp says they were made with the same settings and weights)."""
    rows = {name: Row(name, table, key) for name, table, key in (
        ("FR (base)", "5", "fr_base"), ("FR + NR (base)", "5", "nr_base"), ("FR (SFT)", "5", "fr_sft"),
        ("FR + NR (SFT)", "5", "nr_sft"), ("NR compass", "8", "nr_base"), ("NR gated", "8", "nr_gated"),
        ("NR gain", "8", "nr_gain"), ("NR NFT", "7", "nr_base"), ("NR Flow-GRPO", "7", "nr_grpo"),
        ("NR Flow-GRPO, NFT's time", "7", "nr_grpo_time"))}
    runs_dir = out / "runs"
    claim_runs_dir(runs_dir, s)
    for seed in s.seeds:
        def stage(key: str, script: str, args: list[str]) -> tuple[Path, float]:
            lora = runs_dir / f"{key}_s{seed}.safetensors"
            if lora.exists():
                return lora, json.loads((runs_dir / f"{key}_s{seed}.time").read_text())
            seconds = run_command([script, *s.common(seed), *args, "--out", str(lora)], runs_dir / f"{key}_s{seed}.log")
            (runs_dir / f"{key}_s{seed}.time").write_text(json.dumps(seconds))
            return lora, seconds

        fr_args = ["--hr-dir", str(hr_dir), "--fidelity", "ssim", "--steps", str(s.fr_steps)]
        def nr_args(steps: int = s.nr_steps) -> list[str]:  # other steps: Flow-GRPO at equal wall time
            return ["--lr-dir", str(lq_dir), "--steps", str(steps)]
        fr_base, t_fr_base = stage("fr_base", "rl_fr.py", fr_args)
        done = {"fr_base": (fr_base, t_fr_base, t_fr_base)}  # key -> (LoRA, all stages' seconds, last stage's)
        lora, t = stage("nr_base", "rl_nr.py", [*nr_args(), "--lora", str(fr_base)])
        done["nr_base"] = (lora, t_fr_base + t, t)
        if "5" in tables:
            fr_sft, t_fr_sft = stage("fr_sft", "rl_fr.py", [*fr_args, "--init", "sft", "--sft", "mini"])
            done["fr_sft"] = (fr_sft, t_fr_sft, t_fr_sft)
            lora, t = stage("nr_sft", "rl_nr.py", [*nr_args(), "--lora", str(fr_sft), "--init", "sft", "--sft", "mini"])
            done["nr_sft"] = (lora, t_fr_sft + t, t)
        if "8" in tables:
            for form in ("gated", "gain"):
                lora, t = stage(f"nr_{form}", "rl_nr.py", [*nr_args(), "--lora", str(fr_base), "--reward-form", form])
                done[f"nr_{form}"] = (lora, t_fr_base + t, t)
        if "7" in tables:
            lora, t = stage("nr_grpo", "rl_nr.py", [*nr_args(), "--lora", str(fr_base), "--objective", "flow_grpo"])
            done["nr_grpo"] = (lora, t_fr_base + t, t)
            # equal wall time: Flow-GRPO gets the steps that fit in the NFT run's NR-stage seconds (this seed's
            # two same-step runs give the ratio; each includes the script's loading, the same for both)
            steps = max(1, round(s.nr_steps * done["nr_base"][2] / t))
            lora, t = stage("nr_grpo_time", "rl_nr.py", [*nr_args(steps), "--lora", str(fr_base),
                                                         "--objective", "flow_grpo"])
            done["nr_grpo_time"] = (lora, t_fr_base + t, t)
        for row in rows.values():
            if row.claim_key in done and row.table in tables:
                row.loras[seed], row.seconds[seed], row.last_stage_seconds[seed] = done[row.claim_key]
    return [r for r in rows.values() if r.loras]


# ====================================================================================================
# the report
# ====================================================================================================


def cell(stats: dict, metric: str) -> str:
    m, sd = stats[metric]
    digits = 4 if metric in ("SSIM", "F", "sharpness") else 2 if metric in ("PSNR", "PIQE") else 3
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def claims(results: dict[str, dict]) -> list[tuple[str, str, bool, str]]:
    """The paper's signs, checked on the means: (table, claim, reproduced, the numbers)."""
    m = {name: {k: v[0] for k, v in r.items() if isinstance(v, tuple)} for name, r in results.items()}
    checks = [
        ("5", "FR RL on the base raises the Eq.4 reward over SFT while SSIM drops by at most 0.01",
         ("SFT", "FR (base)"), lambda a, b: b["R"] > a["R"] and a["SSIM"] - b["SSIM"] <= 0.01,
         lambda a, b: f"R {a['R']:.3f} -> {b['R']:.3f}, SSIM {a['SSIM']:.4f} -> {b['SSIM']:.4f}"),
        ("5", "FR RL on the base raises its own reward (Eq.4 with F = SSIM to the HR: R_FR) over SFT",
         ("SFT", "FR (base)"), lambda a, b: b["R_FR"] > a["R_FR"],
         lambda a, b: f"R_FR {a['R_FR']:.3f} -> {b['R_FR']:.3f}"),
        ("5", "RL on the SFT weights loses more SSIM than on the base (FR stage)", ("FR (base)", "FR (SFT)"),
         lambda a, b: b["SSIM"] < a["SSIM"], lambda a, b: f"SSIM base {a['SSIM']:.4f}, SFT {b['SSIM']:.4f}"),
        ("5", "RL on the SFT weights loses more SSIM than on the base (FR + NR)", ("FR + NR (base)", "FR + NR (SFT)"),
         lambda a, b: b["SSIM"] < a["SSIM"], lambda a, b: f"SSIM base {a['SSIM']:.4f}, SFT {b['SSIM']:.4f}"),
        ("5", "the NR stage adds no-reference quality on top of FR (SNB up and PIQE down)",
         ("FR (base)", "FR + NR (base)"), lambda a, b: b["SNB"] > a["SNB"] and b["PIQE"] < a["PIQE"],
         lambda a, b: f"SNB {a['SNB']:.3f} -> {b['SNB']:.3f}, PIQE {a['PIQE']:.2f} -> {b['PIQE']:.2f}"),
        ("8", "gain-only raises Q_SR more than COMPASS but loses more SSIM", ("NR compass", "NR gain"),
         lambda a, b: b["Q_SR"] > a["Q_SR"] and b["SSIM"] < a["SSIM"],
         lambda a, b: f"Q_SR compass {a['Q_SR']:.3f}, gain {b['Q_SR']:.3f}; SSIM compass {a['SSIM']:.4f}, "
                      f"gain {b['SSIM']:.4f}"),
        ("8", "the gated form keeps SSIM between gain-only and COMPASS", ("NR gain", "NR gated", "NR compass"),
         lambda a, b, c: a["SSIM"] <= b["SSIM"] <= c["SSIM"],
         lambda a, b, c: f"SSIM gain {a['SSIM']:.4f}, gated {b['SSIM']:.4f}, compass {c['SSIM']:.4f}"),
        ("7", "NFT reaches a higher Eq.4 reward than Flow-GRPO with the same steps", ("NR NFT", "NR Flow-GRPO"),
         lambda a, b: a["R"] > b["R"], lambda a, b: f"R NFT {a['R']:.3f}, Flow-GRPO {b['R']:.3f}"),
        ("7", "an NFT run is faster than a Flow-GRPO run", ("NR NFT", "NR Flow-GRPO"),
         lambda a, b: a["stage_seconds"] < b["stage_seconds"],
         lambda a, b: f"NR stage seconds NFT {a['stage_seconds']:.0f}, Flow-GRPO {b['stage_seconds']:.0f}"),
        ("7", "NFT reaches a higher Eq.4 reward than Flow-GRPO in the same wall time",
         ("NR NFT", "NR Flow-GRPO, NFT's time"), lambda a, b: a["R"] > b["R"],
         lambda a, b: f"R NFT {a['R']:.3f} ({a['stage_seconds']:.0f} s), Flow-GRPO {b['R']:.3f} "
                      f"({b['stage_seconds']:.0f} s)"),
    ]
    return [(table, text, bool(ok(*[m[n] for n in names])), numbers(*[m[n] for n in names]))
            for table, text, names, ok, numbers in checks if all(n in m for n in names)]


def strip(images: torch.Tensor, n: int = 6) -> torch.Tensor:
    """The first n held-out crops side by side (3,64,64n)."""
    return torch.cat(list(images[:n]), dim=-1)


def write_report(out: Path, results: dict[str, dict], pictures: dict[str, Path], s: Settings, minutes: float,
                 quick: bool) -> Path:
    lines = [f"# OARS in miniature{' (--quick)' if quick else ''}", "",
             f"{len(s.seeds)} seed(s) per row; shared settings: K={s.group_size}, {s.rollout_steps} rollout steps, "
             f"LoRA r32/a64, lr {s.lr:g}, FR {s.fr_steps} steps (F = SSIM to the HR), NR {s.nr_steps} steps (mini COMPASS "
             f"in-process, readings over {s.reward_views} flip(s)/rotation(s)); held-out: {s.eval_crops} crops of "
             f"{', '.join(photos.HELDOUT)}, {s.eval_steps} Euler steps, fixed noise, mini COMPASS readings over "
             f"{s.eval_views} flip(s)/rotation(s). Total run time {minutes:.0f} min.", ""]
    for table, title in (("5", "Table 5: RL stages, LoRA on the base vs on the SFT weights"),
                         ("8", "Table 8: reward forms of the NR stage"), ("7", "Table 7: NFT vs Flow-GRPO (NR stage)")):
        names = ["SFT"] + [n for n, r in results.items() if r.get("table") == table]
        if len(names) == 1:
            continue
        lines += [f"## {title}", "", "| policy | " + " | ".join(m + (" ↓" if m in LOWER_BETTER else "") for m in METRICS)
                  + " | RL seconds |", "|---|" + "---|" * (len(METRICS) + 1)]
        for name in names:
            r = results[name]
            sec = f"{r['seconds'][0]:.0f}" if "seconds" in r else "-"
            lines.append(f"| {name} | " + " | ".join(cell(r, m) for m in METRICS) + f" | {sec} |")
        lines.append("")
        lines += [f"![{name}]({pictures[name].name}) {name}  " for name in names if name in pictures] + [""]
    lines += ["## Does the paper's sign reproduce?", "", "| table | claim | reproduced | numbers (means) |",
              "|---|---|---|---|"]
    lines += [f"| {t} | {text} | {'yes' if ok else 'no'} | {nums} |" for t, text, ok, nums in claims(results)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/miniature")
    p.add_argument("--quick", action="store_true", help="1 seed, a few steps, small evaluation (CI)")
    p.add_argument("--tables", default="5,8,7", help="which tables to run, e.g. 5,8")
    p.add_argument("--reward-views", type=int, default=Settings.reward_views,
                   help="the RL reward's mini COMPASS readings averaged over this many flips/rotations (1 = paper)")
    p.add_argument("--eval-views", type=int, default=Settings.eval_views,
                   help="the same for the held-out evaluation")
    a = p.parse_args(argv)
    t0 = time.time()
    views = dict(reward_views=a.reward_views, eval_views=a.eval_views)
    quick = dict(group_size=4, fr_steps=3, nr_steps=2, seeds=(0,), eval_crops=4, eval_steps=4, train_images=8)
    s = Settings(**(quick if a.quick else {}), **views)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hr_dir, lq_dir = make_training_data(out / "data", s.train_images)
    rows = run_rows(out, s, hr_dir, lq_dir, set(a.tables.split(",")))
    held_out = HeldOut.make(s.eval_crops)
    scorer = reward.make_scorer("mini", views=s.eval_views)
    results: dict[str, dict] = {}
    pictures: dict[str, Path] = {}
    per_seed: dict[str, dict[int, dict]] = {}
    evaluated: dict[str | None, tuple[dict, Path]] = {}  # LoRA file -> (means, picture): rows share runs
    for name, loras in [("SFT", {0: None})] + [(r.name, r.loras) for r in rows]:
        per_seed[name] = {}
        for seed, lora in loras.items():
            key = str(lora) if lora else None
            if key not in evaluated:
                metrics, sr = evaluate_policy(policy("mini", key), held_out, scorer, s.eval_steps)
                picture = out / f"picture_{Path(key).stem if key else 'SFT'}.png"
                data.save_image(F.interpolate(strip(sr)[None], scale_factor=2, mode="nearest")[0], picture)
                evaluated[key] = ({k: float(np.nanmean(v)) for k, v in metrics.items()}, picture)
            per_seed[name][seed] = evaluated[key][0]
            if seed == min(loras):
                pictures[name] = evaluated[key][1]
        results[name] = {k: mean_std([per_seed[name][sd][k] for sd in per_seed[name]]) for k in METRICS}
    for r in rows:
        results[r.name].update(table=r.table, seconds=mean_std(list(r.seconds.values())),
                               stage_seconds=mean_std(list(r.last_stage_seconds.values())))
    pictures["HR"] = out / "picture_HR.png"
    data.save_image(F.interpolate(strip(held_out.hr)[None], scale_factor=2, mode="nearest")[0], pictures["HR"])
    (out / "results.json").write_text(json.dumps({"per_seed": per_seed, "settings": s.__dict__}, indent=1, default=str))
    report = write_report(out, results, pictures, s, (time.time() - t0) / 60, a.quick)
    print(report.read_text())
    return report


if __name__ == "__main__":
    main()
