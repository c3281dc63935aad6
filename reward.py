"""COMPASS reward (paper §3.3, Eq.4) and the scorers that feed it.

COMPASS is a Qwen3-VL model fine-tuned (train_compass.py) to read an (LR, SR) pair and answer with three
numbers: the fidelity F in [0, 1] of the enhancement process, the perceptual quality Q_LR in [1, 5] of
the input and Q_SR in [1, 5] of the output. Eq.4 turns them into one scalar reward:

    R = F * Q_LR + F ** (Q_LR / gamma) * (Q_SR - Q_LR),    gamma = 7                       (Eq.4)

This file holds, top to bottom:
  1. Eq.4 and the two Table 8 ablation forms, as pure functions on floats or tensors.
  2. The model door: `load_compass("tiny")` builds a tiny Qwen3-VL from configs of the real classes with
     deterministic random weights; `load_compass(path_or_hub_name)` loads a trained checkpoint.
  3. The prompt (`build_messages`) and THE fixed answer format (`format_answer` / `parse_answer`) that
     train_compass.py teaches and every scorer reads.
  4. Scorers, one interface `score(lr_images, sr_images) -> Scores` plus `score_group(lr, srs)`:
     `LocalScorer` (in-process transformers), `RemoteScorer` (OpenAI-compatible server: vLLM at full
     scale, `transformers serve` on CPU) and `FidelityScorer` (F = 1 - DISTS against the HR, Eq.1, for
     the full-reference RL stage, §4).

Choices made where the paper is silent
--------------------------------------
* What the model sees of the LR: `build_messages` resizes the LR to the SR's size (PIL bicubic) before
  it reaches the processor. Both images then cost the same number of vision tokens and are pixel-aligned,
  so "did the content survive" is a same-scale comparison. (The real processor would upsample a 64x64
  LR to 256x256 anyway because of its 65536-pixel minimum; resizing ourselves makes the scale explicit
  and identical for training, local scoring and remote scoring.)
* Prompt: one user turn "Input image: <LR> Enhanced image: <SR> <task text>". The task text names the
  task setting (§3.3: "prompts indicate the data type and task setting"): `synthetic=True` asks for
  F, Q_LR, Q_SR (the setting of the synthetic subset, where F is annotated), `synthetic=False` asks for
  Q_LR, Q_SR only. Eq.4 needs F, so the non-reference RL stage (rl_nr.py) scores real LQ inputs with
  the `synthetic=True` prompt; the quality-only prompt is for training on real-world samples and for
  quality-only evaluation. The LR comes first so a server with prefix caching (vLLM) reuses the LR's
  vision tokens across the K outputs of a group.
* Answer format (numbers first, fixed width, rationale last):

      Fidelity: 0.83
      Input quality: 2.41
      Output quality: 3.95
      Reason: <one or two sentences>

  The quality-only answer omits the Fidelity line; an empty rationale omits the Reason line. Numbers
  first means RL-time scoring can stop after the numbers (`max_new_tokens` covers just them).
* Read-out of a continuous score from the digit probabilities (the Q-Align idea: a score is the expected
  value of the model's distribution over rating tokens, not the argmax; digits are single tokens in the
  Qwen vocabulary). Each number "a.bc" is read as

      value = E[a] + 0.1 * E[b | greedy a] + 0.01 * E[c | greedy a, b]

  where E[a] is the expectation over the allowed leading digits ({0,1} for F, {1..5} for Q, probabilities
  renormalised over that set) and the fractional digits are expectations over 0-9 at their positions
  given the greedy digits before them. Locally this is one KV-cached greedy decode constrained to the
  answer template (label tokens forced, digit slots restricted to digits) with the raw logits kept
  (`output_logits=True`): no free-text parsing can fail. Remotely, vLLM's `top_logprobs` (top 20) give
  the same expectations at the digit positions of the reply (digits missing from the top 20 count as 0);
  servers without logprobs (`transformers serve`) fall back to parsing the text. Values outside
  [0,1] / [1,5] are clamped and counted (`stats["clamped"]`).
* Q_LR is a property of the input, but the model predicts it once per pair. `score_group(lr, srs)`
  replaces the K per-pair Q_LR predictions of a group by their mean over the valid pairs (no extra model
  call, lower variance than any single reading), so reward differences inside a group come only from F
  and Q_SR. The per-pair readings stay in `Scores.q_lr_pair` for diagnostics.
* Nothing is silently zero: an unparseable reply is retried once, then marked `valid=False` with NaN
  scores and counted in `stats["invalid"]`; `Scores.reward()` is NaN there.

Serving a trained COMPASS checkpoint folder (written by train_compass.py with save_pretrained):

    # GPUs (the paper: vLLM on 8 A100s; the 8B model fits one GPU, so one replica per GPU):
    vllm serve runs/compass --served-model-name compass --host 0.0.0.0 --port 8000 \\
        --data-parallel-size 8 --max-logprobs 20 --limit-mm-per-prompt '{"image": 2}' \\
        --api-key "$COMPASS_API_KEY"
    # CPU / tests (no logprobs: the text read-out is used; requests are served one at a time):
    transformers serve runs/compass --host 127.0.0.1 --port 8000 --device cpu

then `RemoteScorer("http://127.0.0.1:8000", "compass")` (vLLM) or
`RemoteScorer("http://127.0.0.1:8000", "runs/compass")` (`transformers serve` is pinned to the path it
was started with and wants that exact string as the model name).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image

from common.compass_text import (
    FIELD_RANGES,
    REASON_PATTERN,
    build_messages,
    clamp_score,
    fields_for,
    find_fields,
    format_answer,
    parse_answer,
    strip_special_tokens,
    to_openai_messages,
)
from common.training import RunError
from common.vl_model import load_compass
from evaluation.evaluate import create_metric, texture_fidelity

# bitsandbytes (pulled in by diffusers, transformers and pyiqa) logs a warning about an optional 4-bit CPU
# kernel when it is imported; nothing here uses 4-bit weights.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# =====================================================================================================
# 1. The reward: Eq.4 and the Table 8 ablation forms (pure; floats or tensors, broadcasting)
# =====================================================================================================

GAMMA = 7.0  # §3.3 / Table 3: gamma = 7 chosen by ablation


def _check_fidelity(F) -> None:
    """F ** (Q_LR / gamma) with F < 0 is NaN: refuse it instead of returning NaN rewards."""
    bad = (F < 0) | (F > 1)  # a bool, a numpy array or a tensor
    if bool(bad.any() if hasattr(bad, "any") else bad):
        raise ValueError(f"fidelity F must lie in [0, 1] (Eq.1), got {F}; clamp it first (FidelityScorer and the scorers already do)")


def compass_reward(F, q_lr, q_sr, gamma: float = GAMMA):
    """COMPASS reward, Eq.4: R = F * Q_LR + F ** (Q_LR / gamma) * (Q_SR - Q_LR).

    F in [0, 1], q_lr and q_sr in [1, 5]; floats, numpy arrays or tensors, broadcastable (e.g. (N,)). F = 1 gives
    R = Q_SR; F = 0 gives R = 0. A higher Q_LR raises the exponent, so the gain term falls faster when
    fidelity drops (conservative on good inputs, permissive on badly degraded ones).
    """
    _check_fidelity(F)
    gain = q_sr - q_lr  # dQ, the perceptual gain
    return F * q_lr + F ** (q_lr / gamma) * gain  # Eq.4


def reward_gain_only(F, q_lr, q_sr, gamma: float = GAMMA):
    """Table 8, Formulation 1: R = dQ = Q_SR - Q_LR (F and gamma unused; kept for a common signature)."""
    return q_sr - q_lr


def reward_gated_gain(F, q_lr, q_sr, gamma: float = GAMMA):
    """Table 8, Formulation 2: R = F ** (Q_LR / gamma) * (Q_SR - Q_LR), Eq.4 without the F * Q_LR term."""
    _check_fidelity(F)
    return F ** (q_lr / gamma) * (q_sr - q_lr)


REWARD_FORMS: dict[str, Callable] = {
    "compass": compass_reward,
    "gain": reward_gain_only,
    "gated": reward_gated_gain,
}


def combine_reward(F, q_lr, q_sr, form: str = "compass", gamma: float = GAMMA):
    """Reward by form name ("compass" = Eq.4, "gain" / "gated" = Table 8 ablations)."""
    if form not in REWARD_FORMS:
        raise ValueError(f"unknown reward form {form!r}; choose one of {sorted(REWARD_FORMS)}")
    return REWARD_FORMS[form](F, q_lr, q_sr, gamma)


def label_reward(F: float | None, q_lr: float, q_sr: float, gamma: float = GAMMA) -> float:
    """Eq.4 of one labelled (or predicted) triple, F = 1 where there is none (a real LQ input without GT:
    then R = Q_SR)."""
    return float(compass_reward(torch.tensor([1.0 if F is None else F]), torch.tensor([q_lr]), torch.tensor([q_sr]),
                                gamma)[0])


# =====================================================================================================
# 2. Scores, the scorer interface, Q_LR once per group
# =====================================================================================================


@dataclass
class Scores:
    """Scores of N (LR, SR) pairs. Invalid pairs (unreadable reply) have valid=False and NaN scores.

    F: (N,) fidelity in [0,1] (NaN for the quality-only task), q_lr / q_sr: (N,) in [1,5], valid: (N,)
    bool, rationale: N strings ("" if none). text: the N raw replies; q_lr_pair: the per-pair Q_LR
    readings when `q_lr` holds a group-shared value (score_group), else None.
    """
    F: torch.Tensor
    q_lr: torch.Tensor
    q_sr: torch.Tensor
    valid: torch.Tensor
    rationale: list[str]
    text: list[str] = field(default_factory=list)
    q_lr_pair: torch.Tensor | None = None

    def reward(self, form: str = "compass", gamma: float = GAMMA) -> torch.Tensor:
        """(N,) reward by `combine_reward`; NaN where valid is False (never a silent 0)."""
        r = combine_reward(self.F, self.q_lr, self.q_sr, form, gamma)  # F is NaN for the quality-only task
        return torch.where(self.valid, r, torch.full_like(r, float("nan")))


class Scorer(Protocol):
    """What the RL stages and train_compass.py need from a COMPASS scorer (LocalScorer, RemoteScorer)."""

    def score(self, lr_images: list[Image.Image], sr_images: list[Image.Image]) -> Scores: ...

    def score_group(self, lr_image: Image.Image, sr_images: list[Image.Image]) -> Scores: ...


def share_group_q_lr(scores: Scores) -> Scores:
    """Replace the per-pair Q_LR of one group (same LR, K outputs) by their mean over the valid pairs.

    Q_LR describes the input, so it must not differ between the K outputs of a group; the mean of the K
    readings is the least noisy estimate that costs no extra model call. Returns a new Scores with the
    shared value in `q_lr` (NaN where invalid) and the readings in `q_lr_pair`.
    """
    shared = scores.q_lr[scores.valid].mean() if bool(scores.valid.any()) else torch.tensor(float("nan"))
    q_lr = torch.where(scores.valid, shared.expand_as(scores.q_lr), torch.full_like(scores.q_lr, float("nan")))
    return Scores(scores.F, q_lr, scores.q_sr, scores.valid, scores.rationale, scores.text, q_lr_pair=scores.q_lr)


def _stack_scores(rows: list[dict], synthetic: bool) -> Scores:
    """rows: dicts with F, q_lr, q_sr (floats or None), valid, rationale, text -> Scores."""
    nan = float("nan")

    def col(name):
        return torch.tensor([r[name] if (r["valid"] and r[name] is not None) else nan for r in rows], dtype=torch.float32)

    return Scores(
        F=col("F") if synthetic else torch.full((len(rows),), nan),
        q_lr=col("q_lr"),
        q_sr=col("q_sr"),
        valid=torch.tensor([r["valid"] for r in rows], dtype=torch.bool),
        rationale=[r["rationale"] for r in rows],
        text=[r["text"] for r in rows],
    )


def _check_pairs(lr_images: Sequence, sr_images: Sequence) -> None:
    if len(lr_images) != len(sr_images):
        raise ValueError(f"score: got {len(lr_images)} LR images and {len(sr_images)} SR images; pass one LR per SR")


# =====================================================================================================
# 3. Digit-probability read-out (Q-Align style expected value; see module docstring)
# =====================================================================================================


def allowed_digits(name: str, position: int) -> tuple[int, ...]:
    """Digits allowed at `position` (0 = leading, 1-2 = decimals) of field `name`: {0,1} / {1..5} / 0-9."""
    if position > 0:
        return tuple(range(10))
    lo, hi = FIELD_RANGES[name]
    return tuple(range(int(lo), int(hi) + 1))


def digit_token_ids(tokenizer, owner: str) -> list[int]:
    """Token id of each digit 0-9. The read-out needs one token per digit (true of the Qwen vocabulary); `owner`
    names the caller in the error."""
    ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(10)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"{owner}: the tokenizer does not encode each digit 0-9 as one token; the digit read-out needs that")
    return [i[0] for i in ids]


def expected_number(digit_probs: Sequence[torch.Tensor], digit_values: Sequence[Sequence[int]]) -> torch.Tensor:
    """value = sum_k 10**-k * E[digit_k] for a number "a.bc" read position by position.

    digit_probs[k]: (N, D_k) probabilities over the allowed digits of position k (rows sum to 1),
    digit_values[k]: the D_k digit values. Returns (N,).
    """
    value = 0.0
    for k, (p, v) in enumerate(zip(digit_probs, digit_values)):
        value = value + 10.0 ** (-k) * (p @ torch.tensor(v, dtype=p.dtype))
    return value


# =====================================================================================================
# 4. LocalScorer: in-process transformers
# =====================================================================================================


class _TemplateLogits:
    """LogitsProcessor that forces the answer template during a greedy decode.

    slots[t] is either a forced token id (labels, ".", newlines) or a digit slot (field, position,
    step of that number's leading digit): a leading digit is restricted to the field's allowed digits; a
    decimal to 0-9, or to 0 alone when the row's leading digit is the top of the range ("1.00", "5.00").
    Steps beyond the template are left free (the rationale, if max_new_tokens allows it).
    """

    def __init__(self, prompt_len: int, slots: list, digit_id: list[int]):
        self.prompt_len, self.slots, self.digit_id = prompt_len, slots, digit_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_len
        if t >= len(self.slots):
            return scores
        mask = torch.full_like(scores, float("-inf"))  # (B, V)
        slot = self.slots[t]
        if isinstance(slot, int):
            mask[:, slot] = 0.0
        else:
            name, position, lead_step = slot
            mask[:, [self.digit_id[d] for d in allowed_digits(name, position)]] = 0.0
            if position > 0:
                at_top = input_ids[:, self.prompt_len + lead_step] == self.digit_id[int(FIELD_RANGES[name][1])]
                mask[at_top] = float("-inf")
                mask[at_top, self.digit_id[0]] = 0.0
        return scores + mask


# The dihedral group of a square: the identity, two flips, three rotations and the two diagonal transposes.
_DIHEDRAL = (None, "FLIP_LEFT_RIGHT", "FLIP_TOP_BOTTOM", "ROTATE_90", "ROTATE_180", "ROTATE_270", "TRANSPOSE",
             "TRANSVERSE")


def augment_pair(lr: Image.Image, sr: Image.Image, index: int) -> tuple[Image.Image, Image.Image]:
    """The same dihedral transform `index` (0 = none, 1 = horizontal flip, 2-7 = the others) applied to both
    PIL images of a pair. Labels stay valid when they do not depend on orientation: SSIM to an equally
    transformed HR, the SNB score, a human's opinion under a horizontal flip. Used by `train_compass.py
    train --augment` and by the scorers' `views` (`pairs_in_views`)."""
    if index == 0:
        return lr, sr
    op = getattr(Image.Transpose, _DIHEDRAL[index])
    return lr.transpose(op), sr.transpose(op)


def check_views(views: int, owner: str) -> None:
    """`views` must name 1 to 8 of `augment_pair`'s transforms."""
    if views not in range(1, len(_DIHEDRAL) + 1):
        raise ValueError(f"{owner}: views must be 1..{len(_DIHEDRAL)}, got {views}")


def pairs_in_views(lr_images: Sequence, sr_images: Sequence, views: int) -> list[tuple[Image.Image, Image.Image]]:
    """The (LR, SR) pairs in the first `views` transforms of `augment_pair`: view v of pair i at v * n + i
    (view 0 = the pairs as given)."""
    return [augment_pair(lr, sr, v) for v in range(views) for lr, sr in zip(lr_images, sr_images)]


def mean_over_views(rows: list[dict], views: int, synthetic: bool) -> list[dict]:
    """Readings of `pairs_in_views` -> one row per pair: F, Q_LR, Q_SR are the means over the pair's valid
    views (a pair is invalid only when every view is); text and rationale stay view 0's."""
    n = len(rows) // views
    merged = []
    for i in range(n):
        valid = [rows[v * n + i] for v in range(views) if rows[v * n + i]["valid"]]
        merged.append({**rows[i], "valid": True, **{name: sum(r[name] for r in valid) / len(valid)
                                                    for name in fields_for(synthetic)}} if valid else rows[i])
    return merged


class LocalScorer:
    """COMPASS scoring with an in-process transformers model, batched and deterministic (greedy).

    mode "expected" (default): greedy decode constrained to the answer template; each number is read
    from the digit distributions (module docstring) and every pair is valid. mode "text": free greedy
    generation parsed by `parse_answer`; unparseable -> valid=False, NaN, counted in stats["invalid"].
    max_new_tokens: None = just the numbers in "expected" mode (RL use) and numbers + 32 tokens in
    "text" mode; larger values also generate the rationale. stats: pairs, invalid, clamped.
    views: test-time averaging (not in the paper; an option): each pair is scored in the first `views`
    transforms of `augment_pair` (1 = as given, 2 = and its horizontal flip, 8 = all flips/rotations) and
    F, Q_LR, Q_SR are the means of those readings (`mean_over_views`; the text and rationale are the
    untransformed pair's). It costs `views` times the model calls. For a model trained with `--augment
    dihedral` it averages out the orientation noise of single readings (README "The mini presets").
    """

    def __init__(
        self, model, processor, synthetic: bool, batch_size: int = 8, max_new_tokens: int | None = None,
        mode: str = "expected", views: int = 1
    ):
        if mode not in ("expected", "text"):
            raise ValueError(f"LocalScorer: mode must be 'expected' or 'text', got {mode!r}")
        check_views(views, "LocalScorer")
        self.model, self.processor, self.synthetic = model, processor, synthetic
        self.batch_size, self.mode, self.views = batch_size, mode, views
        self.stats: Counter = Counter()
        self.tokenizer = processor.tokenizer
        self.slots, self.digit_slots = self._template_slots()
        default = len(self.slots) if mode == "expected" else len(self.slots) + 32
        self.max_new_tokens = max_new_tokens if max_new_tokens is not None else default
        if mode == "expected" and self.max_new_tokens < len(self.slots):
            raise ValueError(f"LocalScorer: max_new_tokens={max_new_tokens} cannot hold the {len(self.slots)} answer-number tokens")

    def _template_slots(self):
        """Tokenize the numbers part of the answer once: label tokens are forced, digit tokens are slots.

        Digits are single tokens in the Qwen vocabulary (checked here), so the placeholder digits can be
        replaced without changing the tokens around them. Returns (slots, digit_slots) with
        digit_slots = [(step, field, position, leading-digit step), ...].
        """
        self.digit_id = digit_token_ids(self.tokenizer, "LocalScorer")
        placeholder = format_answer(0.0 if self.synthetic else None, 1.0, 1.0)  # "Fidelity: 0.00\n..." numbers only
        ids = self.tokenizer.encode(placeholder, add_special_tokens=False)
        fields = fields_for(self.synthetic)
        slots, digit_slots, k, lead_step = [], [], 0, 0
        for step, token in enumerate(ids):
            if token in self.digit_id:
                name, position = fields[k // 3], k % 3
                lead_step = step if position == 0 else lead_step
                slots.append((name, position, lead_step))
                digit_slots.append((step, name, position, lead_step))
                k += 1
            else:
                slots.append(token)
        if k != 3 * len(fields):
            raise ValueError(f"LocalScorer: expected {3 * len(fields)} digit tokens in the answer template, found {k}")
        return slots, digit_slots

    @torch.no_grad()
    def _generate(self, lr_images, sr_images, constrained: bool):
        conversations = [build_messages(lr, sr, self.synthetic) for lr, sr in zip(lr_images, sr_images)]
        batch = self.processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True, "padding_side": "left"},
        ).to(self.model.device)  # keeps mm_token_type_ids: M-RoPE needs it
        prompt_len = batch["input_ids"].shape[1]
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=False, return_dict_in_generate=True)
        if constrained:
            kwargs.update(logits_processor=[_TemplateLogits(prompt_len, self.slots, self.digit_id)], output_logits=True)
        out = self.model.generate(**batch, **kwargs)
        answer_ids = out.sequences[:, prompt_len:]  # (B, T)
        return answer_ids, out.logits if constrained else None, self.tokenizer.batch_decode(answer_ids, skip_special_tokens=False)

    def score(self, lr_images: list[Image.Image], sr_images: list[Image.Image]) -> Scores:
        """Score N pairs in batches of `batch_size`. Returns Scores with (N,) tensors."""
        _check_pairs(lr_images, sr_images)
        pairs = pairs_in_views(lr_images, sr_images, self.views)
        rows = []
        for i in range(0, len(pairs), self.batch_size):
            lr, sr = zip(*pairs[i : i + self.batch_size])
            rows += self._score_expected(lr, sr) if self.mode == "expected" else self._score_text(lr, sr)
        self.stats["pairs"] += len(lr_images)
        return _stack_scores(mean_over_views(rows, self.views, self.synthetic), self.synthetic)

    def score_group(self, lr_image: Image.Image, sr_images: list[Image.Image]) -> Scores:
        """Score K outputs of one LR; Q_LR shared across the group (`share_group_q_lr`)."""
        return share_group_q_lr(self.score([lr_image] * len(sr_images), sr_images))

    def _score_text(self, lr_images, sr_images) -> list[dict]:
        _, _, texts = self._generate(lr_images, sr_images, constrained=False)
        rows = []
        for text in texts:
            parsed = parse_answer(text, self.synthetic)
            if parsed is None:
                self.stats["invalid"] += 1
                rows.append(dict(F=None, q_lr=None, q_sr=None, valid=False, rationale="", text=text))
            else:
                self.stats["clamped"] += parsed.clamped
                rows.append(dict(F=parsed.F, q_lr=parsed.q_lr, q_sr=parsed.q_sr, valid=True, rationale=parsed.rationale, text=text))
        return rows

    def _score_expected(self, lr_images, sr_images) -> list[dict]:
        answer_ids, logits, texts = self._generate(lr_images, sr_images, constrained=True)
        probs, values = {}, {}  # field -> per position: (B, D) probabilities, the D digit values
        for step, name, position, lead_step in self.digit_slots:
            digits = allowed_digits(name, position)
            p = torch.softmax(logits[step].float()[:, [self.digit_id[d] for d in digits]], dim=-1)  # raw logits -> (B, D)
            if position > 0:  # greedy leading digit at the top of the range: decimals are 0 (forced above)
                at_top = answer_ids[:, lead_step] == self.digit_id[int(FIELD_RANGES[name][1])]
                p = torch.where(at_top[:, None], torch.eye(len(digits))[0], p)
            probs.setdefault(name, []).append(p)
            values.setdefault(name, []).append(digits)
        numbers = {name: expected_number(probs[name], values[name]) for name in probs}  # field -> (B,)
        rows = []
        for i, text in enumerate(texts):
            row = dict(F=None, valid=True, text=text)
            for name, value in numbers.items():
                row[name], was_clamped = clamp_score(float(value[i]), *FIELD_RANGES[name])
                self.stats["clamped"] += was_clamped
            clean = strip_special_tokens(text)
            reason = REASON_PATTERN.search(clean)
            row["rationale"] = " ".join(clean[reason.end() :].split()) if reason else ""
            rows.append(row)
        return rows


# =====================================================================================================
# 5. RemoteScorer: OpenAI-compatible server (vLLM at full scale, `transformers serve` on CPU)
# =====================================================================================================


class RewardServerError(RunError, RuntimeError):
    """The reward server could not be reached or refused the request (message names the URL; the scripts print
    it as one line and stop, training.run_script)."""


def expected_from_logprobs(content: list[dict], synthetic: bool) -> dict[str, float] | None:
    """Expected F / Q_LR / Q_SR from an OpenAI `choices[0].logprobs.content` list (vLLM), unclamped.

    content: [{"token": str, "logprob": float, "top_logprobs": [{"token", "logprob"}, ...]}, ...].
    Each digit of a fixed-width "a.bc" number must be its own token; its distribution is the top
    logprobs restricted to the allowed digits and renormalised (digits outside the top list count as 0).
    A number that is not fixed-width or not digit-tokenized falls back to its text value. None if the
    text does not parse.
    """
    tokens = [c["token"] for c in content]
    text = "".join(tokens)
    found = find_fields(text, synthetic)
    if found is None:
        return None
    token_at = []  # char offset -> token index
    for index, token in enumerate(tokens):
        token_at += [index] * len(token)
    values = {}
    for name, match in found.items():
        number, start = match.group(1), match.start(1)
        positions = [start, start + 2, start + 3]
        if not re.fullmatch(r"\d\.\d\d", number) or any(tokens[token_at[p]] != text[p] for p in positions):
            values[name] = float(number)  # not fixed-width / not one token per digit: text value
            continue
        probs, digit_values = [], []
        for k, p in enumerate(positions):
            digits = allowed_digits(name, k)
            top = {t["token"]: t["logprob"] for t in content[token_at[p]].get("top_logprobs") or []}
            top.setdefault(text[p], content[token_at[p]]["logprob"])  # the sampled digit itself
            weights = torch.tensor([math.exp(top[str(d)]) if str(d) in top else 0.0 for d in digits], dtype=torch.float64)
            if weights.sum() == 0:  # greedy digit outside the allowed set (e.g. "7.00" for Q)
                weights = torch.tensor([float(d == int(text[p])) for d in digits], dtype=torch.float64)
                if weights.sum() == 0:
                    values[name] = float(number)
                    break
            probs.append((weights / weights.sum())[None])
            digit_values.append(digits)
        else:
            values[name] = float(expected_number(probs, digit_values)[0])
    return values


class RemoteScorer:
    """COMPASS scoring through an OpenAI-compatible `/v1/chat/completions` server, `concurrency` in flight.

    Images go losslessly as base64 PNG data URLs. Requests ask for `logprobs` / `top_logprobs: 20` at
    temperature 0: vLLM returns them and the scores are digit expectations (module docstring);
    `transformers serve` ignores them and the reply text is parsed. An unparseable reply is retried once,
    then marked valid=False (NaN scores) and counted. Connection errors, timeouts and 5xx replies are
    retried with exponential backoff (waits backoff, 2*backoff, 4*backoff, ... s, at most 30 s each) for
    `retry_for` seconds in all (a server restarting or catching up), then `RewardServerError` names the URL;
    a 4xx reply raises at once. stats: requests (HTTP attempts),
    replies, retried (unparseable replies asked again), invalid, clamped, logprob_readouts,
    server_retries, max_in_flight. `concurrency` is the knob bench.py times (`time_remote_scoring`).
    views: as LocalScorer's (each pair sent in `views` orientations, the valid readings averaged; the stats
    count requests and replies of every view).
    """

    def __init__(
        self,
        base_url: str,
        model_name: str,
        api_key_env: str = "COMPASS_API_KEY",
        concurrency: int = 8,
        timeout: float = 60,
        retry_for: float = 600.0,
        backoff: float = 0.5,
        synthetic: bool = False,
        max_new_tokens: int = 64,
        top_logprobs: int = 20,
        views: int = 1,
    ):
        check_views(views, "RemoteScorer")
        self.views = views
        base = base_url.rstrip("/")
        base = base[: -len("/v1")] if base.endswith("/v1") else base  # accept ".../v1" as OpenAI clients do
        self.url = base + "/v1/chat/completions"
        self.model_name, self.concurrency, self.timeout = model_name, concurrency, timeout
        self.retry_for, self.backoff, self.synthetic = retry_for, backoff, synthetic
        self.max_new_tokens, self.top_logprobs = max_new_tokens, top_logprobs
        key = os.environ.get(api_key_env)
        self.headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._local = threading.local()  # one requests.Session per worker thread

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _post(self, payload: dict) -> dict:
        """POST with bounded retries on connection errors, timeouts and 5xx; 4xx raises at once."""
        import requests

        session = getattr(self._local, "session", None) or requests.Session()
        self._local.session = session
        last, start, attempt = None, time.monotonic(), 0
        while True:
            if attempt:
                wait = min(self.backoff * 2 ** (attempt - 1), 30.0)
                if time.monotonic() - start + wait > self.retry_for:
                    break
                self._count("server_retries")
                time.sleep(wait)
            attempt += 1
            with self._lock:
                self._in_flight += 1
                self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self._in_flight)
                self.stats["requests"] += 1
            try:
                reply = session.post(self.url, json=payload, headers=self.headers, timeout=self.timeout)
            except requests.RequestException as err:
                last = f"{type(err).__name__}: {err}"
                continue
            finally:
                with self._lock:
                    self._in_flight -= 1
            if reply.status_code >= 500:
                last = f"HTTP {reply.status_code}: {reply.text[:300]}"
                continue
            if reply.status_code >= 400:
                raise RewardServerError(
                    f"reward server {self.url} refused the request (HTTP {reply.status_code}: {reply.text[:300]}); "
                    f"check model_name={self.model_name!r} matches the served model"
                )
            try:
                data = reply.json()
                data["choices"][0]["message"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise RewardServerError(
                    f"reward server {self.url} answered without a chat completion: {reply.text[:300]}"
                ) from None
            return data
        raise RewardServerError(
            f"reward server {self.url} did not answer in {time.monotonic() - start:.0f} s ({attempt} attempts; "
            f"{last}). Start it "
            f"(`vllm serve CKPT ...` or `transformers serve CKPT --host 127.0.0.1 --port N --device cpu`, see "
            f"reward.py) or pass the right URL."
        )

    def _score_pair(self, lr: Image.Image, sr: Image.Image) -> dict:
        payload = {
            "model": self.model_name,
            "messages": to_openai_messages(build_messages(lr, sr, self.synthetic)),
            "temperature": 0.0,
            "max_tokens": self.max_new_tokens,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        for attempt in range(2):  # an unparseable reply is retried once
            choice = self._post(payload)["choices"][0]
            self._count("replies")
            text = choice["message"].get("content") or ""
            parsed = parse_answer(text, self.synthetic)
            if parsed is not None:
                break
            if attempt == 0:
                self._count("retried")
        if parsed is None:
            self._count("invalid")
            return dict(F=None, q_lr=None, q_sr=None, valid=False, rationale="", text=text)
        row = dict(F=parsed.F, q_lr=parsed.q_lr, q_sr=parsed.q_sr, valid=True, rationale=parsed.rationale, text=text)
        logprobs = (choice.get("logprobs") or {}).get("content")
        expected = expected_from_logprobs(logprobs, self.synthetic) if logprobs else None
        if expected is None:
            self._count("clamped", parsed.clamped)  # text read-out
            return row
        for name, value in expected.items():
            row[name], was_clamped = clamp_score(value, *FIELD_RANGES[name])
            self._count("clamped", was_clamped)
        self._count("logprob_readouts")
        return row

    def chat_texts(self, conversations: list[list[dict]]) -> list[str]:
        """Raw reply texts of several chats (processor-format messages, greedy), `concurrency` in flight, with
        the same retries and errors as scoring (used by refreward.RefRewardScorer)."""
        def one(messages: list[dict]) -> str:
            payload = {"model": self.model_name, "messages": to_openai_messages(messages), "temperature": 0.0,
                       "max_tokens": self.max_new_tokens}
            choice = self._post(payload)["choices"][0]
            self._count("replies")
            return choice["message"].get("content") or ""

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(one, conversations))

    def score(self, lr_images: list[Image.Image], sr_images: list[Image.Image]) -> Scores:
        """Score N pairs with up to `concurrency` requests in flight. Returns Scores with (N,) tensors."""
        _check_pairs(lr_images, sr_images)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            rows = list(pool.map(lambda pair: self._score_pair(*pair),
                                 pairs_in_views(lr_images, sr_images, self.views)))
        return _stack_scores(mean_over_views(rows, self.views, self.synthetic), self.synthetic)

    def score_group(self, lr_image: Image.Image, sr_images: list[Image.Image]) -> Scores:
        """Score K outputs of one LR; Q_LR shared across the group (`share_group_q_lr`)."""
        return share_group_q_lr(self.score([lr_image] * len(sr_images), sr_images))


def make_scorer(model: str = "tiny", url: str | None = None, model_name: str = "compass", synthetic: bool = True,
                concurrency: int = 8, device: str | torch.device = "cpu", views: int = 1,
                retry_for: float = 600.0) -> "LocalScorer | RemoteScorer":
    """The COMPASS scorer the scripts use: remote when `url` is given (vLLM / `transformers serve`, the
    model named `model_name` there, retried for `retry_for` seconds when it does not answer), else `model`
    ('tiny', 'mini', hub name, folder) in-process on `device` (bfloat16 on CUDA, float32 otherwise); either
    averages its readings over `views` orientations."""
    if url:
        return RemoteScorer(url, model_name, concurrency=concurrency, synthetic=synthetic, views=views,
                            retry_for=retry_for)
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    compass, processor = load_compass(model, dtype=dtype, device=device)
    return LocalScorer(compass, processor, synthetic=synthetic, views=views)


# =====================================================================================================
# 6. FidelityScorer: F against the HR for the full-reference RL stage (§4, Eq.1)
# =====================================================================================================


class FidelityMetricError(RuntimeError):
    """A fidelity metric could not be built (usually: its weights cannot be downloaded offline)."""


# the fidelities that need no downloaded weights; they are similarities (1 = same image), not distances
WEIGHTS_FREE_FIDELITY = ("ssim", "texture", "blend")


class FidelityScorer:
    """Full-reference fidelity F in [0, 1]: 1 - DISTS (Eq.1, default), 1 - LPIPS, SSIM on Y (YCbCr), or
    'texture' (evaluate.texture_fidelity: a weights-free analogue of DISTS that, unlike SSIM, does not
    prefer a blurred sample to one with re-synthesised texture), or 'blend' = (SSIM + texture) / 2, nearly
    flat when the mini SFT's samples are blurred (README "OARS in miniature").

    `fidelity(sr, hr)` takes (N, 3, H, W) tensors in [0, 1] and returns (N,) float32. DISTS / LPIPS
    need pretrained weights (pyiqa downloads them into $TORCH_HOME/hub); SSIM, texture, blend need none. Values
    outside [0, 1] are clamped and counted in stats["clamped"] so Eq.4 stays defined.
    """

    def __init__(self, metric: str = "dists", device: str = "cpu"):
        options = ("dists", "lpips", *WEIGHTS_FREE_FIDELITY)
        if metric not in options:
            raise ValueError(f"FidelityScorer: metric must be one of {list(options)}, got {metric!r}")
        try:
            if metric == "texture":
                self.metric = texture_fidelity
            elif metric == "blend":
                ssim = create_metric("SSIM", device).requires_grad_(False)
                self.metric = lambda sr, hr: (ssim(sr, hr).reshape(-1) + texture_fidelity(sr, hr)) / 2
            else:
                self.metric = create_metric(metric.upper(), device).requires_grad_(False)
        except Exception as err:  # pyiqa raises URLError / OSError / RuntimeError when weights are missing
            raise FidelityMetricError(
                f"FidelityScorer: could not build the {metric!r} metric ({type(err).__name__}: {err}). Its pretrained "
                f"weights are probably not in $TORCH_HOME/hub and this machine cannot download them: copy them "
                f"there, or use --fidelity {' / '.join(WEIGHTS_FREE_FIDELITY)} (need no weights)."
            ) from err
        self.name, self.device = metric, device
        self.stats: Counter = Counter()

    @torch.no_grad()
    def fidelity(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """F for N pairs: sr, hr (N, 3, H, W) in [0, 1] -> (N,) float32."""
        if sr.shape != hr.shape:
            raise ValueError(f"FidelityScorer.fidelity: sr {tuple(sr.shape)} and hr {tuple(hr.shape)} differ in shape")
        value = self.metric(sr.to(self.device).float(), hr.to(self.device).float()).reshape(-1).float().cpu()
        F = value if self.name in WEIGHTS_FREE_FIDELITY else 1.0 - value  # Eq.1: F = 1 - DISTS
        clamped = F.clamp(0.0, 1.0)
        self.stats["clamped"] += int((clamped != F).sum())
        return clamped
