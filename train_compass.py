"""COMPASS reward model: annotation pipeline (§3.2, Eq.1-3) and SFT of Qwen3-VL (§3.3, §5.1). One file, two
subcommands, readable top to bottom. Its accuracy on SRIQA-Bench (§5.2, Table 1) is evaluation/sriqa.py.

    annotate  folders of LR inputs, SR outputs (one sub-folder per method) and optional GT  ->  a JSONL
              of labels {F, Q_LR, Q_SR} made by the three-stage pipeline of §3.2:
                F = 1 - DISTS(SR, GT)                          (Eq.1, only where a GT exists)
                stage 1  global anchors Q_LR, Q_SR in [1, 5]   (a no-reference scorer)
                stage 2  relative rank r in [0, 1] per group   (exhaustive pairwise comparisons)
                stage 3  Q^_SR = a* r + b*, (a*, b*) = least squares against the anchors   (Eq.2, Eq.3)
              plus a QC report of the top / bottom 5% for manual checking.
    train     full-parameter SFT of Qwen3-VL on that JSONL (§3.3): the model learns to answer with
              F, Q_LR, Q_SR (and a rationale) in the fixed format of reward.py; samples without F use
              the no-F prompt and supervise only the quality numbers. Loss on the answer tokens only.
              One process = plain training; torchrun = the model SHARDED with torch FSDP2.

Commands (tiny preset: a Qwen3-VL of the real classes with random weights, trains on a CPU in seconds):

    python train_compass.py annotate --lr-dir data/lr --sr-dir data/sr --gt-dir data/gt \\
        --out data/compass.jsonl --fidelity ssim --anchor piqe          # weights-free demo
    python train_compass.py train --model tiny --data data/compass.jsonl --root data \\
        --out out/compass_tiny --epochs 100 --global-batch 4 --per-device-batch 4 --lr 5e-3 --device cpu
    python -m evaluation.sriqa --reward-model out/compass_tiny --sriqa-root SRIQA-Bench --out out/sriqa   # Table 1

Full scale (paper §5.1: Qwen3-VL-8B-Instruct, AdamW lr 1e-5, cosine decay, global batch 64, 8 epochs;
per-device batch x grad accumulation x GPUs = global batch):

    python train_compass.py annotate --lr-dir COMPASS/lr --sr-dir COMPASS/sr --gt-dir COMPASS/gt \\
        --out COMPASS/compass.jsonl --fidelity dists --anchor mllm \\
        --anchor-url http://127.0.0.1:8000 --anchor-model-name q-insight
    torchrun --nproc_per_node 8 train_compass.py train --model Qwen/Qwen3-VL-8B-Instruct \\
        --data COMPASS/compass.jsonl --root COMPASS --out out/compass --per-device-batch 1 \\
        --gradient-checkpointing
    torchrun --nproc_per_node 8 train_compass.py train ... --resume latest      # after an interruption
    python -m evaluation.sriqa --reward-model out/compass --sriqa-root SRIQA-Bench --out out/sriqa
    vllm serve out/compass --served-model-name compass --max-logprobs 20 \\
        --limit-mm-per-prompt '{"image": 2}'                                    # the RL reward server

    Memory: rank 0 loads the float32 model on its CPU (~35 GB of host RAM for 8B), the other ranks build
    it on the meta device and receive their shards from rank 0 (one full copy per node, not one per
    rank); the float32 master weights, gradients and AdamW state (16 bytes/param, ~140 GB for 8B) are
    sharded over the ranks; compute runs in bfloat16 (--bf16 auto on CUDA).
    `--anchor mllm` needs an instruction-following MLLM on an OpenAI-compatible server; it is asked
    with reward.py's quality-only prompt and must answer in reward.py's format.

What it writes:
    annotate  OUT.jsonl (one record per (LR, SR) pair, format below) and OUT.qc.md (QC report).
    train     OUT/ = save_pretrained of model + processor (config, safetensors, tokenizer, chat
              template): loads with from_pretrained, VL.load_compass(OUT), reward.LocalScorer and
              `vllm serve OUT`.  OUT/checkpoints/step_XXXXXX/ (full training state, for --resume),
              OUT/tb/ (TensorBoard: loss, lr, grad_norm).

Dataset format (JSONL, one record per (LR, SR) pair, paths relative to --root):

    {"lr": "lr/0001.png", "sr": "sr/OSEDiff/0001.png", "gt": "gt/0001.png", "group": "0001",
     "method": "OSEDiff", "F": 0.81, "q_lr": 2.10, "q_sr": 3.45, "rationale": "Sharper edges, ..."}
    {"lr": "real/0042.jpg", "sr": "sr/SeeSR/0042.png", "group": "0042", "method": "SeeSR",
     "F": null, "q_lr": 1.72, "q_sr": 3.02}

    F in [0, 1] (synthetic subset only; absent / null for real-world inputs without GT),
    q_lr and q_sr in [1, 5], "gt" and "rationale" optional. `load_records` refuses missing images,
    labels out of range and duplicate (lr, sr) pairs with errors that name FILE:LINE.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import reward
from common import compass_text as CT
from common import training as T
from common import vl_model as VL
from common.data import jsonl_objects, list_images, load_image, to_pil, to_tensor
from common.training import (
    NonFiniteGuard,
    add_dataclass_args,
    all_reduce_mean,
    atomic_write_text,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gather_full_state,
    resolve_resume,
    restore_training_checkpoint,
    run_script,
    save_training_checkpoint,
    seed_everything,
    setup_distributed,
    summary_writer,
)
from evaluation.evaluate import create_metric, snb_quality

F_RANGE, Q_RANGE = CT.F_RANGE, CT.Q_RANGE  # Eq.1: F = 1 - DISTS in [0, 1]; §3.2: Q_LR, Q_SR in [1, 5]


# ====================================================================================================
# 1. Dataset: JSONL records, validated
# ====================================================================================================


@dataclass
class Record:
    """One labelled (LR, SR) pair. Paths are relative to the dataset root."""

    lr: str
    sr: str
    group: str  # the LR the SR was made from: records of one group share an LR
    method: str  # the SR method that produced `sr`
    q_lr: float  # perceptual quality of the LR input, [1, 5]
    q_sr: float  # perceptual quality of the SR output, [1, 5] (calibrated, Eq.3)
    F: float | None = None  # fidelity, [0, 1] (Eq.1); None for real-world inputs without GT
    gt: str | None = None
    rationale: str = ""
    where: str = ""  # "file:line" it was read from (error messages only; not written)

    def to_json(self) -> dict:
        d = {"lr": self.lr, "sr": self.sr, "gt": self.gt, "group": self.group, "method": self.method,
             "F": self.F, "q_lr": self.q_lr, "q_sr": self.q_sr, "rationale": self.rationale}
        return {k: v for k, v in d.items() if v is not None and v != ""}


def _number(value, name: str, lo: float, hi: float) -> tuple[float | None, str | None]:
    """(value as float, None) if it is a finite number in [lo, hi], else (None, problem)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{name}={value!r} is not a number"
    if not math.isfinite(value) or not lo <= value <= hi:
        return None, f"{name}={value} is outside [{lo:g}, {hi:g}]"
    return float(value), None


def parse_record(obj: dict, root: Path | None, where: str) -> Record:
    """Validate one JSON object -> Record. Raises ValueError("FILE:LINE: problem; what to do").

    `root` is the folder the image paths are relative to; None skips the file-existence checks.
    """
    problems = []
    missing = [k for k in ("lr", "sr", "group", "method", "q_lr", "q_sr") if obj.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; every record needs lr, sr, group, "
                         "method, q_lr, q_sr (F, gt, rationale are optional)")
    q_lr, p1 = _number(obj["q_lr"], "q_lr", *Q_RANGE)
    q_sr, p2 = _number(obj["q_sr"], "q_sr", *Q_RANGE)
    F, p3 = (None, None) if obj.get("F") is None else _number(obj["F"], "F", *F_RANGE)
    problems += [p for p in (p1, p2, p3) if p]
    if root is not None:
        for key in ("lr", "sr", "gt"):
            if obj.get(key) is not None and not (root / obj[key]).is_file():
                problems.append(f"{key} image not found: {root / obj[key]}")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems)
                         + " (fix the record, or check --root, the folder the paths are relative to)")
    return Record(lr=str(obj["lr"]), sr=str(obj["sr"]), group=str(obj["group"]), method=str(obj["method"]),
                  q_lr=q_lr, q_sr=q_sr, F=F, gt=obj.get("gt"), rationale=str(obj.get("rationale") or ""),
                  where=where)


def load_records(path: str | Path, root: str | Path | None = None, skip_invalid: bool = False,
                 check_images: bool = True) -> list[Record]:
    """Read and validate a COMPASS JSONL (format in the module docstring).

    Refused, with errors naming FILE:LINE: unparsable lines, missing fields, F outside [0, 1], Q outside
    [1, 5], missing image files (relative to `root`, default: the JSONL's folder), a (lr, sr) pair that
    already appeared. Blank lines are allowed. By default the first bad record raises ValueError (all
    problems of the file are listed); with `skip_invalid=True` bad records are dropped, and their COUNT
    and reasons are printed: nothing is dropped silently.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} (make one with `train_compass.py annotate`)")
    root = Path(root) if root is not None else path.parent
    records: list[Record] = []
    errors: list[str] = []
    seen: dict[tuple[str, str], str] = {}
    for where, obj in jsonl_objects(path, errors):
        try:
            rec = parse_record(obj, root if check_images else None, where)
            if (rec.lr, rec.sr) in seen:
                raise ValueError(f"{where}: duplicate (lr, sr) pair ({rec.lr}, {rec.sr}), first at "
                                 f"{seen[(rec.lr, rec.sr)]}; keep one record per pair")
        except ValueError as err:
            errors.append(str(err))
            continue
        seen[(rec.lr, rec.sr)] = where
        records.append(rec)
    if errors and not skip_invalid:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{len(errors)} invalid record(s) in {path}:\n  {shown}{more}\n"
                         "Fix them, or pass --skip-invalid to drop them (they are counted).")
    if errors:
        print(f"[data] skipped {len(errors)} invalid record(s) of {path}; first: {errors[0]}", file=sys.stderr)
    if not records:
        raise ValueError(f"{path}: no valid record")
    return records


def write_records(records: Sequence[Record], path: str | Path) -> Path:
    """Write records as JSONL (atomic: temp file + rename)."""
    atomic_write_text("".join(json.dumps(r.to_json()) + "\n" for r in records), path)
    return Path(path)


# ====================================================================================================
# 2. Annotation pipeline (§3.2). The maths is pure functions, each copyable alone; `annotate` wires
#    them to image folders.
# ====================================================================================================


# --- Stage 1: global anchor scores Q in [1, 5] -------------------------------------------------------
# The paper scores LR and SR with the Q-Insight score model (an MLLM). Here the scorer is pluggable:
#   * any pyiqa no-reference metric (raw score mapped linearly to [1, 5], below), e.g. "piqe", which
#     needs no weights (weights-free demo / tests), or "musiq", "liqe", "topiq_nr" with weights;
#   * an MLLM served on an OpenAI-compatible endpoint through reward.RemoteScorer ("mllm").
# Mapping a raw metric to [1, 5]. Default "range": the metric's declared range from pyiqa
# (`score_range`, e.g. "0, 100" for PIQE; "~" marks are dropped) and its direction (`lower_better`).
# A fixed range keeps the scale GLOBAL, which is what stage 1 is for: a score does not change when other
# images are added. "minmax" (over all LR and SR images of the run) is the fallback for metrics whose
# declared range is unbounded or far wider than the data; it makes the scale dataset-relative.


def parse_score_range(text: str) -> tuple[float, float]:
    """pyiqa's `score_range` string ("0, 100", "~0, ~40") -> (lo, hi). Raises ValueError if not numeric."""
    parts = [p.strip().lstrip("~").strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ValueError(f"score_range {text!r}: expected 'lo, hi'")
    lo, hi = float(parts[0]), float(parts[1])
    if not hi > lo:
        raise ValueError(f"score_range {text!r}: hi must exceed lo")
    return lo, hi


def anchor_scores(raw: np.ndarray, lower_better: bool,
                  score_range: tuple[float, float] | None = None) -> tuple[np.ndarray, int]:
    """Stage 1: raw no-reference scores (N,) -> anchor scores Q (N,) in [1, 5] and the clamp count.

    Q = 1 + 4 u with u = (raw - lo) / (hi - lo), u -> 1 - u when lower is better. (lo, hi) is
    `score_range` if given, else min/max of `raw` (a constant `raw` maps to 3). Values outside [1, 5]
    (raw outside the declared range) are clamped and counted.
    """
    raw = np.asarray(raw, dtype=np.float64)
    lo, hi = score_range if score_range is not None else (float(raw.min()), float(raw.max()))
    if hi - lo <= 0:
        return np.full_like(raw, 3.0), 0
    u = (raw - lo) / (hi - lo)
    if lower_better:
        u = 1.0 - u
    q = Q_RANGE[0] + (Q_RANGE[1] - Q_RANGE[0]) * u
    clamped = int(((q < Q_RANGE[0]) | (q > Q_RANGE[1])).sum())
    return np.clip(q, *Q_RANGE), clamped


# --- Stage 2: intra-group ranking r in [0, 1] from exhaustive pairwise comparisons --------------------
# A comparator(i, j) returns the probability (or a hard 1 / 0.5 / 0) that SR i is better than SR j. The
# paper uses a Q-Insight compare model trained on DiffIQA; any callable works (an MLLM client, a metric).
# Both orders are asked and averaged, P_ij = (c(i,j) + 1 - c(j,i)) / 2, which cancels a comparator's
# position bias (MLLM judges prefer the first or the second image).
# Aggregation, default "winrate": r_i = mean_j P_ij (Borda count). Chosen because it is defined for
# every tournament, including hard 0/1 outcomes and a strict order, where it gives exactly evenly spaced
# scores; the Bradley-Terry maximum-likelihood strengths diverge there (a perfect winner has infinite
# strength), so "bt" needs a prior (a Gaussian on the log-strengths, `bt_prior`) and is the better choice
# for soft / noisy probabilities. Both are min-max normalised in the group: best = 1, worst = 0.


def preference_matrix(n: int, comparator: Callable[[int, int], float], both_orders: bool = True) -> np.ndarray:
    """P (n, n) with P[i, j] = probability that item i beats item j, P[j, i] = 1 - P[i, j], P[i, i] = 0.5.

    Calls comparator(i, j) for every pair i < j (and comparator(j, i) too when `both_orders`).
    """
    P = np.full((n, n), 0.5)
    for i, j in itertools.combinations(range(n), 2):
        p = float(comparator(i, j))
        if both_orders:
            p = 0.5 * (p + 1.0 - float(comparator(j, i)))
        P[i, j], P[j, i] = p, 1.0 - p
    return P


def bradley_terry(P: np.ndarray, prior: float = 0.1, iters: int = 100) -> np.ndarray:
    """Bradley-Terry log-strengths s (n,) maximising sum_{i != j} P_ij log sigmoid(s_i - s_j) - prior/2 |s|^2.

    Newton's method on a concave objective (the prior makes it strictly concave: finite s for a strict
    order). Returns s centred to mean 0.
    """
    n = P.shape[0]
    s = np.zeros(n)
    off = ~np.eye(n, dtype=bool)
    for _ in range(iters):
        sig = 1.0 / (1.0 + np.exp(-(s[:, None] - s[None, :])))  # (n, n) model P(i beats j)
        W = np.where(off, P + P.T, 0.0)  # comparisons between i and j (1 for a preference_matrix)
        grad = np.where(off, P - W * sig, 0.0).sum(1) - prior * s
        curv = np.where(off, W * sig * (1 - sig), 0.0)
        H = -np.diag(curv.sum(1)) + curv - prior * np.eye(n)  # Hessian (negative definite)
        step = np.linalg.solve(H, grad)
        s = s - step
        if np.abs(step).max() < 1e-10:
            break
    return s - s.mean()


def group_rank(n: int, comparator: Callable[[int, int], float], method: str = "winrate",
               both_orders: bool = True, bt_prior: float = 0.1) -> np.ndarray:
    """Stage 2: relative rank r (n,) in [0, 1] of the n SR outputs of one group (1 best, 0 worst).

    All C(n, 2) pairs are compared (both orders by default, see above) and aggregated by win rate
    ("winrate") or Bradley-Terry strengths ("bt"), then min-max normalised within the group. A strict
    order gives r = 1, (n-2)/(n-1), ..., 0 with "winrate". If every item scores the same (one item, a
    cycle, all ties) r = 0.5 for all: there is no order to express, and stage 3 then falls back to the
    anchors' mean.
    """
    if n == 1:
        return np.array([0.5])
    P = preference_matrix(n, comparator, both_orders)
    if method == "winrate":
        score = (P.sum(1) - 0.5) / (n - 1)  # mean_j!=i P_ij
    elif method == "bt":
        score = bradley_terry(P, prior=bt_prior)
    else:
        raise ValueError(f"group_rank: method {method!r} unknown; use 'winrate' or 'bt'")
    span = score.max() - score.min()
    if span < 1e-9:
        return np.full(n, 0.5)
    return (score - score.min()) / span


def value_comparator(values: Sequence[float], higher_better: bool = True) -> Callable[[int, int], float]:
    """A weights-free comparator from per-item values: 1 if i is better than j, 0 if worse, 0.5 if equal."""
    v = np.asarray(values, dtype=np.float64) * (1.0 if higher_better else -1.0)
    return lambda i, j: 1.0 if v[i] > v[j] else (0.0 if v[i] < v[j] else 0.5)


# --- Stage 3: rank-guided calibration (Eq.2, Eq.3) ----------------------------------------------------


def calibrate_group(r: np.ndarray, q_anchor: np.ndarray, nonnegative: bool = True) -> tuple[float, float]:
    """Stage 3: (alpha*, beta*) = argmin sum_i (alpha r_i + beta - Q_SR_i)^2   (Eq.2).

    r (n,) from stage 2, q_anchor (n,) the stage-1 anchor Q_SR of the same items.
    Degenerate groups: one item, or all r equal, carry no order -> alpha = 0, beta = mean(q_anchor).
    `nonnegative` (default): if the unconstrained alpha* < 0 (anchors disagree with the ranking) the
    constrained least-squares solution over alpha >= 0 is used, which is alpha = 0, beta = mean(q_anchor).
    A negative alpha would invert the intra-group ranking that §3.2 says the calibration preserves.
    """
    r = np.asarray(r, dtype=np.float64)
    q = np.asarray(q_anchor, dtype=np.float64)
    if r.shape != q.shape or r.ndim != 1 or len(r) == 0:
        raise ValueError(f"calibrate_group: r {r.shape} and q_anchor {q.shape} must be equal-length 1-D")
    if len(r) == 1 or np.ptp(r) < 1e-12:
        return 0.0, float(q.mean())
    A = np.stack([r, np.ones_like(r)], axis=1)  # (n, 2): columns r, 1
    (alpha, beta), *_ = np.linalg.lstsq(A, q, rcond=None)  # Eq.2
    if nonnegative and alpha < 0:
        return 0.0, float(q.mean())
    return float(alpha), float(beta)


AGAINST_ORDER = ("flat", "sorted")  # stage 3 where the anchors disagree with the stage-2 order (annotate)


def anchors_in_rank_order(r: np.ndarray, q_anchor: np.ndarray) -> np.ndarray:
    """Stage 3 where Eq.2's best line falls (the anchors disagree with the stage-2 order; the paper is silent):
    the group's own anchor values, handed out in the stage-2 order (the highest to the best-ranked item, the
    lowest to the worst; items tied in r share the mean of their values). Unlike alpha = 0 (every item the
    same score) it keeps the intra-group ranking that §3.2 says the calibration preserves, on the group's
    anchor scale. `annotate --against-order sorted`."""
    r = np.asarray(r, dtype=np.float64)
    q = np.sort(np.asarray(q_anchor, dtype=np.float64))
    q_hat = np.empty_like(q)
    q_hat[np.argsort(r, kind="stable")] = q
    for value in np.unique(r):  # ties in r: one score
        q_hat[r == value] = q_hat[r == value].mean()
    return q_hat


def calibrated_scores(r: np.ndarray, alpha: float, beta: float) -> tuple[np.ndarray, int]:
    """Eq.3: Q^_SR = alpha* r + beta*, clamped to [1, 5]; returns (scores (n,), number clamped)."""
    q = alpha * np.asarray(r, dtype=np.float64) + beta  # Eq.3
    clamped = int(((q < Q_RANGE[0] - 1e-9) | (q > Q_RANGE[1] + 1e-9)).sum())
    return np.clip(q, *Q_RANGE), clamped


# --- QC (§3.2 "Interpretability Annotation") -----------------------------------------------------------


def record_score(rec: Record, gamma: float = 7.0) -> float:
    """The reward the labels imply (Eq.4), with F = 1 where there is no GT (then R = Q_SR)."""
    return reward.label_reward(rec.F, rec.q_lr, rec.q_sr, gamma)


def qc_report(records: Sequence[Record], fraction: float = 0.05, path: str | Path | None = None,
              gamma: float = 7.0) -> str:
    """Markdown list of the top and bottom `fraction` of records by `record_score`, with their rationales
    and image paths, for the manual check of §3.2 (discard pairs whose description contradicts the
    score). At least one record per side. Written to `path` when given; returned as text.
    """
    scored = sorted(records, key=lambda r: record_score(r, gamma), reverse=True)
    k = max(1, math.ceil(fraction * len(scored)))
    lines = [f"# COMPASS annotation QC: top / bottom {fraction:.0%} of {len(scored)} pairs ({k} each)", "",
             f"Score = Eq.4 reward of the labels (gamma {gamma:g}; F = 1 where there is no GT). Check that each",
             "rationale agrees with its score; drop the pairs that do not.", ""]
    for title, part in (("Top", scored[:k]), ("Bottom", scored[::-1][:k])):
        lines += [f"## {title} {k}", "", "| score | F | Q_LR | Q_SR | method | LR | SR | rationale |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in part:
            F = "-" if r.F is None else f"{r.F:.3f}"
            why = (r.rationale or "(no rationale)").replace("|", "/").replace("\n", " ")
            lines.append(f"| {record_score(r, gamma):.3f} | {F} | {r.q_lr:.2f} | {r.q_sr:.2f} | {r.method} "
                         f"| [{r.lr}]({r.lr}) | [{r.sr}]({r.sr}) | {why} |")
        lines.append("")
    text = "\n".join(lines)
    if path is not None:
        atomic_write_text(text, path)
    return text


# --- The pipeline on a folder layout ------------------------------------------------------------------


@dataclass
class Group:
    """One LR input and its SR outputs (the unit of stage 2 and stage 3)."""

    name: str
    lr: Path
    gt: Path | None
    srs: dict[str, Path]  # method -> SR file


def discover_groups(lr_dir: str | Path, sr_dir: str | Path, gt_dir: str | Path | None = None
                    ) -> tuple[list[Group], dict[str, int]]:
    """Folder layout -> groups, matched by file STEM:

        LR_DIR/0001.png            SR_DIR/<method>/0001.png  (one sub-folder per SR method)
        GT_DIR/0001.png            (optional; gives F by Eq.1 and marks the pair as synthetic)

    Returns (groups, counts) where counts has the unmatched files: "sr_without_lr", "lr_without_sr",
    "gt_without_lr". Nothing is dropped without being counted.
    """
    lr_by = {p.stem: p for p in list_images(lr_dir)}
    gt_by = {p.stem: p for p in list_images(gt_dir)} if gt_dir else {}
    methods = sorted(p for p in Path(sr_dir).iterdir() if p.is_dir()) if Path(sr_dir).is_dir() else []
    if not methods:
        raise FileNotFoundError(f"--sr-dir {sr_dir}: expected one sub-folder per SR method (e.g. "
                                f"{sr_dir}/OSEDiff/0001.png), found none")
    srs: dict[str, dict[str, Path]] = {}
    sr_without_lr = 0
    for m in methods:
        for p in list_images(m):
            if p.stem in lr_by:
                srs.setdefault(p.stem, {})[m.name] = p
            else:
                sr_without_lr += 1
    groups = [Group(stem, lr_by[stem], gt_by.get(stem), srs[stem]) for stem in sorted(srs)]
    counts = {"sr_without_lr": sr_without_lr, "lr_without_sr": len(lr_by.keys() - srs.keys()),
              "gt_without_lr": len(gt_by.keys() - lr_by.keys())}
    return groups, counts


def annotate(groups: Sequence[Group], root: Path, *,
             fidelity: Callable[[torch.Tensor, torch.Tensor], float] | None,
             nr_raw: Callable[[torch.Tensor], float] | None = None, lower_better: bool = False,
             score_range: tuple[float, float] | None = None,
             mllm: Callable[[list, list], reward.Scores] | None = None,
             compare: str = "nr", fr_compare: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
             rank_method: str = "winrate", calibration: str = "rank", lr_view: str = "native",
             against_order: str = "flat", log: Callable[[str], None] = print) -> list[Record]:
    """Run Eq.1 + stages 1-3 on `groups` and return one Record per (LR, SR) pair.

    fidelity(sr, gt) -> F in [0, 1] (Eq.1), used where the group has a GT (None: no F at all).
    Stage 1 from `nr_raw(image (3,H,W)) -> raw score` mapped by `anchor_scores(lower_better,
    score_range)`, or from `mllm(lr_pils, sr_pils) -> reward.Scores` (Q_LR of a group = mean of its
    per-pair Q_LR; the MLLM's rationale is kept).
    Stage 2 comparator: "nr" compares the stage-1 SR anchors (weights-free, but then r only re-states
    the anchors' order), "fr" compares `fr_compare(sr, gt)` (higher = better) where a GT exists and
    falls back to "nr" (counted) where it does not; any other pairwise model plugs into `group_rank`.
    calibration "rank" (paper): Q_SR from stages 2-3; "none": Q_SR = the stage-1 anchor (absolute scores,
    Table 3 case 1). lr_view "native" (paper): `nr_raw` scores the LR file as it is; "sr": the LR resized to
    its group's SR size first (CT.lr_at_sr_size, what the reward model sees), for NR metrics that mean
    little on a 16x16 image.
    against_order: stage 3 in a group whose anchors disagree with the stage-2 order (Eq.2's slope < 0; the
    paper is silent): "flat" = alpha 0, every item the group's mean anchor; "sorted" = the group's anchors
    handed out in the stage-2 order (`anchors_in_rank_order`).
    """
    if (calibration not in ("rank", "none") or lr_view not in ("native", "sr")
            or against_order not in AGAINST_ORDER):
        raise ValueError(f"annotate: calibration {calibration!r} (rank | none), lr_view {lr_view!r} (native | sr), "
                         f"against_order {against_order!r} ({' | '.join(AGAINST_ORDER)})")
    pairs = [(g, m, p) for g in groups for m, p in g.srs.items()]
    # Eq.1 on the synthetic subset
    F = {}
    for g, m, p in pairs:
        if g.gt is not None and fidelity is not None:
            F[(g.name, m)] = float(fidelity(load_image(p), load_image(g.gt)))
    # stage 1: anchors
    rationale: dict[tuple[str, str], str] = {}
    if mllm is not None:
        q_lr_of: dict[str, list[float]] = {}
        q_sr_anchor = {}
        for g in groups:
            methods = list(g.srs)
            lr_pil = to_pil(load_image(g.lr))
            s = mllm([lr_pil] * len(methods), [to_pil(load_image(g.srs[m])) for m in methods])
            for k, m in enumerate(methods):
                if not bool(s.valid[k]):
                    raise ValueError(f"stage 1: the MLLM answer for {g.srs[m]} did not parse; re-run or "
                                     "check the server's prompt format")
                q_lr_of.setdefault(g.name, []).append(float(s.q_lr[k]))
                q_sr_anchor[(g.name, m)] = float(s.q_sr[k])
                rationale[(g.name, m)] = s.rationale[k] if s.rationale else ""
        q_lr = {name: float(np.mean(v)) for name, v in q_lr_of.items()}
    else:
        if nr_raw is None:
            raise ValueError("annotate: give nr_raw (a no-reference metric) or mllm (a scorer)")
        def lr_image(g: Group) -> torch.Tensor:
            if lr_view == "native":
                return load_image(g.lr)
            sr = to_pil(load_image(next(iter(g.srs.values()))))
            return to_tensor(CT.lr_at_sr_size(to_pil(load_image(g.lr)), sr))

        lr_raw = {g.name: float(nr_raw(lr_image(g))) for g in groups}
        sr_raw = {(g.name, m): float(nr_raw(load_image(p))) for g, m, p in pairs}
        keys_lr, keys_sr = list(lr_raw), list(sr_raw)
        q_all, n_clamped = anchor_scores(np.array([lr_raw[k] for k in keys_lr] + [sr_raw[k] for k in keys_sr]),
                                         lower_better, score_range)
        q_lr = dict(zip(keys_lr, q_all[: len(keys_lr)].tolist()))
        q_sr_anchor = dict(zip(keys_sr, q_all[len(keys_lr):].tolist()))
        log(f"[annotate] stage 1: {len(q_all)} anchor scores, {n_clamped} clamped to [1, 5]")
    # stages 2 + 3 per group
    records: list[Record] = []
    n_fallback = n_degenerate = n_clamped_cal = n_sorted = 0
    for g in groups:
        methods = list(g.srs)
        anchors = np.array([q_sr_anchor[(g.name, m)] for m in methods])
        if calibration == "none":  # Table 3 case 1: absolute anchor scores, no intra-group ranking
            q_hat = anchors
        else:
            if compare == "fr" and g.gt is not None and fr_compare is not None:
                gt = load_image(g.gt)
                comparator = value_comparator([fr_compare(load_image(g.srs[m]), gt) for m in methods], True)
            else:
                n_fallback += compare == "fr"
                comparator = value_comparator(anchors, higher_better=True)
            r = group_rank(len(methods), comparator, method=rank_method)
            alpha, beta = calibrate_group(r, anchors)
            if alpha == 0.0 and against_order == "sorted" and calibrate_group(r, anchors, nonnegative=False)[0] < 0:
                q_hat, n_sorted = anchors_in_rank_order(r, anchors), n_sorted + 1
            else:
                n_degenerate += alpha == 0.0
                q_hat, c = calibrated_scores(r, alpha, beta)
                n_clamped_cal += c
        for k, m in enumerate(methods):
            f = F.get((g.name, m))
            records.append(Record(
                lr=os.path.relpath(g.lr, root), sr=os.path.relpath(g.srs[m], root),
                gt=os.path.relpath(g.gt, root) if g.gt is not None else None, group=g.name, method=m,
                F=None if f is None else round(f, 4), q_lr=round(float(np.clip(q_lr[g.name], *Q_RANGE)), 4),
                q_sr=round(float(q_hat[k]), 4), rationale=rationale.get((g.name, m), "")))
    log(f"[annotate] {len(groups)} groups, {len(records)} pairs, {len(F)} with F; stage 2 'fr' fell back to "
        f"'nr' in {n_fallback} groups without GT; stage 3: {n_degenerate} groups with alpha = 0 "
        f"(one item, no order, or anchors against the order), {n_sorted} groups whose anchors were handed out in "
        f"the stage-2 order (--against-order sorted), {n_clamped_cal} scores clamped to [1, 5]")
    return records


# ====================================================================================================
# 3. SFT of the reward model (§3.3, §5.1): chat samples, answer-only labels, the training loop
# ====================================================================================================

# Everything up to and including the LAST "<|im_start|>assistant\n" is prompt (system, user turn, both
# images); the labels are the answer tokens and the closing <|im_end|> (so the model learns to stop).
# The real Qwen3-VL template has no {% generation %} tags, so the mask is found in the token ids; the
# same string opens the assistant turn in the real and in the tiny template.
ASSISTANT_PREFIX = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
IGNORE_INDEX = -100  # label value the loss skips


def sft_conversation(rec: Record, lr, sr) -> list[dict]:
    """Chat messages of one training sample: CT.build_messages (the scorer's own prompt, so training
    and scoring see the same text and images) + the assistant answer in CT.format_answer's format.

    §3.3: a record with F uses the synthetic prompt and supervises F, Q_LR, Q_SR; a record without F
    (real-world LR, no GT) uses the no-F prompt and supervises only Q_LR, Q_SR.
    """
    synthetic = rec.F is not None
    messages = CT.build_messages(lr, sr, synthetic=synthetic)
    answer = CT.format_answer(rec.F if synthetic else None, rec.q_lr, rec.q_sr, rec.rationale)
    return messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def images_in(messages: list[dict]) -> list:
    """The images of a conversation in the order they appear (the order the processor expects)."""
    return [part["image"] for m in messages if isinstance(m["content"], list)
            for part in m["content"] if part.get("type") == "image"]


def find_last(seq: list[int], sub: list[int]) -> int:
    """Start index of the last occurrence of `sub` in `seq`, or -1."""
    for start in range(len(seq) - len(sub), -1, -1):
        if seq[start:start + len(sub)] == sub:
            return start
    return -1


def answer_only_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_ids: list[int],
                       end_id: int) -> torch.Tensor:
    """labels (B, T) = input_ids on the answer (after the last `prefix_ids`, up to and including the
    first `end_id` after it), IGNORE_INDEX elsewhere (prompt, images, padding, the template's trailing
    newline). Raises ValueError if a row has no assistant turn (e.g. truncated by a max length).
    """
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b].tolist()
        start = find_last(ids, prefix_ids)
        if start < 0:
            raise ValueError(f"sample {b} of the batch has no {ASSISTANT_PREFIX!r}: the chat template "
                             "does not open an assistant turn the usual way, or the text was truncated")
        first = start + len(prefix_ids)
        end = next((t for t in range(first, len(ids)) if ids[t] == end_id), len(ids) - 1)
        labels[b, first:end + 1] = input_ids[b, first:end + 1]
    return labels.masked_fill(attention_mask == 0, IGNORE_INDEX)


def fidelity_line_weights(labels: torch.Tensor, tokenizer, weight: float) -> torch.Tensor:
    """(B, T) loss weights: 1 on the answer tokens, `weight` on the tokens of the answer's first line when
    that line is the Fidelity line (format_answer writes F first; a quality-only answer has none), 0 where
    `labels` is IGNORE_INDEX. The line ends with the first token whose text holds a newline."""
    weights = (labels != IGNORE_INDEX).float()
    for b in range(labels.shape[0]):
        positions = weights[b].nonzero().flatten().tolist()
        texts = [tokenizer.decode([int(labels[b, t])]) for t in positions]
        if not "".join(texts).lstrip().startswith(CT.FIELD_LABELS["F"]):
            continue
        for t, text in zip(positions, texts):
            weights[b, t] = weight
            if "\n" in text:
                break
    return weights


def weighted_answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the labelled tokens, weighted: sum(w * ce) / sum(w). With weights 1 on
    every labelled token this is the model's own loss (the mean over them)."""
    logits, target, w = logits[:, :-1].float(), labels[:, 1:], weights[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * w.reshape(-1)).sum() / w.sum()


# --- Optional: a ranking loss on the read-out (--rank-weight; the paper trains the answer tokens only) -------
# The cross-entropy scores every digit of the answer on its own: reading 0.8 where the label says 0.7 costs as
# much as reading 0.1, and nothing asks two candidates of one LR to come out in their labels' order, which is
# all the RL reward is used for (group-relative advantages). The read-out below is reward.py's (Q-Align style
# expected digits: value = E[a] + 0.1 E[b] + 0.01 E[c]), teacher-forced on the label's digits instead of the
# greedy ones, so it is differentiable; the loss asks the F and the Q_SR read for a better candidate to be at
# least the labels' gap above the worse one's (`readout_rank_loss`). Measured on the mini, it did not make the
# reward rank unambiguous pairs better (README "The mini presets"): an option, off by default.


def readout_numbers(logits: torch.Tensor, labels: torch.Tensor, digit_id: list[int],
                    synthetic: Sequence[bool]) -> dict[str, torch.Tensor]:
    """The answer's numbers read from the digit probabilities, teacher-forced: {field: (B,)} for F, q_lr, q_sr
    (F is 1 for a quality-only answer, which has no Fidelity line: Eq.4 then gives R = Q_SR).

    The first 3 x fields digit tokens of each answer (`labels`, IGNORE_INDEX outside it) are its numbers "a.bc"
    in format_answer's order; the probabilities over the allowed digits at each (reward.allowed_digits; a
    leading digit at the top of its range forces "x.00", as the scorer's template does) give
    value = sum_k 10**-k E[digit_k] (reward.expected_number)."""
    is_digit = torch.zeros(logits.shape[-1], dtype=torch.bool, device=labels.device)
    is_digit[digit_id] = True
    out = {name: [] for name in ("F", "q_lr", "q_sr")}
    for b in range(labels.shape[0]):
        fields = CT.fields_for(synthetic[b])
        safe = labels[b].clamp(min=0)
        positions = ((labels[b] != IGNORE_INDEX) & is_digit[safe]).nonzero().flatten()[:3 * len(fields)]
        if len(positions) < 3 * len(fields):
            raise ValueError(f"sample {b}: its answer holds {len(positions)} digits, the read-out needs {3 * len(fields)}")
        for f, name in enumerate(fields):
            probs, values = [], []
            at_top = int(labels[b, positions[3 * f]]) == digit_id[int(CT.FIELD_RANGES[name][1])]  # leading digit
            for k in range(3):
                t = int(positions[3 * f + k])
                digits = reward.allowed_digits(name, k)
                p = torch.softmax(logits[b, t - 1, [digit_id[d] for d in digits]].float(), dim=-1)  # t is predicted at t-1
                if k > 0 and at_top:
                    p = torch.eye(len(digits), device=p.device)[0]  # "1.00" / "5.00": the scorer forces the decimals
                probs.append(p[None])
                values.append(digits)
            out[name].append(reward.expected_number(probs, values)[0])
        if "F" not in fields:
            out["F"].append(torch.ones((), device=logits.device))
    return {name: torch.stack(v) for name, v in out.items()}


RANK_SCALES = {"F": 4.0, "q_sr": 1.0}  # the ranked fields; F in [0, 1] counts on Q's span of 4


def readout_rank_loss(read: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                      min_gap: float) -> tuple[torch.Tensor, int, int]:
    """Hinge on the read-out of consecutive pairs (0,1), (2,3), ... of the batch (two candidates of one LR), per
    ranked field (F and Q_SR, F x 4 so both span 4): max(0, |gap| - sign(gap) (x^_0 - x^_1)), gap = the labels'
    x_0 - x_1, over the (field, pair) terms with |gap| >= min_gap. Returns (mean over those terms, 0 without one;
    terms used; terms read in the labels' order).

    Per field, each reading by its own labels, not on Eq.4's R. Measured on the mini (README "The mini presets",
    "A ranking loss on the read-out"): a hinge on R through F paid the model for reading a damaged candidate's F
    HIGHER (R = F Q_LR + F^(Q_LR / gamma) (Q_SR - Q_LR) falls as F rises where Q_SR < Q_LR; F alone then ordered
    0.42 of the unambiguous pairs), and with F held as read it moved R's order into Q_SR (its Spearman with
    its labels 0.79 -> -0.03). Q_LR is one label per LR: nothing to rank."""
    terms, used, ordered = [], 0, 0
    for name, scale in RANK_SCALES.items():
        x, y = scale * read[name].view(-1, 2), scale * labels[name].view(-1, 2)
        gap = y[:, 0] - y[:, 1]
        keep = gap.abs() >= min_gap
        sign, diff = gap[keep].sign(), (x[:, 0] - x[:, 1])[keep]
        terms.append(torch.relu(gap[keep].abs() - sign * diff))
        used, ordered = used + int(keep.sum()), ordered + int((sign * diff > 0).sum())
    return (torch.cat(terms).mean() if used else read["q_sr"].sum() * 0.0), used, ordered


def rank_labels(records: Sequence[Record], device="cpu") -> dict[str, torch.Tensor]:
    """The labels `readout_rank_loss` orders by: F (1 where a record has none, as the read-out reads it) and Q_SR."""
    return {"F": torch.tensor([1.0 if r.F is None else r.F for r in records], device=device),
            "q_sr": torch.tensor([r.q_sr for r in records], device=device)}


def group_members(records: Sequence[Record]) -> list[list[int]]:
    """For each record, the indices of the other records of its group (the other candidates of its LR); made once
    per run for `with_partners`."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.group, []).append(i)
    return [[j for j in groups[r.group] if j != i] for i, r in enumerate(records)]


def with_partners(members: list[list[int]], anchors: list[int], seed: int, step: int) -> list[int]:
    """[a0, p0, a1, p1, ...]: each anchor followed by another record of its group (`group_members`), drawn by a pure
    function of (seed, step, slot) so resumes and rank layouts agree. A group of one record pairs it with itself
    (that pair's gap is 0: it adds nothing to the ranking loss)."""
    out = []
    for slot, a in enumerate(anchors):
        others = members[a] or [a]
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + slot)
        out += [a, others[int(torch.randint(len(others), (), generator=g))]]
    return out


def sft_collate(processor, conversations: list[list[dict]]) -> dict[str, torch.Tensor]:
    """Conversations -> a model batch with `labels`.

    Keeps EVERY tensor the processor returns, including `mm_token_type_ids`: Qwen3-VL needs it for the
    multimodal RoPE (M-RoPE) positions of the image tokens; a collator that drops it silently trains
    with 1-D positions.
    """
    texts = [processor.apply_chat_template(c, tokenize=False) for c in conversations]
    images = [img for c in conversations for img in images_in(c)]
    batch = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    tok = processor.tokenizer
    prefix_ids = tok.encode(ASSISTANT_PREFIX, add_special_tokens=False)
    batch["labels"] = answer_only_labels(batch["input_ids"], batch["attention_mask"], prefix_ids,
                                         tok.convert_tokens_to_ids(END_OF_TURN))
    return batch


def load_pil_pair(rec: Record, root: Path):
    """(LR, SR) of a record as 8-bit RGB PIL images (what processors and chat messages take)."""
    return to_pil(load_image(root / rec.lr)), to_pil(load_image(root / rec.sr))


# How many of reward.augment_pair's transforms (the dihedral group of a square) each option draws from
AUGMENTATIONS = {"none": 1, "flip": 2, "dihedral": 8}


def augment_index(kind: str, seed: int, step: int, slot: int) -> int:
    """Which transform sample `slot` of the global batch of `step` gets: a pure function of (seed, step,
    slot), so every rank layout and a resumed run see the same augmented batches."""
    n = AUGMENTATIONS[kind]
    if n == 1:
        return 0
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + slot)
    return int(torch.randint(n, (), generator=g))


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """Sample order of one epoch: a permutation seeded by (seed, epoch), identical on every rank.

    A pure function of (seed, epoch), so a resumed run sees exactly the batches of an uninterrupted one.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_indices(n: int, step: int, steps_per_epoch: int, global_batch: int, seed: int) -> list[int]:
    """The `global_batch` sample indices of optimizer step `step`. The last batch of an epoch is filled
    up by wrapping to the start of that epoch's order (those repeats are counted in the log)."""
    epoch, k = divmod(step, steps_per_epoch)
    order = epoch_order(n, epoch, seed)
    return [order[(k * global_batch + i) % n] for i in range(global_batch)]


# --- Checkpoints: one process writes full state; FSDP2 ranks write their own shards ------------------
# On one process the checkpoint holds the full model and optimizer (training.save_training_checkpoint).
# Under FSDP2 every rank writes ITS shards of the weights and of the AdamW state (safetensors, in parallel,
# no gather: a full 8B checkpoint with AdamW is ~140 GB) and resumes from them on the same number of ranks.
# The optimizer state is keyed by parameter NAME, flattened as "optim.<name>.<key>". The final export
# gathers the full weights once to rank 0 (torch.distributed.checkpoint.state_dict, cpu_offload).


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier at `step`: linear warm-up 0 -> 1 over `warmup` steps, then cosine decay 1 -> 0 at
    `total` (§5.1 "initial learning rate 1e-5 and a cosine decay schedule")."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainArgs:
    """Arguments of `train`. Defaults = paper §5.1 (Qwen3-VL-8B-Instruct, AdamW, lr 1e-5, cosine decay,
    global batch 64, 8 epochs); where the paper is silent, the Hugging Face Trainer's defaults."""

    data: str = ""
    """(required) JSONL of labelled pairs (see the module docstring)"""
    root: str = ""
    """folder the JSONL image paths are relative to (default: the JSONL's folder)"""
    out: str = "out/compass"
    """output folder (model, checkpoints, tb)"""
    model: str = "Qwen/Qwen3-VL-8B-Instruct"
    """hub name, local folder, 'tiny' (random tiny Qwen3-VL of the real classes) or 'mini' (continue the mini COMPASS)"""
    epochs: int = 8
    """training epochs (§5.1: 8)"""
    global_batch: int = 64
    """samples per optimizer step over all GPUs (§5.1: 64)"""
    per_device_batch: int = 1
    """samples per forward pass per GPU; grad accumulation fills the global batch"""
    lr: float = 1e-5
    """AdamW peak learning rate (§5.1: 1e-5)"""
    warmup_steps: int = 0
    """linear warm-up steps before the cosine decay (paper silent: 0)"""
    weight_decay: float = 0.0
    """AdamW weight decay (paper silent: 0)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (paper silent: 1)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass (saves memory)"""
    bf16: str = "auto"
    """bfloat16 compute: on | off | auto (on with CUDA)"""
    export_dtype: str = "auto"
    """dtype of the saved model: bfloat16 | float32 | auto (bfloat16 if --bf16)"""
    seed: int = 0
    """seed of the data order (the tiny preset always uses reward.py's seed 0)"""
    device: str = "auto"
    """cuda | cpu | auto"""
    save_every: int = 0
    """checkpoint every N steps (0: every epoch)"""
    keep_last: int = 2
    """checkpoints kept (8B: ~105 GB each)"""
    resume: str = ""
    """'latest' or a checkpoint folder"""
    overwrite: bool = False
    """start over in an --out folder that holds a run (deletes its checkpoints, logs and model); without it such a
    folder is refused unless --resume"""
    max_steps: int = 0
    """stop after this many steps (0: all); the LR schedule still spans --epochs"""
    skip_invalid: bool = False
    """drop (and count) invalid records instead of refusing the file"""
    max_nonfinite: int = 10
    """NaN/Inf steps skipped before giving up"""
    fidelity_weight: float = 1.0
    """loss weight of the answer's Fidelity line (its tokens) relative to the other answer tokens (paper
    silent: 1 = the plain mean over the answer tokens); > 1 spends more of each step on F"""
    augment: str = "none"
    """none (paper) | flip (horizontal flip of the pair) | dihedral (one of the 8 flips/rotations of the pair,
    for labels that do not depend on orientation, like the mini build's): the same transform on LR and SR"""
    rank_weight: float = 0.0
    """weight of a ranking loss on the read-out beside the answer cross-entropy (paper silent: 0 = the answer
    tokens alone). Each step then takes half its batch from the epoch order (an epoch = every record once
    this way) and pairs each record with another candidate of its LR; the F and the Q_SR read from their digit
    probabilities must stand at least the labels' gap apart, in the labels' order (`readout_rank_loss`).
    Needs an even --per-device-batch"""
    rank_min_gap: float = 0.1
    """--rank-weight: a field of a pair whose labels differ by less (F x 4) is left out of the ranking loss"""
    freeze_vision: bool = False
    """keep the vision tower (model.visual: ViT + merger) as loaded; only the language model learns (paper silent:
    off = full-parameter SFT). What a tower already sees (a pretrained encoder, or the mini build's perception
    warm-up) then survives the SFT; it also saves the tower's gradients and AdamW state"""
    # filled at run time
    grad_accum: int = 0
    """(filled at run time) micro-batches per optimizer step = global / (per-device x processes)"""
    steps_per_epoch: int = 0
    """(filled at run time) ceil(pairs / global batch)"""
    total_steps: int = 0
    """(filled at run time) epochs x steps per epoch: the cosine schedule's length"""


def train(args: TrainArgs) -> Path | int:
    """Full-parameter SFT of the COMPASS reward model (§3.3). Returns the output folder."""
    from tqdm import tqdm

    # ---- plumbing: processes, seeds, data -------------------------------------------------------------
    dist_info = setup_distributed(args.device)
    device, world = dist_info.device, dist_info.world_size
    sharded = world > 1
    seed_everything(args.seed, dist_info.rank)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda")
    root = Path(args.root) if args.root else Path(args.data).parent
    records = load_records(args.data, root, skip_invalid=args.skip_invalid)
    n = len(records)

    if args.augment not in AUGMENTATIONS:
        raise ValueError(f"--augment {args.augment}: choose one of {', '.join(AUGMENTATIONS)}")
    if not args.fidelity_weight > 0:
        raise ValueError(f"--fidelity-weight {args.fidelity_weight}: must be > 0 (1 = every answer token alike)")
    if args.global_batch % (args.per_device_batch * world):
        raise ValueError(f"--global-batch {args.global_batch} must be a multiple of --per-device-batch "
                         f"{args.per_device_batch} x {world} processes")
    if args.rank_weight < 0 or (args.rank_weight > 0 and args.per_device_batch % 2):
        raise ValueError(f"--rank-weight {args.rank_weight}: must be >= 0, and > 0 needs an even --per-device-batch "
                         f"(pairs share a micro-batch), got {args.per_device_batch}")
    args.grad_accum = args.global_batch // (args.per_device_batch * world)
    ranking = args.rank_weight > 0
    fresh = args.global_batch // 2 if ranking else args.global_batch  # records per step from the epoch order
    args.steps_per_epoch = math.ceil(n / fresh)
    args.total_steps = args.epochs * args.steps_per_epoch
    out = Path(args.out)
    ckpt_root = out / "checkpoints"
    # a finished or interrupted run in --out is never replaced by accident (--resume / --overwrite)
    T.claim_run(out, args.resume, args.overwrite, out / "config.json", dist_info,
                {k: v for k, v in asdict(args).items() if k not in ("grad_accum", "steps_per_epoch", "total_steps")})
    if dist_info.is_main:
        print(f"[train] {n} pairs ({sum(r.F is not None for r in records)} with F), {world} process(es), "
              f"global batch {args.global_batch} = {args.per_device_batch} x {args.grad_accum} accum x "
              f"{world}, {args.steps_per_epoch} steps/epoch, {args.total_steps} steps; "
              f"{args.steps_per_epoch * fresh - n} repeated samples per epoch fill the last batch"
              + (f"; ranking loss x {args.rank_weight} on {args.global_batch // 2} pairs per step" if ranking else ""))

    # ---- model: the same loader as the scorer; FSDP2 when launched by torchrun -------------------------
    # FSDP2 keeps ONE full copy per node: rank 0 loads the weights, the others build the model on the meta
    # device and receive their shards from rank 0 (training.shard_from_rank0)
    model, processor = VL.load_compass(args.model, dtype=torch.float32, device="cpu",
                                           on_meta=sharded and not dist_info.is_main)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if args.freeze_vision:  # before sharding: FSDP2 keeps requires_grad per parameter
        model.model.visual.requires_grad_(False)
    if sharded:
        VL.shard_vl_model(model, dist_info, bf16)  # each rank's shards on `device`
    else:
        model.to(device)
    digit_id = reward.digit_token_ids(processor.tokenizer, "--rank-weight") if ranking else []
    members = group_members(records) if ranking else []
    trained = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP2 swaps the Parameters
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, args.warmup_steps, args.total_steps))

    # ---- resume ------------------------------------------------------------------------------------
    start, losses = 0, []  # losses: one per optimizer step, kept in the checkpoints across resumes
    found = resolve_resume(args.resume, ckpt_root) if dist_info.is_main else None
    if sharded:  # rank 0 finds the checkpoint; every rank reads its own shards of it
        found = broadcast_object(found)
    if found is not None:
        state = restore_training_checkpoint(found, model, optimizer, dist_info, None, scheduler, sharded)
        start, losses = state["step"], state.get("losses", [])
        if dist_info.is_main:
            print(f"[train] resumed from {found} at step {start}")
    elif args.resume and dist_info.is_main:
        print(f"[train] --resume {args.resume}: no checkpoint in {ckpt_root} yet, starting from step 0")

    def save(step: int) -> None:  # collective under FSDP2: every rank calls it, rank 0 writes
        save_training_checkpoint(ckpt_root, step, model, optimizer, dist_info, None, scheduler,
                                 keep_last=args.keep_last, sharded=sharded, epoch=step / args.steps_per_epoch,
                                 losses=losses, args=vars(args))

    # ---- the loop -----------------------------------------------------------------------------------
    writer = summary_writer(out / "tb", start) if dist_info.is_main else None  # purges a killed run's tail
    guard = NonFiniteGuard(args.max_nonfinite)
    end = min(args.total_steps, args.max_steps) if args.max_steps else args.total_steps
    save_every = args.save_every or args.steps_per_epoch
    per_rank = args.per_device_batch * args.grad_accum
    stop = T.StopOnSignal()  # Ctrl-C / SIGTERM: checkpoint at the end of the step, then the resume command
    bar = tqdm(range(start, end), initial=start, total=end, disable=not dist_info.is_main, desc="sft")
    for step in bar:
        # 1. this rank's share of the global batch, split into micro-batches
        idx = step_indices(n, step, args.steps_per_epoch, fresh, args.seed)
        if ranking:  # --rank-weight: each record followed by another candidate of its LR
            idx = with_partners(members, idx, args.seed, step)
        mine = idx[dist_info.rank * per_rank:(dist_info.rank + 1) * per_rank]
        step_loss = torch.zeros((), device=device)
        rank_stats = torch.zeros(3, device=device)  # ranking loss (summed over micro-batches), pairs, in order
        for micro in range(args.grad_accum):
            first = micro * args.per_device_batch
            chunk = [records[i] for i in mine[first:first + args.per_device_batch]]
            slots = [dist_info.rank * per_rank + first + j for j in range(len(chunk))]  # places in the global batch
            # 2. prompt (both images + task) and the labelled answer; labels only on the answer tokens
            #    (--augment: the same flip/rotation of both images, chosen per sample)
            pairs = [reward.augment_pair(*load_pil_pair(r, root), augment_index(args.augment, args.seed, step, slot))
                     for r, slot in zip(chunk, slots)]
            batch = sft_collate(processor, [sft_conversation(r, *pair) for r, pair in zip(chunk, pairs)])
            batch = {k: v.to(device) for k, v in batch.items()}
            if sharded:  # reduce-scatter gradients once, on the last micro-batch
                model.set_requires_gradient_sync(micro == args.grad_accum - 1)
            # 3. next-token cross-entropy on the answer tokens, averaged over the accumulation
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not sharded):
                if args.fidelity_weight == 1.0 and not ranking:
                    loss = model(**batch).loss / args.grad_accum
                else:  # --fidelity-weight: the Fidelity line's tokens count more; --rank-weight: the read-out ranks
                    weights = fidelity_line_weights(batch["labels"], processor.tokenizer, args.fidelity_weight)
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                    loss = weighted_answer_loss(logits, batch["labels"], weights)
                    if ranking:
                        read = readout_numbers(logits, batch["labels"], digit_id, [r.F is not None for r in chunk])
                        rank_loss, used, ordered = readout_rank_loss(read, rank_labels(chunk, device), args.rank_min_gap)
                        loss = loss + args.rank_weight * rank_loss
                        rank_stats += torch.tensor([float(rank_loss.detach()), used, ordered], device=device)
                    loss = loss / args.grad_accum
            loss.backward()
            step_loss += loss.detach()
        # 4. clip, step AdamW, advance the cosine schedule (NaN/Inf steps are skipped and counted)
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if guard.ok(step_loss):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss_value = float(all_reduce_mean(step_loss))  # mean over ranks
        losses.append(loss_value)
        if writer is not None:
            writer.add_scalar("train/loss", loss_value, step + 1)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step + 1)
            writer.add_scalar("train/grad_norm", float(grad_norm), step + 1)
            if ranking:  # this rank's pairs: the hinge (mean over micro-batches) and the share read in order
                writer.add_scalar("train/rank_loss", float(rank_stats[0]) / args.grad_accum, step + 1)
                writer.add_scalar("train/rank_acc", float(rank_stats[2] / rank_stats[1].clamp(min=1)), step + 1)
            writer.flush()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            **({"rank_acc": f"{float(rank_stats[2] / rank_stats[1].clamp(min=1)):.2f}"} if ranking else {}))
        stopping = stop.requested()
        if (step + 1) % save_every == 0 or step + 1 == end or stopping:
            save(step + 1)
        if stopping:
            return T.stopped(stop, writer, dist_info)
    stop.restore()

    # ---- export: a plain Hugging Face folder (from_pretrained, VL.load_compass, vllm serve) --------
    if end == args.total_steps:
        model_sd, _ = gather_full_state(model, None)
        if dist_info.is_main:
            export = {"auto": torch.bfloat16 if bf16 else torch.float32, "bfloat16": torch.bfloat16,
                      "float32": torch.float32}[args.export_dtype]
            model.config.use_cache = True
            model.config.dtype = export
            model.save_pretrained(out, state_dict={k: v.to(export) for k, v in model_sd.items()})
            processor.save_pretrained(out)
            print(f"[train] saved the reward model to {out} ({guard.skipped} non-finite steps skipped)")
        barrier()
    if dist_info.is_main:
        atomic_write_text(json.dumps({"losses": losses, "resumed_at": start, "end_step": end}), out / "losses.json")
    if writer is not None:
        writer.close()
    cleanup_distributed()
    return out


# ====================================================================================================
# 4. Command line
# ====================================================================================================


@dataclass
class AnnotateArgs:
    """Arguments of `annotate` (folder layout in `discover_groups`)."""

    lr_dir: str = ""
    """(required) folder of LR inputs (synthetic LR or real LQ)"""
    sr_dir: str = ""
    """(required) folder with one sub-folder of SR outputs per method"""
    gt_dir: str = ""
    """optional folder of GT images (gives F, Eq.1)"""
    out: str = "compass.jsonl"
    """JSONL to write (QC report beside it)"""
    root: str = ""
    """paths are written relative to this folder (default: the folder of --out)"""
    fidelity: str = "dists"
    """Eq.1 distance: dists | lpips | ssim | texture | blend (the last three need no weights; texture =
    evaluate.texture_fidelity, a DISTS analogue; blend = (ssim + texture) / 2)"""
    anchor: str = "piqe"
    """stage 1 scorer: a pyiqa NR metric name (piqe needs no weights), 'snb' (evaluate.snb_quality, weights-free,
    already in [1, 5]) or 'mllm' (--anchor-url)"""
    lr_view: str = "native"
    """stage 1 on the LR: native (the file as it is, paper) | sr (resized to the SR size, as the reward model sees it)"""
    calibration: str = "rank"
    """rank (stages 2-3, paper) | none (Q_SR = the stage-1 anchor: Table 3 case 1, absolute scores)"""
    against_order: str = "flat"
    """stage 3 where a group's anchors disagree with its stage-2 order (the paper is silent): flat (alpha 0: one
    score for the whole group) | sorted (the group's anchors handed out in the stage-2 order)"""
    anchor_mapping: str = "range"
    """raw -> [1, 5]: range (pyiqa's score_range) | minmax (over the data)"""
    anchor_url: str = ""
    """OpenAI-compatible URL of the MLLM for --anchor mllm"""
    anchor_model_name: str = ""
    """model name on --anchor-url"""
    compare: str = "nr"
    """stage 2 comparator: nr (stage-1 anchors) | fr (--compare-metric vs GT where it exists)"""
    compare_metric: str = "ssim"
    """full-reference metric of --compare fr"""
    rank: str = "winrate"
    """stage 2 aggregation: winrate | bt"""
    qc_fraction: float = 0.05
    """QC report: top / bottom fraction (§3.2: 5%)"""
    device: str = "auto"
    """cuda | cpu | auto"""


def run_annotate(args: AnnotateArgs) -> list[Record]:
    """The `annotate` command: folders -> JSONL + QC report."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    try:
        groups, counts = discover_groups(args.lr_dir, args.sr_dir, args.gt_dir or None)
    except ValueError as err:  # a missing or empty folder, two files for one stem: the user's input, one line
        raise T.RunError(f"annotate: {err}") from err
    print(f"[annotate] {len(groups)} groups; unmatched files: {counts}")
    root = Path(args.root) if args.root else Path(args.out).resolve().parent
    fidelity = None
    if args.gt_dir:
        fs = reward.FidelityScorer(metric=args.fidelity, device=device)
        fidelity = lambda sr, gt: float(fs.fidelity(sr[None].to(device), gt[None].to(device))[0])
    kw: dict = {}
    if args.anchor == "mllm":
        if not args.anchor_url:
            raise T.RunError("--anchor mllm needs --anchor-url URL (and --anchor-model-name)")
        remote = reward.RemoteScorer(args.anchor_url, args.anchor_model_name, synthetic=False)
        kw["mllm"] = remote.score
    elif args.anchor == "snb":  # weights-free sharpness / noise / blocking score, already on the [1, 5] scale
        kw.update(nr_raw=lambda x: float(snb_quality(x[None].to(device))[0]), lower_better=False,
                  score_range=Q_RANGE)
    else:
        metric = create_metric(args.anchor, device)
        if metric.metric_mode != "NR":
            raise ValueError(f"--anchor {args.anchor}: needs a no-reference metric, this one is "
                             f"{metric.metric_mode} (try piqe, musiq, liqe, topiq_nr)")
        kw["nr_raw"] = lambda x: float(metric(x[None].to(device)).flatten()[0])
        kw["lower_better"] = bool(metric.lower_better)
        if args.anchor_mapping == "range":
            kw["score_range"] = parse_score_range(metric.score_range)
        elif args.anchor_mapping != "minmax":
            raise ValueError(f"--anchor-mapping {args.anchor_mapping}: use range or minmax")
    fr_compare = None
    if args.compare == "fr":
        m = create_metric(args.compare_metric, device)
        sign = -1.0 if m.lower_better else 1.0
        fr_compare = lambda sr, gt: sign * float(m(sr[None].to(device), gt[None].to(device)).flatten()[0])
    records = annotate(groups, root, fidelity=fidelity, compare=args.compare, fr_compare=fr_compare,
                       rank_method=args.rank, calibration=args.calibration, lr_view=args.lr_view,
                       against_order=args.against_order, **kw)
    write_records(records, args.out)
    qc_path = Path(args.out).with_suffix(".qc.md")
    qc_report(records, args.qc_fraction, qc_path)
    print(f"[annotate] wrote {len(records)} records to {args.out} (paths relative to {root}) and {qc_path}")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in (("annotate", AnnotateArgs), ("train", TrainArgs)):
        add_dataclass_args(sub.add_parser(name, help=cls.__doc__.split("\n")[0],
                                          formatter_class=argparse.ArgumentDefaultsHelpFormatter), cls)
    argv = sys.argv[1:] if argv is None else list(argv)
    renames = {**T.DEPRECATED_FLAGS, "--server": "--anchor-url", "--server-model": "--anchor-model-name"} \
        if argv[:1] == ["annotate"] else T.DEPRECATED_FLAGS  # annotate's server is the anchor MLLM
    known = {o for a in sub.choices[argv[0]]._actions for o in a.option_strings} if argv[:1] and argv[0] in sub.choices \
        else set()
    ns = vars(parser.parse_args(T.renamed_flags(argv, known, renames)))
    command = ns.pop("command")
    t0 = time.time()
    if command == "annotate":
        if ns["against_order"] not in AGAINST_ORDER:
            parser.error(f"annotate: --against-order {ns['against_order']}: choose {' or '.join(AGAINST_ORDER)}")
        run_annotate(AnnotateArgs(**ns))
    else:
        if not ns["data"]:
            parser.error("train: --data JSONL is required")
        result = train(TrainArgs(**ns))
        if isinstance(result, int):
            return result
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[{command}] done in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    run_script(main)
