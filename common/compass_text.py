"""What COMPASS reads and writes: the prompt of one (LR, SR) pair and THE answer format.

train_compass.py teaches this format, every scorer of reward.py reads it. Choices where the paper is silent
(reward.py's docstring gives the reasons): the LR is shown at the SR's size; one user turn "Input image:
<LR> Enhanced image: <SR> <task text>"; the answer puts the numbers first, fixed width, the rationale last:

    Fidelity: 0.83
    Input quality: 2.41
    Output quality: 3.95
    Reason: <one or two sentences>
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass

from PIL import Image

F_RANGE = (0.0, 1.0)  # Eq.1
Q_RANGE = (1.0, 5.0)  # §3.2, Q-Insight scale
FIELD_LABELS = {"F": "Fidelity", "q_lr": "Input quality", "q_sr": "Output quality"}
FIELD_RANGES = {"F": F_RANGE, "q_lr": Q_RANGE, "q_sr": Q_RANGE}
REASON_LABEL = "Reason"

TASK_FULL = (
    "Task setting: fidelity and quality. Rate the enhancement from the input image to the enhanced image: "
    "the fidelity of the enhanced image to the input's content and structure (0 to 1), the perceptual "
    "quality of the input image (1 to 5) and of the enhanced image (1 to 5). Answer in exactly this format:\n"
    "Fidelity: d.dd\nInput quality: d.dd\nOutput quality: d.dd\nReason: <one or two sentences>"
)
TASK_QUALITY = (
    "Task setting: quality only. Rate the perceptual quality of the input image (1 to 5) and of the "
    "enhanced image (1 to 5). Answer in exactly this format:\n"
    "Input quality: d.dd\nOutput quality: d.dd\nReason: <one or two sentences>"
)


def fields_for(synthetic: bool) -> tuple[str, ...]:
    """The answer's number fields in answer order: ("F", "q_lr", "q_sr") or ("q_lr", "q_sr")."""
    return ("F", "q_lr", "q_sr") if synthetic else ("q_lr", "q_sr")


def build_messages(lr_image: Image.Image, sr_image: Image.Image, synthetic: bool) -> list[dict]:
    """Chat messages for one (LR, SR) pair: a single user turn, LR first, then SR, then the task text.

    The LR is resized to the SR's size (bicubic) here, so training, local and remote scoring all show
    the model the same pixels (see module docstring). Images are PIL RGB in `{"type": "image", "image":
    PIL}` parts (the processor's format); `to_openai_messages` turns them into base64 PNG `image_url`
    parts for a server. `synthetic` selects the task setting: True asks for F, Q_LR, Q_SR; False for
    Q_LR, Q_SR only.
    """
    sr = sr_image.convert("RGB")
    lr = lr_at_sr_size(lr_image, sr)
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Input image:"},
                {"type": "image", "image": lr},
                {"type": "text", "text": "\nEnhanced image:"},
                {"type": "image", "image": sr},
                {"type": "text", "text": "\n" + (TASK_FULL if synthetic else TASK_QUALITY)},
            ],
        }
    ]


def lr_at_sr_size(lr_image: Image.Image, sr_image: Image.Image) -> Image.Image:
    """The LR as the reward model sees it: RGB, resized to the SR's size with PIL bicubic (see above)."""
    lr = lr_image.convert("RGB")
    return lr if lr.size == sr_image.size else lr.resize(sr_image.size, Image.BICUBIC)


def _png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict]) -> list[dict]:
    """Processor-format messages -> OpenAI chat format (images as base64 PNG data URLs in image_url parts)."""
    out = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": _png_data_url(part["image"])}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": message["role"], "content": parts})
    return out


def format_answer(F: float | None, q_lr: float, q_sr: float, rationale: str = "") -> str:
    """THE answer text: numbers first, two decimals each, then the rationale (see module docstring).

    F=None gives the quality-only answer (no Fidelity line); rationale="" omits the Reason line.
    Values must already lie in their ranges (F in [0,1], Q in [1,5]): a label outside them is an error
    here (clamp it where the label is made and count it), not silently rewritten.
    """
    values = {"F": F, "q_lr": q_lr, "q_sr": q_sr}
    lines = []
    for name in fields_for(F is not None):
        value, (lo, hi) = float(values[name]), FIELD_RANGES[name]
        if not lo <= value <= hi:  # also rejects NaN
            raise ValueError(f"format_answer: {name}={value} is outside [{lo}, {hi}]; clamp labels before formatting")
        lines.append(f"{FIELD_LABELS[name]}: {value:.2f}")
    rationale = " ".join(rationale.split())  # one line
    if rationale:
        lines.append(f"{REASON_LABEL}: {rationale}")
    return "\n".join(lines)


@dataclass
class Parsed:
    """Scores read from one answer. F is None for the quality-only task; clamped counts clamped fields."""

    F: float | None
    q_lr: float
    q_sr: float
    rationale: str
    clamped: int


_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_NUMBER = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))"
_FIELD_PATTERNS = {
    name: re.compile(r"(?<![A-Za-z])" + r"\s+".join(label.split()) + r"\s*:\s*" + _NUMBER, re.IGNORECASE)
    for name, label in FIELD_LABELS.items()
}
REASON_PATTERN = re.compile(r"(?<![A-Za-z])" + REASON_LABEL + r"\s*:", re.IGNORECASE)


def strip_special_tokens(text: str) -> str:
    """Remove Qwen special tokens such as <|im_end|> or <|endoftext|> from generated text."""
    return _SPECIAL_TOKEN.sub("", text)


def clamp_score(value: float, lo: float, hi: float) -> tuple[float, bool]:
    """(value clamped to [lo, hi], whether it was clamped)."""
    clamped = min(max(value, lo), hi)
    return clamped, clamped != value


def find_fields(text: str, synthetic: bool) -> dict[str, re.Match] | None:
    """Regex match of each required number field, or None if one is missing or given twice differently.

    Numbers are looked up before the first "Reason:" (the format puts them first, and a rationale may
    itself say "input quality: ..."); a field missing there is looked up in the whole text, so a reply
    that writes the rationale first still parses.
    """
    reason = REASON_PATTERN.search(text)
    head = text[: reason.start()] if reason else text
    found = {}
    for name in fields_for(synthetic):
        matches = list(_FIELD_PATTERNS[name].finditer(head)) or list(_FIELD_PATTERNS[name].finditer(text))
        if not matches or len({float(m.group(1)) for m in matches}) > 1:
            return None
        found[name] = matches[0]
    return found


def parse_answer(text: str, synthetic: bool) -> Parsed | None:
    """Read F (if synthetic), Q_LR, Q_SR and the rationale from an answer; None if malformed.

    Tolerates special tokens, extra whitespace, any field order, missing decimals ("3" for 3.00) and a
    missing rationale. Malformed = a required field missing, not a number, or given twice with different
    values. Out-of-range numbers are clamped to [0,1] / [1,5] and counted in `Parsed.clamped`.
    """
    text = strip_special_tokens(text)
    found = find_fields(text, synthetic)
    if found is None:
        return None
    values, clamped = {"F": None}, 0
    for name, match in found.items():
        values[name], was_clamped = clamp_score(float(match.group(1)), *FIELD_RANGES[name])
        clamped += was_clamped
    reason = REASON_PATTERN.search(text)
    rationale = " ".join(text[reason.end() :].split()) if reason else ""
    return Parsed(F=values["F"], q_lr=values["q_lr"], q_sr=values["q_sr"], rationale=rationale, clamped=clamped)
