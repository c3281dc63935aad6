"""VLCoT: the vision-language chain of thought of RealSR-R1 (paper §3.2), its token layout and its rewards (§3.3).

RealSR-R1 restores an LR image by writing, in ONE autoregressive sequence (paper Fig. 2, the public code's tags):

    <degradation>light blur, medium noise, heavy compression</degradation>
    <rough_understand>cup, saucer and table</rough_understand>       coarse understanding (main objects)
    <rough_image> [HR/4 image] </rough_image>                         coarse image (HQ downsampled by 4)
    <middle_understand>a red cup of coffee ...</middle_understand>
    <middle_image> [HR/2 image] </middle_image>                       middle image (HQ downsampled by 2)
    <final_understand>brown foam, a silver spoon ...</final_understand>
    <final_image> [HR image] </final_image>                           the restored image (full size)

This file holds, top to bottom, everything about that sequence that needs no model:

  1. Lumina-mGPT's image layout: `<racm3:break>`, a height and a width token, rows of image-code tokens each
     ended by an end-of-line token, `<eoss>` (`image_tokens` / `read_image`); the `Layout` of token ids.
  2. Constrained decoding: a tiny state machine (`DecodeState`, `constraint`, `advance`) that lets a sampler
     put image codes ONLY inside an image and forces the size tokens, the end-of-line tokens and `<eoss>`, so a
     generated image always has H rows of W codes.
  3. Reading a completion: `split_completion` cuts it into text and image segments (an image cut short stays a
     "broken" segment, never decoded), `render` writes the text with one marker per image.
  4. The four rewards as small pure functions (Eq.5 sums them): `format_reward`, `degradation_reward`,
     `understanding_reward` (and `planted_reward`, a sanity reward for tests); the generation reward needs a
     visual expert and lives in train_realsr_r1.py, with its Qwen2.5-VL prompt and parser here
     (`judge_prompt`, `parse_judge_scores`).
  5. The degradation with RECORDED parameters and its discretisation into light / medium / heavy (§3.2,
     "Degradation perception step") and the ORACLE understanding texts of the photographs the mini preset
     learns from (the paper's Qwen2.5-VL descriptions and Grounded-SAM tags, written here by hand).

Choices where the paper is silent (each documented where it is made): the text of the degradation summary, the
understanding texts, one size token per `grid` codes, a completion ends at the tokenizer's end-of-turn token.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common import data

# =====================================================================================================
# 1. Tags, prompt and Lumina-mGPT's image layout
# =====================================================================================================

TAGS: tuple[str, ...] = ("degradation", "rough_understand", "rough_image", "middle_understand", "middle_image",
                         "final_understand", "final_image")
"""The seven steps of VLCoT in order (the public code's tag names; the paper: "<degradation>...</degradation>...")."""
IMAGE_TAGS: tuple[str, ...] = ("rough_image", "middle_image", "final_image")
IMAGE_DIVISORS: tuple[int, ...] = (4, 2, 1)
"""The HQ image downsampled by 4 and 2 and at full size are the coarse, middle and final targets (§3.2)."""
TAG_TOKENS: tuple[str, ...] = tuple(t for name in TAGS for t in (f"<{name}>", f"</{name}>"))

PROMPT = ("Perceive the degradation, understand the image content, and restore the high-quality image step by step "
          "(simulating the image restoration process in three steps from coarse to fine). "
          "The low-quality image is as follows: ")
"""The paper's instruction (§3.2) followed by the public code's lead-in to the LR image."""

# Lumina-mGPT's special tokens (its FlexARItemProcessor; the names exist in its Chameleon vocabulary)
IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
NEW_LINE = "<reserved08799>"
SIZE_TOKEN_BASE = 8800  # "<reserved{8800 + n:05d}>" = an image side of n grid units


def size_token(n: int) -> str:
    """Lumina's height/width token for a side of `n` grid units (`get_n_grids_token`)."""
    return f"<reserved{SIZE_TOKEN_BASE + n:05d}>"


def image_token_name(code: int) -> str:
    """Chameleon's name of the image token of VQ code `code`: "IMGIMG" + its digits as letters A-J + "Z"
    (the inverse of transformers' ChameleonImageVocabularyMapping.bpe2img)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


@dataclass
class Layout:
    """The token ids of the image layout in one vocabulary.

    code_ids[k] is the token of VQ code k; size_ids[n] the size token of n grid units; one grid unit is `grid`
    codes (Lumina / PURE: 32 px = 4 codes of the 8x LlamaGen VQ; the mini preset: 1 code). `eos` ends a
    completion, `pad` fills batches (never sampled).
    """

    image_start: int
    image_end: int
    new_line: int
    eos: int
    pad: int
    size_ids: tuple[int, ...]
    code_ids: tuple[int, ...]
    grid: int = 1
    position_stride: int = 0
    """0: consecutive position ids (Lumina-mGPT). S > 0: the k-th image of a sequence (the prompt's LR = 0) starts at
    position first + k S (first = where the LR starts) and every token after it counts on from there
    (train_realsr_r1.position_ids): the final image's code (r, c) then sits a fixed distance 3 S from the LR's code
    (r, c) whatever the texts between them, so a small model trained from scratch can copy by relative position
    (RoPE). Not in the paper (the pretrained 7B uses consecutive ids); the mini presets use it."""

    def __post_init__(self) -> None:
        self.code_of = {t: k for k, t in enumerate(self.code_ids)}  # token id -> VQ code
        self.grids_of = {t: n for n, t in enumerate(self.size_ids)}  # token id -> grid units

    @classmethod
    def from_tokenizer(cls, tokenizer, num_codes: int, max_grids: int, grid: int = 1,
                       position_stride: int = 0) -> "Layout":
        """Look every layout token up in `tokenizer`; ValueError naming the first missing one."""
        vocab = tokenizer.get_vocab()
        names = [IMAGE_START, IMAGE_END, NEW_LINE] + [size_token(n) for n in range(max_grids + 1)] + \
            [image_token_name(k) for k in range(num_codes)]
        missing = [n for n in names if n not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks {len(missing)} layout token(s), e.g. {missing[0]!r}")
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(vocab[IMAGE_START], vocab[IMAGE_END], vocab[NEW_LINE], eos, pad,
                   tuple(vocab[size_token(n)] for n in range(max_grids + 1)),
                   tuple(vocab[image_token_name(k)] for k in range(num_codes)), grid, position_stride)

    def masks(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(text_allowed, code_allowed), each (V,) bool: the tokens a sampler may draw outside / inside an image.
        Outside: everything but image codes, end-of-line, size tokens, `<eoss>` and padding."""
        code = torch.zeros(vocab_size, dtype=torch.bool)
        code[list(self.code_ids)] = True
        text = ~code
        text[[self.new_line, self.image_end, *self.size_ids]] = False
        if self.pad != self.eos:
            text[self.pad] = False
        return text, code


def image_tokens(codes: torch.Tensor, layout: Layout) -> list[int]:
    """One image in Lumina's layout: codes (h, w) ints -> [start, H, W, row_1 EOL, ..., row_h EOL, <eoss>].

    h and w must be multiples of `layout.grid` (the size tokens count grid units)."""
    h, w = codes.shape
    if h % layout.grid or w % layout.grid:
        raise ValueError(f"image_tokens: a {h}x{w} code grid is not a multiple of the layout grid {layout.grid}")
    ids = torch.tensor(layout.code_ids)[codes.long().cpu()]  # (h, w) token ids
    rows = torch.cat([ids, torch.full((h, 1), layout.new_line)], dim=1)  # (h, w + 1): each row ends with EOL
    return [layout.image_start, layout.size_ids[h // layout.grid], layout.size_ids[w // layout.grid],
            *rows.flatten().tolist(), layout.image_end]


def read_image(ids: Sequence[int], layout: Layout) -> torch.Tensor | None:
    """Inverse of `image_tokens`: the codes (h, w) of one image segment [start ... <eoss>], or None when the
    segment breaks the layout anywhere (cut short, wrong row length, a text token inside, unknown size)."""
    ids = list(ids)
    if len(ids) < 4 or ids[0] != layout.image_start or ids[-1] != layout.image_end:
        return None
    h, w = layout.grids_of.get(ids[1]), layout.grids_of.get(ids[2])
    if not h or not w:
        return None
    h, w = h * layout.grid, w * layout.grid
    body = ids[3:-1]
    if len(body) != h * (w + 1):
        return None
    rows = [body[r * (w + 1):(r + 1) * (w + 1)] for r in range(h)]
    if any(row[-1] != layout.new_line or any(t not in layout.code_of for t in row[:-1]) for row in rows):
        return None
    return torch.tensor([[layout.code_of[t] for t in row[:-1]] for row in rows], dtype=torch.long)


def image_length(rows: int, cols: int) -> int:
    """Tokens of one image in the layout: start + 2 size tokens + rows x (cols + EOL) + end."""
    return 4 + rows * (cols + 1)


def stage_sizes(hr_size: tuple[int, int], downsample: int) -> list[tuple[int, int]]:
    """(rows, cols) of the coarse, middle and final images' code grids for an HR of `hr_size` pixels and a VQ
    that downsamples by `downsample`: HR/4, HR/2, HR (§3.2)."""
    h, w = hr_size
    return [(h // d // downsample, w // d // downsample) for d in IMAGE_DIVISORS]


# =====================================================================================================
# 2. Constrained decoding: image codes only inside an image, the layout forced
# =====================================================================================================

TEXT, CODE, FORCED, DONE = 0, 1, 2, 3
"""What a completion position is: a sampled text token, a sampled image code, a token the layout forced (size,
end-of-line, <eoss>: probability 1 under the constrained policy, so no gradient), or padding after the end."""


@dataclass
class DecodeState:
    """Where one sequence is in the layout while it is generated."""

    images: int = 0  # images completed so far
    phase: str = "text"  # text | height | width | codes | done
    rows: int = 0  # code grid of the image being written
    cols: int = 0
    r: int = 0  # position inside it
    c: int = 0


def constraint(state: DecodeState, layout: Layout, sizes: Sequence[tuple[int, int]]) -> tuple[int, int | None]:
    """(kind, forced token) of the next position: (TEXT, None), (CODE, None), (FORCED, id) or (DONE, pad).

    The k-th image of a completion gets the size sizes[k] (coarse, middle, final; later ones the last), so the
    size tokens are forced, as a Lumina sampler that is asked for a resolution forces them."""
    rows, cols = sizes[min(state.images, len(sizes) - 1)]
    if state.phase == "done":
        return DONE, layout.pad
    if state.phase == "height":
        return FORCED, layout.size_ids[rows // layout.grid]
    if state.phase == "width":
        return FORCED, layout.size_ids[cols // layout.grid]
    if state.phase == "codes":
        if state.r == state.rows:
            return FORCED, layout.image_end
        if state.c == state.cols:
            return FORCED, layout.new_line
        return CODE, None
    return TEXT, None


def advance(state: DecodeState, token: int, layout: Layout, sizes: Sequence[tuple[int, int]]) -> DecodeState:
    """The state after `token` (a new object; the input is not changed)."""
    s = DecodeState(**vars(state))
    if s.phase == "text":
        if token == layout.eos:
            s.phase = "done"
        elif token == layout.image_start:
            s.phase = "height"
            s.rows, s.cols = sizes[min(s.images, len(sizes) - 1)]
    elif s.phase == "height":
        s.phase = "width"
    elif s.phase == "width":
        s.phase, s.r, s.c = "codes", 0, 0
    elif s.phase == "codes":
        if token == layout.image_end:
            s.phase, s.images = "text", s.images + 1
        elif token == layout.new_line:
            s.r, s.c = s.r + 1, 0
        else:
            s.c += 1
    return s


# =====================================================================================================
# 3. Reading a completion
# =====================================================================================================

IMAGE_MARK = "<|image|>"
BROKEN_MARK = "<|broken_image|>"


@dataclass
class Segment:
    """A run of a completion: text (`codes` None) or one image (`codes` (h, w), None when it breaks the layout)."""

    kind: str  # "text" | "image"
    ids: list[int]
    codes: torch.Tensor | None = None

    @property
    def complete(self) -> bool:
        return self.kind == "image" and self.codes is not None


def split_completion(ids: Sequence[int], layout: Layout) -> list[Segment]:
    """Cut a completion into text and image segments. It ends at its first end-of-turn token (or padding); an
    image runs from `<racm3:break>` to the next `<eoss>` (or to the end, then it is broken)."""
    ids = list(ids)
    for stop in (layout.eos, layout.pad):
        if stop in ids:
            ids = ids[:ids.index(stop)]
    segments, i = [], 0
    while i < len(ids):
        if ids[i] == layout.image_start:
            j = ids.index(layout.image_end, i) + 1 if layout.image_end in ids[i:] else len(ids)
            segments.append(Segment("image", ids[i:j], read_image(ids[i:j], layout)))
        else:
            j = ids.index(layout.image_start, i) if layout.image_start in ids[i:] else len(ids)
            segments.append(Segment("text", ids[i:j]))
        i = j
    return segments


def render(segments: Sequence[Segment], decode) -> str:
    """The completion as text: text segments decoded with `decode` (ids -> str), each complete image as
    IMAGE_MARK, each broken one as BROKEN_MARK. The rewards read this string."""
    return "".join(decode(s.ids) if s.kind == "text" else IMAGE_MARK if s.complete else BROKEN_MARK
                   for s in segments)


def tagged_images(segments: Sequence[Segment], decode) -> dict[str, torch.Tensor | None]:
    """The complete image written right inside each image tag: {"rough_image": codes (h, w) or None, ...}.
    An image counts for a tag when the text just before it ends with `<tag>` (spaces allowed) and no other
    image of that tag came first; a broken image never counts."""
    out: dict[str, torch.Tensor | None] = {t: None for t in IMAGE_TAGS}
    before = ""
    for s in segments:
        if s.kind == "text":
            before = decode(s.ids)
            continue
        tag = next((t for t in IMAGE_TAGS if before.rstrip().endswith(f"<{t}>")), None)
        if tag is not None and s.complete and out[tag] is None:
            out[tag] = s.codes
        before = ""
    return out


# =====================================================================================================
# 4. Rewards (§3.3; Eq.5: R = R_format + R_degradation + R_understand + R_generation)
# =====================================================================================================

_TEXT = r"(?:(?!<\|).)*?"  # a text field: anything without an image marker
FORMAT_PATTERN = re.compile(r"\s*" + r"\s*".join(
    (rf"<{t}>\s*{re.escape(IMAGE_MARK)}\s*</{t}>" if t in IMAGE_TAGS else rf"<{t}>{_TEXT}</{t}>") for t in TAGS)
    + r"\s*", re.DOTALL)


def format_reward(text: str) -> float:
    """1 if the rendered completion is exactly the seven VLCoT steps, each wrapped once in its tags, in order,
    every image tag holding one COMPLETE image and the text tags none; else 0 (§3.3 "Format Reward")."""
    if any(text.count(t) != 1 for t in TAG_TOKENS):
        return 0.0
    return 1.0 if FORMAT_PATTERN.fullmatch(text) else 0.0


def tag_content(text: str, tag: str) -> str | None:
    """The text inside the first <tag>...</tag>, or None."""
    m = re.search(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return m.group(1) if m else None


DEGRADATIONS: tuple[str, ...] = ("blur", "noise", "compression")
"""The degradation components, each described by one of LEVELS (the paper's example: "light", "medium",
"heavy"). "compression" is JPEG."""
LEVELS: tuple[str, ...] = ("light", "medium", "heavy")


def parse_degradation(text: str) -> dict[str, str]:
    """{component: level} from a degradation summary such as "light blur, heavy noise, medium compression";
    the first level word written right before a component name counts."""
    found: dict[str, str] = {}
    for level, comp in re.findall(rf"\b({'|'.join(LEVELS)})\s+({'|'.join(DEGRADATIONS)})\b", text.lower()):
        found.setdefault(comp, level)
    return found


def degradation_hits(text: str, truth: dict[str, str]) -> dict[str, bool]:
    """{component: whether the level read from the first <degradation> field equals the recorded one}; no field:
    every component missed."""
    content = tag_content(text, "degradation")
    said = parse_degradation(content) if content is not None else {}
    return {comp: said.get(comp) == level for comp, level in truth.items()}


def degradation_reward(text: str, truth: dict[str, str]) -> float:
    """R_d = N_c / N_t (§3.3): the share of the degradation components whose level, read from the first
    <degradation> field, equals the level of the parameters the degradation pipeline recorded. No field: 0."""
    hits = degradation_hits(text, truth)
    return sum(hits.values()) / len(hits) if hits else 0.0


def mentions(text: str, word: str) -> bool:
    """`word` (or its plural) appears in `text` as a whole word, any case."""
    return re.search(rf"\b{re.escape(word.lower())}(?:s|es)?\b", text.lower()) is not None


def understanding_reward(text: str, objects: Sequence[str]) -> float:
    """R_u = N_hit / N_obj (§3.3): the share of the image's main objects named in the coarse understanding
    (<rough_understand>). The objects come from a detector (the paper: Grounded-SAM on the LR) or, in the mini
    world, from the ORACLE lists below. No field or no objects: 0."""
    content = tag_content(text, "rough_understand")
    if content is None or not objects:
        return 0.0
    return sum(mentions(content, o) for o in objects) / len(objects)


def planted_reward(ids: torch.Tensor, kinds: torch.Tensor, target: int) -> float:
    """A sanity reward for tests (not the paper's): the share of the sampled TEXT tokens that are `target`.
    ids, kinds: (T,) one completion and its position kinds (TEXT, CODE, FORCED, DONE)."""
    text = kinds == TEXT
    return float(((ids == target) & text).sum() / text.sum().clamp_min(1))


# ---- the generation reward's visual expert (Qwen2.5-VL, §3.3 and Appendix A.3) ----------------------

JUDGE_CRITERIA = ("quality", "realism", "consistency")
JUDGE_WEIGHTS = (1 / 3, 1 / 3, 1 / 3)
"""Appendix A.3: the expert scores each output for quality, realism and consistency (with the LR), and the scores
are "aggregated via a weighted sum"; the weights are not given: equal here."""


def judge_prompt(k: int) -> str:
    """The task text after the LR and the k candidates (the images come first in the conversation)."""
    return (f"The first image is a low-quality input; images 1 to {k} after it are restorations of it. Judge the "
            f"restorations together. For each, rate from 0 to 10 its quality (sharp, clean), realism (natural, "
            f"plausible detail) and consistency (same content and layout as the input). Answer one line per image: "
            f"'Image i: quality q, realism r, consistency c'.")


def parse_judge_scores(text: str, k: int) -> torch.Tensor:
    """(k,) weighted scores in [0, 1] from the expert's answer; NaN for an image without all three numbers."""
    out = torch.full((k,), math.nan)
    for line in text.splitlines():
        m = re.search(r"image\s*(\d+)\s*:(.*)", line, re.IGNORECASE)
        if not m or not 1 <= int(m.group(1)) <= k:
            continue
        values = [re.search(rf"{c}\D*?(\d+(?:\.\d+)?)", m.group(2), re.IGNORECASE) for c in JUDGE_CRITERIA]
        if all(values):
            scores = [min(10.0, float(v.group(1))) / 10 for v in values]
            out[int(m.group(1)) - 1] = sum(w * s for w, s in zip(JUDGE_WEIGHTS, scores))
    return out


# =====================================================================================================
# 5. Data: the degradation with recorded parameters, and the ORACLE understanding texts
# =====================================================================================================


@dataclass(frozen=True)
class DegradationRanges:
    """Uniform ranges of the recorded one-pass degradation (blur -> bicubic downscale -> noise -> JPEG)."""

    blur_sigma: tuple[float, float]
    """Gaussian blur std in HR pixels"""
    noise_sigma: tuple[float, float]
    """Gaussian noise std in 8-bit levels at LR size"""
    jpeg_quality: tuple[float, float]
    """JPEG quality (lower = heavier)"""


DEGRADATION_PRESETS = {
    # the first-order ranges of Real-ESRGAN (the paper follows SeeSR's Real-ESRGAN settings, §4.1)
    "real-esrgan": DegradationRanges((0.2, 3.0), (1.0, 30.0), (30.0, 95.0)),
    # the mini world: a 16 px LR keeps its picture (NOTES: the x4 ranges bury a 16 px LR in noise)
    "mini": DegradationRanges((0.2, 2.4), (0.0, 12.0), (50.0, 95.0)),
}


def level_of(value: float, lo: float, hi: float, heavier_when_low: bool = False) -> str:
    """Discretise a parameter drawn from U(lo, hi) into three equal intervals, light / medium / heavy (§3.2:
    "we divide the distribution ... into three uniform intervals")."""
    frac = (value - lo) / (hi - lo) if hi > lo else 0.0
    frac = 1.0 - frac if heavier_when_low else frac
    return LEVELS[min(2, max(0, int(frac * 3)))]


def sample_degradation(generator: torch.Generator, ranges: DegradationRanges) -> dict[str, float]:
    """Draw one degradation: {"blur_sigma", "noise_sigma", "jpeg_quality"}, each uniform in its range."""
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    pick = lambda r, x: r[0] + (r[1] - r[0]) * x  # noqa: E731
    return {"blur_sigma": pick(ranges.blur_sigma, u[0]), "noise_sigma": pick(ranges.noise_sigma, u[1]),
            "jpeg_quality": round(pick(ranges.jpeg_quality, u[2]))}


def degradation_levels(params: dict[str, float], ranges: DegradationRanges) -> dict[str, str]:
    """The recorded parameters as the ground truth of the degradation step: {component: level}."""
    return {"blur": level_of(params["blur_sigma"], *ranges.blur_sigma),
            "noise": level_of(params["noise_sigma"], *ranges.noise_sigma),
            "compression": level_of(params["jpeg_quality"], *ranges.jpeg_quality, heavier_when_low=True)}


def degradation_text(levels: dict[str, str]) -> str:
    """The summary text of the degradation step: "light blur, medium noise, heavy compression" (the paper's
    "[deblurring description, noise description, ...]")."""
    return ", ".join(f"{levels[c]} {c}" for c in DEGRADATIONS if c in levels)


def apply_degradation(hr: torch.Tensor, params: Sequence[dict[str, float]], generator: torch.Generator,
                      scale: int = 4) -> torch.Tensor:
    """HR (B, 3, H, W) -> LR (B, 3, H/scale, W/scale) with the recorded parameters of each image: Gaussian blur
    (sigma in HR px), bicubic downscale, Gaussian colour noise, JPEG, 8 bits (data.py's pure steps)."""
    kernels = torch.stack([data.gaussian_family_kernel(21, p["blur_sigma"], p["blur_sigma"]) for p in params])
    h, w = hr.shape[-2:]
    x = data.resize(data.filter2d(hr, kernels), (h // scale, w // scale), "bicubic").clamp(0, 1)
    sigma = torch.tensor([p["noise_sigma"] / 255.0 for p in params])
    x = data.add_gaussian_noise(x, sigma, torch.zeros(len(params), dtype=torch.bool), generator)
    return data.quantize(data.jpeg(x, [int(p["jpeg_quality"]) for p in params]))


AUGMENTATIONS = ("colour", "rotate", "grey")
"""What `augment` may do to an HR crop. Each keeps what the understanding reward compares against (the objects of a
photograph are still there, turned or recoloured); the middle / fine texts may then name wrong colours, which no
reward reads."""


def augment(hr: torch.Tensor, kinds: Sequence[str], prob: float, generator: torch.Generator) -> torch.Tensor:
    """A GRPO input made less familiar (not in the paper; an option of this project): with probability `prob`, one
    of `kinds` drawn uniformly is applied to the HR crop (3, H, W) before its degradation:
      colour: the channels in a random order, each times a gain in [0.8, 1.2];
      rotate: a quarter, half or three-quarter turn (square crops keep their size);
      grey:   the channel mean in all three channels.
    Why: a small policy memorises the ORACLE texts of its few training photographs, so on them its format and
    understanding rewards are saturated and a group carries no advantage; on a turned or recoloured crop it must
    read the picture. No kinds: the crop unchanged and nothing drawn from the generator (runs without the option
    stay identical)."""
    if not kinds:
        return hr
    if float(torch.rand((), generator=generator)) >= prob:
        return hr
    kind = kinds[int(torch.randint(len(kinds), (), generator=generator))]
    if kind == "colour":
        order = torch.randperm(3, generator=generator)
        gain = 0.8 + 0.4 * torch.rand(3, 1, 1, generator=generator)
        return (hr[order] * gain).clamp(0, 1)
    if kind == "rotate":
        return torch.rot90(hr, int(torch.randint(1, 4, (), generator=generator)), (-2, -1))
    if kind == "grey":
        return hr.mean(0, keepdim=True).expand_as(hr).clone()
    raise ValueError(f"augmentation {kind!r}: choose from {', '.join(AUGMENTATIONS)}")


def downscale(hr: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H/factor, W/factor), area average (the coarse and middle targets)."""
    return hr if factor == 1 else F.interpolate(hr, scale_factor=1 / factor, mode="area")


def colour_fix(sr: torch.Tensor, lr: torch.Tensor, sigma: float) -> torch.Tensor:
    """The colour correction of the diffusion SR line (StableSR's wavelet colour fix, also in SeeSR / OSEDiff
    inference; not in the RealSR-R1 paper, an evaluation option here): the SR's high frequencies on the low
    frequencies of the bicubic-upscaled LR, split by a Gaussian blur of std `sigma` HR px (a band below the LR's
    pixel grid, so it moves colour and brightness, not LR-pixel detail). sr (B, 3, H, W), lr (B, 3, h, w)."""
    kernel = data.gaussian_family_kernel(4 * math.ceil(2 * sigma) + 1, sigma, sigma)
    up = F.interpolate(lr.float(), size=sr.shape[-2:], mode="bicubic", align_corners=False)
    low = lambda x: data.filter2d(x, kernel)  # noqa: E731
    return (sr - low(sr) + low(up)).clamp(0, 1)


@dataclass(frozen=True)
class Caption:
    """The ORACLE understanding of one photograph: its main objects (the understanding reward's reference list,
    standing in for Grounded-SAM's tags), a middle and a fine description (standing in for the paper's three
    Qwen2.5-VL dialogue rounds, Appendix A.2)."""

    objects: tuple[str, ...]
    middle: str
    fine: str

    @property
    def coarse(self) -> str:
        """The coarse understanding: the main objects, "cup, saucer and table"."""
        o = list(self.objects)
        return o[0] if len(o) == 1 else ", ".join(o[:-1]) + " and " + o[-1]


ORACLE: dict[str, Caption] = {
    # hand-written from looking at each photograph of mini/photos.py (crops of the mini preset show most of it)
    "astronaut": Caption(("woman", "flag", "suit"), "a smiling woman in an orange suit before a flag",
                         "white patches, short hair and a model rocket"),
    "chelsea": Caption(("cat", "eyes"), "a tabby cat looking at the camera", "striped fur, green eyes and whiskers"),
    "coffee": Caption(("cup", "saucer", "table"), "a red cup of coffee on a wooden table",
                      "brown foam, a silver spoon and wood grain"),
    "rocket": Caption(("rocket", "tower", "sky"), "a white rocket between towers at dusk",
                      "thin steel beams and a dark blue sky"),
    "hubble_deep_field": Caption(("stars", "galaxies"), "many small galaxies on a black sky",
                                 "red, blue and white dots of light"),
    "immunohistochemistry": Caption(("cells", "tissue"), "brown stained tissue among blue cells",
                                    "small round nuclei and smooth brown bands"),
    "retina": Caption(("eye", "vessels"), "an orange retina with dark vessels", "branching red vessels and a bright disc"),
    "motorcycle": Caption(("motorcycle", "wheel", "shelf"), "a red motorcycle in a cluttered garage",
                          "chrome parts, black tyres and boxes on shelves"),
    "grace_hopper": Caption(("woman", "uniform", "flag"), "an old woman in a dark uniform before a flag",
                            "white hair, glasses and medals"),
    "china": Caption(("tower", "trees", "water", "sky"), "a tall pagoda among trees above a lake",
                     "curved red roofs and calm water"),
    "flower": Caption(("flower", "leaves"), "an orange dahlia on a dark green background",
                      "many pointed petals and soft leaves"),
    "I03": Caption(("hat", "wall", "sky"), "yellow, red and green hats on a wall", "bright fabric, seams and a grey sky"),
    "I04": Caption(("woman", "hat", "face"), "a smiling woman with a red hat", "blond hair, blue eyes and a necklace"),
    "I06": Caption(("boat", "water", "sky"), "an old boat with a mast on the sea", "rusty hull, ropes and small waves"),
    "I08": Caption(("house", "window", "roof"), "colourful old houses in a narrow street",
                   "wooden beams, many windows and steep roofs"),
    "I19": Caption(("house", "fence", "tower", "sky"), "a white lighthouse behind a fence",
                   "wooden boards, a lamp and a clear sky"),
    "SPAQ_10241": Caption(("road", "trees", "light"), "a quiet road at night under a street lamp",
                          "orange light, wet ground and dark trees"),
    "frame_4wrwr48cdk6rbcjl": Caption(("garden", "fountain", "trees"), "a formal garden with a fountain",
                                      "trimmed hedges, red flowers and a blue statue"),
    "frame_7gzdcz9sif0ekg31": Caption(("sun", "sky", "water", "person"), "a sunset over the sea with a person",
                                      "orange clouds, small waves and wet sand"),
    "frame_9ogwhvvy7gfj6jzh": Caption(("car", "road", "snow"), "cars on a snowy highway",
                                      "white tracks, a person and grey slush"),
    "camera": Caption(("man", "camera", "grass"), "a man with a camera on a tripod",
                      "a dark coat, a field and buildings far away"),
    "brick": Caption(("wall", "bricks"), "a wall of long bricks", "straight mortar lines and rough stone"),
    "grass": Caption(("grass",), "a field of grass", "thin blades in many shades"),
    "gravel": Caption(("stones",), "a patch of gravel", "small sharp stones and shadows"),
    "coins": Caption(("coins",), "rows of old coins", "round edges and worn faces"),
    "clock": Caption(("clock",), "a clock in soft light", "a blurry face on a smooth background"),
    "moon": Caption(("moon", "craters"), "the surface of the moon", "round craters and dusty plains"),
    "page": Caption(("text", "page"), "a printed page of text", "black letters and a title"),
    "text": Caption(("text", "paper"), "handwritten text on paper", "dark strokes, numbers and symbols"),
    "cell": Caption(("cell",), "a single round cell", "a bright center and a dark ring"),
}


def chain_texts(levels: dict[str, str], caption: Caption, tags: bool = True) -> list[str]:
    """The four text pieces of a VLCoT target around its three images (image i goes between piece i and i+1):

        <degradation>..</degradation><rough_understand>..</rough_understand><rough_image>   | coarse image |
        </rough_image><middle_understand>..</middle_understand><middle_image>               | middle image |
        </middle_image><final_understand>..</final_understand><final_image>                 | final image  |
        </final_image>

    `tags=False` writes the same chain without the tags (the public code's cold-start data)."""
    fields = [degradation_text(levels), caption.coarse, caption.middle, caption.fine]
    if not tags:
        return [f"{fields[0]}. {fields[1]}.", f" {fields[2]}.", f" {fields[3]}.", ""]
    return [f"<degradation>{fields[0]}</degradation><rough_understand>{fields[1]}</rough_understand><rough_image>",
            f"</rough_image><middle_understand>{fields[2]}</middle_understand><middle_image>",
            f"</middle_image><final_understand>{fields[3]}</final_understand><final_image>",
            "</final_image>"]


def vocabulary_texts() -> list[str]:
    """Every fixed text the mini tokenizer should hold as whole words (prompt, degradation words, the ORACLE
    texts), each also after a space and after each tag, so every word is one token wherever it stands."""
    texts = [PROMPT, ", ".join(f"{lv} {c}" for lv in LEVELS for c in DEGRADATIONS)]
    for cap in ORACLE.values():
        texts += [cap.coarse, cap.middle, cap.fine]
    return [t for text in texts for t in (text, " " + text)]


@dataclass
class Example:
    """One training or evaluation input: an HR crop, its LR and what the rewards compare against."""

    hr: torch.Tensor  # (3, H, W)
    lr: torch.Tensor  # (3, H/scale, W/scale)
    levels: dict[str, str] = field(default_factory=dict)  # recorded degradation, discretised
    caption: Caption | None = None
    photo: str = ""
