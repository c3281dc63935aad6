"""The backbone every OARS stage stands on: Qwen-Image-Edit-2509 used as a 4x super-resolution model.

Paper §4 and §5.1: the policy v_theta(x_t, t | x_LR, c) is Qwen-Image-Edit-2509 (a 20B MMDiT flow-matching
transformer, a Qwen2.5-VL text encoder, a 3-D causal VAE). For SR the "edit" input is the LR image
upscaled 4x, and the instruction c is a fixed "enhance" prompt.

One code path, three doors:
    load_backbone("Qwen/Qwen-Image-Edit-2509")  # or a local folder: diffusers `from_pretrained`
    load_backbone("mini")                       # small configs of the SAME classes, weights trained on a
                                                # CPU by mini/build_backbone.py and shipped in mini/
    load_backbone("tiny")                       # the SAME classes from tiny configs, random weights
The tiny preset is deterministic (weights drawn from a fixed seed inside a forked RNG), so separate
processes (SFT, RL, inference) all build identical base weights; it needs no download. The mini preset
is the base model of the paper in miniature (a general image-to-image model); `--sft mini` selects its
cold start (`mini/sft/transformer.safetensors`, made by train_sft.py).

The functions below re-state what `QwenImageEditPlusPipeline.__call__` does, split into the pieces the
training stages need (condition encoding once per LR, VAE, packing, sigma schedule, one velocity call,
a batched Euler sampler). `tests/test_backbone.py` checks they reproduce the stock pipeline.

Shapes: B batch, K samples per condition, H x W output pixels, f = the VAE's spatial factor
(`vae_scale_factor`: 8 for the real model and the tiny preset, 4 for the mini preset), h = H/f, w = W/f
latent size, N = (h/2)*(w/2) packed tokens, C = the VAE's z_dim latent channels (16 real), packed
channel dim 4C (64 real). Output sides must be multiples of 2f (`Backbone.size_multiple`).
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# bitsandbytes (pulled in by diffusers, transformers and pyiqa) logs a warning about an optional 4-bit CPU
# kernel when it is imported; nothing here uses 4-bit weights.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
from diffusers import (  # noqa: E402
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
    CONDITION_IMAGE_SIZE,
    calculate_dimensions,
    calculate_shift,
)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from common import presets
from common import training as T
from common.byte_tokenizer import build_byte_tokenizer
from common.data import to_pil

REAL_MODEL = "Qwen/Qwen-Image-Edit-2509"

# The enhanced prompt c of Eq.5 (the paper does not print its wording; this one is an option, --prompt).
DEFAULT_PROMPT = (
    "Enhance this image: restore it into a high-resolution, sharp, clean photograph with realistic "
    "fine details, removing blur, noise and compression artifacts, while keeping the content, "
    "structure and colors faithful to the input."
)

# Attention projections of every MMDiT block (image and text streams), as in diffusers' Qwen-Image
# LoRA trainer. Pass `targets=` to `add_lora` to include the MLPs too (DiffSynth-style trainers do).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

# Where the VL text encoder's system prefix ends is found by tokenizing it (see `prompt_drop_index`).
_TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input "
    "where appropriate.<|im_end|>\n<|im_start|>user\n"
)
_TEMPLATE = _TEMPLATE_PREFIX + "{}<|im_end|>\n<|im_start|>assistant\n"
_IMAGE_SLOT = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"


# ====================================================================================================
# Loading: the real checkpoint or the tiny preset, same classes
# ====================================================================================================


@dataclass
class Backbone:
    """The components of Qwen-Image-Edit-2509 (real or tiny) plus two derived constants."""

    transformer: QwenImageTransformer2DModel
    vae: AutoencoderKLQwenImage
    text_encoder: Qwen2_5_VLForConditionalGeneration
    processor: Qwen2VLProcessor
    scheduler: FlowMatchEulerDiscreteScheduler
    prompt_drop_idx: int  # tokens of the system prefix dropped from the prompt embedding
    name: str = "tiny"
    vae_scale_factor: int = field(init=False)

    def __post_init__(self) -> None:
        # as the stock pipeline: one 2x spatial downsample per entry (8 for the real VAE)
        self.vae_scale_factor = 2 ** len(self.vae.temperal_downsample)

    @property
    def size_multiple(self) -> int:
        """Output sides must be multiples of this: the VAE factor times the transformer's 2x2 packing."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def pipeline(self) -> QwenImageEditPlusPipeline:
        """The stock diffusers pipeline around the SAME modules (no copy), e.g. for LoRA loading tests."""
        pipe = QwenImageEditPlusPipeline(
            scheduler=self.scheduler, vae=self.vae, text_encoder=self.text_encoder,
            tokenizer=self.processor.tokenizer, processor=self.processor, transformer=self.transformer)
        pipe.prompt_template_encode_start_idx = self.prompt_drop_idx
        pipe.set_progress_bar_config(disable=True)
        return pipe


def prompt_drop_index(tokenizer) -> int:
    """Number of tokens of the text encoder's system prefix (64 for the real Qwen tokenizer).

    The stock pipeline hard-codes 64; the tiny byte-level tokenizer needs its own count.
    """
    return len(tokenizer(_TEMPLATE_PREFIX, add_special_tokens=False).input_ids)


def build_tiny_components(seed: int = 0, words_from: tuple[str, ...] = (), transformer_on_meta: bool = False) -> dict:
    """Tiny configs of the real classes with deterministic random weights (~11 MB, no download).

    The RNG is forked, so building the preset neither depends on nor changes the caller's RNG state.
    `words_from`: texts whose words become single tokens (byte_tokenizer.word_merges; the mini preset).
    The transformer is built last, so `transformer_on_meta` (its parameters on the meta device, for FSDP2
    ranks that receive their shards from rank 0) leaves the other components' weights unchanged.
    """
    tokenizer = build_byte_tokenizer(words_from=words_from)
    ids = tokenizer.convert_tokens_to_ids
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 4]},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
        vision_config = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=[1])
        te_config = Qwen2_5_VLConfig(
            text_config=text_config, vision_config=vision_config,
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
            temperal_downsample=[False, True, True])
        with T.parameters_on_meta(transformer_on_meta):
            transformer = QwenImageTransformer2DModel(
                patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    # Small image processor limits: the VL branch of the tiny model sees at most ~128x128 pixels.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    video_processor = Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=tokenizer.chat_template)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True, num_train_timesteps=1000)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, processor=processor,
                scheduler=scheduler)


def load_backbone(model: str = "tiny", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  text_encoder_device: str | torch.device | None = None, seed: int = 0,
                  transformer_on_meta: bool = False, transformer_device: str | torch.device | None = None
                  ) -> Backbone:
    """Load Qwen-Image-Edit-2509 by hub name or local folder, the shipped mini preset (`model="mini"`),
    or build the tiny preset (`model="tiny"`). Every component in `dtype` (the hub checkpoint is bf16).

    `text_encoder_device` lets the (frozen, used once per LR) text encoder live elsewhere, e.g. "cpu"
    while the transformer trains on the GPU (`text_encoder_on` brings it over for an encoding).
    `transformer_device` (default `device`): "cpu" keeps the transformer on the host, e.g. on the FSDP2
    rank that shards it out. `transformer_on_meta`: build the transformer from its config with its
    parameters on the meta device (no memory, weights not read), for the FSDP2 ranks that receive their
    shards from rank 0 (`training.shard_from_rank0`); the other components load as usual.
    """
    if model == "tiny":
        parts = build_tiny_components(seed, transformer_on_meta=transformer_on_meta)
    else:
        path = presets.mini_backbone() if model == "mini" else Path(T.find_checkpoint(model, "--model", REAL_MODEL))
        if path.exists() and not (path / "model_index.json").exists():
            raise T.RunError(
                f"--model {model}: folder has no model_index.json. Pass a diffusers pipeline folder "
                f"(e.g. a download of {REAL_MODEL}), 'mini' or 'tiny'.")
        extra = {}
        try:
            if transformer_on_meta:
                with T.parameters_on_meta():
                    config = QwenImageTransformer2DModel.load_config(str(path), subfolder="transformer")
                    extra["transformer"] = QwenImageTransformer2DModel.from_config(config)
            pipe = QwenImageEditPlusPipeline.from_pretrained(str(path), dtype=dtype, **extra)
        except OSError as err:  # not downloadable (a typo, no access): one line, not three tracebacks
            raise T.RunError(f"--model {model}: could not be loaded ({type(err).__name__}: {str(err)[:200]}). Pass a "
                             f"download of {REAL_MODEL}, or --model mini / --model tiny.") from None
        parts = dict(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                     processor=pipe.processor, scheduler=pipe.scheduler)
    single_frame_convs(parts["vae"])
    te_device = text_encoder_device or device
    for name, dev in (("transformer", transformer_device or device), ("vae", device), ("text_encoder", te_device)):
        if not (name == "transformer" and transformer_on_meta):  # meta parameters stay where FSDP2 puts them
            place(parts[name], dev, dtype)
        parts[name].requires_grad_(False).eval()
    return Backbone(**parts, prompt_drop_idx=prompt_drop_index(parts["processor"].tokenizer), name=model)


@contextmanager
def text_encoder_on(backbone: Backbone, device: str | torch.device):
    """Run with the text encoder on `device`, then put it back where it was (--offload-text-encoder: the 8B
    encoder waits on the host in bf16 and crosses to the GPU for each batch's conditioning, ~17 GB over PCIe,
    instead of running there on one CPU thread per rank, ~30 s per LR image)."""
    home = backbone.text_encoder.device
    backbone.text_encoder.to(device)
    try:
        yield backbone
    finally:
        backbone.text_encoder.to(home)


class SingleFrameCausalConv3d(QwenImageCausalConv3d):
    """The VAE's causal 3-D convolution, computed as a 2-D convolution when it sees ONE frame (exact).

    An image is a video of one frame. The causal padding puts zero frames BEFORE it in time, so only the
    kernel's last time slice ever meets data: conv3d(pad(x)) = conv2d(x, W[:, :, -1]) + b. The 2-D form
    skips the multiplications by those zeros (about 3x less work for the 3x3x3 kernels; the same numbers
    up to float rounding, checked in tests/test_backbone.py). Several frames, a feature cache or a
    temporal stride take the original 3-D path.
    """

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if cache_x is not None or x.shape[2] != 1 or self.stride[0] != 1:
            return super().forward(x, cache_x)
        pad_w, _, pad_h = self._padding[:3]  # (w, w, h, h, 2t, 0): zeros around each frame
        out = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (pad_h, pad_w))
        return out.unsqueeze(2)


def single_frame_convs(vae: AutoencoderKLQwenImage) -> AutoencoderKLQwenImage:
    """Make every causal conv of `vae` a `SingleFrameCausalConv3d` in place (same weights, same state dict,
    still an instance of the stock class). `load_backbone` does this for every door; returns `vae`."""
    for module in vae.modules():
        if type(module) is QwenImageCausalConv3d:
            module.__class__ = SingleFrameCausalConv3d
    return vae


def place(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a module; cast only when the dtype differs (diffusers warns on needless casts)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module.to(device=device)


def save_backbone(backbone: Backbone, folder: str | Path) -> None:
    """Save all components as a diffusers pipeline folder (loadable with `load_backbone(folder)`)."""
    backbone.pipeline().save_pretrained(folder)


# ====================================================================================================
# Latents: VAE with normalisation, 2x2 packing
# ====================================================================================================


def _latent_stats(vae: AutoencoderKLQwenImage, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)
    return mean, std


def vae_encode(vae: AutoencoderKLQwenImage, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> normalised latents (B,C,1,H/f,W/f): posterior mode, (z - mean) / std."""
    x = images.to(vae.dtype).unsqueeze(2) * 2 - 1  # the VAE works in [-1,1] with a time axis of 1
    z = vae.encode(x).latent_dist.mode()
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


def vae_decode(vae: AutoencoderKLQwenImage, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents (B,C,1,h,w) -> images (B,3,f*h,f*w) in [0,1] (inverse of `vae_encode`).

    The latents are cast to the VAE's dtype FIRST (the sampler integrates in float32; a bf16 VAE's convs
    refuse float32 inputs), and de-normalised in that dtype."""
    z = latents.to(vae.device, vae.dtype)
    mean, std = _latent_stats(vae, z)
    x = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
    return ((x.float() + 1) / 2).clamp(0, 1)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B,C,1,h,w) -> (B, (h/2)*(w/2), 4C): every 2x2 latent patch becomes one transformer token."""
    b, c, _, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, (h/2)*(w/2), 4C) -> (B,C,1,h,w), `h`, `w` in latent units (inverse of `pack_latents`)."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, 1, h, w)


# ====================================================================================================
# Condition: computed ONCE per LR image and shared by all K samples / all timesteps
# ====================================================================================================


@dataclass
class Condition:
    """Everything the transformer needs about (x_LR, c), for ONE LR image.

    prompt_embeds (1,L,D): the VL text encoder's last hidden state of "Picture 1: <LR> <prompt>";
    prompt_mask (B,L) or None: None when no text token is padding (one condition, or a batch of equal
    lengths), as in the stock pipeline: with a mask the attention cannot use the flash kernel;
    image_latents (1,N,4C): the packed, normalised VAE latents of the LR upscaled to the output size;
    height/width: output size in pixels; vae_scale: the VAE's spatial factor f (pixels per latent).
    """

    prompt_embeds: torch.Tensor
    prompt_mask: torch.Tensor | None
    image_latents: torch.Tensor
    height: int
    width: int
    vae_scale: int = 8

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_scale, self.width // self.vae_scale

    @property
    def latent_channels(self) -> int:
        """C, the VAE's z_dim (a packed token holds a 2x2 patch of C channels)."""
        return self.image_latents.shape[-1] // 4

    @property
    def num_tokens(self) -> int:
        h, w = self.latent_hw
        return (h // 2) * (w // 2)

    def img_shapes(self, batch: int) -> list[list[tuple[int, int, int]]]:
        """RoPE layout: target tokens then condition tokens, in latent units / 2 (same for the batch)."""
        h, w = self.latent_hw
        return [[(1, h // 2, w // 2), (1, h // 2, w // 2)]] * batch


def stack_conditions(conds: list[Condition]) -> Condition:
    """Batch conditions of equal output size: tensors concatenated on dim 0, text padded to max L."""
    if len({(c.height, c.width) for c in conds}) != 1:
        raise ValueError("stack_conditions: all conditions in a batch must share one output size "
                         "(the transformer's RoPE layout `img_shapes` is shared by the batch)")
    lengths = [c.prompt_embeds.shape[1] for c in conds]
    length = max(lengths)
    embeds = torch.cat([F.pad(c.prompt_embeds, (0, 0, 0, length - c.prompt_embeds.shape[1])) for c in conds])
    mask = None  # no padding: no mask (the flash kernel stays usable)
    if len(set(lengths)) > 1 or any(c.prompt_mask is not None for c in conds):
        masks = [c.prompt_mask if c.prompt_mask is not None else
                 torch.ones(c.prompt_embeds.shape[:2], dtype=torch.long, device=c.prompt_embeds.device) for c in conds]
        mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks])
    latents = torch.cat([c.image_latents for c in conds])
    return Condition(embeds, mask, latents, conds[0].height, conds[0].width, conds[0].vae_scale)


def stack_pairs(pairs: list[tuple[Condition, torch.Tensor]]) -> tuple[Condition, torch.Tensor]:
    """(condition, x0 tokens (1,N,4C)) training pairs -> one batched Condition and x0 (B,N,4C)."""
    return stack_conditions([c for c, _ in pairs]), torch.cat([x for _, x in pairs])


def repeat_condition(cond: Condition, k: int) -> Condition:
    """View of one condition for a batch of K samples (no recomputation)."""
    mask = None if cond.prompt_mask is None else cond.prompt_mask.expand(k, -1)
    return Condition(cond.prompt_embeds.expand(k, -1, -1), mask, cond.image_latents.expand(k, -1, -1),
                     cond.height, cond.width, cond.vae_scale)


def upscale(lr: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """(B,3,h,w) in [0,1] -> bicubic (B,3,scale*h,scale*w) in [0,1]: the image the "edit" model conditions on."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


@torch.no_grad()
def encode_prompt(backbone: Backbone, image: Image.Image, prompt: str = DEFAULT_PROMPT,
                  pass_mm_token_type_ids: bool = True) -> tuple[torch.Tensor, None]:
    """VL prompt embedding of "Picture 1: <image> <prompt>" -> (embeds (1,L,D), None: no padding, no mask).

    As the stock pipeline: chat template, last hidden state, system prefix dropped. Unlike diffusers
    0.42.1, `mm_token_type_ids` is passed so image tokens get their M-RoPE positions (set
    `pass_mm_token_type_ids=False` to reproduce the stock pipeline bit-for-bit).
    """
    te = backbone.text_encoder
    inputs = backbone.processor(text=[_TEMPLATE.format(_IMAGE_SLOT + prompt)], images=[image],
                                padding=True, return_tensors="pt").to(te.device)
    extra = {}
    if pass_mm_token_type_ids and "mm_token_type_ids" in inputs:
        extra["mm_token_type_ids"] = inputs["mm_token_type_ids"]
    out = te(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
             pixel_values=inputs["pixel_values"].to(te.dtype), image_grid_thw=inputs["image_grid_thw"],
             output_hidden_states=True, **extra)
    hidden = out.hidden_states[-1][0][inputs["attention_mask"][0].bool()]  # one prompt: no padding
    return hidden[backbone.prompt_drop_idx:].unsqueeze(0), None


def vl_view(cond_image: torch.Tensor, area: int = CONDITION_IMAGE_SIZE) -> Image.Image:
    """What the VL encoder sees: the condition image resized to ~`area` pixels (stock: 384^2), as PIL."""
    pil = to_pil(cond_image)
    w, h = calculate_dimensions(area, pil.width / pil.height)
    return VaeImageProcessor(vae_scale_factor=16).resize(pil, h, w)


@torch.no_grad()
def encode_condition_image(backbone: Backbone, cond_image: torch.Tensor, prompt: str = DEFAULT_PROMPT,
                           pass_mm_token_type_ids: bool = True) -> Condition:
    """The "edit" input (3,H,W) in [0,1] at OUTPUT size -> its Condition.

    The VL encoder sees it at ~384^2 pixels (as the stock pipeline), the VAE at full size. H and W must
    be multiples of `backbone.size_multiple` (16 for the 8x VAE, 8 for the mini's 4x VAE, times the 2x2
    packing): `infer.py` pads inputs to that.
    """
    height, width = cond_image.shape[-2:]
    unit = backbone.size_multiple
    if height % unit or width % unit:
        raise ValueError(f"output size {height}x{width} must be a multiple of {unit} on both sides "
                         f"({backbone.vae_scale_factor}x VAE, 2x2 packing); pad the input first")
    embeds, mask = encode_prompt(backbone, vl_view(cond_image), prompt, pass_mm_token_type_ids)
    dev, dt = backbone.device, backbone.dtype
    latents = pack_latents(vae_encode(backbone.vae, cond_image.unsqueeze(0).to(backbone.vae.device)))
    return Condition(embeds.to(dev, dt), mask, latents.to(dev, dt), int(height), int(width),
                     backbone.vae_scale_factor)


def encode_condition(backbone: Backbone, lr: torch.Tensor, prompt: str = DEFAULT_PROMPT, scale: int = 4,
                     pass_mm_token_type_ids: bool = True) -> Condition:
    """One LR image (3,h,w) in [0,1] -> its Condition for a (scale*h, scale*w) output: the LR is
    upscaled bicubically to the output size and used as the edit model's input image (x_LR in Eq.5)."""
    return encode_condition_image(backbone, upscale(lr.unsqueeze(0).float(), scale)[0], prompt,
                                  pass_mm_token_type_ids)


# ====================================================================================================
# Flow matching: sigma schedule, velocity, Euler sampler  (x_t = (1-t) x0 + t eps, v = eps - x0)
# ====================================================================================================


def sigma_schedule(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, image_seq_len: int) -> torch.Tensor:
    """The N+1 sigmas (1 -> ... -> 0) the stock pipeline integrates over, for `image_seq_len` tokens.

    Exactly as `QwenImageEditPlusPipeline`: sigmas = linspace(1, 1/N, N), resolution-dependent shift
    mu = calculate_shift(tokens), the scheduler's exponential time shift and terminal stretch, then 0.
    """
    if num_steps < 2:  # one step makes the scheduler's terminal stretch divide 0 by 0 (NaN sigmas)
        raise ValueError(f"num_steps={num_steps}: the flow-matching schedule needs at least 2 steps")
    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
    return scheduler.sigmas.clone().float()


def velocity(transformer: QwenImageTransformer2DModel, x_t: torch.Tensor, sigma: torch.Tensor,
             cond: Condition) -> torch.Tensor:
    """v_theta(x_t, t | x_LR, c): (B,N,4C) noisy target tokens, sigma (B,) in [0,1] -> velocity (B,N,4C).

    The condition latents are appended AFTER the target tokens along the sequence; the output is sliced
    back to the target tokens. `cond` must have batch B (see `repeat_condition`/`stack_conditions`).
    """
    b, n, _ = x_t.shape
    hidden = torch.cat([x_t, cond.image_latents.to(x_t.dtype)], dim=1)
    out = transformer(hidden_states=hidden, timestep=sigma.to(x_t.dtype).expand(b),
                      encoder_hidden_states=cond.prompt_embeds, encoder_hidden_states_mask=cond.prompt_mask,
                      img_shapes=cond.img_shapes(b), return_dict=False)[0]
    return out[:, :n]


def initial_noise(cond: Condition, k: int, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """K packed Gaussian noise latents (K,N,4C), drawn in (K,1,C,h,w) order like the stock pipeline."""
    h, w = cond.latent_hw
    eps = torch.randn((k, 1, cond.latent_channels, h, w), generator=generator, dtype=dtype)
    return pack_latents(eps.permute(0, 2, 1, 3, 4))


@torch.no_grad()
def sample(transformer: QwenImageTransformer2DModel, cond: Condition, noise: torch.Tensor,
           sigmas: torch.Tensor, progress=None) -> torch.Tensor:
    """Batched Euler sampler: K samples for ONE condition in one batch -> x0 tokens (K,N,4C).

    noise (K,N,4C) is x at sigma=1; each step x <- x + (s_next - s) * v_theta(x, s) (Eq.5's v = eps - x0
    integrated from t=1 to 0). The condition is encoded once and shared by all K rows.
    """
    k = noise.shape[0]
    cond_k = repeat_condition(cond, k)
    x = noise.to(cond.image_latents.device, torch.float32)
    dt = cond.image_latents.dtype
    for i in range(len(sigmas) - 1):
        v = velocity(transformer, x.to(dt), sigmas[i].to(x.device).expand(k), cond_k)
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.device) * v.float()  # scheduler.step in float32
        if progress is not None:
            progress.update(1)
    return x


DECODE_CHUNK = 4
"""Samples per VAE decode call. The VAE's activations at 512 px are ~0.9 GB per sample in bf16 (its
full-resolution convs), so decoding a group of K = 24 at once adds ~20 GB at the peak of an RL step; chunks
of 4 keep it under 4 GB (measured with fake tensors: estimate_scale.py)."""


@torch.no_grad()
def decode(backbone: Backbone, tokens: torch.Tensor, cond: Condition, chunk: int = DECODE_CHUNK) -> torch.Tensor:
    """Packed x0 tokens (K,N,4C) -> images (K,3,H,W) in [0,1], `chunk` samples per VAE call."""
    h, w = cond.latent_hw
    return torch.cat([vae_decode(backbone.vae, unpack_latents(t, h, w)) for t in tokens.split(chunk)])


@torch.no_grad()
def super_resolve(backbone: Backbone, lr: torch.Tensor, num_steps: int = 40, k: int = 1,
                  generator: torch.Generator | None = None, prompt: str = DEFAULT_PROMPT,
                  scale: int = 4, progress=None) -> torch.Tensor:
    """LR (3,h,w) in [0,1] -> K SR images (K,3,scale*h,scale*w): condition once, sample, decode. `progress`
    (e.g. a tqdm bar) gets update(1) per Euler step."""
    cond = encode_condition(backbone, lr, prompt, scale)
    noise = initial_noise(cond, k, generator)
    sigmas = sigma_schedule(backbone.scheduler, num_steps, cond.num_tokens)
    return decode(backbone, sample(backbone.transformer, cond, noise, sigmas, progress), cond)


@torch.no_grad()
def super_resolve_many(backbone: Backbone, lrs: torch.Tensor, num_steps: int = 40, seed: int = 0,
                       prompt: str = DEFAULT_PROMPT, scale: int = 4) -> torch.Tensor:
    """One SR sample for each of N LR images of one size (N,3,h,w) -> (N,3,scale*h,scale*w), in ONE batch.

    LR i's noise comes from its own generator (seed + i), so any subset of the LRs (same seeds) gets the
    same samples: evaluations on a fixed held-out set with fixed noise, comparable across policies.
    """
    cond = stack_conditions([encode_condition(backbone, lr, prompt, scale) for lr in lrs])
    noise = torch.cat([initial_noise(cond, 1, torch.Generator().manual_seed(seed + i)) for i in range(len(lrs))])
    sigmas = sigma_schedule(backbone.scheduler, num_steps, cond.num_tokens)
    return decode(backbone, sample(backbone.transformer, cond, noise, sigmas), cond)


# ====================================================================================================
# Transformer weights (the SFT output) and LoRA files in the stock pipeline's format
# ====================================================================================================


def load_transformer_weights(transformer: QwenImageTransformer2DModel, path: str | Path, model: str = "") -> None:
    """Load full transformer weights (e.g. `out/sft/transformer.safetensors`, or "mini" for the shipped
    mini SFT) in place. Keys and shapes must match the transformer (`model` names it in the error).

    Streams: one tensor at a time is read from the file, cast to the parameter's dtype and copied to its
    device, so loading the 20B SFT costs one tensor of host memory per process, not a float32 copy of the
    whole model on every rank."""
    path = presets.mini_sft() if str(path) == "mini" else Path(path)
    if path.is_dir():
        path = path / "transformer.safetensors"
    if not path.exists():
        raise T.RunError(f"--sft {path}: no such file. Pass the folder train_sft.py wrote "
                         "(it holds transformer.safetensors), the file itself, or 'mini'.")
    own = transformer.state_dict()
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as err:  # a truncated or foreign file: one line naming it, not the reader's traceback
        raise T.RunError(f"--sft {path}: not a readable safetensors file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120]}; {path.stat().st_size} bytes). Re-copy it or rerun "
                         f"train_sft.py") from None
    with f:
        keys = set(f.keys())
        missing, unexpected = sorted(own.keys() - keys), sorted(keys - own.keys())
        wrong = sorted(k for k in own.keys() & keys if tuple(own[k].shape) != tuple(f.get_slice(k).get_shape()))
        if missing or unexpected or wrong:
            raise T.RunError(f"--sft {path} does not fit the transformer of --model {model or '?'}: {len(missing)} "
                             f"missing, {len(unexpected)} unexpected and {len(wrong)} differently shaped weights (e.g. "
                             f"{(missing + unexpected + wrong)[:3]}). It was trained for another --model.")
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(f.get_tensor(key).to(target.dtype))


@contextmanager
def active_adapter(transformer: QwenImageTransformer2DModel, name: str | None):
    """Run with LoRA adapter `name` active (None = adapters disabled: the base, the RL reference); then back
    to "default", the trainable one. peft's set_adapter moves requires_grad to the active adapter, so the
    trainable adapter is always active again before the caller's backward."""
    if name is None:
        transformer.disable_adapters()
    else:
        transformer.set_adapter(name)
    try:
        yield
    finally:
        if name is None:
            transformer.enable_adapters()
        transformer.set_adapter("default")


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """THE autocast of every policy forward pass, rollouts and updates alike (bf16 runs; a no-op otherwise).
    A rollout without it and an update with it differ by ~3e-5 in Flow-GRPO's likelihood ratio before any
    step (its clip range is 1e-4): peft computes the LoRA in float32 outside autocast, in bf16 inside."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16))


def add_lora(transformer: QwenImageTransformer2DModel, rank: int = 32, alpha: int = 64,
             adapter_name: str = "default", targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """Attach a peft LoRA adapter (paper §5.1: rank 32, alpha 64). B starts at 0: the model is unchanged."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with warnings.catch_warnings():  # peft warns about a second adapter; the RL's old policy is one on purpose
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(cfg, adapter_name=adapter_name)


def lora_state_dict(transformer: QwenImageTransformer2DModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights with peft key names ("...to_q.lora_A.weight"), detached on CPU."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def lora_config_dict(transformer: QwenImageTransformer2DModel, adapter_name: str = "default") -> dict:
    cfg = transformer.peft_config[adapter_name]
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules),
            "init_lora_weights": cfg.init_lora_weights if isinstance(cfg.init_lora_weights, (bool, str)) else True}


def save_lora(transformer: QwenImageTransformer2DModel, path: str | Path, adapter_name: str = "default",
              metadata: dict[str, str] | None = None) -> Path:
    """Write ONE .safetensors file that `QwenImageEditPlusPipeline.load_lora_weights` loads.

    Keys are "transformer.<module>.lora_A/B.weight" and the LoRA config (rank, alpha, targets) goes in the
    file's metadata, via the pipeline's own `save_lora_weights`, with `metadata` beside it (the RL stages record
    the step and their arguments). (A peft `adapter_model.safetensors` has no "transformer." prefix: the
    pipeline loads NOTHING from it, with only a warning.) Atomic.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + ".tmp.safetensors")
    QwenImageEditPlusPipeline.save_lora_weights(
        str(path.parent), transformer_lora_layers=lora_state_dict(transformer, adapter_name),
        transformer_lora_adapter_metadata=lora_config_dict(transformer, adapter_name), weight_name=tmp.name)
    if metadata:
        with safe_open(str(tmp), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        save_file(tensors, str(tmp), metadata={**meta, **metadata})
    tmp.replace(path)
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A pipeline-format LoRA file -> (weights with the "transformer." prefix removed, config dict)."""
    path = Path(path)
    if not path.is_file():
        raise T.RunError(f"--lora {path}: no such file (expected a .safetensors written by rl_fr.py / rl_nr.py)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # a truncated or foreign file: one line naming it, not the reader's traceback
        raise T.RunError(f"--lora {path}: not a readable safetensors file ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120]}; {path.stat().st_size} bytes). Re-copy it or rerun the "
                         f"stage that wrote it") from None
    raw = json.loads(meta.get("lora_adapter_metadata", "{}"))
    config = {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith("transformer.")}
    stripped = {k[len("transformer."):]: v for k, v in weights.items() if k.startswith("transformer.")}
    if not stripped:
        raise T.RunError(f"--lora {path}: no 'transformer.*' LoRA keys; this is not a pipeline-format LoRA file "
                         "(a peft adapter_model.safetensors must be converted with backbone.save_lora)")
    if "r" not in config:  # files from other trainers: rank from the shapes, alpha = rank (scale 1)
        rank = next(v.shape[0] for k, v in stripped.items() if "lora_A" in k)
        config = {"r": rank, "lora_alpha": rank}
    return stripped, config


def load_lora(transformer: QwenImageTransformer2DModel, path: str | Path, adapter_name: str = "default") -> None:
    """Load a pipeline-format LoRA file into a (new) peft adapter of `transformer`.

    Used to continue RL from a previous stage (rl_nr.py starts from rl_fr.py's file). Raises if the
    file's keys match no module of this transformer.
    """
    weights, config = read_lora_file(path)
    _check_lora_keys(transformer, weights, path)
    add_lora(transformer, config["r"], config["lora_alpha"], adapter_name,
             tuple(config.get("target_modules", LORA_TARGETS)))
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, weights, adapter_name=adapter_name)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if bad:
        raise T.RunError(f"--lora {path}: {len(bad)} keys were not loaded (e.g. {bad[:2]})")


def _check_lora_keys(transformer: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    modules = dict(transformer.named_modules())
    targets = {k.split(".lora_")[0] for k in weights}
    unknown = sorted(t for t in targets if t not in modules)
    if unknown:
        raise T.RunError(
            f"--lora {path}: {len(unknown)} of {len(targets)} LoRA target modules do not exist in this "
            f"transformer (e.g. {unknown[:2]}). The file was trained for another model; check --model.")
    for t in targets:
        w = modules[t].weight if not hasattr(modules[t], "base_layer") else modules[t].base_layer.weight
        a, b = weights[f"{t}.lora_A.weight"], weights[f"{t}.lora_B.weight"]
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0]:
            raise T.RunError(f"--lora {path}: shape mismatch at {t} (LoRA {tuple(b.shape)}x{tuple(a.shape)}, "
                             f"weight {tuple(w.shape)}). The file was trained for another model; check --model.")


def merge_lora_weights(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], alpha: float, rank: int,
                       scale: float = 1.0) -> dict[str, torch.Tensor]:
    """W' = W + scale * (alpha / rank) * B @ A for every LoRA target; pure, on state dicts.

    `weights` has "<module>.weight" keys (e.g. the SFT transformer), `lora` has "<module>.lora_A.weight"
    and "<module>.lora_B.weight". Paper §4: the RL LoRA (trained on the BASE model) is merged into the
    SFT weights for the final policy.
    """
    merged = dict(weights)
    for key in lora:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        a, b = lora[key].float(), lora[f"{module}.lora_B.weight"].float()
        w = merged[f"{module}.weight"]
        merged[f"{module}.weight"] = (w.float() + scale * (alpha / rank) * (b @ a)).to(w.dtype)
    return merged


def merge_lora_files(transformer: QwenImageTransformer2DModel, files: list[tuple[str | Path, float]]) -> None:
    """Merge one or more pipeline-format LoRA files (with scales) into the transformer's weights in place.

    Module by module on the weights' own device: W <- W + scale (alpha / r) B A computed in float32 for that
    one weight, stored back in W's dtype. The model never exists twice, and never in float32 (the 20B
    transformer merges in bf16 on its GPU, not through ~200 GB of host memory)."""
    modules = dict(transformer.named_modules())
    for path, scale in files:
        lora, config = read_lora_file(path)
        _check_lora_keys(transformer, lora, path)
        with torch.no_grad():
            for key in lora:
                if ".lora_A." not in key:
                    continue
                name = key.split(".lora_A.")[0]
                weight = modules[name].weight
                a = lora[key].to(weight.device, torch.float32)
                b = lora[f"{name}.lora_B.weight"].to(weight.device, torch.float32)
                weight.copy_((weight.float() + scale * (config["lora_alpha"] / config["r"]) * (b @ a)).to(weight.dtype))
