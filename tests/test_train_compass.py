"""Tests of train_compass.py: annotation maths (Eq.2/3, ranking), JSONL validation, SRIQA accuracy and the
tie rules, the annotate / train / eval commands on the tiny preset (incl. resume and torchrun + FSDP2)."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reward
import train_compass as tc
from common import compass_text as CT
from common import vl_model as VL
from common.data import load_image, save_image
from evaluation import sriqa

# one pytest-xdist worker runs this file: its module fixtures (the tiny COMPASS runs) are built once
pytestmark = pytest.mark.xdist_group("test_train_compass")

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


# ----------------------------------------------------------------------------------------------------
# Stage 3: calibration (Eq.2, Eq.3)
# ----------------------------------------------------------------------------------------------------


def test_calibration_hand_worked_and_lstsq():
    # hand-worked: r = (1, .5, 0), Q = (4, 3.5, 2): slope 2, intercept 13/6
    alpha, beta = tc.calibrate_group(np.array([1.0, 0.5, 0.0]), np.array([4.0, 3.5, 2.0]))
    assert alpha == pytest.approx(2.0) and beta == pytest.approx(13 / 6)
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 12):
        r = np.concatenate([[0.0, 1.0], rng.uniform(0, 1, n - 2)])
        q = np.clip(1.5 + 2.5 * r + rng.normal(0, 0.3, n), 1, 5)
        expect = np.linalg.lstsq(np.c_[r, np.ones(n)], q, rcond=None)[0]
        if expect[0] < 0:
            continue
        got = tc.calibrate_group(r, q)
        np.testing.assert_allclose(got, expect, atol=1e-10)
        q_hat, _ = tc.calibrated_scores(r, *got)
        np.testing.assert_allclose(q_hat, np.clip(expect[0] * r + expect[1], 1, 5))  # Eq.3
        # the calibration keeps the stage-2 order
        assert np.all(np.diff(q_hat[np.argsort(r)]) >= -1e-12)


def test_calibration_degenerate_groups():
    assert tc.calibrate_group(np.array([0.5]), np.array([3.2])) == (0.0, pytest.approx(3.2))
    assert tc.calibrate_group(np.full(4, 0.5), np.array([2.0, 3.0, 4.0, 5.0])) == (0.0, pytest.approx(3.5))
    # anchors against the ranking: unconstrained slope < 0 -> alpha = 0, beta = mean (order kept)
    r, q = np.array([1.0, 0.5, 0.0]), np.array([2.0, 3.0, 4.0])
    assert np.linalg.lstsq(np.c_[r, np.ones(3)], q, rcond=None)[0][0] < 0
    assert tc.calibrate_group(r, q) == (0.0, pytest.approx(3.0))
    assert tc.calibrate_group(r, q, nonnegative=False)[0] == pytest.approx(-2.0)
    # clamping to [1, 5] is counted
    q_hat, clamped = tc.calibrated_scores(np.array([0.0, 0.5, 1.0]), 6.0, 0.5)
    np.testing.assert_allclose(q_hat, [1.0, 3.5, 5.0])
    assert clamped == 2


def test_anchors_handed_out_in_rank_order_keep_the_ranking_and_the_anchor_values():
    # anchors against the order: the best-ranked item gets the highest anchor, the worst the lowest
    np.testing.assert_allclose(tc.anchors_in_rank_order(np.array([1.0, 0.5, 0.0]), np.array([2.0, 3.0, 4.0])),
                               [4.0, 3.0, 2.0])
    # ties in r share the mean of the values they would get: r (1, 0, 0), anchors {1, 2, 4} -> 4, 1.5, 1.5
    np.testing.assert_allclose(tc.anchors_in_rank_order(np.array([1.0, 0.0, 0.0]), np.array([1.0, 4.0, 2.0])),
                               [4.0, 1.5, 1.5])


# ----------------------------------------------------------------------------------------------------
# Stage 2: ranking from pairwise comparisons
# ----------------------------------------------------------------------------------------------------


def test_group_rank_strict_order_is_evenly_spaced():
    quality = np.array([0.3, 0.9, 0.1, 0.5, 0.7])  # hidden true order: 1 > 4 > 3 > 0 > 2
    r = tc.group_rank(5, tc.value_comparator(quality))
    expect = np.empty(5)
    expect[np.argsort(-quality)] = [1.0, 0.75, 0.5, 0.25, 0.0]
    np.testing.assert_allclose(r, expect)
    bt = tc.group_rank(5, tc.value_comparator(quality), method="bt")
    assert list(np.argsort(-bt)) == list(np.argsort(-quality)) and bt.max() == 1.0 and bt.min() == 0.0


def test_group_rank_cycle_ties_and_position_bias():
    cycle = {(0, 1): 1.0, (1, 2): 1.0, (2, 0): 1.0}  # 0 > 1 > 2 > 0
    comp = lambda i, j: cycle.get((i, j), 1.0 - cycle.get((j, i), 0.5))
    np.testing.assert_allclose(tc.group_rank(3, comp), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(tc.group_rank(3, comp, method="bt"), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(tc.group_rank(1, comp), [0.5])
    # a judge that always prefers the first image: asking both orders cancels the bias
    first = lambda i, j: 1.0
    np.testing.assert_allclose(tc.group_rank(4, first), np.full(4, 0.5))
    assert tc.group_rank(4, first, both_orders=False)[0] == 1.0
    # soft probabilities: the win rate is their row mean (hand-worked), then min-max
    P = np.array([[0.5, 0.8, 0.9], [0.2, 0.5, 0.6], [0.1, 0.4, 0.5]])
    r = tc.group_rank(3, lambda i, j: P[i, j], both_orders=False)
    wins = np.array([0.85, 0.4, 0.25])
    np.testing.assert_allclose(r, (wins - 0.25) / 0.6)


def test_anchor_scores_mapping():
    # PIQE-like: range 0..100, lower is better; 120 is outside the range -> clamped and counted
    q, clamped = tc.anchor_scores(np.array([0.0, 25.0, 100.0, 120.0]), True, (0.0, 100.0))
    np.testing.assert_allclose(q, [5.0, 4.0, 1.0, 1.0])
    assert clamped == 1
    q, clamped = tc.anchor_scores(np.array([2.0, 4.0, 3.0]), False)  # min-max over the data
    np.testing.assert_allclose(q, [1.0, 5.0, 3.0])
    assert tc.parse_score_range("~0, ~40") == (0.0, 40.0)


# ----------------------------------------------------------------------------------------------------
# JSONL dataset
# ----------------------------------------------------------------------------------------------------


def _image(path, seed, size=32, smooth=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size, size, generator=g)
    for _ in range(smooth):
        x = torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    save_image(x[0], path)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_valid_and_errors_name_file_line(tmp_path):
    for name in ("lr/a.png", "sr/m1/a.png", "sr/m2/a.png", "gt/a.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        _image(tmp_path / name, 0)
    good = {"lr": "lr/a.png", "sr": "sr/m1/a.png", "gt": "gt/a.png", "group": "a", "method": "m1",
            "F": 0.8, "q_lr": 2.0, "q_sr": 3.5, "rationale": "sharper"}
    real = {"lr": "lr/a.png", "sr": "sr/m2/a.png", "group": "a", "method": "m2", "F": None,
            "q_lr": 2.0, "q_sr": 4.0}
    f = _write_jsonl(tmp_path / "ok.jsonl", [good, "", real])
    recs = tc.load_records(f, tmp_path)
    assert [r.method for r in recs] == ["m1", "m2"] and recs[0].F == 0.8 and recs[1].F is None
    assert recs[1].where == f"{f}:3"
    # write -> read round trip
    again = tc.load_records(tc.write_records(recs, tmp_path / "again.jsonl"), tmp_path)
    assert [r.to_json() for r in again] == [r.to_json() for r in recs]

    cases = {
        "missing image": ({**good, "sr": "sr/m1/nope.png"}, "sr image not found"),
        "F out of range": ({**good, "F": 1.2}, "F=1.2 is outside [0, 1]"),
        "Q out of range": ({**good, "q_sr": 5.5}, "q_sr=5.5 is outside [1, 5]"),
        "Q not a number": ({**good, "q_lr": "high"}, "q_lr='high' is not a number"),
        "missing field": ({k: v for k, v in good.items() if k != "group"}, "missing field(s) ['group']"),
    }
    for name, (bad, message) in cases.items():
        f = _write_jsonl(tmp_path / "bad.jsonl", [real, bad])
        with pytest.raises(ValueError) as err:
            tc.load_records(f, tmp_path)
        assert f"{f}:2: " in str(err.value) and message in str(err.value), name
    f = _write_jsonl(tmp_path / "dup.jsonl", [good, real, good, "{not json"])
    with pytest.raises(ValueError) as err:
        tc.load_records(f, tmp_path)
    text = str(err.value)
    assert "2 invalid record(s)" in text
    assert f"{f}:3: duplicate (lr, sr) pair (lr/a.png, sr/m1/a.png), first at {f}:1" in text
    assert f"{f}:4: not valid JSON" in text
    kept = tc.load_records(f, tmp_path, skip_invalid=True)  # dropped records are counted on stderr
    assert len(kept) == 2


# ----------------------------------------------------------------------------------------------------
# Annotation pipeline on folders (weights-free: SSIM fidelity, PIQE anchors)
# ----------------------------------------------------------------------------------------------------


def _sr_folders(base, n_groups=2, methods=("Bicubic", "GAN", "Diff")):
    """LR/GT/SR folders where SR quality is ordered by blur: method k is blurred k times."""
    for g in range(n_groups):
        hr = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(g))
        hr = torch.nn.functional.avg_pool2d(hr, 3, 1, 1, count_include_pad=False)
        save_image(hr[0], base / "gt" / f"{g:04d}.png")
        save_image(torch.nn.functional.avg_pool2d(hr, 4)[0], base / "lr" / f"{g:04d}.png")
        x = hr
        for k, m in enumerate(methods):
            save_image(x[0], base / "sr" / m / f"{g:04d}.png")
            x = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False)
    save_image(hr[0], base / "sr" / methods[0] / "orphan.png")  # an SR without LR: counted


@pytest.mark.parametrize("fidelity", ["ssim", "texture", "blend"])  # the weights-free Eq.1 distances
def test_annotate_command_writes_valid_jsonl_and_qc(tmp_path, fidelity):
    _sr_folders(tmp_path)
    out = tmp_path / "compass.jsonl"
    tc.main(["annotate", "--lr-dir", str(tmp_path / "lr"), "--sr-dir", str(tmp_path / "sr"), "--gt-dir",
             str(tmp_path / "gt"), "--out", str(out), "--fidelity", fidelity, "--anchor", "piqe",
             "--device", "cpu"])
    recs = tc.load_records(out, tmp_path)  # validates ranges and images
    assert len(recs) == 6 and {r.group for r in recs} == {"0000", "0001"}
    for g in ("0000", "0001"):
        by = {r.method: r for r in recs if r.group == g}
        # F = 1 - distance(SR, GT) (Eq.1): the unblurred SR equals the GT
        assert by["Bicubic"].F == pytest.approx(1.0, abs=1e-4) and by["Bicubic"].F > by["GAN"].F > by["Diff"].F
        # one Q_LR per group; calibrated Q_SR keeps the ranking (stage 2 on the PIQE anchors)
        assert len({r.q_lr for r in by.values()}) == 1
    qc = out.with_suffix(".qc.md").read_text()
    assert "## Top 1" in qc and "## Bottom 1" in qc and "sr/" in qc


def test_annotate_function_ranks_calibrates_and_counts(tmp_path):
    # flat images whose raw "NR score" is 5 x their grey level (8-bit exact): LR 0, SRs A..D = 3, 4, 1, 2
    levels = {"A": 0.6, "B": 0.8, "C": 0.2, "D": 0.4}
    save_image(torch.zeros(3, 16, 16), tmp_path / "lr" / "g.png")
    for m, v in levels.items():
        save_image(torch.full((3, 16, 16), v), tmp_path / "sr" / m / "g.png")
    save_image(torch.zeros(3, 16, 16), tmp_path / "sr" / "A" / "orphan.png")  # an SR without LR: counted
    groups, counts = tc.discover_groups(tmp_path / "lr", tmp_path / "sr")
    assert counts == {"sr_without_lr": 1, "lr_without_sr": 0, "gt_without_lr": 0}
    recs = tc.annotate(groups, tmp_path, fidelity=None, nr_raw=lambda x: 5 * float(x.mean()),
                       lower_better=False, score_range=(0.0, 4.0), log=lambda s: None)
    q = {r.method: r.q_sr for r in recs}
    # anchors 1 + 4 raw / 4 = (4, 5, 2, 3); stage 2 r = (2/3, 1, 0, 1/3): the exact line alpha 3, beta 2
    assert q == pytest.approx({"A": 4.0, "B": 5.0, "C": 2.0, "D": 3.0}, abs=1e-3)
    assert all(r.q_lr == pytest.approx(1.0) and r.F is None for r in recs)
    assert {r.sr for r in recs} == {f"sr/{m}/g.png" for m in levels}


def test_annotate_against_order_flat_or_sorted(tmp_path):
    # the NR anchors prefer brighter SRs, the stage-2 comparator darker ones: Eq.2's slope is negative
    levels = {"A": 0.6, "B": 0.8, "C": 0.2, "D": 0.4}
    save_image(torch.zeros(3, 16, 16), tmp_path / "lr" / "g.png")
    save_image(torch.zeros(3, 16, 16), tmp_path / "gt" / "g.png")
    for m, v in levels.items():
        save_image(torch.full((3, 16, 16), v), tmp_path / "sr" / m / "g.png")
    groups, _ = tc.discover_groups(tmp_path / "lr", tmp_path / "sr", tmp_path / "gt")
    logs = []
    q = {}
    for against_order in ("flat", "sorted"):
        recs = tc.annotate(groups, tmp_path, fidelity=None, nr_raw=lambda x: 5 * float(x.mean()), lower_better=False,
                           score_range=(0.0, 4.0), compare="fr", fr_compare=lambda sr, gt: -float(sr.mean()),
                           against_order=against_order, log=logs.append)
        q[against_order] = {r.method: r.q_sr for r in recs}
    # anchors (A, B, C, D) = (4, 5, 2, 3); stage 2 order C > D > A > B
    assert q["flat"] == pytest.approx({m: 3.5 for m in levels}, abs=1e-3)  # one score: no order left
    assert q["sorted"] == pytest.approx({"C": 5.0, "D": 4.0, "A": 3.0, "B": 2.0}, abs=1e-3)
    assert "1 groups with alpha = 0" in logs[1] and "0 groups whose anchors" in logs[1]
    assert "0 groups with alpha = 0" in logs[3] and "1 groups whose anchors" in logs[3]
    with pytest.raises(ValueError, match="against_order"):
        tc.annotate(groups, tmp_path, fidelity=None, nr_raw=lambda x: 0.0, against_order="isotonic", log=logs.append)


def test_annotate_with_an_mllm_anchor_scorer(tmp_path):
    import reward
    _sr_folders(tmp_path, n_groups=1, methods=("A", "B", "C"))
    groups, _ = tc.discover_groups(tmp_path / "lr", tmp_path / "sr", tmp_path / "gt")
    calls = []

    def fake_mllm(lr_images, sr_images):  # per pair: Q_LR 2.0 / 2.2 / 2.4, Q_SR 3, 4, 2, a rationale each
        calls.append(len(sr_images))
        n = len(sr_images)
        return reward.Scores(F=torch.full((n,), float("nan")), q_lr=torch.tensor([2.0, 2.2, 2.4]),
                             q_sr=torch.tensor([3.0, 4.0, 2.0]), valid=torch.ones(n, dtype=torch.bool),
                             rationale=[f"reason {k}" for k in range(n)])
    recs = tc.annotate(groups, tmp_path, fidelity=lambda sr, gt: 0.5, mllm=fake_mllm, log=lambda s: None)
    assert calls == [3]  # one call per group, LR repeated for each SR
    by = {r.method: r for r in recs}
    assert all(r.q_lr == pytest.approx(2.2) for r in recs)  # mean of the per-pair Q_LR readings
    assert [by[m].q_sr for m in "ABC"] == pytest.approx([3.0, 4.0, 2.0])  # r = (.5, 1, 0): exact line
    assert [by[m].rationale for m in "ABC"] == ["reason 0", "reason 1", "reason 2"]
    assert all(r.F == 0.5 for r in recs)
    qc = tc.qc_report(recs, fraction=0.05, path=tmp_path / "qc.md")
    # F = 0.5, Q_LR = 2.2: Eq.4 top is B (Q_SR 4), bottom is C (Q_SR 2); rationales shown for checking
    top, bottom = qc.split("## Bottom")
    assert "reason 1" in top and "reason 2" in bottom and (tmp_path / "qc.md").read_text() == qc
    r_b = 0.5 * 2.2 + 0.5 ** (2.2 / 7) * (4.0 - 2.2)
    assert f"| {r_b:.3f} |" in top


# ----------------------------------------------------------------------------------------------------
# SRIQA-Bench accuracy and tie rules
# ----------------------------------------------------------------------------------------------------


METHODS = ["Bicubic", "SwinIR", "OSEDiff", "SeeSR"]
REG, GEN = METHODS[:2], METHODS[2:]


def make_sriqa(base: Path, n_groups: int = 3, tie_group: bool = False) -> dict:
    """Synthetic SRIQA-Bench layout. SR of method k = HR + Gaussian noise of sigma 0.03 (k + 1), and
    MOS = 90 - 20 k: MOS agrees with PSNR. With `tie_group`, group x{n} gives two methods equal MOS."""
    mos = {}
    for i in range(1, n_groups + 1 + tie_group):
        g = torch.Generator().manual_seed(i)
        hr = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 64, 64, generator=g), 3, 1, 1,
                                            count_include_pad=False)[0]
        save_image(hr, base / "images" / "Original" / f"x{i}_Original.png")
        save_image(torch.nn.functional.avg_pool2d(hr[None], 4)[0], base / "LRImages" / f"x{i}_Original.png")
        scores = {}
        for k, m in enumerate(METHODS):
            sr = (hr + 0.03 * (k + 1) * torch.randn(hr.shape, generator=g)).clamp(0, 1)
            save_image(sr, base / "images" / m / f"x{i}_{m}x4.png")
            scores[f"x{i}_{m}x4.png"] = 90.0 - 20 * k
        if tie_group and i == n_groups + 1:
            scores[f"x{i}_SwinIRx4.png"] = scores[f"x{i}_Bicubicx4.png"]
        mos[f"x{i}"] = scores
        for folder, keep in (("MOS", METHODS), ("MOS_Reg", REG), ("MOS_Gen", GEN)):
            (base / folder).mkdir(parents=True, exist_ok=True)
            (base / folder / f"x{i}.txt").write_text(
                "".join(f"{n},{s}\n" for n, s in scores.items() if any(f"_{m}x4" in n for m in keep)))
    return {n: s for group in mos.values() for n, s in group.items()}


def test_pair_labels_and_tie_rules():
    gt = np.array([80.0, 60.0, 60.0])  # pairs (0,1)=1, (0,2)=1, (1,2)=0.5
    np.testing.assert_array_equal(sriqa.pair_labels(gt), [1.0, 1.0, 0.5])
    full = sriqa.pairwise_accuracy(gt, np.array([3.0, 2.0, 2.0]))
    assert full == {"agree": 3, "pairs": 3, "gt_ties": 1, "pred_ties": 1, "missing": 0}
    # a non-tie prediction on a ground-truth tie is wrong; with gt_ties="skip" the pair leaves the count
    assert sriqa.pairwise_accuracy(gt, np.array([3.0, 2.0, 1.0]))["agree"] == 2
    assert sriqa.pairwise_accuracy(gt, np.array([3.0, 2.0, 1.0]), "skip") == {
        "agree": 2, "pairs": 2, "gt_ties": 1, "pred_ties": 0, "missing": 0}
    # a predicted tie on a non-tie pair is wrong: a constant scorer gets exactly the ground-truth ties
    assert sriqa.pairwise_accuracy(gt, np.full(3, 1.0))["agree"] == 1
    # a missing score (NaN) makes its pairs wrong and is counted
    assert sriqa.pairwise_accuracy(gt, np.array([3.0, np.nan, 1.0])) == {
        "agree": 1, "pairs": 3, "gt_ties": 1, "pred_ties": 0, "missing": 2}


def test_sriqa_accuracy_oracle_reverse_and_ties(tmp_path):
    mos = make_sriqa(tmp_path, n_groups=3)
    groups = sriqa.load_sriqa(tmp_path)
    assert [len(groups[s]) for s in ("Reg", "Gen", "All")] == [3, 3, 3]
    assert groups["All"][0].hr.name == "x1_Original.png" and groups["All"][0].lr.parent.name == "LRImages"
    oracle = lambda lr, hr, srs: np.array([mos[p.name] for p in srs])
    reverse = lambda lr, hr, srs: -oracle(lr, hr, srs)
    res = sriqa.evaluate_sriqa(groups, oracle)
    assert {s: res[s]["acc"] for s in res} == {"Reg": 100.0, "Gen": 100.0, "All": 100.0}
    assert res["All"]["pairs"] == 3 * 6 and res["Reg"]["pairs"] == 3
    assert {s: v["acc"] for s, v in sriqa.evaluate_sriqa(groups, reverse).items()} == {"Reg": 0.0, "Gen": 0.0, "All": 0.0}
    # one ground-truth tie (group 4: Bicubic = SwinIR): the oracle still agrees on every pair, the reverse
    # agrees only on that tie; with --gt-ties skip the tie leaves the count
    mos = make_sriqa(tmp_path / "ties", n_groups=3, tie_group=True)
    groups = sriqa.load_sriqa(tmp_path / "ties")
    assert sriqa.evaluate_sriqa(groups, oracle)["All"]["acc"] == 100.0
    rev = sriqa.evaluate_sriqa(groups, reverse)["All"]
    assert (rev["agree"], rev["pairs"], rev["gt_ties"]) == (1, 24, 1)
    skip = sriqa.evaluate_sriqa(groups, reverse, gt_ties="skip")["All"]
    assert (skip["agree"], skip["pairs"]) == (0, 23)
    constant = sriqa.evaluate_sriqa(groups, lambda lr, hr, srs: np.zeros(len(srs)))["All"]
    assert constant["acc"] == pytest.approx(100 / 24)


def test_eval_command_table_with_baselines(tmp_path, monkeypatch):
    mos = make_sriqa(tmp_path / "bench", n_groups=2)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty cache: DISTS has no weights
    args = sriqa.EvalArgs(sriqa_root=str(tmp_path / "bench"), out=str(tmp_path / "out"),
                       baselines=["PSNR", "SSIM", "DISTS", "SNB"], device="cpu")
    oracle = lambda lr, hr, srs: np.array([mos[p.name] for p in srs])
    rows = sriqa.run_eval(args, extra={"oracle": ("GT-Free", oracle)})
    by = {r["method"]: r for r in rows}
    assert by["PSNR"]["All"] == 100.0 and by["oracle"]["All"] == 100.0  # MOS follows the noise level
    assert by["PSNR"]["type"] == "GT-Ref"
    assert "unavailable" in by["DISTS"]["note"] and "All" not in by["DISTS"]
    md = (tmp_path / "out" / "sriqa_accuracy.md").read_text()
    assert "| GT-Ref | PSNR | 100.0 | 100.0 | 100.0 | 12 |" in md and "| DISTS | n/a | n/a | n/a |" in md
    with open(tmp_path / "out" / "sriqa_accuracy.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["PSNR", "SSIM", "DISTS", "SNB", "oracle"]
    # SNB: the weights-free score of each SR alone, a GT-free row (its accuracy = ranking by snb_quality)
    from evaluation.evaluate import snb_quality

    snb = sriqa.evaluate_sriqa(sriqa.load_sriqa(tmp_path / "bench"), lambda lr, hr, srs: snb_quality(
        torch.stack([load_image(p) for p in srs])).numpy())
    assert by["SNB"]["type"] == "GT-Free" and by["SNB"]["All"] == snb["All"]["acc"] and by["SNB"]["pairs"] == 12


def test_extra_gammas_share_one_answer_per_group(tmp_path, monkeypatch):
    """Rows at several gammas ask the model once per group; each row is Eq.4 of those answers at its gamma
    (inf: the fixed combination F Q_LR + Q_SR - Q_LR). A bad gamma names the flag before any model loads."""
    make_sriqa(tmp_path / "bench", n_groups=2)
    group = sriqa.load_sriqa(tmp_path / "bench")["All"][0]
    scorer = reward.make_scorer("tiny")
    calls = []
    real = scorer.score_group
    monkeypatch.setattr(scorer, "score_group", lambda lr, srs: calls.append(1) or real(lr, srs))
    answers: dict = {}
    r5 = sriqa.compass_score_fn(scorer, True, 5.0, answers)(group.lr, group.hr, group.srs)
    rinf = sriqa.compass_score_fn(scorer, True, math.inf, answers)(group.lr, group.hr, group.srs)
    assert len(calls) == 1
    s = next(iter(answers.values()))
    F, q_lr, q_sr = (np.asarray(x, dtype=np.float64) for x in (s.F, s.q_lr, s.q_sr))
    assert np.allclose(r5, F * q_lr + F ** (q_lr / 5) * (q_sr - q_lr), atol=1e-5)
    assert np.allclose(rinf, F * q_lr + q_sr - q_lr, atol=1e-5)
    with pytest.raises(SystemExit, match="--extra-gammas 'x'"):
        sriqa.run_eval(sriqa.EvalArgs(sriqa_root=str(tmp_path / "bench"), reward_model="no/such/model", extra_gammas=["x"]))


# ----------------------------------------------------------------------------------------------------
# SFT on the tiny preset: labels, overfitting the answer format, export, resume, torchrun + FSDP2
# ----------------------------------------------------------------------------------------------------


def test_answer_only_labels_hand_made():
    # ids: 7 = "<|im_start|>", 8 = "assistant", 9 = "\n", 5 = "<|im_end|>", 0 = pad
    ids = torch.tensor([[7, 1, 2, 5, 7, 8, 9, 3, 4, 5, 9, 0],
                        [7, 8, 9, 6, 5, 7, 8, 9, 3, 5, 9, 0]])
    mask = torch.tensor([[1] * 11 + [0], [1] * 11 + [0]])
    labels = tc.answer_only_labels(ids, mask, [7, 8, 9], end_id=5)
    x = tc.IGNORE_INDEX
    # only the tokens after the LAST "<|im_start|>assistant\n", up to and including <|im_end|>
    assert labels.tolist() == [[x, x, x, x, x, x, x, 3, 4, 5, x, x], [x, x, x, x, x, x, x, x, 3, 5, x, x]]
    with pytest.raises(ValueError, match="no '<\\|im_start\\|>assistant"):
        tc.answer_only_labels(ids[:, :4], mask[:, :4], [7, 8, 9], end_id=5)


def test_augment_pair_is_the_dihedral_group_on_both_images_by_hand():
    from PIL import Image

    a = Image.fromarray(np.arange(6, dtype=np.uint8).reshape(2, 3))  # rows [0 1 2], [3 4 5]
    b = Image.fromarray(np.arange(6, 12, dtype=np.uint8).reshape(2, 3))
    expected = {0: [[0, 1, 2], [3, 4, 5]], 1: [[2, 1, 0], [5, 4, 3]], 2: [[3, 4, 5], [0, 1, 2]],
                3: [[2, 5], [1, 4], [0, 3]], 4: [[5, 4, 3], [2, 1, 0]], 5: [[3, 0], [4, 1], [5, 2]],
                6: [[0, 3], [1, 4], [2, 5]], 7: [[5, 2], [4, 1], [3, 0]]}
    for index, rows in expected.items():
        lr, sr = reward.augment_pair(a, b, index)
        assert np.asarray(lr).tolist() == rows and (np.asarray(sr) - 6).tolist() == rows  # the same transform
    # the choice is a pure function of (seed, step, slot) and covers the group; "none" never transforms
    draws = [tc.augment_index("dihedral", 0, step, slot) for step in range(20) for slot in range(8)]
    assert draws == [tc.augment_index("dihedral", 0, step, slot) for step in range(20) for slot in range(8)]
    assert set(draws) == set(range(8)) and set(tc.augment_index("flip", 1, 3, k) for k in range(40)) == {0, 1}
    assert {tc.augment_index("none", 0, step, 0) for step in range(20)} == {0}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """4 pairs, 2 groups: group 0 synthetic (F = 0.80), group 1 real-world (no F). Same numbers for all,
    so the tiny model can overfit the answer format in ~100 steps."""
    root = tmp_path_factory.mktemp("sft")
    rows = []
    for g in range(2):
        hr = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(g))
        save_image(torch.nn.functional.avg_pool2d(hr[None], 4)[0], root / "lr" / f"{g}.png")
        for k, m in enumerate(("A", "B")):
            sr = hr if k == 0 else torch.nn.functional.avg_pool2d(hr[None], 3, 1, 1)[0]
            save_image(sr, root / "sr" / m / f"{g}.png")
            rows.append({"lr": f"lr/{g}.png", "sr": f"sr/{m}/{g}.png", "group": str(g), "method": m,
                         "F": 0.8 if g == 0 else None, "q_lr": 2.0, "q_sr": 3.5})
    return _write_jsonl(root / "train.jsonl", rows), root


def test_unknown_augmentation_or_bad_fidelity_weight_names_the_flag(sft_data, tmp_path):
    path, root = sft_data
    with pytest.raises(ValueError, match="--augment rotate: choose one of none, flip, dihedral"):
        tc.train(tc.TrainArgs(data=str(path), root=str(root), out=str(tmp_path / "x"), model="tiny", device="cpu",
                              augment="rotate"))
    with pytest.raises(ValueError, match="--fidelity-weight 0.0: must be > 0"):
        tc.train(tc.TrainArgs(data=str(path), root=str(root), out=str(tmp_path / "x"), model="tiny", device="cpu",
                              fidelity_weight=0.0))
    assert not (tmp_path / "x").exists()  # refused before any model is built or folder written


def test_sft_collate_keeps_mm_token_type_ids_and_masks_the_prompt(sft_data):
    path, root = sft_data
    recs = tc.load_records(path)
    _, processor = VL.load_compass("tiny")
    batch = tc.sft_collate(processor, [tc.sft_conversation(r, *tc.load_pil_pair(r, root)) for r in recs])
    assert {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "labels"} <= set(batch)
    assert int((batch["mm_token_type_ids"] == 1).sum()) > 0  # image tokens are marked for M-RoPE
    for row, rec in enumerate(recs):
        supervised = batch["labels"][row][batch["labels"][row] != tc.IGNORE_INDEX]
        text = processor.tokenizer.decode(supervised)
        # exactly the answer (no-F answer for the real-world records) + the end-of-turn token
        assert text == CT.format_answer(rec.F, rec.q_lr, rec.q_sr) + "<|im_end|>"


def test_weighted_answer_loss_hand_worked():
    # position t predicts labels[t + 1]: logits [0, 0] for target 0 (ce ln 2), [ln 3, 0] for target 1
    # (p = 1/4, ce ln 4); weights 1 and 3 on the two targets: (ln 2 + 3 ln 4) / 4 = 7/4 ln 2
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[tc.IGNORE_INDEX, 0, 1]])
    assert float(tc.weighted_answer_loss(logits, labels, torch.tensor([[0.0, 1.0, 3.0]]))) == pytest.approx(
        7 / 4 * math.log(2.0), rel=1e-6)
    assert float(tc.weighted_answer_loss(logits, labels, torch.tensor([[0.0, 1.0, 1.0]]))) == pytest.approx(
        1.5 * math.log(2.0), rel=1e-6)


def _first_batch(processor, path, root):
    """The batch of step 0 of a one-epoch, one-process run over all 4 records (--augment none)."""
    recs = tc.load_records(path)
    order = tc.step_indices(len(recs), 0, 1, len(recs), 0)
    return tc.sft_collate(processor, [tc.sft_conversation(recs[i], *tc.load_pil_pair(recs[i], root)) for i in order])


def test_fidelity_weight_weighs_the_fidelity_line_in_the_training_loss(sft_data, tmp_path):
    """--fidelity-weight W: the tokens of "Fidelity: 0.80\n" count W times in the loss, the rest of the answer
    once (a no-F answer has no such line); the loss the run logs for its first step is exactly that."""
    path, root = sft_data
    model, processor = VL.load_compass("tiny")
    batch = _first_batch(processor, path, root)
    weights = tc.fidelity_line_weights(batch["labels"], processor.tokenizer, 3.0)
    heavy = [processor.tokenizer.decode(labels[w == 3.0]) for labels, w in zip(batch["labels"], weights)]
    # the F line of each synthetic record (2 of the 4), nothing for a real-world one
    assert sorted(heavy) == ["", "", "Fidelity: 0.80\n", "Fidelity: 0.80\n"]
    for labels, w in zip(batch["labels"], weights):
        answer = labels != tc.IGNORE_INDEX
        assert torch.equal(w > 0, answer) and set(w[answer].tolist()) <= {1.0, 3.0}
    with torch.no_grad():
        plain = model(**batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert float(tc.weighted_answer_loss(logits, batch["labels"], (batch["labels"] != tc.IGNORE_INDEX).float())) \
        == pytest.approx(float(plain.loss), rel=1e-5)  # weights 1 = the model's own loss
    expected = float(tc.weighted_answer_loss(logits, batch["labels"], weights))
    tc.train(tc.TrainArgs(data=str(path), root=str(root), out=str(tmp_path / "w3"), model="tiny", device="cpu",
                          epochs=1, global_batch=4, per_device_batch=4, fidelity_weight=3.0))
    logged = json.loads((tmp_path / "w3" / "losses.json").read_text())["losses"]
    assert logged[0] == pytest.approx(expected, rel=1e-5) and expected != pytest.approx(float(plain.loss), rel=1e-3)


def _digit_logits(T, V, digit_id, at):
    """(1, T, V) logits, 0 everywhere except `at` {position: {digit: logit}} on the digit tokens."""
    logits = torch.zeros(1, T, V)
    for t, row in at.items():
        for d, value in row.items():
            logits[0, t, digit_id[d]] = value
    return logits


def test_readout_numbers_hand_worked():
    """Teacher-forced expected digits: value = E[a] + 0.1 E[b] + 0.01 E[c], each over the allowed digits at the
    position that PREDICTS the digit (t - 1); a leading digit at the top of its range forces x.00."""
    digit_id = list(range(2, 12))  # token 2 + d is the digit d; tokens 0 and 1 are text
    # answer tokens: "F" 0 . 8 3 "Q" 2 . 4 1 "Q" 5 . 0 0 (the digits' values do not matter: their probabilities do)
    answer = [0, 2, 1, 10, 5, 0, 4, 1, 6, 3, 0, 7, 1, 2, 2]
    labels = torch.tensor([[tc.IGNORE_INDEX] * 2 + answer])
    d = {k: t + 2 for k, t in enumerate([i for i, tok in enumerate(answer) if tok >= 2])}  # k-th digit -> position
    big = 30.0
    logits = _digit_logits(labels.shape[1], 12, digit_id, {
        d[0] - 1: {1: math.log(3.0)},  # F's leading digit over {0, 1}: p(1) = 3/4 -> 0.75
        # d[1]: all logits 0 -> uniform over 0-9 -> 4.5
        d[2] - 1: {3: big},            # -> 3
        # q_lr's leading digit over {1..5}: uniform -> 3
        d[4] - 1: {4: big}, d[5] - 1: {1: big},
        d[6] - 1: {5: big},            # q_sr's leading digit 5 in the label: "5.00" whatever the decimals say
        d[7] - 1: {9: big}, d[8] - 1: {9: big}})
    read = tc.readout_numbers(logits, labels, digit_id, [True])
    assert float(read["F"][0]) == pytest.approx(0.75 + 0.45 + 0.03, abs=1e-5)
    assert float(read["q_lr"][0]) == pytest.approx(3.0 + 0.4 + 0.01, abs=1e-5)
    assert float(read["q_sr"][0]) == pytest.approx(5.0, abs=1e-5)
    # a quality-only answer: its first 6 digits are Q_LR and Q_SR (leading digits over {1..5}), F reads 1
    no_f = tc.readout_numbers(logits, labels, digit_id, [False])
    assert float(no_f["F"][0]) == 1.0
    assert float(no_f["q_lr"][0]) == pytest.approx((3 * 1 + 2 + 3 + 4 + 5) / 7 + 0.45 + 0.03, abs=1e-5)
    assert float(no_f["q_sr"][0]) == pytest.approx(3.0 + 0.4 + 0.01, abs=1e-5)
    with pytest.raises(ValueError, match="holds 3 digits, the read-out needs 9"):
        tc.readout_numbers(logits[:, :8], labels[:, :8], digit_id, [True])


def test_readout_numbers_of_the_labels_on_the_tiny_tokenizer(sft_data):
    """Logits that put all mass on each label token read back the labels' numbers (0.80 / 2.00 / 3.50, and 2.00 /
    3.50 with F = 1 for the real-world records): the digit positions are found in the real chat template."""
    path, root = sft_data
    _, processor = VL.load_compass("tiny")
    batch = _first_batch(processor, path, root)
    labels = batch["labels"]
    V = len(processor.tokenizer)
    logits = torch.zeros(*labels.shape, V)
    for b, t in (labels[:, 1:] != tc.IGNORE_INDEX).nonzero().tolist():
        logits[b, t, labels[b, t + 1]] = 50.0
    recs = tc.load_records(path)
    order = tc.step_indices(len(recs), 0, 1, len(recs), 0)
    read = tc.readout_numbers(logits, labels, reward.digit_token_ids(processor.tokenizer, "test"), [recs[i].F is not None for i in order])
    for b, i in enumerate(order):
        assert float(read["F"][b]) == pytest.approx(recs[i].F if recs[i].F is not None else 1.0, abs=1e-4)
        assert (float(read["q_lr"][b]), float(read["q_sr"][b])) == pytest.approx((2.0, 3.5), abs=1e-4)


def test_readout_rank_loss_hand_worked():
    """Pairs (0,1), (2,3), (4,5), per field: max(0, |gap| - sign(gap) (x^_0 - x^_1)) with F x 4, over the terms
    whose labelled gap is at least min_gap; the mean over the terms kept."""
    read = {"F": torch.tensor([0.9, 0.8, 0.5, 0.5, 0.7, 0.7]), "q_lr": torch.full((6,), 2.0),
            "q_sr": torch.tensor([3.0, 2.8, 3.0, 2.9, 4.0, 1.0])}
    labels = {"F": torch.tensor([1.0, 0.9, 0.5, 0.5, 0.6, 0.8]),  # F gaps x4: +0.4, 0 (out), -0.8
              "q_sr": torch.tensor([4.0, 3.5, 2.0, 2.3, 3.0, 2.95])}  # Q_SR gaps +0.5, -0.3, +0.05 (out)
    loss, used, ordered = tc.readout_rank_loss(read, labels, min_gap=0.1)
    # F: pair 0 reads +0.4 against +0.4 -> 0, in order; pair 2 reads 0 against -0.8 -> 0.8, not in order
    # Q_SR: pair 0 reads +0.2 against +0.5 -> 0.3, in order; pair 1 reads +0.1 against -0.3 -> 0.4, not in order
    assert (float(loss), used, ordered) == (pytest.approx((0.0 + 0.8 + 0.3 + 0.4) / 4, abs=1e-6), 4, 2)
    same = {"F": torch.ones(2), "q_sr": torch.full((2,), 3.0)}
    loss, used, _ = tc.readout_rank_loss({k: v[:2] for k, v in read.items()}, same, min_gap=0.1)
    assert (float(loss), used) == (0.0, 0)
    labels = tc.rank_labels([tc.Record(lr="l", sr="s", group="g", method="m", q_lr=2.0, q_sr=3.5),
                             tc.Record(lr="l", sr="t", group="g", method="m", q_lr=2.0, q_sr=1.5, F=0.5)])
    assert labels["F"].tolist() == [1.0, 0.5] and labels["q_sr"].tolist() == [3.5, 1.5]


def test_with_partners_pairs_each_record_with_another_of_its_group():
    recs = [tc.Record(lr="l", sr=f"s{i}", group=g, method="m", q_lr=2.0, q_sr=3.0)
            for i, g in enumerate("aaabbc")]
    idx = tc.with_partners(tc.group_members(recs), [0, 3, 5, 1], seed=0, step=7)
    assert idx[0::2] == [0, 3, 5, 1]
    assert idx[1] in (1, 2) and idx[3] == 4 and idx[5] == 5 and idx[7] in (0, 2)  # c is alone: itself
    assert idx == tc.with_partners(tc.group_members(recs), [0, 3, 5, 1], seed=0, step=7)  # a pure function of (seed, step, slot)
    draws = {tuple(tc.with_partners(tc.group_members(recs), [0], seed=0, step=s)) for s in range(20)}
    assert draws == {(0, 1), (0, 2)}


@pytest.fixture(scope="module")
def rank_data(tmp_path_factory):
    """2 groups x 2 candidates whose labels differ (the HR: F 1, Q_SR 4; its blur: F 0.6, Q_SR 2)."""
    root = tmp_path_factory.mktemp("rank")
    rows = []
    for g in range(2):
        hr = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(10 + g))
        save_image(torch.nn.functional.avg_pool2d(hr[None], 4)[0], root / "lr" / f"{g}.png")
        for m, sr, F, q in (("HR", hr, 1.0, 4.0), ("blur", torch.nn.functional.avg_pool2d(hr[None], 5, 1, 2)[0], 0.6, 2.0)):
            save_image(sr, root / "sr" / m / f"{g}.png")
            rows.append({"lr": f"lr/{g}.png", "sr": f"sr/{m}/{g}.png", "group": str(g), "method": m,
                         "F": F, "q_lr": 2.0, "q_sr": q})
    return _write_jsonl(root / "train.jsonl", rows), root


def test_rank_weight_adds_the_readout_ranking_to_the_logged_loss(rank_data, tmp_path):
    """--rank-weight W: step 0's batch is 2 records of the epoch order, each followed by the other candidate of its
    LR; the logged loss is the answer cross-entropy + W x the read-out's hinge, computed here from the model."""
    path, root = rank_data
    model, processor = VL.load_compass("tiny")
    recs = tc.load_records(path)
    order = tc.with_partners(tc.group_members(recs), tc.step_indices(len(recs), 0, 2, 2, 0), 0, 0)
    assert [recs[i].group for i in order[0::2]] == [recs[i].group for i in order[1::2]]
    chunk = [recs[i] for i in order]
    batch = tc.sft_collate(processor, [tc.sft_conversation(r, *tc.load_pil_pair(r, root)) for r in chunk])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    ce = float(tc.weighted_answer_loss(logits, batch["labels"], (batch["labels"] != tc.IGNORE_INDEX).float()))
    read = tc.readout_numbers(logits, batch["labels"], reward.digit_token_ids(processor.tokenizer, "test"), [True] * 4)
    hinge, used, _ = tc.readout_rank_loss(read, tc.rank_labels(chunk), 0.1)
    assert used == 4 and float(hinge) > 0.1  # the random model does not read the labels' gaps (F 1.6, Q_SR 2)
    tc.train(tc.TrainArgs(data=str(path), root=str(root), out=str(tmp_path / "r"), model="tiny", device="cpu",
                          epochs=1, global_batch=4, per_device_batch=4, rank_weight=2.0))
    logged = json.loads((tmp_path / "r" / "losses.json").read_text())["losses"]
    assert len(logged) == 2 and logged[0] == pytest.approx(ce + 2.0 * float(hinge), rel=1e-5)
    with pytest.raises(ValueError, match="--rank-weight 1.0: .* even --per-device-batch"):
        tc.train(tc.TrainArgs(data=str(path), root=str(root), out=str(tmp_path / "x"), model="tiny", device="cpu",
                              global_batch=3, per_device_batch=3, rank_weight=1.0))
    assert not (tmp_path / "x").exists()


def test_freeze_vision_trains_the_language_model_only(sft_data, tmp_path):
    """--freeze-vision: the export's vision tower (ViT + merger) is the preset's bit for bit, the language model
    moved, and the checkpoint's AdamW state holds no vision parameter (nothing was optimized there)."""
    from safetensors.torch import load_file

    path, root = sft_data
    out = tmp_path / "frozen"
    tc.train(tc.TrainArgs(data=str(path), root=str(root), out=str(out), model="tiny", device="cpu", epochs=2,
                          global_batch=4, per_device_batch=4, lr=5e-3, freeze_vision=True, export_dtype="float32"))
    exported, preset = load_file(str(out / "model.safetensors")), VL.build_tiny_compass()[0].state_dict()
    vision = [k for k in preset if k.startswith("model.visual.")]
    language = [k for k in preset if k.startswith("model.language_model.")]
    assert vision and language and set(exported) == set(preset)
    assert all(torch.equal(exported[k], preset[k]) for k in vision)
    assert sum(not torch.equal(exported[k], preset[k]) for k in language) > len(language) // 2
    optim = load_file(str(out / "checkpoints" / "step_000002" / "optimizer.safetensors"))
    assert optim and not [k for k in optim if ".visual." in k]
    assert any(".language_model." in k for k in optim)


def _run(args, tmp_path, torchrun=False, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    from mini import serving  # a free rendezvous port: a fixed one may still be held by an earlier run

    launcher = [str(Path(PY).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
                str(serving.free_port())] if torchrun else [PY]
    proc = subprocess.run(launcher + [str(ROOT / "train_compass.py"), *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _train_args(data, out, *extra):
    path, root = data
    return ["train", "--model", "tiny", "--data", path, "--root", root, "--out", out, "--global-batch", 4,
            "--lr", 5e-3, "--device", "cpu", *extra]


@pytest.mark.slow
def test_sft_tiny_learns_the_answer_format_and_exports(sft_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    import reward
    out = tmp_path / "compass"
    _run(_train_args(sft_data, out, "--epochs", 100, "--per-device-batch", 4), tmp_path)
    losses = json.loads((out / "losses.json").read_text())["losses"]
    assert len(losses) == 100 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.05 * losses[0], losses[::10]  # e.g. 5.6 -> 0.013
    # a plain Hugging Face folder: from_pretrained gives exactly the last checkpoint's weights
    model = Qwen3VLForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    last = load_file(str(out / "checkpoints" / "step_000100" / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[k], last[k]) for k in last)
    # the in-process scorer on the reloaded model: free generation follows THE format and parses back
    # to the labels, with the prompt of each record's type (synthetic -> with F, real-world -> without)
    model, processor = VL.load_compass(str(out))
    path, root = sft_data
    for rec in tc.load_records(path):
        lr, sr = tc.load_pil_pair(rec, root)
        synthetic = rec.F is not None
        scores = reward.LocalScorer(model, processor, synthetic=synthetic, mode="text",
                                    max_new_tokens=64).score([lr], [sr])
        assert bool(scores.valid[0]), scores.text
        assert scores.text[0].startswith(CT.format_answer(rec.F, rec.q_lr, rec.q_sr)), scores.text
        assert (float(scores.q_lr[0]), float(scores.q_sr[0])) == pytest.approx((2.0, 3.5))
        if synthetic:
            assert float(scores.F[0]) == pytest.approx(0.8)
        expected = reward.LocalScorer(model, processor, synthetic=synthetic).score([lr], [sr])  # digit read-out
        assert float(expected.q_sr[0]) == pytest.approx(3.5, abs=0.1)
    # eval with the trained model in-process: a COMPASS row (Eq.4 from the digit read-out) beside PSNR
    make_sriqa(tmp_path / "bench", n_groups=2)
    rows = sriqa.run_eval(sriqa.EvalArgs(sriqa_root=str(tmp_path / "bench"), out=str(tmp_path / "eval"),
                                         reward_model=str(out), baselines=["PSNR"], device="cpu"))
    compass = next(r for r in rows if r["method"] == "COMPASS")
    assert compass["pairs"] == 12 and 0.0 <= compass["All"] <= 100.0 and "without a score" not in compass["note"]
    assert "| GT-Free | COMPASS |" in (tmp_path / "eval" / "sriqa_accuracy.md").read_text()
    # TensorBoard scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(acc.Tags()["scalars"])
    assert len(acc.Scalars("train/loss")) == 100


# 3 optimizer steps of 4 samples as 4 micro-batches of 1: the reference for resume and for FSDP2 (with a
# flip/rotation per sample: the same for every rank layout and after a resume)
SHORT = ["--epochs", 3, "--per-device-batch", 1, "--augment", "dihedral"]


@pytest.fixture(scope="module")
def straight_run(sft_data, tmp_path_factory):
    """An uninterrupted one-process run (model + losses), shared by the resume and the FSDP2 tests."""
    from safetensors.torch import load_file
    out = tmp_path_factory.mktemp("straight")
    _run(_train_args(sft_data, out / "run", *SHORT), out)
    return load_file(str(out / "run" / "model.safetensors")), json.loads((out / "run" / "losses.json").read_text())["losses"]


def _compare(run_dir, straight, atol):
    from safetensors.torch import load_file
    a, la = straight
    b = load_file(str(run_dir / "model.safetensors"))
    lb = json.loads((run_dir / "losses.json").read_text())["losses"]
    assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) < atol
    assert len(lb) == 3 and np.allclose(la, lb, rtol=1e-4) and la[-1] < la[0]


@pytest.mark.slow
def test_sft_resume_after_interruption_is_exact(sft_data, straight_run, tmp_path):
    out = tmp_path / "resumed"
    # "interrupted" after 2 of 3 steps (checkpoints at every step, the newest 2 kept), then resumed
    _run(_train_args(sft_data, out, *SHORT, "--save-every", 1, "--max-steps", 2), tmp_path)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert not (out / "model.safetensors").exists()  # the export happens only at the end
    proc = _run(_train_args(sft_data, out, *SHORT, "--resume", "latest"), tmp_path)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    _compare(out, straight_run, atol=1e-6)


@pytest.mark.slow
def test_torchrun_fsdp2_two_processes_match_one_process(sft_data, straight_run, tmp_path):
    # 2 ranks x 1 per device x 2 accumulation = the reference's 1 process x 1 per device x 4 accumulation;
    # sharded with FSDP2, interrupted after 2 steps and resumed (rank 0 reads, broadcast to the shards)
    out = tmp_path / "fsdp"
    _run(_train_args(sft_data, out, *SHORT, "--max-steps", 2, "--gradient-checkpointing"), tmp_path, torchrun=True)
    proc = _run(_train_args(sft_data, out, *SHORT, "--resume", "latest", "--gradient-checkpointing"), tmp_path,
                torchrun=True)
    assert "2 process(es)" in proc.stdout and "resumed from" in proc.stdout
    _compare(out, straight_run, atol=1e-5)  # the export was gathered from the shards on rank 0


@pytest.mark.slow
def test_fsdp2_rank0_loading_equals_the_full_model_bit_for_bit(sft_data, tmp_path):
    """Ranks other than 0 build the model on the meta device and receive their shards from rank 0; with
    lr 0 (AdamW, no weight decay) the gathered export must equal the preset's weights exactly. The vision
    tower is frozen (--freeze-vision): sharded blocks without gradients go through the same steps and export."""
    from safetensors.torch import load_file


    out = tmp_path / "lr0"
    _run(_train_args(sft_data, out, "--epochs", 1, "--per-device-batch", 1, "--lr", 0, "--export-dtype", "float32",
                     "--freeze-vision"), tmp_path, torchrun=True)
    exported = load_file(str(out / "model.safetensors"))
    preset = VL.build_tiny_compass()[0].state_dict()
    assert set(exported) == set(preset)
    assert all(torch.equal(exported[k], preset[k]) for k in preset)


def test_annotate_names_a_bad_folder_or_option_in_one_line(tmp_path, capsys):
    from common import training as T

    (tmp_path / "lr").mkdir()
    (tmp_path / "sr" / "A").mkdir(parents=True)
    argv = ["annotate", "--lr-dir", str(tmp_path / "lr"), "--sr-dir", str(tmp_path / "sr"), "--anchor", "snb",
            "--out", str(tmp_path / "a.jsonl")]
    with pytest.raises(T.RunError, match=f"annotate: no images in {tmp_path / 'lr'}"):
        tc.main(argv)
    with pytest.raises(SystemExit):
        tc.main([*argv, "--against-order", "isotonic"])
    assert "--against-order isotonic: choose flat or sorted" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()
