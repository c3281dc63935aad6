"""Pairwise preference accuracy on SRIQA-Bench (paper §5.1-5.2, Table 1; the reward rows of Table 3).

Scores every SR of a group with COMPASS (Eq.4 of its F, Q_LR, Q_SR; in-process or served), with pyiqa
baselines (PSNR, SSIM, LPIPS, DISTS against the HR; no-reference metrics on the SR alone) and optionally
with RefReward-SR (win rate over the group), and counts the pairs each ranks like the MOS. --extra-gammas
adds Eq.4 rows at other gammas from the same answers (Table 3).

    python -m evaluation.sriqa --reward-model out/compass --sriqa-root SRIQA-Bench --out out/sriqa
    python -m evaluation.sriqa --reward-url http://127.0.0.1:8000 --sriqa-root SRIQA-Bench

Writes OUT/sriqa_accuracy.csv and OUT/sriqa_accuracy.md (the Table 1 layout). `write_sriqa_layout` turns a
COMPASS annotation (train_compass.py annotate) into the same layout, so held-out groups of one's own data
are scored the same way.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import reward
from common.data import load_image, to_pil
from common.training import atomic_write_text, parse_dataclass_args, run_script
from evaluation.evaluate import METRIC_SPECS, create_metric, short_reason, snb_quality
from refreward_sr import refreward
from train_compass import Record, record_score

# ====================================================================================================
# 4. Evaluation: pairwise preference accuracy on SRIQA-Bench (§5.1, Table 1)
# ====================================================================================================
# Layout (A-FINE's SRIQA-Bench):  LRImages/x{i}_Original.png   images/{Method}/x{i}_{Method}x4.png
#   images/Original/ (the HR)   MOS/x{i}.txt  MOS_Reg/x{i}.txt  MOS_Gen/x{i}.txt,  lines "name.png,score"
#   (0-100, higher = better). Pairs: all C(n, 2) of a MOS file. All-Acc from MOS/, Reg-Acc from MOS_Reg/
#   (regression SR methods), Gen-Acc from MOS_Gen/ (generative ones).
# Protocol. For a pair (a, b) the ground-truth label is 1 if MOS_a > MOS_b, 0 if <, 0.5 if equal; the
# predicted label is the same function of the two predicted scores. A pair AGREES when the labels are
# equal; accuracy = agreeing pairs / pairs. Hence:
#   - a ground-truth tie counts, and is right only if the prediction also ties ("--gt-ties skip" leaves
#     such pairs out instead);
#   - a predicted tie on a non-tie pair is wrong (not half right): a constant scorer then scores exactly
#     the fraction of ground-truth ties instead of ~50%;
#   - a missing prediction (an answer that did not parse, a metric without HR) is wrong and counted.
# COMPASS is scored with the SYNTHETIC prompt (it predicts F, Q_LR, Q_SR) and ranked by Eq.4: SRIQA-Bench
# LR images are downsampled from the HR, i.e. the synthetic case; the model never sees the HR (GT-free).
# `--real-prompt` uses the no-F prompt instead, where Eq.4 with F = 1 reduces to R = Q_SR. Q_LR is read once
# per group (reward.py `score_group`), so the order inside a group comes from F and Q_SR only.
# Baselines: pyiqa FR metrics against the HR of images/Original/ (PSNR/SSIM on Y of YCbCr as in
# evaluate.py), NR metrics on the SR alone; lower-is-better metrics are negated.

SRIQA_SUBSETS = {"Reg": "MOS_Reg", "Gen": "MOS_Gen", "All": "MOS"}  # column -> MOS folder


@dataclass
class SriqaGroup:
    """One MOS file: an LR, its HR (if found) and the rated SR outputs."""

    name: str  # "x12"
    mos_file: Path
    lr: Path
    hr: Path | None
    srs: list[Path]
    mos: np.ndarray  # (n,) higher = better


def _one_match(folder: Path, name: str) -> Path | None:
    """The file in `folder` whose stem is `name` or starts with `name` + "_" (x1 -> x1_Original.png)."""
    if not folder.is_dir():
        return None
    hits = sorted(p for p in folder.iterdir() if p.is_file() and (p.stem == name or p.stem.startswith(name + "_")))
    if len(hits) > 1:
        raise ValueError(f"{folder}: several files match {name!r}: {[h.name for h in hits]}")
    return hits[0] if hits else None


def read_mos(path: Path) -> list[tuple[str, float]]:
    """Lines "name.png,score" -> [(name, score)]; blank lines skipped; a bad line raises naming FILE:LINE."""
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, _, score = line.strip().rpartition(",")
        try:
            rows.append((name.strip(), float(score)))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected 'name.png,score', got {line!r}") from None
    return rows


def load_sriqa(root: str | Path) -> dict[str, list[SriqaGroup]]:
    """SRIQA-Bench folder -> {"Reg" | "Gen" | "All": groups}; a missing MOS folder gives an empty list.

    SR files named in a MOS file are looked up by file name among images/*/; a name that is missing or
    present in two method folders raises naming the MOS FILE:LINE.
    """
    root = Path(root)
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"--sriqa-root {root}: no images/ folder (expected the SRIQA-Bench layout "
                                "LRImages/, images/{Method}/, MOS/, MOS_Reg/, MOS_Gen/)")
    where: dict[str, Path] = {}
    for method in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
        for p in method.iterdir():
            if p.is_file():
                if p.name in where:
                    raise ValueError(f"{root}: {p.name} is in two method folders: {where[p.name]} and {p}")
                where[p.name] = p
    out: dict[str, list[SriqaGroup]] = {}
    for subset, folder in SRIQA_SUBSETS.items():
        out[subset] = []
        mos_dir = root / folder
        for mos_file in sorted(mos_dir.glob("*.txt")) if mos_dir.is_dir() else []:
            rows = read_mos(mos_file)
            missing = [f"{mos_file}:{k + 1}: {name}" for k, (name, _) in enumerate(rows) if name not in where]
            if missing:
                raise FileNotFoundError(f"SR image(s) named in MOS files not found under {root / 'images'}: "
                                        + "; ".join(missing[:5]))
            name = mos_file.stem
            lr = _one_match(root / "LRImages", name)
            if lr is None:
                raise FileNotFoundError(f"{mos_file}: no LR image {name}_*.png in {root / 'LRImages'}")
            out[subset].append(SriqaGroup(name, mos_file, lr, _one_match(root / "images" / "Original", name),
                                          [where[n] for n, _ in rows], np.array([s for _, s in rows])))
    return out


def write_sriqa_layout(records: Sequence[Record], root: Path, dst: Path, generative: Callable[[str], bool],
                       gamma: float = 7.0) -> Path:
    """Labelled pairs (e.g. held-out groups of `annotate`) -> the SRIQA-Bench layout, for `eval`.

    MOS = 20 x Eq.4 of the labels (0-100, F = 1 where there is no GT); Gen = the methods `generative`
    accepts, Reg = the others, All = both. Files are copied under their SRIQA names (x{i}_{Method}x4.png).
    """
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    for sub in ("LRImages", "images/Original", "MOS", "MOS_Reg", "MOS_Gen"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for i, (_, recs) in enumerate(sorted(groups.items())):
        key = f"x{i}"
        shutil.copy(root / recs[0].lr, dst / "LRImages" / f"{key}_Original.png")
        if recs[0].gt:
            shutil.copy(root / recs[0].gt, dst / "images" / "Original" / f"{key}_Original.png")
        lines: dict[str, list[str]] = {"MOS": [], "MOS_Reg": [], "MOS_Gen": []}
        for r in recs:
            name = f"{key}_{r.method}x4.png"
            (dst / "images" / r.method).mkdir(parents=True, exist_ok=True)
            shutil.copy(root / r.sr, dst / "images" / r.method / name)
            mos = f"{name},{20 * record_score(r, gamma):.4f}"
            lines["MOS"].append(mos)
            lines["MOS_Gen" if generative(r.method) else "MOS_Reg"].append(mos)
        for sub, rows in lines.items():
            (dst / sub / f"{key}.txt").write_text("\n".join(rows) + "\n")
    return dst


def pair_labels(values: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """(n,) scores -> (n(n-1)/2,) labels of the pairs i < j: 1 if v_i > v_j, 0 if v_i < v_j, 0.5 if
    |v_i - v_j| <= tol; NaN if either score is NaN."""
    v = np.asarray(values, dtype=np.float64)
    i, j = np.triu_indices(len(v), k=1)
    d = v[i] - v[j]
    lab = np.where(d > tol, 1.0, np.where(d < -tol, 0.0, 0.5))
    return np.where(np.isnan(d), np.nan, lab)


def pairwise_accuracy(gt: np.ndarray, pred: np.ndarray, gt_ties: str = "count") -> dict[str, int]:
    """Counts of one group: {"agree", "pairs", "gt_ties", "pred_ties", "missing"} (rules above).

    gt, pred: (n,) scores, higher = better; NaN in pred = missing prediction (counted as wrong).
    gt_ties: "count" (a tie is a class; right only if the prediction ties too) or "skip".
    """
    g, p = pair_labels(gt), pair_labels(pred)
    keep = np.ones_like(g, dtype=bool) if gt_ties == "count" else g != 0.5
    if gt_ties not in ("count", "skip"):
        raise ValueError(f"gt_ties={gt_ties!r}: use 'count' or 'skip'")
    agree = (g == p) & keep  # NaN == x is False: a missing prediction never agrees
    return {"agree": int(agree.sum()), "pairs": int(keep.sum()), "gt_ties": int((g == 0.5).sum()),
            "pred_ties": int(((p == 0.5) & keep).sum()), "missing": int((np.isnan(p) & keep).sum())}


# A scoring function: (lr, hr or None, [sr files]) -> (n,) scores, higher = better, NaN = no score.
ScoreFn = Callable[[Path, "Path | None", list[Path]], np.ndarray]


def evaluate_sriqa(groups: dict[str, list[SriqaGroup]], score_fn: ScoreFn, gt_ties: str = "count"
                   ) -> dict[str, dict[str, float]]:
    """Accuracy (%) of one scoring function per subset: {subset: {"acc", "agree", "pairs", ...}}.

    Each (LR, SR) is scored once and reused across MOS/, MOS_Reg/, MOS_Gen/ (their images overlap).
    """
    cache: dict[tuple[Path, Path], float] = {}
    result = {}
    for subset, gs in groups.items():
        total = {"agree": 0, "pairs": 0, "gt_ties": 0, "pred_ties": 0, "missing": 0}
        for g in gs:
            todo = [s for s in g.srs if (g.lr, s) not in cache]
            if todo:
                for s, v in zip(todo, np.asarray(score_fn(g.lr, g.hr, todo), dtype=np.float64)):
                    cache[(g.lr, s)] = float(v)
            counts = pairwise_accuracy(g.mos, np.array([cache[(g.lr, s)] for s in g.srs]), gt_ties)
            total = {k: total[k] + counts[k] for k in total}
        total["acc"] = 100.0 * total["agree"] / total["pairs"] if total["pairs"] else math.nan
        result[subset] = total
    return result


def compass_score_fn(scorer, synthetic: bool = True, gamma: float = 7.0, answers: dict | None = None) -> ScoreFn:
    """COMPASS reward (Eq.4) of each SR given its LR, from a reward.LocalScorer / RemoteScorer. Functions
    that share an `answers` dict ask the model once per group (e.g. one per gamma)."""
    def score(lr: Path, hr: Path | None, srs: list[Path]) -> np.ndarray:
        key = (str(lr), tuple(map(str, srs)))
        s = answers.get(key) if answers is not None else None
        if s is None:
            # score_group: Q_LR is read once per LR (mean of the per-pair readings), as in RL (reward.py)
            s = scorer.score_group(to_pil(load_image(lr)), [to_pil(load_image(p)) for p in srs])
            if answers is not None:
                answers[key] = s
        F = s.F if synthetic else torch.ones_like(s.q_sr)  # no-F prompt: F = 1, so R = Q_SR
        R = reward.compass_reward(F.float(), s.q_lr.float(), s.q_sr.float(), gamma)  # Eq.4
        return np.where(s.valid.cpu().numpy(), R.cpu().numpy(), np.nan)
    return score


def _gamma_value(text: str) -> float:
    """'5' -> 5.0, 'inf' -> inf (the fixed combination R = F Q_LR + dQ); anything else names the flag."""
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"--extra-gammas {text!r}: give numbers > 0 or 'inf'") from None
    if not value > 0:
        raise SystemExit(f"--extra-gammas {text!r}: gamma must be > 0")
    return value


def pyiqa_score_fn(metric) -> ScoreFn:
    """A pyiqa metric as a scoring function: FR metrics against the HR (NaN when there is none), NR
    metrics on the SR alone; the sign is flipped for lower-is-better metrics (LPIPS, DISTS, PIQE)."""
    sign = -1.0 if metric.lower_better else 1.0
    def score(lr: Path, hr: Path | None, srs: list[Path]) -> np.ndarray:
        if metric.metric_mode == "FR" and hr is None:
            return np.full(len(srs), np.nan)
        ref = load_image(hr)[None] if hr is not None else None
        vals = []
        with torch.no_grad():
            for p in srs:
                x = load_image(p)[None]
                v = metric(x, ref) if metric.metric_mode == "FR" else metric(x)
                vals.append(sign * float(torch.as_tensor(v).flatten()[0]))
        return np.array(vals)
    return score


def snb_score_fn(lr: Path, hr: Path | None, srs: list[Path]) -> np.ndarray:
    """The weights-free no-reference SNB score (evaluate.snb_quality, the annotation's stage-1 anchor) of each SR
    alone: a GT-free baseline that needs no download."""
    return snb_quality(torch.stack([load_image(p) for p in srs])).numpy()


def accuracy_table(rows: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    """Write the Table 1 layout as CSV and markdown. rows: {"type", "method", "Reg", "Gen", "All",
    "pairs", "note"} with accuracies in % (NaN = unavailable)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = ["type", "method", "Reg-Acc", "Gen-Acc", "All-Acc", "pairs_all", "note"]
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"
    csv_path, md_path = out_dir / "sriqa_accuracy.csv", out_dir / "sriqa_accuracy.md"
    with open(csv_path.with_suffix(".csv.tmp"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([r["type"], r["method"], fmt(r.get("Reg")), fmt(r.get("Gen")), fmt(r.get("All")),
                        r.get("pairs", 0), r.get("note", "")])
    os.replace(csv_path.with_suffix(".csv.tmp"), csv_path)
    lines = ["| Type | Method | Reg-Acc | Gen-Acc | All-Acc | pairs (All) | note |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['type']} | {r['method']} | {fmt(r.get('Reg'))} | {fmt(r.get('Gen'))} | {fmt(r.get('All'))} "
              f"| {r.get('pairs', 0)} | {r.get('note', '')} |" for r in rows]
    atomic_write_text("\n".join(lines) + "\n", md_path)
    return csv_path, md_path


@dataclass
class EvalArgs:
    """Arguments of the SRIQA-Bench evaluation."""

    sriqa_root: str = ""
    """(required) SRIQA-Bench folder (LRImages/, images/, MOS*/)"""
    out: str = "out/sriqa"
    """folder for sriqa_accuracy.csv / .md"""
    reward_model: str = ""
    """the COMPASS to evaluate, in-process: its folder, a hub name, 'mini' or 'tiny'"""
    reward_url: str = ""
    """OpenAI-compatible URL of a served COMPASS (instead of --reward-model), e.g. http://127.0.0.1:8000 (vllm serve)"""
    reward_model_name: str = "compass"
    """model name on --reward-url"""
    reward_views: int = 1
    """average COMPASS's readings over this many flips/rotations of each pair (reward.LocalScorer /
    RemoteScorer views: 1 = the paper's single reading, 8 = all; --reward-model or --reward-url)"""
    real_prompt: bool = False
    """score with the no-F prompt (R = Q_SR)"""
    gamma: float = 7.0
    """gamma of Eq.4 (§3.3: 7)"""
    extra_gammas: list[str] = field(default_factory=list)
    """also rank by Eq.4 at these gammas ('inf' = the fixed combination; Table 3), one row each: the model
    answers once, only the combination changes"""
    refreward_model: str = ""
    """also rank with a RefReward-SR model ('tiny', 'mini', folder): each SR scored by its win rate over the
    group's other SRs (refreward.py; every pair asked in both orders)"""
    baselines: list[str] = field(default_factory=lambda: ["PSNR", "SSIM", "LPIPS", "DISTS"])
    """pyiqa metrics (Table 1's GT-Ref rows; NR names such as piqe or musiq give GT-Free rows) and SNB
    (evaluate.snb_quality: weights-free, GT-free)"""
    gt_ties: str = "count"
    """ground-truth ties: count | skip"""
    device: str = "auto"
    """cuda | cpu | auto"""


def run_eval(args: EvalArgs, extra: dict[str, tuple[str, ScoreFn]] | None = None) -> list[dict]:
    """Score COMPASS and the baselines on SRIQA-Bench and write the table. `extra` adds scoring
    functions {name: (type, fn)} (tests use an oracle). Returns the table rows."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    groups = load_sriqa(args.sriqa_root)
    n_pairs = sum(len(g.srs) * (len(g.srs) - 1) // 2 for g in groups["All"])
    print(f"[eval] {args.sriqa_root}: " + ", ".join(f"{k} {len(v)} groups" for k, v in groups.items())
          + f", {n_pairs} pairs in All")
    scorers: list[tuple[str, str, ScoreFn | None, str]] = []  # (type, name, fn, note)
    extra_gammas = {text: _gamma_value(text) for text in args.extra_gammas}  # checked before loading the model
    if args.reward_model or args.reward_url:
        scorer = reward.make_scorer(args.reward_model, args.reward_url or None, args.reward_model_name,
                                    not args.real_prompt, device=device, views=args.reward_views)
        answers: dict = {}  # every gamma's row reads the same answers
        note = "Eq.4, " + ("no-F prompt" if args.real_prompt else "synthetic prompt")
        scorers.append(("GT-Free", "COMPASS", compass_score_fn(scorer, not args.real_prompt, args.gamma, answers),
                        note))
        for text, gamma in extra_gammas.items():
            scorers.append(("GT-Free", f"COMPASS gamma {text}", compass_score_fn(
                scorer, not args.real_prompt, gamma, answers), note))
    if args.refreward_model:
        judge = refreward.RefRewardScorer(*refreward.load_refreward(args.refreward_model, device))
        scorers.append(("GT-Free", "RefReward-SR", lambda lr, hr, srs: judge.group_rewards(
            to_pil(load_image(lr)), [to_pil(load_image(p)) for p in srs]).numpy(), "pairwise win rate, both orders"))
    for name in args.baselines:
        if name == "SNB":  # not a pyiqa metric
            scorers.append(("GT-Free", name, snb_score_fn, "weights-free, the SR alone"))
            continue
        try:
            metric = create_metric(name, device)
            kind = "GT-Ref" if metric.metric_mode == "FR" else "GT-Free"
            scorers.append((kind, name, pyiqa_score_fn(metric), ""))
        except Exception as err:  # noqa: BLE001 - reported in the table, the evaluation goes on
            kind = ("GT-Ref" if METRIC_SPECS[name][2] else "GT-Free") if name in METRIC_SPECS else "-"
            scorers.append((kind, name, None, "unavailable: " + short_reason(err)))
    for name, (kind, fn) in (extra or {}).items():
        scorers.append((kind, name, fn, ""))

    rows = []
    for kind, name, fn, note in scorers:
        row = {"type": kind, "method": name, "note": note}
        try:
            res = evaluate_sriqa(groups, fn, args.gt_ties) if fn is not None else None
        except Exception as err:
            if name == "COMPASS":
                raise
            res, note = None, "failed: " + short_reason(err)
            row["note"] = note
        if res is not None:
            row.update({s: res[s]["acc"] for s in res}, pairs=res["All"]["pairs"])
            missing = res["All"]["missing"]
            row["note"] = "; ".join(x for x in (note, f"{missing} pairs without a score" if missing else "",
                                                f"{res['All']['pred_ties']} predicted ties"
                                                if res["All"]["pred_ties"] else "") if x)
        rows.append(row)
        print(f"[eval] {name}: " + ", ".join(f"{s} {row.get(s, math.nan):.1f}" for s in SRIQA_SUBSETS)
              + (f"  ({row['note']})" if row["note"] else ""))
    csv_path, md_path = accuracy_table(rows, args.out)
    print(f"[eval] wrote {csv_path} and {md_path}")
    return rows


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_dataclass_args(EvalArgs, argv, __doc__.split("\n")[0])
    if not args.sriqa_root:
        parser.error("--sriqa-root is required (a folder with LRImages/, images/, MOS*/)")
    run_eval(args)
    return 0


if __name__ == "__main__":
    run_script(main)
