"""The vision-language judge model: Qwen3-VL, as COMPASS (reward.py, train_compass.py) and RefReward-SR use it.

One code path, three doors (as common/backbone.py for the SR model): a real checkpoint by hub name or folder
(Qwen/Qwen3-VL-8B-Instruct, or a COMPASS folder written by train_compass.py), the trained mini preset
("mini", shipped in mini/compass) and a tiny preset ("tiny", random weights from configs of the real
classes, for tests). `shard_vl_model` splits one over the ranks of a torchrun job with FSDP2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common import presets
from common.byte_tokenizer import QWEN_VL_CHAT_TEMPLATE, build_byte_tokenizer
from common.training import DistInfo, RunError, find_checkpoint, parameters_on_meta, shard_from_rank0

# The tiny image processor's pixel budget: a 64x64 image is 2x2 merged vision tokens, at most 4x4.
TINY_MIN_PIXELS = 32 * 32
TINY_MAX_PIXELS = 128 * 128

TINY_COMPASS = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, mrope_section=[2, 3, 3]),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, deepstack_visual_indexes=[1]),
    patch_size=16, min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS,
)
"""The tiny preset (~0.23M params): text hidden 64 x 2 layers, vision depth 2 x 32, patch 16 like the real 8B."""


def build_compass(seed: int = 0, text: dict = TINY_COMPASS["text"], vision: dict = TINY_COMPASS["vision"],
                  patch_size: int = 16, min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS,
                  words_from: Sequence[str] = ()):
    """A Qwen3-VL COMPASS with random weights and its processor, from configs of the real classes.

    Same classes as Qwen3-VL-8B (`Qwen3VLForConditionalGeneration`, `Qwen3VLProcessor`), merge size 2;
    `text` and `vision` set the sizes (mrope_section must sum to head_dim / 2; deepstack indexes lie within
    the vision depth), `patch_size` and the processor's pixel budget set how many vision tokens an image
    costs: (side / patch / 2)^2 for a square image inside [min_pixels, max_pixels]. Tokenizer: the
    byte-level Qwen2Tokenizer of byte_tokenizer.py (digits are single tokens as in the real vocabulary),
    with one token per word of `words_from`. Weights are drawn under `torch.manual_seed(seed)` inside a
    forked RNG scope: every build with the same arguments is identical and the caller's RNG is untouched.

    Returns (model in eval mode, processor).
    """
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = build_byte_tokenizer(words_from=words_from)
    tid = tokenizer.convert_tokens_to_ids
    text = dict(text)
    mrope = text.pop("mrope_section")
    rope_theta = text.pop("rope_theta", 5e6)  # the 8B's value; a small head_dim may want a smaller one
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),  # must cover every token id, specials included
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope,
                             "mrope_interleaved": True},
            pad_token_id=tid("<|endoftext|>"),
            **text,
        ),
        vision_config=dict(
            patch_size=patch_size,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=text["hidden_size"],  # the merger projects into the text width
            num_position_embeddings=64,  # 8x8 learned grid, interpolated to the image grid
            **vision,
        ),
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.eval()
    model.generation_config.eos_token_id = tid("<|im_end|>")
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    model.generation_config.do_sample = False

    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],  # Qwen3-VL's normalisation
        image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(  # unused, but Qwen3VLProcessor requires one
        size={"shortest_edge": min_pixels, "longest_edge": 4 * max_pixels}, patch_size=patch_size,
        temporal_patch_size=2, merge_size=2
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_VL_CHAT_TEMPLATE,  # saved as chat_template.jinja: `transformers serve` needs it
    )
    return model, processor


def build_tiny_compass(seed: int = 0):
    """The tiny COMPASS preset (`TINY_COMPASS`, random weights): (model in eval mode, processor)."""
    return build_compass(seed)


def load_compass(model: str = "tiny", dtype: torch.dtype = torch.float32, device: str = "cpu", on_meta: bool = False):
    """COMPASS model and processor: "tiny" (seed 0 preset), "mini" (the trained mini preset shipped in
    mini/compass, built by mini/build_compass.py) or a hub name / local folder (from_pretrained).

    A checkpoint folder written by train_compass.py (`save_pretrained` of model and processor) loads
    back to identical outputs. `on_meta`: the model from its config with parameters on the meta device
    (weights not read), for FSDP2 ranks that receive their shards from rank 0. Returns (model in eval
    mode on `device`, processor).
    """
    if model == "tiny":
        with parameters_on_meta(on_meta):
            m, processor = build_tiny_compass()
        return (m if on_meta else m.to(device=device, dtype=dtype)), processor
    from transformers import AutoConfig, AutoProcessor, Qwen3VLForConditionalGeneration

    model = str(presets.mini_compass()) if model == "mini" else find_checkpoint(
        model, "COMPASS checkpoint", "a COMPASS folder written by train_compass.py")  # one line if missing
    try:
        if on_meta:
            with parameters_on_meta():
                m = Qwen3VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(model), dtype=dtype)
        else:
            m = Qwen3VLForConditionalGeneration.from_pretrained(model, dtype=dtype)
        processor = AutoProcessor.from_pretrained(model)
    except OSError as err:  # not on disk, not downloadable: one line that says what to pass
        raise RunError(
            f"COMPASS checkpoint {model!r}: no such folder, and not downloadable here ({type(err).__name__}). Pass "
            f"the folder train_compass.py wrote (model + processor), serve it and pass --reward-url, or use 'mini' "
            f"(the trained laptop preset) or 'tiny' (random weights, for tests)."
        ) from None
    return (m if on_meta else m.to(device)).eval(), processor


def shard_vl_model(model, dist_info: DistInfo, bf16: bool) -> None:
    """FSDP2 for Qwen3-VL: every vision block and every decoder layer, then the root (embeddings, merger,
    lm_head), the weights broadcast from rank 0; see `training.shard_from_rank0`."""
    inner = model.model  # Qwen3VLModel: .visual.blocks, .language_model.layers
    shard_from_rank0(model, [*inner.visual.blocks, *inner.language_model.layers], dist_info, bf16)
