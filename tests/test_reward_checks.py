"""mini/reward_checks.py: the unambiguous pairs it builds and how it counts right, wrong and invalid."""

import json

import pytest
import torch

from common import backbone as B
from mini import reward_checks as RC


def test_the_damaged_image_of_every_pair_is_damaged_as_named():
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 16, 16, generator=g)
    lr = torch.rand(2, 3, 4, 4, generator=g)
    sft = torch.full((2, 3, 16, 16), 0.5)
    pairs = RC.make_pairs(hr, lr, sft, seed=1)
    assert tuple(pairs) == RC.KINDS
    assert all(better.shape == worse.shape == (2, 3, 16, 16) for better, worse in pairs.values())
    # hand-worked: the pattern brightens every 4th row and column of a flat 0.5 by 0.1, nothing else
    grid = pairs["sft>pattern"][1]
    assert float(grid[0, 0, 0, 1]) == pytest.approx(0.6) and float(grid[0, 0, 4, 4]) == pytest.approx(0.6)
    assert float(grid[0, 0, 1, 1]) == pytest.approx(0.5) and float(grid[0, 0, 5, 6]) == pytest.approx(0.5)
    assert torch.allclose(pairs["sft>blur"][1], sft, atol=1e-6)  # blur keeps a flat image flat ...
    assert RC.blur(hr).std() < hr.std() / 2  # ... and smooths a noisy one
    # nearest: 4x4 blocks of the LR's pixels; bicubic: the model's condition image
    assert torch.equal(pairs["hr>nearest"][1][:, :, 4:8, 8:12], lr[:, :, 1:2, 2:3].expand(2, 3, 4, 4))
    assert torch.equal(pairs["bicubic>nearest"][0], B.upscale(lr))
    assert float((pairs["hr>noise"][1] - hr).std()) == pytest.approx(0.1, abs=0.02)
    assert set(RC.make_pairs(hr, lr, None, seed=1)) == set(RC.KINDS[:5])


def test_invalid_readings_are_counted_and_excluded_never_wrong_or_right():
    assert RC.accuracy([True, False, None, True]) == {"right": 2, "counted": 3, "invalid": 1,
                                                      "accuracy": pytest.approx(2 / 3)}


def test_a_gt_free_baseline_judges_by_its_score_and_a_tie_is_wrong():
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32).clone()
    noisy = RC.noise(ramp, g, 0.1)
    snb = RC.baseline_judge("snb")
    assert snb(None, torch.cat([ramp, noisy]), torch.cat([noisy, ramp])) == [True, False]  # noise lowers SNB
    assert snb(None, ramp, ramp) == [False]  # the metric cannot tell them apart: not right
    piqe = RC.baseline_judge("piqe")  # lower is better: the sign is flipped, a tie is still wrong
    assert piqe(None, ramp, ramp) == [False]
    with pytest.raises(ValueError, match="no-reference"):
        RC.baseline_judge("psnr")


def test_compass_rows_read_eq4_and_each_part_of_the_same_readings():
    import reward

    class Readings:  # fixed readings per call, in the scorer's interface: (better, worse) of one pair each
        def __init__(self, rows):
            self.rows = iter(rows)

        def score_group(self, lr, srs):
            F, q_sr, valid = next(self.rows)
            t = torch.tensor
            return reward.Scores(F=t(F), q_lr=t([2.0, 2.0]), q_sr=t(q_sr), valid=t(valid), rationale=["", ""])

    # hand-worked Eq.4 with Q_LR = 2, gamma = 7: R = 2F + F^(2/7) (Q_SR - 2)
    #   pair 1: F .9 / .5, Q 2.5 / 3.5 -> R 2.285 / 2.231: R right, F right, Q_SR wrong
    #   pair 2: F .6 / .7, Q 4.0 / 2.0 -> R 2.928 / 1.400: R right, F wrong, Q_SR right
    #   pair 3: one reading invalid -> None in every row
    rows = [([0.9, 0.5], [2.5, 3.5], [True, True]), ([0.6, 0.7], [4.0, 2.0], [True, True]),
            ([0.9, 0.1], [4.0, 1.0], [True, False])]
    x = torch.zeros(3, 3, 8, 8)
    right = RC.compass_right(Readings(rows), torch.zeros(3, 3, 2, 2), x, x)
    assert right == {"R": [True, True, None], "F": [True, False, None], "Q_SR": [False, True, None]}


def test_the_check_runs_both_judges_and_writes_its_table(tmp_path):
    results = RC.main(["--compass", "tiny", "--refreward", "tiny", "--crops", "2", "--views", "1", "--no-sft",
                       "--threads", "1", "--baselines", "snb", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "results.json").read_text())
    saved = record["results"]
    assert record["refreward_stats"]["pairs"] == 10 and record["refreward_stats"]["answers"] == 20  # both orders
    assert saved == json.loads(json.dumps(results))
    assert list(saved) == ["COMPASS", "COMPASS F", "COMPASS Q_SR", "RefReward-SR", "SNB (GT-free)"]
    for judge in saved:
        rows = saved[judge]
        assert set(rows) == {*RC.KINDS[:5], "all"}
        assert all(r["counted"] + r["invalid"] == 2 for k, r in rows.items() if k != "all")
        assert rows["all"]["right"] == sum(r["right"] for k, r in rows.items() if k != "all")
    assert saved["RefReward-SR"]["all"]["invalid"] == 0  # a pairwise verdict is right or wrong
    # the F and Q_SR rows read the same readings as the Eq.4 row: the same pairs are invalid
    assert all(saved[f"COMPASS {p}"][k]["invalid"] == saved["COMPASS"][k]["invalid"] for p in ("F", "Q_SR") for k in saved["COMPASS"])
    table = (tmp_path / "table.md").read_text().splitlines()
    assert [row.split(" |")[0] for row in table[2:]] == [f"| {judge}" for judge in saved]
