"""RefReward-SR: an LR-conditioned PAIRWISE reward model, its data, prompt, verdict and scorers.

RefReward-SR (the project's second seed paper; abstract only, no public code) judges two HR candidates
CONDITIONED ON THEIR LR input (the LR is the semantic anchor), by reasoning in an MLLM fine-tuned with GRPO
on pairwise rankings (RefSR-18K: LR-HR consistency and HR naturalness), and rewards GRPO training of the
SR model with it. It is COMPASS's sibling: the same inputs (LR, SR) and model class (Qwen3-VL), a
relative judgement instead of absolute scores, RL instead of SFT for the reward model. This file holds,
top to bottom:

  1. the pairs data format (JSONL, validated with file:line errors) and a builder that derives pairs from
     a COMPASS annotation file, so both reward models train from one data set;
  2. the prompt (LR, candidate A, candidate B, task text) and THE answer format
     `<think>short reasoning</think><answer>A</answer>`, with a strict verdict parser;
  3. the GRPO pieces that are specific to a text policy: per-token log-probabilities of the sampled
     answers and the k3 KL estimator (the group advantages and the clipped surrogate are flow_grpo.py's);
  4. scorers: in-process and remote, both orders asked for every pair (position bias), and the
     conversion of K samples of one LR into per-sample rewards for RL (win rate, or against the bicubic
     upscale as the anchor).

Choices where the abstract is silent (each an option): pairs from COMPASS labels ordered by their Eq.4
value with a minimum margin; the order of A and B drawn at random in training and asked both ways at
scoring time (a verdict that flips with the order is "position-inconsistent": counted and excluded, never
a tie); per-sample reward = win rate over the group's other samples; rule rewards 1 for a correct verdict,
0.2 for a well-formed answer.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import reward
from common import compass_text as CT
from common import data, presets
from common import vl_model as VL
from common.training import atomic_write_text, parameters_on_meta

# =====================================================================================================
# 1. Data: LR-conditioned pairwise preferences
# =====================================================================================================


@dataclass
class Pair:
    """One preference: `preferred` ("a" or "b") is the better SR of `lr`. Paths relative to the root."""

    lr: str
    sr_a: str
    sr_b: str
    preferred: str
    group: str = ""
    reason: str = ""
    where: str = ""  # "file:line" (errors only)
    score_a: float | None = None  # the labels' Eq.4 reward of each candidate, where the pair came from labels
    score_b: float | None = None  # (pairs_from_compass): what `--warmup-verdicts readings` writes in the think

    def to_json(self) -> dict:
        d = {"lr": self.lr, "sr_a": self.sr_a, "sr_b": self.sr_b, "preferred": self.preferred, "group": self.group,
             "reason": self.reason}
        scores = {k: v for k, v in (("score_a", self.score_a), ("score_b", self.score_b)) if v is not None}
        return {**{k: v for k, v in d.items() if v}, **scores}


def load_pairs(path: str | Path, root: str | Path | None = None) -> list[Pair]:
    """Read and validate a pairs JSONL: {"lr", "sr_a", "sr_b", "preferred": "a"|"b", "group"?, "reason"?,
    "score_a"?, "score_b"?} (the scores: numbers, both or neither).

    Every bad record is refused with FILE:LINE (not JSON, a field missing, `preferred` not a/b, sr_a ==
    sr_b); then every image that does not exist (relative to `root`, default: the JSONL's folder) is named,
    all of them in one error, before any training starts.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path} (make one with `train_refreward.py pairs`)")
    root = Path(root) if root else path.parent
    pairs, errors = [], []
    for where, obj in data.jsonl_objects(path, errors):
        missing = [k for k in ("lr", "sr_a", "sr_b", "preferred") if not obj.get(k)]
        if missing:
            errors.append(f"{where}: missing field(s) {missing}; a record needs lr, sr_a, sr_b, preferred")
            continue
        if str(obj["preferred"]).lower() not in ("a", "b"):
            errors.append(f"{where}: preferred={obj['preferred']!r} must be 'a' or 'b'")
            continue
        if obj["sr_a"] == obj["sr_b"]:
            errors.append(f"{where}: sr_a and sr_b are the same file ({obj['sr_a']})")
            continue
        scores = [obj.get(k) for k in ("score_a", "score_b")]
        if (scores[0] is None) != (scores[1] is None) or any(
                v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in scores):
            errors.append(f"{where}: score_a={scores[0]!r}, score_b={scores[1]!r}: both numbers or neither")
            continue
        pairs.append(Pair(str(obj["lr"]), str(obj["sr_a"]), str(obj["sr_b"]), str(obj["preferred"]).lower(),
                          str(obj.get("group") or ""), str(obj.get("reason") or ""), where,
                          *(None if v is None else float(v) for v in scores)))
    if errors:
        raise ValueError(f"{len(errors)} invalid record(s) in {path}:\n  " + "\n  ".join(errors[:20]))
    if not pairs:
        raise ValueError(f"{path}: no pair")
    missing = sorted({f"{root / p}" for pair in pairs for p in (pair.lr, pair.sr_a, pair.sr_b) if not (root / p).is_file()})
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) named in {path} do not exist (paths are relative to "
                                f"{root}; check --root):\n  " + "\n  ".join(missing))
    return pairs


def pairs_from_compass(records: Sequence, margin: float = 0.1, gamma: float = 7.0, seed: int = 0) -> list[Pair]:
    """Pairs inside each group of a COMPASS annotation (train_compass.Record list), ordered by their labels.

    Two SRs of one LR form a pair when their label rewards (Eq.4 of F, Q_LR, Q_SR; F = 1 where there is no
    GT) differ by at least `margin`; the better one is preferred. Which of the two is "a" is drawn at random
    (seeded), so a position carries no information. The reason names the label differences.
    """
    def record_score(r, gamma: float) -> float:
        return reward.label_reward(r.F, r.q_lr, r.q_sr, gamma)

    rng = random.Random(seed)
    groups: dict[str, list] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    pairs = []
    for name, recs in groups.items():
        for i in range(len(recs)):
            for j in range(i + 1, len(recs)):
                better, worse = sorted((recs[i], recs[j]), key=lambda r: record_score(r, gamma), reverse=True)
                if record_score(better, gamma) - record_score(worse, gamma) < margin:
                    continue
                first_is_better = rng.random() < 0.5
                a, b = (better, worse) if first_is_better else (worse, better)
                pairs.append(Pair(better.lr, a.sr, b.sr, "a" if first_is_better else "b", name,
                                  reason_from_labels(better, worse), score_a=round(record_score(a, gamma), 4),
                                  score_b=round(record_score(b, gamma), 4)))
    return pairs


def reason_from_labels(better, worse) -> str:
    """A one-line rationale from two COMPASS records' labels (the better one first)."""
    parts = []
    if better.F is not None and worse.F is not None and abs(better.F - worse.F) >= 0.02:
        parts.append("more faithful to the input" if better.F > worse.F else "less faithful but")
    if abs(better.q_sr - worse.q_sr) >= 0.1:
        parts.append("looks cleaner and sharper" if better.q_sr > worse.q_sr else "looks a little softer")
    return "The preferred image " + (" and ".join(parts) if parts else "is better overall") + "."


def write_pairs(pairs: Sequence[Pair], path: str | Path) -> Path:
    atomic_write_text("".join(json.dumps(p.to_json()) + "\n" for p in pairs), path)
    return Path(path)


# =====================================================================================================
# 2. Prompt and THE answer format
# =====================================================================================================

TASK = ("Task: compare two super-resolved versions of the low-resolution image. Judge which candidate is "
        "the better enhancement of it: faithful to its content and structure, and natural, clean and sharp. "
        "Think briefly, then answer in exactly this format: <think>reasoning</think><answer>A</answer> "
        "or <think>reasoning</think><answer>B</answer>")
TEXTS = ["Low-resolution image:", "\nCandidate A:", "\nCandidate B:", TASK, "<think></think><answer></answer>"]


def build_pair_messages(lr: Image.Image, sr_a: Image.Image, sr_b: Image.Image) -> list[dict]:
    """One user turn: the LR (resized to the candidates' size, as COMPASS sees it), candidate A, candidate B,
    the task text. Images are PIL parts; CT.to_openai_messages turns them into data URLs."""
    a, b = sr_a.convert("RGB"), sr_b.convert("RGB")
    return [{"role": "user", "content": [
        {"type": "text", "text": "Low-resolution image:"}, {"type": "image", "image": CT.lr_at_sr_size(lr, a)},
        {"type": "text", "text": "\nCandidate A:"}, {"type": "image", "image": a},
        {"type": "text", "text": "\nCandidate B:"}, {"type": "image", "image": b},
        {"type": "text", "text": "\n" + TASK}]}]


def readings(score_a: float, score_b: float) -> str:
    """The think of a `--warmup-verdicts readings` answer: both candidates' rewards, "A 3.1 B 1.2". A verdict
    after the two readings is what the mini judge learns; a verdict alone it does not (mini/README.md)."""
    return f"A {score_a:.1f} B {score_b:.1f}"


def format_verdict(verdict: str, reason: str = "") -> str:
    """THE answer: `<think>{reason}</think><answer>{A|B}</answer>`."""
    if verdict not in ("A", "B"):
        raise ValueError(f"format_verdict: verdict must be 'A' or 'B', got {verdict!r}")
    return f"<think>{' '.join(reason.split())}</think><answer>{verdict}</answer>"


ANSWER_END = "</answer>"
_ANSWER = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.IGNORECASE | re.DOTALL)


def parse_verdict(text: str) -> str | None:
    """"A" or "B" from an answer, or None when it is not well formed.

    The answer ends at its first </answer> (where generation stops, `answer_generation_kwargs`): anything
    after it is ignored. Well formed: one <answer>...</answer> holding exactly A or B (case and surrounding
    spaces ignored), after a <think>...</think> block. No answer, "A and B", "A/B", text around the letter,
    a second <answer> before the first </answer> or a missing think block: None (the callers count it as
    invalid, never as a tie).
    """
    text = CT.strip_special_tokens(text)
    end = re.search(re.escape(ANSWER_END), text, re.IGNORECASE)
    text = text[:end.end()] if end else text
    answers = _ANSWER.findall(text)
    if len(answers) != 1 or not re.search(r"<think>.*?</think>", text, re.IGNORECASE | re.DOTALL):
        return None
    verdict = answers[0].strip().upper()
    return verdict if verdict in ("A", "B") else None


def answer_generation_kwargs(tokenizer) -> dict:
    """`generate()` arguments of every RefReward answer, sampled (GRPO) or greedy (scoring).

    - The image/video placeholder tokens are suppressed: an answer must never contain them (a sampled
      <|image_pad|> would break the model's count of image features).
    - The answer ends at its first `</answer>` (kept in the text): the verdict is complete there, so the
      policy is neither rewarded nor penalised for what it would write after it, and a small model need not
      also learn to end its turn (without the stop, answers such as "...<answer>A</answer>A</answer>" are
      invalid although the verdict was given). `parse_verdict` reads an answer only up to its first
      `</answer>`, so a served model's reply (no stop sent: `transformers serve` fails on stop strings with
      a multimodal processor) gets the same verdict as the local greedy answer.
    """
    return {"suppress_tokens": vision_token_ids(tokenizer), "stop_strings": [ANSWER_END], "tokenizer": tokenizer}


def vision_token_ids(tokenizer) -> list[int]:
    """The image/video placeholder tokens, which generation suppresses (`answer_generation_kwargs`)."""
    return tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])


def rule_reward(text: str, truth: str, format_weight: float = 0.2) -> float:
    """GRPO's rule reward of one sampled answer: 1 for the correct verdict + `format_weight` if well formed."""
    verdict = parse_verdict(text)
    return (verdict == truth.upper()) * 1.0 + (verdict is not None) * format_weight


# =====================================================================================================
# 3. GRPO pieces of a text policy
# =====================================================================================================


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token_t | prefix) per position: logits (B,T,V) predicting tokens (B,T) -> (B,T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def kl_k3(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(ref - cur) - (ref - cur) - 1 >= 0 (unbiased, low variance;
    the estimator of DeepSeekMath's GRPO), from the sampled tokens' log-probabilities."""
    d = ref_log_prob.detach() - log_prob
    return torch.exp(d) - d - 1


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over the answer tokens: (B,T), mask (B,T) -> (B,)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


# =====================================================================================================
# 4. Scorers
# =====================================================================================================


def both_orders(first: str | None, swapped: str | None) -> str | None:
    """The verdict on (x, y) asked as (A=x, B=y) and as (A=y, B=x): "x", "y", or None when either answer
    is invalid or the two disagree (the model chose a POSITION, not an image)."""
    if first is None or swapped is None:
        return None
    x_wins, x_wins_swapped = first == "A", swapped == "B"
    return ("x" if x_wins else "y") if x_wins == x_wins_swapped else None


class RefRewardScorer:
    """Pairwise verdicts of a RefReward model, in-process (greedy) or remote (an OpenAI-compatible server).

    `compare(lr, xs, ys)` asks every pair in both orders and returns, per pair, "x", "y" or None; stats
    count invalid answers and position-inconsistent pairs. `score_group(lr, srs)` turns the K samples of
    one LR into per-sample rewards (reward.Scores with q_sr = the reward, F = 1, q_lr = 1, so Eq.4 is the
    reward itself): `mode` "winrate" (share of the other samples it beats; every pair of the group is asked)
    or "anchor" (1 if it beats the bicubic upscale of the LR, 0 if not: K comparisons instead of K(K-1)/2).
    A sample whose verdicts are all invalid has no reward (valid=False).
    """

    def __init__(self, model=None, processor=None, url: str | None = None, model_name: str = "refreward",
                 mode: str = "winrate", batch_size: int = 8, max_new_tokens: int = 48, concurrency: int = 8):
        if mode not in ("winrate", "anchor"):
            raise ValueError(f"RefRewardScorer: mode must be 'winrate' or 'anchor', got {mode!r}")
        self.model, self.processor, self.mode, self.batch_size = model, processor, mode, batch_size
        self.max_new_tokens = max_new_tokens
        self.remote = reward.RemoteScorer(url, model_name, concurrency=concurrency, max_new_tokens=max_new_tokens) \
            if url else None
        self.stats: Counter = Counter()

    def answers(self, lrs: list, xs: list, ys: list) -> list[str]:
        """Raw answers to the prompts (lr, A=x, B=y)."""
        conversations = [build_pair_messages(lr, x, y) for lr, x, y in zip(lrs, xs, ys)]
        if self.remote is not None:
            return self.remote.chat_texts(conversations)  # read up to the first </answer> (parse_verdict)
        texts = []
        for i in range(0, len(conversations), self.batch_size):
            batch = self.processor.apply_chat_template(
                conversations[i:i + self.batch_size], add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt", processor_kwargs={"padding": True, "padding_side": "left"}).to(self.model.device)
            with torch.no_grad():
                out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                          **answer_generation_kwargs(self.processor.tokenizer))
            texts += self.processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:])
        return texts

    def compare(self, lr: Image.Image, xs: list, ys: list) -> list[str | None]:
        """Verdicts for the pairs (xs[i], ys[i]) of one LR, each asked in both orders."""
        n = len(xs)
        texts = self.answers([lr] * 2 * n, list(xs) + list(ys), list(ys) + list(xs))
        verdicts = [parse_verdict(t) for t in texts]
        self.stats["answers"] += 2 * n
        self.stats["invalid"] += sum(v is None for v in verdicts)
        out = [both_orders(verdicts[i], verdicts[n + i]) for i in range(n)]
        self.stats["position_inconsistent"] += sum(o is None and verdicts[i] is not None and verdicts[n + i] is not None
                                                   for i, o in enumerate(out))
        self.stats["pairs"] += n
        return out

    def group_rewards(self, lr: Image.Image, srs: list) -> torch.Tensor:
        """(K,) rewards in [0, 1] (NaN where no verdict counted)."""
        k = len(srs)
        wins, counted = torch.zeros(k), torch.zeros(k)
        if self.mode == "anchor":
            anchor = lr.convert("RGB").resize(srs[0].size, Image.BICUBIC)
            for i, v in enumerate(self.compare(lr, list(srs), [anchor] * k)):
                if v is not None:
                    wins[i] += v == "x"
                    counted[i] += 1
        else:
            pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
            for (i, j), v in zip(pairs, self.compare(lr, [srs[i] for i, _ in pairs], [srs[j] for _, j in pairs])):
                if v is not None:
                    wins[i if v == "x" else j] += 1
                    counted[i] += 1
                    counted[j] += 1
        return torch.where(counted > 0, wins / counted.clamp_min(1), torch.full((k,), math.nan))

    def score_group(self, lr_image: Image.Image, sr_images: list) -> reward.Scores:
        """The reward.Scorer interface: q_sr = the pairwise reward, F = Q_LR = 1 (so Eq.4 returns q_sr)."""
        r = self.group_rewards(lr_image, sr_images)
        valid = ~torch.isnan(r)
        k = len(sr_images)
        return reward.Scores(F=torch.ones(k), q_lr=torch.ones(k), q_sr=r, valid=valid, rationale=[""] * k)

    def score(self, lr_images: list, sr_images: list) -> reward.Scores:
        """Per-pair scoring is not defined for a pairwise model: score each LR's group (all share one LR)."""
        if len(set(map(id, lr_images))) != 1:
            raise ValueError("RefRewardScorer.score: a pairwise reward compares the SRs of ONE LR; use score_group")
        return self.score_group(lr_images[0], sr_images)


def load_refreward(model: str = "tiny", device: str = "cpu", dtype: torch.dtype = torch.float32,
                   on_meta: bool = False):
    """(model, processor): 'tiny' (the tiny Qwen3-VL of common/vl_model.py with the RefReward words as tokens),
    'mini' (the shipped mini RefReward in mini/refreward) or a folder / hub name. `on_meta`: parameters on
    the meta device, for the FSDP2 ranks that receive their shards from rank 0 (vl_model.load_compass)."""
    if model == "tiny":
        with parameters_on_meta(on_meta):
            m, processor = VL.build_compass(0, words_from=TEXTS)
        return (m if on_meta else m.to(device=device, dtype=dtype)), processor
    return VL.load_compass(str(presets.mini_refreward()) if model == "mini" else model, dtype=dtype,
                           device=device, on_meta=on_meta)


# =====================================================================================================
# 5. The seam into the OARS RL stages (rl_fr.py / rl_nr.py --reward refreward)
# =====================================================================================================


@dataclass
class Options:
    """RefReward-SR as the RL reward (--reward refreward)"""

    refreward_model: str = "out/refreward"
    """the judge, in-process (--reward-url serves it instead): the folder train_refreward.py wrote (default: its
    default output), 'mini' or 'tiny'"""
    refreward_mode: str = "winrate"
    """'winrate' (every pair of the group asked) or 'anchor' (each sample against the bicubic upscale)"""


def group_reward(options: Options, url: str | None, model_name: str, concurrency: int,
                 device: str | torch.device = "cpu") -> Callable[[dict, torch.Tensor], reward.Scores]:
    """The RL reward of one group: (dataset item with its "lr", K decoded samples (K,3,H,W)) -> reward.Scores
    whose Eq.4 value is each sample's pairwise reward (RefRewardScorer.score_group)."""
    model, processor = (None, None) if url else load_refreward(options.refreward_model, device=str(device))
    scorer = RefRewardScorer(model, processor, url=url, model_name=model_name, mode=options.refreward_mode,
                             concurrency=concurrency)
    return lambda item, srs: scorer.score_group(data.to_pil(item["lr"]), [data.to_pil(s) for s in srs])
