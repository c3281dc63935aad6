"""Tests for reward.py: Eq.4 and Table 8 forms, answer format, digit read-out, tiny model door, scorers.

Run: python -m pytest tests/test_reward.py  (about a minute; the `slow` tests train a tiny COMPASS to
the answer format and serve it with a real `transformers serve` process).
"""

import base64
import io
import math
import time
from collections import Counter
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

import reward as R
from common import compass_text as CT
from common import vl_model as VL
from mini import serving
from scale import bench

# ----------------------------------------------------------------------------------------------------
# Eq.4 and Table 8, hand-worked
# ----------------------------------------------------------------------------------------------------
# F = 0.8, Q_LR = 2.1, Q_SR = 3.5, gamma = 7:
#   exponent Q_LR / gamma = 0.3;  0.8 ** 0.3 = exp(0.3 * ln 0.8) = exp(-0.0669431) = 0.9352481
#   F * Q_LR = 1.68;  dQ = 1.4;  gated gain = 0.9352481 * 1.4 = 1.3093473
#   R (Eq.4) = 1.68 + 1.3093473 = 2.9893473
HAND = dict(F=0.8, q_lr=2.1, q_sr=3.5)


def test_eq4_and_ablations_hand_values():
    assert R.compass_reward(**HAND) == pytest.approx(2.9893473, abs=1e-6)
    assert R.reward_gated_gain(**HAND) == pytest.approx(1.3093473, abs=1e-6)
    assert R.reward_gain_only(**HAND) == pytest.approx(1.4, abs=1e-9)
    # same numbers through tensors, broadcasting a scalar gamma
    F, q_lr, q_sr = torch.tensor([0.8, 0.8]), torch.tensor([2.1, 2.1]), torch.tensor([3.5, 3.5])
    torch.testing.assert_close(R.compass_reward(F, q_lr, q_sr), torch.full((2,), 2.9893473), atol=1e-5, rtol=0)
    # gamma changes the exponent: gamma = 3 -> 0.8 ** 0.7 = exp(-0.1562005) = 0.8553877 -> R = 1.68 + 1.1975428
    assert R.compass_reward(**HAND, gamma=3.0) == pytest.approx(2.8775428, abs=1e-6)


def test_eq4_limits():
    # F = 1: R = Q_LR + (Q_SR - Q_LR) = Q_SR, whatever Q_LR
    for q_lr, q_sr in [(1.0, 4.2), (4.5, 2.0), (3.3, 3.3)]:
        assert R.compass_reward(1.0, q_lr, q_sr) == pytest.approx(q_sr)
        assert R.reward_gated_gain(1.0, q_lr, q_sr) == pytest.approx(q_sr - q_lr)
    # F = 0: 0 * Q_LR + 0 ** (Q_LR / gamma) * dQ = 0 (Q_LR >= 1 > 0), the gain is fully gated
    assert R.compass_reward(0.0, 2.0, 4.5) == 0.0
    assert R.reward_gated_gain(0.0, 2.0, 4.5) == 0.0
    assert R.reward_gain_only(0.0, 2.0, 4.5) == 2.5  # Formulation 1 ignores fidelity
    torch.testing.assert_close(R.compass_reward(torch.zeros(3), torch.tensor([1.0, 3.0, 5.0]), torch.full((3,), 4.0)), torch.zeros(3))


def test_gating_high_input_quality_is_stricter():
    # Same gain dQ = 0.5, fidelity drops 1.0 -> 0.8. Hand-worked:
    #   Q_LR = 4.0: 0.8 ** (4/7) = exp(-0.1275106) = 0.8802841 -> gated gain 0.4401420 (drop 0.0598580);
    #               R (Eq.4) 4.5 -> 3.2 + 0.4401420 = 3.6401420
    #   Q_LR = 1.5: 0.8 ** (1.5/7) = exp(-0.0478165) = 0.9533087 -> gated gain 0.4766544 (drop 0.0233456);
    #               R (Eq.4) 2.0 -> 1.2 + 0.4766544 = 1.6766544
    hi = R.reward_gated_gain(1.0, 4.0, 4.5) - R.reward_gated_gain(0.8, 4.0, 4.5)
    lo = R.reward_gated_gain(1.0, 1.5, 2.0) - R.reward_gated_gain(0.8, 1.5, 2.0)
    assert hi == pytest.approx(0.0598580, abs=1e-6)
    assert lo == pytest.approx(0.0233456, abs=1e-6)
    assert R.compass_reward(0.8, 4.0, 4.5) == pytest.approx(3.6401420, abs=1e-6)
    assert R.compass_reward(0.8, 1.5, 2.0) == pytest.approx(1.6766544, abs=1e-6)
    assert hi > 2 * lo


def test_combine_reward_by_name_and_errors():
    for name, fn in R.REWARD_FORMS.items():
        assert R.combine_reward(**HAND, form=name) == fn(**HAND)
    assert set(R.REWARD_FORMS) == {"compass", "gain", "gated"}
    with pytest.raises(ValueError, match="compass.*gain.*gated"):
        R.combine_reward(**HAND, form="sum")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        R.compass_reward(-0.1, 2.0, 3.0)  # 0.8 ** x is defined, (-0.1) ** x is NaN: refused
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        R.compass_reward(torch.tensor([0.5, 1.2]), torch.tensor([2.0, 2.0]), torch.tensor([3.0, 3.0]))


# ----------------------------------------------------------------------------------------------------
# Answer format and parsing
# ----------------------------------------------------------------------------------------------------


def test_format_answer_exact_text():
    assert CT.format_answer(0.834, 2.41, 3.949, "Sharper  edges,\n no halos.") == (
        "Fidelity: 0.83\nInput quality: 2.41\nOutput quality: 3.95\nReason: Sharper edges, no halos."
    )
    assert CT.format_answer(None, 1.0, 5.0) == "Input quality: 1.00\nOutput quality: 5.00"
    with pytest.raises(ValueError, match="q_sr=5.2"):
        CT.format_answer(0.5, 2.0, 5.2)
    with pytest.raises(ValueError, match="F=nan"):
        CT.format_answer(float("nan"), 2.0, 3.0)


def test_parse_well_formed_special_tokens_whitespace_order():
    text = CT.format_answer(0.83, 2.41, 3.95, "sharper edges")
    assert CT.parse_answer(text, synthetic=True) == CT.Parsed(0.83, 2.41, 3.95, "sharper edges", 0)
    noisy = "<|im_start|>assistant\n  output QUALITY :3.95 \r\n<|endoftext|>Fidelity:0.83\n\n input quality:  2.41\nReason:  ok <|im_end|>"
    assert CT.parse_answer(noisy, synthetic=True) == CT.Parsed(0.83, 2.41, 3.95, "ok", 0)
    # quality-only task: F not asked, ignored even if present; no Reason line -> empty rationale
    assert CT.parse_answer("Input quality: 3\nOutput quality: 4.5<|im_end|>", synthetic=False) == CT.Parsed(None, 3.0, 4.5, "", 0)
    # a rationale quoting a field does not override the numbers written before "Reason:"
    text = "Input quality: 2.00\nOutput quality: 3.00\nReason: the input quality: 4 looked better"
    assert CT.parse_answer(text, synthetic=False).q_lr == 2.0
    # rationale first still parses (numbers searched in the whole text)
    assert CT.parse_answer("Reason: fine.\nInput quality: 2.5 Output quality: 3.5", synthetic=False).q_sr == 3.5


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<|im_end|>",
        "Input quality: 2.41\nOutput quality: 3.95",  # synthetic needs Fidelity
        "Fidelity: high\nInput quality: 2.41\nOutput quality: 3.95",
        "Fidelity: 0.8\nInput quality: 2.41",
        "Fidelity: 0.8\nInput quality: 2.41\nOutput quality: 3.95\nOutput quality: 4.10",  # conflicting
        "Fidelity 0.8 Input quality 2.41 Output quality 3.95",  # no colons
        "Fid: 0.8\nInput q: 2.41\nOutput q: 3.95",
    ],
)
def test_parse_malformed_returns_none(text):
    assert CT.parse_answer(text, synthetic=True) is None


def test_parse_out_of_range_clamped_and_counted():
    p = CT.parse_answer("Fidelity: 1.30\nInput quality: 0.5\nOutput quality: 7\nReason: x", synthetic=True)
    assert (p.F, p.q_lr, p.q_sr, p.clamped) == (1.0, 1.0, 5.0, 3)
    p = CT.parse_answer("Fidelity: -0.2\nInput quality: 2\nOutput quality: 3", synthetic=True)
    assert (p.F, p.clamped) == (0.0, 1)


def test_build_messages_resizes_lr_and_round_trips_png():
    lr = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 20, 3), dtype=np.uint8))
    sr = Image.new("RGB", (80, 64), (10, 20, 30))
    msgs = CT.build_messages(lr, sr, synthetic=True)
    images = [part["image"] for part in msgs[0]["content"] if part["type"] == "image"]
    assert [im.size for im in images] == [(80, 64), (80, 64)]  # LR first, at the SR's size
    assert np.array_equal(np.asarray(images[0]), np.asarray(lr.resize((80, 64), Image.BICUBIC)))
    assert "Fidelity" in msgs[0]["content"][-1]["text"]
    assert "Fidelity" not in CT.build_messages(lr, sr, synthetic=False)[0]["content"][-1]["text"]
    oai = CT.to_openai_messages(msgs)
    url = oai[0]["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(decoded), np.asarray(images[0]))  # lossless


# ----------------------------------------------------------------------------------------------------
# Read-out helpers, group Q_LR, Scores.reward
# ----------------------------------------------------------------------------------------------------


def test_expected_number_hand_values():
    # leading digit over {1..5}: p = (0, 0.5, 0.5, 0, 0) -> 2.5; decimals: E = 4 -> 0.4, E = 9 -> 0.09
    lead = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0]])
    d1, d2 = torch.zeros(1, 10), torch.zeros(1, 10)
    d1[0, 4] = 1.0
    d2[0, 9] = 1.0
    value = R.expected_number([lead, d1, d2], [range(1, 6), range(10), range(10)])
    assert value.item() == pytest.approx(2.99)


def _logprob_reply(text: str, digit_tops: dict[int, dict[str, float]]) -> list[dict]:
    """vLLM-style logprobs content: digits are single tokens; digit_tops[i] = probabilities at the i-th digit."""
    import re

    content, k = [], 0
    for token in re.findall(r"\d|\D+", text):
        if token.isdigit():
            tops = digit_tops.get(k, {token: 1.0})
            k += 1
            content.append({"token": token, "logprob": math.log(tops[token]), "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in tops.items()]})
        else:
            content.append({"token": token, "logprob": 0.0, "top_logprobs": [{"token": token, "logprob": 0.0}]})
    return content


def test_expected_from_logprobs_hand_made_vllm_reply():
    text = "Fidelity: 0.83\nInput quality: 2.41\nOutput quality: 3.95\nReason: ok"
    # digits in order: 0 8 3 | 2 4 1 | 3 9 5
    tops = {
        0: {"0": 0.9, "1": 0.1},  # F lead: E = 0.1
        1: {"8": 0.5, "7": 0.25, "x": 0.25},  # non-digit top entry ignored -> {8: 2/3, 7: 1/3}: E = 23/3
        3: {"2": 0.6, "3": 0.4},  # Q_LR lead: E = 2.4
        4: {"4": 0.5, "5": 0.5},  # E = 4.5
        6: {"3": 0.7, "7": 0.3},  # Q_SR lead: 7 not allowed in {1..5} -> renormalised: E = 3
    }
    values = R.expected_from_logprobs(_logprob_reply(text, tops), synthetic=True)
    # value = E[lead] + 0.1 E[d1] + 0.01 E[d2]; unlisted digits are one-hot on the written digit
    assert values["F"] == pytest.approx(0.1 + 0.1 * 23 / 3 + 0.01 * 3)  # 0.8966667
    assert values["q_lr"] == pytest.approx(2.4 + 0.1 * 4.5 + 0.01 * 1)  # 2.86
    assert values["q_sr"] == pytest.approx(3.0 + 0.1 * 9 + 0.01 * 5)  # 3.95
    assert R.expected_from_logprobs(_logprob_reply("Input quality: 2", {}), synthetic=False) is None


def test_share_group_q_lr_mean_of_valid_pairs():
    s = R.Scores(
        F=torch.tensor([0.9, 0.5, float("nan")]),
        q_lr=torch.tensor([2.0, 3.0, float("nan")]),
        q_sr=torch.tensor([4.0, 3.5, float("nan")]),
        valid=torch.tensor([True, True, False]),
        rationale=["", "", ""],
    )
    g = R.share_group_q_lr(s)
    assert g.q_lr[:2].tolist() == [2.5, 2.5] and math.isnan(g.q_lr[2])
    assert g.q_lr_pair[:2].tolist() == [2.0, 3.0]  # the per-pair readings are kept
    r = g.reward()
    assert r[0].item() == pytest.approx(R.compass_reward(0.9, 2.5, 4.0), abs=1e-6)
    assert math.isnan(r[2])  # invalid -> NaN, never 0
    assert g.reward("gain")[1].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------
# Tiny model door
# ----------------------------------------------------------------------------------------------------


def _pairs(n, seed=0, lr_size=16, sr_size=64):
    rng = np.random.default_rng(seed)
    lrs = [Image.fromarray(rng.integers(0, 255, (lr_size, lr_size, 3), dtype=np.uint8)) for _ in range(n)]
    srs = [Image.fromarray(rng.integers(0, 255, (sr_size, sr_size, 3), dtype=np.uint8)) for _ in range(n)]
    return lrs, srs


@pytest.fixture(scope="module")
def tiny():
    return VL.load_compass("tiny")


def test_tiny_build_deterministic_and_rng_untouched(tiny):
    model, processor = tiny
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again, _ = VL.build_tiny_compass()
    assert torch.rand(1) == before  # the build did not consume the global RNG
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    other, _ = VL.build_tiny_compass(seed=1)
    assert not torch.equal(other.lm_head.weight, model.lm_head.weight)
    tok = processor.tokenizer
    assert model.config.text_config.vocab_size >= len(tok) == 270
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")


def test_tiny_save_load_round_trip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "chat_template.jinja").exists()
    model2, processor2 = VL.load_compass(str(tmp_path))
    lrs, srs = _pairs(2)
    a = R.LocalScorer(model, processor, synthetic=True).score(lrs, srs)
    b = R.LocalScorer(model2, processor2, synthetic=True).score(lrs, srs)
    for name in ("F", "q_lr", "q_sr"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.text == b.text
    with pytest.raises(R.RunError, match="COMPASS checkpoint no/such/ckpt: no such folder"):
        VL.load_compass("no/such/ckpt")


def test_local_expected_readout_in_range_and_deterministic(tiny):
    model, processor = tiny
    lrs, srs = _pairs(3)
    scorer = R.LocalScorer(model, processor, synthetic=True, batch_size=2)
    a, b = scorer.score(lrs, srs), scorer.score(lrs, srs)
    assert a.valid.all() and a.F.shape == (3,)
    assert ((a.F >= 0) & (a.F <= 1)).all() and ((a.q_lr >= 1) & (a.q_lr <= 5)).all() and ((a.q_sr >= 1) & (a.q_sr <= 5)).all()
    assert torch.equal(a.F, b.F) and torch.equal(a.q_lr, b.q_lr) and torch.equal(a.q_sr, b.q_sr)
    for text in a.text:  # the constrained decode writes the answer format
        parsed = CT.parse_answer(text, synthetic=True)
        assert parsed is not None and parsed.clamped == 0
    # an untrained model is near uniform over the digits: E[lead] over {1..5} near 3, not the greedy digit
    assert (a.q_lr - 3.0).abs().max() < 0.6
    q = R.LocalScorer(model, processor, synthetic=False).score(lrs[:1], srs[:1])
    assert torch.isnan(q.F).all() and q.valid.all()
    g = scorer.score_group(lrs[0], srs[:2])
    assert torch.unique(g.q_lr).numel() == 1 and g.q_lr[0].item() == pytest.approx(g.q_lr_pair.mean().item(), abs=1e-6)


def test_views_average_the_readings_of_the_flipped_and_rotated_pairs(tiny):
    model, processor = tiny
    lrs, srs = _pairs(2, lr_size=16, sr_size=32)
    # the 8 transforms by hand: a pixel (row 0, col 1) goes to (0, w-2), (h-1, 1), ... ; all distinct
    lr = np.asarray(lrs[0])
    moved = [np.asarray(R.augment_pair(lrs[0], srs[0], v)[0]) for v in range(8)]
    assert np.array_equal(moved[0], lr) and np.array_equal(moved[1], lr[:, ::-1]) and np.array_equal(moved[2], lr[::-1])
    assert len({m.tobytes() for m in moved}) == 8
    one = R.LocalScorer(model, processor, synthetic=True)
    readings = [one.score(*map(list, zip(*[R.augment_pair(a, b, v) for a, b in zip(lrs, srs)]))) for v in range(8)]
    for views in (2, 8):
        s = R.LocalScorer(model, processor, synthetic=True, views=views).score(lrs, srs)
        for name in ("F", "q_lr", "q_sr"):
            by_hand = torch.stack([getattr(r, name) for r in readings[:views]]).mean(0)
            torch.testing.assert_close(getattr(s, name), by_hand, atol=1e-5, rtol=0)
        assert s.text == readings[0].text and s.valid.all()
    assert not torch.allclose(readings[0].F, readings[1].F)  # the views do read differently
    with pytest.raises(ValueError, match="LocalScorer: views must be 1..8, got 9"):
        R.LocalScorer(model, processor, synthetic=True, views=9)


def test_local_text_mode_marks_garbage_invalid(tiny):
    model, processor = tiny
    lrs, srs = _pairs(2)
    scorer = R.LocalScorer(model, processor, synthetic=True, mode="text", max_new_tokens=24)
    s = scorer.score(lrs, srs)
    assert not s.valid.any() and torch.isnan(s.q_sr).all()
    assert scorer.stats["invalid"] == 2 and all(len(t) > 0 for t in s.text)
    assert torch.isnan(s.reward()).all()


# ----------------------------------------------------------------------------------------------------
# RemoteScorer without a server: reply handling, retries, errors
# ----------------------------------------------------------------------------------------------------


def test_remote_reply_paths_logprobs_retry_invalid(monkeypatch):
    lrs, srs = _pairs(1)
    good = "Input quality: 2.41\nOutput quality: 3.95"
    replies = {
        "logprobs": [{"choices": [{"message": {"content": good}, "logprobs": {"content": _logprob_reply(good, {0: {"2": 0.6, "3": 0.4}})}}]}],
        "retry_ok": [{"choices": [{"message": {"content": "garbage"}}]}, {"choices": [{"message": {"content": good}}]}],
        "invalid": [{"choices": [{"message": {"content": "garbage"}}]}] * 2,
    }
    results = {}
    for case, queue in replies.items():
        scorer = R.RemoteScorer("http://127.0.0.1:9", "compass", synthetic=False)
        queue = list(queue)
        monkeypatch.setattr(scorer, "_post", lambda payload, q=queue: q.pop(0))
        results[case] = (scorer.score(lrs, srs), scorer.stats)
    s, stats = results["logprobs"]
    assert s.q_lr.item() == pytest.approx(2.4 + 0.1 * 4 + 0.01 * 1) and s.q_sr.item() == pytest.approx(3.95)
    assert stats["logprob_readouts"] == 1 and stats["retried"] == 0
    s, stats = results["retry_ok"]
    assert s.valid.all() and s.q_lr.item() == pytest.approx(2.41) and stats["retried"] == 1 and stats["invalid"] == 0
    s, stats = results["invalid"]
    assert not s.valid.any() and torch.isnan(s.q_lr).all() and stats["retried"] == 1 and stats["invalid"] == 1


def test_remote_views_average_the_valid_readings(monkeypatch):
    lrs, srs = _pairs(3)
    reply = lambda text: {"choices": [{"message": {"content": text}}]}  # noqa: E731
    a, b, c = (f"Input quality: {q_lr}\nOutput quality: {q_sr}"
               for q_lr, q_sr in (("2.00", "3.00"), ("1.00", "4.00"), ("2.50", "3.50")))
    # one worker: requests in order view 0 of pairs 0, 1, 2, then view 1 of them; "garbage" is asked again once
    queue = [reply(t) for t in (a, "garbage", "garbage", "garbage", "garbage", b, "garbage", "garbage", c)]
    scorer = R.make_scorer(url="http://127.0.0.1:9", synthetic=False, concurrency=1, views=2)
    monkeypatch.setattr(scorer, "_post", lambda payload: queue.pop(0))
    s = scorer.score(lrs, srs)
    assert not queue and scorer.stats["replies"] == 9 and scorer.stats["invalid"] == 3
    # pair 0: both views read -> their mean; pair 1: no view read -> invalid; pair 2: only view 1 read
    assert s.valid.tolist() == [True, False, True] and s.text == [a, "garbage", "garbage"]
    torch.testing.assert_close(s.q_lr, torch.tensor([1.5, float("nan"), 2.5]), equal_nan=True)
    torch.testing.assert_close(s.q_sr, torch.tensor([3.5, float("nan"), 3.5]), equal_nan=True)
    with pytest.raises(ValueError, match="RemoteScorer: views must be 1..8, got 0"):
        R.RemoteScorer("http://127.0.0.1:9", "compass", views=0)


def test_remote_wrong_port_raises_naming_url():
    url = f"http://127.0.0.1:{serving.free_port()}"
    scorer = R.RemoteScorer(url, "compass", retry_for=0.05, backoff=0.01, timeout=2)
    start = time.perf_counter()
    with pytest.raises(R.RewardServerError, match=f"{url}/v1/chat/completions.*3 attempts"):
        scorer.score(*_pairs(1))
    assert time.perf_counter() - start < 10
    assert scorer.stats["server_retries"] == 2


# ----------------------------------------------------------------------------------------------------
# FidelityScorer
# ----------------------------------------------------------------------------------------------------


def test_fidelity_ssim_and_transform(monkeypatch):
    scorer = R.FidelityScorer("ssim")
    hr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noisy = (hr + 0.2 * torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    F_same, F_noisy = scorer.fidelity(hr, hr), scorer.fidelity(noisy, hr)
    assert F_same.dtype == torch.float32 and F_same.shape == (2,)
    torch.testing.assert_close(F_same, torch.ones(2))
    assert (F_noisy < 0.9).all()
    # Eq.1: F = 1 - DISTS, clamped to [0, 1] and counted (metric replaced by known distances)
    dists = R.FidelityScorer.__new__(R.FidelityScorer)
    dists.name, dists.device, dists.stats = "dists", "cpu", Counter()
    dists.metric = lambda sr, hr: torch.tensor([[0.2], [1.3]])
    torch.testing.assert_close(dists.fidelity(hr, hr), torch.tensor([0.8, 0.0]))
    assert dists.stats["clamped"] == 1


def test_texture_fidelity_by_hand_and_it_does_not_pay_for_blur():
    from evaluation import evaluate

    scorer = R.FidelityScorer("texture")
    # flat grey images: the band-pass maps are zero (their terms are c/c = 1), structure on Y is c2/c2 = 1,
    # texture on Y = (2 * 0.25 * 0.75 + 1e-4) / (0.25^2 + 0.75^2 + 1e-4) = 0.37510 / 0.62510 = 0.600064
    flat_a, flat_b = torch.full((1, 3, 32, 32), 0.25), torch.full((1, 3, 32, 32), 0.75)
    texture_y = (2 * 0.25 * 0.75 + 1e-4) / (0.25 ** 2 + 0.75 ** 2 + 1e-4)
    torch.testing.assert_close(scorer.fidelity(flat_a, flat_b), torch.tensor([(1 + (texture_y + 2) / 3) / 2]))
    # a smooth ramp carrying a random texture: the same ramp with ANOTHER texture of the same strength keeps
    # a high F, the ramp with its texture blurred away loses it. SSIM ranks them the other way round, which
    # is why an SSIM-trained fidelity pays the policy for smoothing.
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0.2, 0.8, 64).view(1, 1, 1, 64).expand(4, 3, 64, 64)
    hr = (ramp + 0.1 * torch.randn(4, 1, 64, 64, generator=g)).clamp(0, 1)
    other_texture = (ramp + 0.1 * torch.randn(4, 1, 64, 64, generator=g)).clamp(0, 1)
    F_same, F_other, F_blur = (scorer.fidelity(x, hr) for x in (hr, other_texture, ramp.contiguous()))
    torch.testing.assert_close(F_same, torch.ones(4))
    assert (F_other > F_blur + 0.2).all(), (F_other, F_blur)
    ssim = evaluate.create_metric("SSIM")
    assert (ssim(other_texture, hr).flatten() < ssim(ramp.contiguous(), hr).flatten()).all()


def test_blend_fidelity_is_the_mean_of_ssim_and_texture():
    """'blend' = (SSIM + texture) / 2 pair by pair: on the ramp of the test above it lies between the two,
    which rank another texture and a blur the opposite ways."""
    g = torch.Generator().manual_seed(1)
    ramp = torch.linspace(0.2, 0.8, 64).view(1, 1, 1, 64).expand(3, 3, 64, 64)
    hr = (ramp + 0.1 * torch.randn(3, 1, 64, 64, generator=g)).clamp(0, 1)
    other_texture = (ramp + 0.1 * torch.randn(3, 1, 64, 64, generator=g)).clamp(0, 1)
    for sr in (other_texture, ramp.contiguous()):
        ssim, texture = R.FidelityScorer("ssim").fidelity(sr, hr), R.FidelityScorer("texture").fidelity(sr, hr)
        torch.testing.assert_close(R.FidelityScorer("blend").fidelity(sr, hr), (ssim + texture) / 2)
        assert (ssim - texture).abs().min() > 0.05  # the two differ, so the mean is a real blend
    torch.testing.assert_close(R.FidelityScorer("blend").fidelity(hr, hr), torch.ones(3))


def test_fidelity_offline_weights_error_suggests_ssim(monkeypatch):
    import pyiqa

    def offline(name, **kwargs):
        raise URLError("[Errno -2] Name or service not known")  # what pyiqa raises with no network

    monkeypatch.setattr(pyiqa, "create_metric", offline)
    with pytest.raises(R.FidelityMetricError, match="'dists'.*--fidelity ssim"):
        R.FidelityScorer("dists")
    with pytest.raises(ValueError, match="psnr"):
        R.FidelityScorer("psnr")


# ----------------------------------------------------------------------------------------------------
# A tiny COMPASS taught the answer format; served by a real `transformers serve`
# ----------------------------------------------------------------------------------------------------

TAUGHT = (0.83, 2.41, 3.95)


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """Tiny COMPASS overfit to answer TAUGHT for one pair (answer-only loss), saved to a folder."""
    model, processor = VL.build_tiny_compass()
    lrs, srs = _pairs(1)
    conv = CT.build_messages(lrs[0], srs[0], synthetic=True)
    prompt = processor.apply_chat_template([conv], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    answer = CT.format_answer(*TAUGHT, "sharper edges")
    full = processor.apply_chat_template(
        [conv + [{"role": "assistant", "content": answer}]], tokenize=True, return_dict=True, return_tensors="pt"
    )
    labels = full["input_ids"].clone()
    labels[:, : prompt["input_ids"].shape[1]] = -100  # loss on the answer only
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)  # ~80 steps to loss < 0.01
    model.train()
    losses = []
    for _ in range(150):
        loss = model(**full, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < 0.01:
            break
    model.eval()
    path = tmp_path_factory.mktemp("compass_taught")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor, path, (lrs, srs), losses


@pytest.mark.slow
@pytest.mark.xdist_group("taught")  # one worker builds the module fixture once
def test_taught_model_readout_matches_labels(taught):
    model, processor, _, (lrs, srs), losses = taught
    assert losses[-1] < 0.05 < losses[0]
    s = R.LocalScorer(model, processor, synthetic=True).score(lrs, srs)
    torch.testing.assert_close(torch.stack([s.F, s.q_lr, s.q_sr], 1)[0], torch.tensor(TAUGHT), atol=0.02, rtol=0)
    t = R.LocalScorer(model, processor, synthetic=True, mode="text", max_new_tokens=90).score(lrs, srs)
    assert t.valid.all() and t.rationale == ["sharper edges"]
    torch.testing.assert_close(torch.stack([t.F, t.q_lr, t.q_sr], 1)[0], torch.tensor(TAUGHT))


@pytest.mark.slow
@pytest.mark.xdist_group("taught")
def test_transformers_serve_remote_scorer(taught, tmp_path):
    from mini import serving

    _, _, path, (lrs, srs), _ = taught
    # a real `transformers serve` on 127.0.0.1, stopped by PID when the block ends
    with serving.serve_locally(path, timeout=120, log_path=tmp_path / "serve.log") as url:
        n = 4
        scorer = R.RemoteScorer(url, str(path), concurrency=4, synthetic=True, max_new_tokens=90)
        s = scorer.score(lrs * n, srs * n)
        assert scorer.stats["replies"] == n and scorer.stats["requests"] == n and scorer.stats["max_in_flight"] > 1
        assert s.valid.all() and scorer.stats["logprob_readouts"] == 0  # transformers serve sends no logprobs
        torch.testing.assert_close(torch.stack([s.F, s.q_lr, s.q_sr], 1), torch.tensor([TAUGHT] * n))
        assert s.rationale == ["sharper edges"] * n
        g = scorer.score_group(lrs[0], srs * 2)
        assert g.q_lr.tolist() == pytest.approx([TAUGHT[1]] * 2)

        # replies cut before "Output quality" cannot be parsed: retried once, then invalid and counted
        short = R.RemoteScorer(url, str(path), concurrency=2, synthetic=True, max_new_tokens=20)
        s = short.score(lrs * 2, srs * 2)
        assert not s.valid.any() and torch.isnan(s.q_sr).all()
        assert short.stats["replies"] == 4 and short.stats["retried"] == 2 and short.stats["invalid"] == 2
        assert all(t.startswith("Fidelity: 0.83") for t in s.text)

        timings = bench.time_remote_scoring(url, str(path), lrs[0], srs * 2, concurrency=(1, 2), max_new_tokens=90)
        assert set(timings) == {1, 2} and all(t > 0 for t in timings.values())


def test_remote_base_url_with_or_without_v1():
    for base in ("http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1"):
        assert R.RemoteScorer(base, "compass").url == "http://127.0.0.1:8000/v1/chat/completions"
