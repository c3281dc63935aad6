"""RefReward-SR: data, verdict parsing, the GRPO pieces against hand-worked numbers, a planted rule learned by
GRPO, the scorer in the RL loop, exact resume, bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import reward

from baselines import flow_grpo
from common import training as T
from common.data import save_image
from refreward_sr import refreward as RR
from refreward_sr import train_refreward

# one pytest-xdist worker runs this file: its module fixtures (the GRPO-trained model) are built once
pytestmark = pytest.mark.xdist_group("test_refreward")


def test_this_file_stays_on_one_worker(request):
    """Under `make test` (pytest-xdist, --dist loadgroup) the group is in each test's node id, by which the
    scheduler keeps the file, and its GRPO-trained fixture, on one worker. pytest 9.2 ignores that suffix, and
    the fixture was built twice (2 min): requirements.txt pins a pytest / pytest-xdist pair that keeps it."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not run by pytest-xdist with --dist loadgroup")
    assert request.node.nodeid.endswith("@test_refreward"), request.node.nodeid


# ---------------------------------------------------------------------------------------------------
# verdicts and rewards
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("<think>A keeps the roof lines.</think><answer>A</answer>", "A"),
    ("<think></think><answer> b </answer><|im_end|>", "B"),
    ("<think>x</think>\n<answer>\nA\n</answer>", "A"),
    ("<answer>A</answer>", None),                                     # no reasoning block
    ("<think>x</think><answer>A</answer><answer>B</answer>", "A"),    # the answer ends at its first </answer>
    ("<think>x</think><answer>A</answer>A</answer>B", "A"),
    ("<think>x</think><answer>A<answer>B</answer>", None),            # two answers
    ("<think>x</think><answer>A and B</answer>", None),               # both
    ("<think>x</think><answer>A/B</answer>", None),
    ("<think>x</think><answer></answer>", None),                      # none
    ("<think>x</think>A", None),
    ("", None),
])
def test_parse_verdict(text, expected):
    assert RR.parse_verdict(text) == expected


def test_format_and_rule_reward():
    text = RR.format_verdict("B", "sharper  edges\nand clean")
    assert text == "<think>sharper edges and clean</think><answer>B</answer>" and RR.parse_verdict(text) == "B"
    assert RR.rule_reward(text, "B") == pytest.approx(1.2) and RR.rule_reward(text, "A") == pytest.approx(0.2)
    assert RR.rule_reward("B", "B") == 0.0  # malformed: no credit even for the right letter
    with pytest.raises(ValueError):
        RR.format_verdict("C")


def test_both_orders():
    assert RR.both_orders("A", "B") == "x" and RR.both_orders("B", "A") == "y"
    assert RR.both_orders("A", "A") is None and RR.both_orders(None, "B") is None  # position bias, invalid


def test_grpo_pieces_hand_worked():
    # advantages of two groups of 3 (group std): [1, 0, 0] -> (r - 1/3) / (0.4714 + 1e-4)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.2, 1.2, 1.2])
    adv = flow_grpo.group_advantages(rewards, [0, 0, 0, 1, 1, 1], std_mode="group")
    std = math.sqrt(2 / 9)
    assert torch.allclose(adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0]) / (std + 1e-4), atol=1e-5)
    # k3: exp(d) - d - 1 with d = ref - cur
    cur, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -1.0])
    assert torch.allclose(RR.kl_k3(cur, ref), torch.tensor([0.0, math.e - 2]), atol=1e-6)
    # token log-probs and the masked mean
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    assert torch.allclose(RR.token_log_probs(logits, torch.tensor([[0, 1]])), torch.log(torch.tensor([[0.5, 0.8]])))
    assert float(RR.masked_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]))) == 2.0
    # answers that ended at the end-of-turn (9) or at a stop string (then padded with 0)
    mask = train_refreward.completion_mask(torch.tensor([[5, 7, 9, 9], [9, 5, 5, 5], [5, 7, 0, 0]]), eos_id=9, pad_id=0)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------


def _images(root: Path, n: int = 6):
    """n groups: an LR and a bright and a dark 16x16 candidate (the planted rule: brighter wins)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        base = torch.rand(3, 16, 16, generator=g) * 0.4 + 0.3
        save_image(base[:, ::4, ::4], root / "lr" / f"{i}.png")
        save_image((base + 0.25).clamp(0, 1), root / "sr" / "bright" / f"{i}.png")
        save_image((base - 0.25).clamp(0, 1), root / "sr" / "dark" / f"{i}.png")
        first_bright = i % 2 == 0
        a, b = ("bright", "dark") if first_bright else ("dark", "bright")
        rows.append({"lr": f"lr/{i}.png", "sr_a": f"sr/{a}/{i}.png", "sr_b": f"sr/{b}/{i}.png",
                     "preferred": "a" if first_bright else "b", "group": str(i)})
    return rows


def _write(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_file_errors_name_file_line_and_missing_images(tmp_path):
    rows = _images(tmp_path, 2)
    bad = [rows[0], {**rows[1], "preferred": "c"}, {"lr": "lr/0.png"}]
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: preferred='c'.*\n.*pairs.jsonl:3: missing field"):
        RR.load_pairs(_write(tmp_path / "pairs.jsonl", bad))
    missing = [{**rows[0], "sr_b": "sr/none/0.png"}, {**rows[1], "lr": "lr/gone.png"}]
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\).*\n.*lr/gone.png\n.*sr/none/0.png"):
        RR.load_pairs(_write(tmp_path / "pairs.jsonl", missing))
    assert len(RR.load_pairs(_write(tmp_path / "pairs.jsonl", rows))) == 2


def test_pairs_from_compass_orders_by_labels_and_randomises_positions():
    from train_compass import Record

    recs = [Record("lr/0.png", f"sr/{m}/0.png", "0", m, q_lr=2.0, q_sr=q, F=f)
            for m, q, f in (("good", 4.0, 0.9), ("bad", 2.0, 0.5), ("same", 4.0, 0.9))]
    pairs = RR.pairs_from_compass(recs * 1, margin=0.1, seed=0)
    assert len(pairs) == 2  # "good" and "same" have equal labels: no pair
    for p in pairs:
        better = p.sr_a if p.preferred == "a" else p.sr_b
        assert "bad" not in better and "faithful" in p.reason
    positions = {p.preferred for seed in range(8) for p in RR.pairs_from_compass(recs, seed=seed)}
    assert positions == {"a", "b"}


def test_pair_scores_round_trip_and_bad_scores_name_file_line(tmp_path):
    rows = _images(tmp_path, 2)
    scored = [{**rows[0], "score_a": 0.0, "score_b": 3.25}, rows[1]]
    pairs = RR.load_pairs(_write(tmp_path / "pairs.jsonl", scored))
    assert (pairs[0].score_a, pairs[0].score_b, pairs[1].score_a) == (0.0, 3.25, None)
    again = RR.load_pairs(RR.write_pairs(pairs, tmp_path / "again.jsonl"))  # a 0.0 score is kept, not dropped
    assert [(p.score_a, p.score_b) for p in again] == [(0.0, 3.25), (None, None)]
    for bad in ({**rows[0], "score_a": 1.0}, {**rows[0], "score_a": "high", "score_b": 1.0}):
        with pytest.raises(ValueError, match=r"pairs.jsonl:1: score_a=.*both numbers or neither"):
            RR.load_pairs(_write(tmp_path / "pairs.jsonl", [bad]))


def test_pairs_from_compass_carry_the_label_rewards_and_the_readings_think():
    from train_compass import Record

    recs = [Record("lr/0.png", f"sr/{m}/0.png", "0", m, q_lr=2.0, q_sr=q, F=f)
            for m, q, f in (("good", 4.0, 0.9), ("bad", 2.0, 0.5))]
    (pair,) = RR.pairs_from_compass(recs, seed=0)
    by_path = {r.sr: reward.label_reward(r.F, r.q_lr, r.q_sr) for r in recs}
    assert (pair.score_a, pair.score_b) == pytest.approx((by_path[pair.sr_a], by_path[pair.sr_b]), abs=1e-4)
    # good: 0.9 * 2 + 0.9 ** (2 / 7) * 2 = 3.741; bad: 0.5 * 2 + 0 = 1.0
    assert sorted(by_path.values()) == pytest.approx([1.0, 1.8 + 2 * 0.9 ** (2 / 7)])
    think = train_refreward.warmup_think(pair, False, "readings")
    assert think == f"A {pair.score_a:.1f} B {pair.score_b:.1f}"
    assert train_refreward.warmup_think(pair, True, "readings") == f"A {pair.score_b:.1f} B {pair.score_a:.1f}"
    assert train_refreward.warmup_think(pair, True, "labelled") == ""


def test_readings_warmup_learns_its_answer_and_finds_the_verdict_after_the_think(planted, tmp_path):
    """--warmup-verdicts readings: the answer `<think>A 3.1 B 1.2</think><answer>X</answer>`; the verdict's NLL is
    read at its own position (after the think), and a pairs file without scores is refused before any work."""
    train, _, root = planted
    with pytest.raises(ValueError, match="--warmup-verdicts readings: .*train.jsonl has pairs without score_a"):
        _train(train, tmp_path / "none", "--warmup-steps", 2, "--warmup-verdicts", "readings", "--steps", 0)
    assert not (tmp_path / "none").exists()
    rows = [{**json.loads(x), "score_a": 1.0 + (i % 3), "score_b": 4.0 - (i % 3)}
            for i, x in enumerate(train.read_text().splitlines())]  # readings of different values
    scored = _write(root / "scored.jsonl", rows)
    _, processor = RR.load_refreward("tiny")
    tok = processor.tokenizer
    for think in ("A 1.0 B 4.0", "A 3.0 B 2.0"):
        at = train_refreward.verdict_position(tok, think)
        assert tok.decode(tok.encode(RR.format_verdict("A", think), add_special_tokens=False)[at]).strip() == "A"
    _train(scored, tmp_path / "r", "--warmup-steps", 40, "--warmup-verdicts", "readings", "--steps", 0,
           "--save-every", 1000, "--beta", 0)
    log = [json.loads(x) for x in (tmp_path / "r" / "rewards.jsonl").read_text().splitlines()]
    loss = [e["warmup_loss"] for e in log]
    assert len(loss) == 40 and np.mean(loss[-5:]) < 0.2 * loss[0], loss[::5]


def test_freeze_vision_keeps_the_tower_as_loaded(planted, tmp_path):
    """--freeze-vision: the warm-up changes the language model, not one weight of the vision tower."""
    train, _, _ = planted
    _train(train, tmp_path / "f", "--warmup-steps", 3, "--steps", 0, "--freeze-vision", "--beta", 0)
    before = RR.load_refreward("tiny")[0].state_dict()
    after = RR.load_refreward(str(tmp_path / "f"))[0].state_dict()
    tower = [k for k in before if k.startswith("model.visual.")]
    assert tower and all(torch.equal(after[k], before[k]) for k in tower)
    assert any(not torch.equal(after[k], before[k]) for k in before if k not in tower)


# ---------------------------------------------------------------------------------------------------
# GRPO training on a planted rule, the scorer, resume
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    rows = _images(root, 16)
    return _write(root / "train.jsonl", rows[:10]), _write(root / "heldout.jsonl", rows[10:]), root


def _train(data, out, *extra):
    train_refreward.main(["train", "--model", "tiny", "--data", str(data), "--out", str(out), "--prompts", "8",
                          "--group", "8", "--max-new-tokens", "16", "--warmup-lr", "1e-2", "--lr", "3e-3",
                          "--device", "cpu", *map(str, extra)])


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("rr") / "model"
    # One CPU thread, so the test is reproducible on one CPU type (the float summation order decides how well
    # a tiny random model learns). Measured with these seeds and answers ending at their first </answer>:
    # at 1 / 2 threads the warm-up ends at losses 0.24 / 0.05 (from 6.1), 39 % / 100 % of the first GRPO
    # samples are well formed, the sampled accuracy goes 0.31 -> 0.93 / 0.50 -> 0.99 (first / last 10 GRPO
    # steps) and the greedy scorer gets all 6 held-out pairs right in both orders. Before the stop at
    # </answer> (answers ran on past it, "<answer>A</answer>A</answer>") the same setting failed on one of
    # two CPU types; warm-ups strong enough to start GRPO well formed (3e-3 x 60, 1e-2 x 100) then learned no
    # rule in 100 steps (sampled accuracy ~0.48), so the test asks that the warm-up taught the format (its
    # loss fell tenfold) and that GRPO ends well formed, not that GRPO starts so.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(planted[0], out, "--warmup-steps", 60, "--steps", 100, "--save-every", 1000)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_grpo_learns_the_planted_rule_and_the_scorer_ranks_with_it(planted, trained):
    train, heldout, root = planted
    out = trained
    log = [json.loads(x) for x in (out / "rewards.jsonl").read_text().splitlines()]
    grpo = [e for e in log if "accuracy" in e]
    assert len(grpo) == 100 and all(e["ratio_max_deviation"] == 0.0 for e in grpo)
    warmup = [e["warmup_loss"] for e in log if "warmup_loss" in e]
    assert len(warmup) == 60 and np.mean(warmup[-10:]) < 0.1 * warmup[0]  # the warm-up taught the format
    # and GRPO's answers end well formed: the median of the last 10 steps, since one step can collapse alone
    # (on one CPU type, step 99 sampled 2% well-formed answers between steps of 98% and 100%; mean 0.894)
    assert np.median([e["format_rate"] for e in grpo[-10:]]) > 0.9
    first, last = np.mean([e["accuracy"] for e in grpo[:10]]), np.mean([e["accuracy"] for e in grpo[-10:]])
    assert first < 0.6 and last > 0.8, (first, last)  # GRPO learned the preference (sampled answers, T = 1)
    model, processor = RR.load_refreward(str(out))
    scorer = RR.RefRewardScorer(model, processor)
    result = train_refreward.evaluate_pairs(scorer, RR.load_pairs(heldout, root), root)
    assert result["accuracy_all"] >= 5 / 6, result  # 6 held-out pairs, greedy, both orders
    # in the RL reward interface: the brighter of two samples gets the higher reward
    from common.data import load_image, to_pil

    lr = to_pil(load_image(root / "lr" / "12.png"))
    srs = [to_pil(load_image(root / "sr" / m / "12.png")) for m in ("dark", "bright")]
    scores = scorer.score_group(lr, srs)
    assert scores.q_sr.tolist() == [0.0, 1.0] and bool(scores.valid.all())
    assert torch.equal(scores.reward(), scores.q_sr)  # F = Q_LR = 1: Eq.4 returns the pairwise reward


@pytest.mark.slow
def test_labelled_warmup_teaches_the_verdict(planted, tmp_path):
    """--warmup-verdicts labelled (a supervised judge, no GRPO) ranks the held-out pairs by the planted rule in
    both orders, which a judge that answers by position cannot. Measured (1 thread): the loss per answer token
    sits near ln 2 / 13 = 0.05 (the format learned, the verdict a coin) until about step 80, then falls to 0.003;
    after 100 steps at 5e-3, or 60 at 1e-2 (the `trained` fixture's format warm-up), every verdict still followed
    the position."""
    train, heldout, root = planted
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible on one CPU type (see `trained`)
    try:
        _train(train, tmp_path / "judge", "--warmup-steps", 150, "--warmup-lr", "3e-3", "--warmup-verdicts",
               "labelled", "--steps", 0, "--save-every", 1000, "--beta", 0)
    finally:
        torch.set_num_threads(threads)
    model, processor = RR.load_refreward(str(tmp_path / "judge"))
    result = train_refreward.evaluate_pairs(RR.RefRewardScorer(model, processor), RR.load_pairs(heldout, root), root)
    assert result["accuracy_all"] >= 5 / 6, result
    # the log shows it: the verdict token's own teacher-forced accuracy goes from a coin to right
    log = [json.loads(x) for x in (tmp_path / "judge" / "rewards.jsonl").read_text().splitlines()]
    acc = [e["warmup_verdict_acc"] for e in log]
    assert len(acc) == 150 and np.mean(acc[:40]) < 0.75 and np.mean(acc[-20:]) > 0.9, (acc[:40], acc[-20:])
    with pytest.raises(SystemExit):
        train_refreward.main(["train", "--data", str(train), "--warmup-verdicts", "majority"])


@pytest.mark.slow
def test_resume_is_exact(planted, tmp_path):
    train, _, _ = planted
    common = ["--warmup-steps", 2, "--save-every", 2]
    _train(train, tmp_path / "a", *common, "--steps", 2)
    _train(train, tmp_path / "b", *common, "--steps", 0)
    _train(train, tmp_path / "b", *common, "--steps", 2, "--resume", "latest")
    wa, _, _ = T.load_checkpoint(tmp_path / "a" / "checkpoints" / "step_000004")
    wb, _, _ = T.load_checkpoint(tmp_path / "b" / "checkpoints" / "step_000004")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(x) for x in (tmp_path / "a" / "rewards.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / "rewards.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lb] == [1, 2, 3, 4] and la == lb


def test_invalid_answers_are_counted_never_a_tie():
    class Fixed(RR.RefRewardScorer):
        def __init__(self, texts):
            super().__init__(model=None, processor=None)
            self.texts = texts

        def answers(self, lrs, xs, ys):
            return self.texts[: len(xs)]

    from PIL import Image

    img = Image.new("RGB", (4, 4))
    # pairs (0,1), (0,2), (1,2) asked as (A,B) then swapped; pair (0,2) is position-inconsistent, (1,2) invalid
    texts = ["<think></think><answer>A</answer>", "<think></think><answer>A</answer>", "garbage",
             "<think></think><answer>B</answer>", "<think></think><answer>A</answer>", "<think></think><answer>B</answer>"]
    scores = Fixed(texts).score_group(img, [img, img, img])
    assert scores.q_sr[:2].tolist() == [1.0, 0.0] and math.isnan(scores.q_sr[2])  # only (0,1) counted
    assert scores.valid.tolist() == [True, True, False]  # sample 2 has no reward, not 0.5
    scorer = Fixed(texts)
    scorer.group_rewards(img, [img, img, img])
    assert scorer.stats["invalid"] == 1 and scorer.stats["position_inconsistent"] == 1


@pytest.mark.slow
def test_refreward_is_the_reward_of_the_rl_loop(planted, trained, tmp_path):
    """rl_nr.py --reward refreward --refreward-mode anchor with the planted model ("the brighter one wins"):
    the tiny policy's samples are brighter than the bicubic upscale of a dark LR, so they all win (reward 1),
    every verdict valid and consistent in both orders."""
    import rl_nr

    lq = tmp_path / "lq"
    save_image(torch.full((3, 8, 8), 0.05), lq / "0_dark.png")  # 8x8 LR -> 32x32 SR: the planted model's size
    rl_nr.main(["--model", "tiny", "--lr-dir", str(lq), "--crop-size", "32", "--group-size", "4", "--rollout-batch", "4",
                "--rollout-steps", "3", "--sample-every", "0", "--steps", "2", "--lr", "1e-2", "--reward", "refreward",
                "--refreward-model", str(trained), "--refreward-mode", "anchor", "--out", str(tmp_path / "nr.safetensors")])
    log = [json.loads(x) for x in (tmp_path / "nr" / "rewards.jsonl").read_text().splitlines()]
    rewards = {name: value for e in log for name, value in e["group_rewards"].items()}
    assert [e["invalid"] for e in log] == [0.0, 0.0] and rewards == {"0_dark": 1.0}
