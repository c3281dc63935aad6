"""RealSR-R1: cold-start SFT and VLCoT-GRPO of an autoregressive multimodal restorer (the project's third seed paper).

The model (Lumina-mGPT, a Chameleon decoder over text and VQ image tokens, model.py) restores an LR image by writing a
vision-language chain of thought (VLCoT, paper §3.2, vlcot.py): a degradation estimate, a coarse understanding, a
coarse image (HR/4), a middle understanding, a middle image (HR/2), a fine understanding and the final image.

    sft    cold start (§3.2 "Cold-start Initialization"): next-token cross-entropy over the text AND image tokens of
           the whole chain given the prompt and the LR image (Eq.4), AdamW with warmup + cosine decay.
    grpo   VLCoT-GRPO (§3.1, §3.3): per LR, G chains sampled from the policy (constrained so that image codes appear
           only inside images: vlcot.constraint); each scored by R = R_format + R_degradation + R_understand +
           R_generation (Eq.5); advantages normalised inside each group (Eq.3); the policy maximises the clipped
           surrogate minus beta KL to the cold-start model (Eq.1-2), per token, averaged over each chain.
    eval   held-out photographs: format rate, degradation and understanding rewards (recorded degradations) and the
           final image against bicubic (plain LR): LR consistency, PSNR / SSIM to the HR; one table, one picture.

Commands (tiny: random weights, seconds; mini: the laptop presets, realsr_r1/build_mini.py runs them):

    python -m realsr_r1.train_realsr_r1 sft --model tiny --crop-size 64 --steps 20 --batch-size 4 --lr 1e-3 --out out/r1_sft
    python -m realsr_r1.train_realsr_r1 grpo --model out/r1_sft --generation-reward compass --reward-model tiny \\
        --crop-size 64 --steps 10 --batch-size 2 --out out/r1_grpo
    python -m realsr_r1.train_realsr_r1 eval --models mini-sft mini --out out/r1_eval

Full scale (paper §4.1; LSDIR + FFHQ with captions made offline, 512 px, 8 GPUs; bf16 on GPUs; --fsdp shards the 7B):
    torchrun --nproc_per_node 8 -m realsr_r1.train_realsr_r1 sft --model Alpha-VLLM/Lumina-mGPT-7B-512 \\
        --vq llamagen_vq_ds8 --data lsdir_captions.jsonl --fsdp --out out/realsr_r1/sft
    torchrun --nproc_per_node 8 -m realsr_r1.train_realsr_r1 grpo --model out/realsr_r1/sft --data grpo_500.jsonl \\
        --generation-reward qwen --fsdp --out out/realsr_r1/grpo
Resume a stopped or killed run: the same command + --resume latest.

Writes OUT/ (a policy folder: config.json, model.safetensors, tokenizer, realsr_r1.json naming its VQ; `--model OUT`
loads it), OUT/checkpoints/, OUT/tb/ (TensorBoard) and OUT/losses.jsonl (sft) or OUT/rewards.jsonl (grpo), one
line per step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import infer
import reward as compass
from baselines import flow_grpo
from common import data, presets
from common import training as T
from common.vl_model import build_compass
from evaluation.evaluate import create_metric, lr_consistency
from mini import photos
from realsr_r1 import model as M
from realsr_r1 import vlcot as V
from refreward_sr import refreward as RR

# =====================================================================================================
# Arguments (one dataclass per subcommand; every field a flag, its docstring the help)
# =====================================================================================================


@dataclass
class RunArgs:
    """model, data and run"""

    model: str = M.REAL_MODEL
    """the policy: a Lumina-mGPT / PURE checkpoint (hub name or folder), a folder this script wrote, 'mini-sft' / 'mini'
    (the trained laptop presets) or 'tiny' (random weights, tests)"""
    vq: str = ""
    """the VQ tokenizer folder (JanusVQVAE layout; LlamaGen's 8x VQ for a real checkpoint, required there); default: the
    policy's own (realsr_r1.json)"""
    tokenizer: str = ""
    """(real checkpoints) Lumina-mGPT's text tokenizer folder when the checkpoint folder has none"""
    data: str = "photos"
    """'photos' (the photographs shipped in installed packages, mini/photos.py TRAIN, with the ORACLE texts of
    vlcot.py) or a JSONL of {"hr": path, "objects": [...], "middle": str, "fine": str} (paths relative to it)"""
    crop_size: int = 512
    """HR crop side in px (Lumina-mGPT-512; the mini preset: 64); a multiple of 4 x scale x the VQ's downsampling"""
    scale: int = 4
    """SR factor (paper: 4)"""
    degradation: str = "real-esrgan"
    """ranges of the recorded degradation (vlcot.DEGRADATION_PRESETS): 'real-esrgan' (the first-order Real-ESRGAN
    ranges) or 'mini' (milder, for 16 px LRs)"""
    out: str = "out/realsr_r1"
    """run folder: the policy (save_pretrained), checkpoints/, tb/, losses.jsonl or rewards.jsonl"""
    batch_size: int = 16
    """LR inputs per step over all processes"""
    steps: int = 1000
    """optimizer steps"""
    lr: float = 2e-5
    """AdamW learning rate"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    seed: int = 0
    """seed of the data, the degradations and the sampling (per step and rank)"""
    save_every: int = 200
    """checkpoint every N steps (and at the last)"""
    keep_last: int = 2
    """checkpoints kept"""
    resume: str = ""
    """'latest' or a checkpoint folder"""
    overwrite: bool = False
    """start over in an --out folder that holds a run (deletes its checkpoints and logs)"""
    stop_after: int = 0
    """stop after this many steps of THIS run (a checkpoint is saved; resume with --resume latest); 0 = run to --steps"""
    device: str = "auto"
    """'auto' (CUDA when available), 'cuda', 'cpu'"""
    bf16: str = "auto"
    """bfloat16 autocast: on | off | auto (on with CUDA)"""
    fsdp: bool = False
    """(GPUs) shard the policy over the torchrun processes with FSDP2 (each rank keeps its own shards)"""
    micro_batch: int = 8
    """sequences per forward/backward (gradients accumulate over a step)"""


@dataclass
class SFTArgs(RunArgs):
    """cold start"""

    model: str = M.REAL_MODEL
    """the start: Lumina-mGPT (paper), a PURE folder (the public code), 'tiny', or a folder this script wrote"""
    out: str = "out/realsr_r1/sft"
    """run folder of the cold-start model"""
    batch_size: int = 16
    """LR inputs per step over all processes (paper §4.1: 16)"""
    lr: float = 2e-5
    """AdamW peak learning rate (the paper's number is lost in our copy; Lumina-mGPT fine-tunes at 2e-5)"""
    warmup: float = 0.01
    """linear warmup over this fraction of the steps, then cosine decay to 0 (paper §4.1: 0.01 epochs, cosine)"""
    lr_size: str = "own"
    """how the LR enters the prompt: 'own' (tokenized at its own size, as every image of the chain) or 'output'
    (bicubic-upscaled to the HR size first, as PURE's item processor resizes every input to the target size; the
    mini preset's choice: a 16 px LR is only 2x2 codes of an 8x VQ)"""
    tags: bool = True
    """cold-start targets wrapped in the VLCoT tags (paper); --no-tags: the same chain without them (the public
    code's cold-start data)"""


@dataclass
class GRPOArgs(RunArgs):
    """VLCoT-GRPO"""

    model: str = "out/realsr_r1/sft"
    """the cold-start policy (the folder `sft` wrote, 'mini-sft' or 'tiny'); also the KL reference"""
    out: str = "out/realsr_r1/grpo"
    """run folder of the GRPO model"""
    batch_size: int = 8
    """LR inputs per step over all processes (paper §4.1: 8)"""
    group: int = 3
    """chains sampled per LR (paper §4.1: 3; the public code: 5)"""
    lr: float = 1e-6
    """AdamW learning rate, constant (the paper's number is lost in our copy; DeepSeekMath GRPO: 1e-6)"""
    beta: float = 0.04
    """weight of the k3 KL to the cold-start model (Eq.2; DeepSeekMath: 0.04; the public code: 0 = no KL)"""
    clip_range: float = 0.2
    """PPO clip of the per-token ratio (Eq.1; 0.2 as PPO / DeepSeekMath; the public code: 0 = no clipping)"""
    ppo_epochs: int = 1
    """policy updates per batch of chains (GRPO's mu); with 1 the ratio is 1 at the update and the clip inactive"""
    temperature: float = 1.0
    """sampling temperature of text and image tokens"""
    text_temperature: float = 0.0
    """not in the paper: another sampling temperature for the text tokens only (0 = --temperature). Above 1 the
    groups explore the text more (a policy that knows its training photographs writes their texts almost surely, so
    its groups carry little format or understanding advantage); the ratio and the KL are taken at the same
    temperatures, so GRPO sharpens the tempered policy (README)"""
    image_top_k: int = 2000
    """sample image codes from the top k (Lumina-mGPT's default 2000); 0 = all"""
    greedy_text: bool = False
    """pick text tokens greedily (the public code) instead of sampling them (paper: sampled chains)"""
    text_budget: int = 256
    """text tokens a chain may write beyond its three images (the length limit is the images' tokens + this)"""
    rewards: str = "format,degradation,understanding,generation"
    """the rewards summed into R (Eq.5), comma-separated; 'planted' (with --planted-word) is a test reward"""
    generation_reward: str = "qwen"
    """the visual expert of R_generation: 'qwen' (paper: Qwen2.5-VL judges the group, Appendix A.3), 'compass' (this
    project's COMPASS, Eq.4 / 5, in-process or served), 'pyiqa' (the public code: mean of TOPIQ, MUSIQ / 100,
    MANIQA, CLIPIQA; needs their weights)"""
    judge_model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """the Qwen2.5-VL of --generation-reward qwen (hub name or folder; 'tiny' = a random tiny Qwen3-VL, tests)"""
    reward_model: str = "mini"
    """COMPASS for --generation-reward compass: 'mini', 'tiny', a folder or hub name (in-process)"""
    reward_url: str = ""
    """a served COMPASS (vLLM / transformers serve) instead of the in-process one"""
    reward_model_name: str = "compass"
    """the model name the server at --reward-url serves"""
    planted_word: str = ""
    """the word whose share of the sampled text tokens is the 'planted' reward (tests)"""
    augment: str = ""
    """not in the paper: comma-separated changes GRPO may make to an input crop before its degradation, from
    colour (channel order and gains), rotate (quarter turns), grey (vlcot.augment), for a policy that knows its
    training photographs by heart (plain crops of them give groups without advantage). '' = plain crops (paper; the
    mini build: all three were measured, README)"""
    augment_prob: float = 0.5
    """the share of input crops that --augment changes"""
    token_advantages: str = "chain"
    """'chain' (paper, Eq.1: the group advantage of the summed reward R on every sampled token) or 'split' (not in
    the paper: text tokens get the group advantage of the text rewards - format, degradation, understanding -, image
    codes that of the generation reward; `token_advantages`)"""


@dataclass
class EvalArgs:
    """held-out evaluation"""

    models: list[str] = field(default_factory=lambda: ["mini-sft", "mini"])
    """policies to compare (each 'mini-sft', 'mini', 'tiny' or a folder), in the table's order"""
    vq: str = ""
    """VQ folder overriding every policy's own"""
    data: str = "heldout"
    """'heldout' (mini/photos.py HELDOUT: never trained on) or a JSONL like sft's --data"""
    crops: int = 32
    """held-out crops (each evaluated twice: with a recorded degradation and with the plain LR)"""
    crop_size: int = 48
    """HR crop side (the mini preset's 48 px)"""
    scale: int = 4
    """SR factor"""
    degradation: str = "mini"
    """ranges of the recorded degradation of the held-out LRs (as sft's --degradation)"""
    plain_sigma: float = 0.8
    """blur of the plain LR (data.plain_degrade), the input of the fidelity columns"""
    temperature: float = 1.0
    """sampling temperature (as grpo's)"""
    image_top_k: int = 2000
    """sample image codes from the top k (as grpo's)"""
    greedy_text: bool = False
    """greedy text tokens (as grpo's)"""
    text_budget: int = 256
    """text tokens beyond the images (as grpo's)"""
    seed: int = 100
    """seed of the held-out crops, their degradations and the sampling"""
    oars: str = "--model mini --sft mini"
    """an OARS policy to compare on the same plain LRs, as infer.py's flags (without --input; e.g. "--model
    mini --sft mini --lora out/nr.safetensors"): its row runs infer.super_resolve_image with its defaults,
    post-processing included. '' = no OARS row"""
    back_projection: int = presets.MINI_BACK_PROJECTION
    """each model's final images are also scored after infer.post_process (not in the paper): this many
    back-projection iterations onto the LR ... (the mini OARS policy's default, infer.py --back-projection)"""
    flat_gate: float = presets.MINI_FLAT_GATE
    """... then the LR-guided flat-region gate (infer.py --flat-gate). Both 0 = no post-processed rows; the
    paper's output is the model's own row"""
    out: str = "out/realsr_r1/eval"
    """writes OUT.json, OUT.md (the table) and OUT.png (LR | bicubic | each model, then post-processed | OARS | HR)"""
    device: str = "auto"
    """'auto' (CUDA when available), 'cuda', 'cpu'"""


# =====================================================================================================
# Data: HR crops with recorded degradations and their understanding texts
# =====================================================================================================


def photo_crops(names: tuple[str, ...], n: int, size: int, generator: torch.Generator) -> list[tuple[torch.Tensor, str]]:
    """n (crop (3, size, size), photo name) from the shipped photographs: a photo, one of its downscales whose short
    side is 1 to 1.5 crop sides (so a crop shows most of the picture and the ORACLE objects are in it), a position,
    a flip. (mini/photos.random_crops does not say which photo a crop came from.)"""
    out = []
    for _ in range(n):
        name = names[int(torch.randint(len(names), (), generator=generator))]
        levels = [x for x in photos.pyramid(name, (size, size * 5 // 4, size * 3 // 2)) if min(x.shape[-2:]) >= size]
        img = levels[int(torch.randint(min(3, len(levels)), (), generator=generator))]
        top = int(torch.randint(img.shape[-2] - size + 1, (), generator=generator))
        left = int(torch.randint(img.shape[-1] - size + 1, (), generator=generator))
        crop = img[:, top:top + size, left:left + size]
        out.append((crop.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else crop, name))
    return out


def load_records(path: str) -> list[tuple[Path, V.Caption]]:
    """A captions JSONL -> [(HR path, Caption)], every bad line named FILE:LINE at once (RunError)."""
    path = Path(path)
    if not path.is_file():
        raise T.RunError(f"--data {path}: no such file ('photos', or a JSONL of hr/objects/middle/fine records)")
    errors: list[str] = []
    records = []
    for where, obj in data.jsonl_objects(path, errors):
        if not obj.get("hr") or not isinstance(obj.get("objects"), list):
            errors.append(f"{where}: needs \"hr\" and a list \"objects\"")
            continue
        records.append((path.parent / obj["hr"], V.Caption(tuple(map(str, obj["objects"])), str(obj.get("middle", "")),
                                                           str(obj.get("fine", "")))))
    if errors or not records:
        raise T.RunError(f"--data {path}: " + ("; ".join(errors[:5]) if errors else "no record"))
    return records


def draw_examples(source, n: int, crop: int, scale: int, ranges: V.DegradationRanges,
                  generator: torch.Generator, augment: tuple[str, ...] = (), augment_prob: float = 0.0
                  ) -> list[V.Example]:
    """n training inputs: HR crops (from `source`: a tuple of photo names or a list of JSONL records), each with an
    LR made by a freshly drawn, recorded degradation (vlcot.apply_degradation) and its understanding texts.
    `augment` (GRPO's --augment): each crop may first be turned, recoloured or greyed (vlcot.augment)."""
    if isinstance(source, tuple):
        picked = [(hr, V.ORACLE[name], name) for hr, name in photo_crops(source, n, crop, generator)]
    else:
        picked = []
        for _ in range(n):
            path, caption = source[int(torch.randint(len(source), (), generator=generator))]
            img = data.load_image(path)
            if min(img.shape[-2:]) < crop:
                raise T.RunError(f"--data: {path} is smaller than --crop-size {crop}")
            top = int(torch.randint(img.shape[-2] - crop + 1, (), generator=generator))
            left = int(torch.randint(img.shape[-1] - crop + 1, (), generator=generator))
            picked.append((img[:, top:top + crop, left:left + crop], caption, path.stem))
    params = [V.sample_degradation(generator, ranges) for _ in picked]
    hr = torch.stack([V.augment(p[0], augment, augment_prob, generator) for p in picked])
    lr = V.apply_degradation(hr, params, generator, scale)
    return [V.Example(h, l, V.degradation_levels(p, ranges), cap, name)
            for h, l, p, (_, cap, name) in zip(hr, lr, params, picked)]


def lr_image(lr: torch.Tensor, hr_size: tuple[int, int], lr_size: str) -> torch.Tensor:
    """The LR as the prompt shows it: (B, 3, h, w) as it is ('own') or bicubic-upscaled to the HR size ('output')."""
    return lr if lr_size == "own" else F.interpolate(lr, size=hr_size, mode="bicubic", align_corners=False).clamp(0, 1)


def prompt_ids(policy: M.Policy, lr_codes: torch.Tensor) -> list[int]:
    """The prompt: the paper's instruction, then the LR image in Lumina's layout. lr_codes (h, w)."""
    text = policy.tokenizer.encode(V.PROMPT, add_special_tokens=False)
    return text + V.image_tokens(lr_codes, policy.layout)


@torch.no_grad()
def encode_examples(policy: M.Policy, examples: list[V.Example], lr_size: str) -> list[dict]:
    """VQ codes of everything a chain holds, per example: {"prompt": ids, "images": [coarse, middle, final] codes}.
    Images of one size are encoded in one batch."""
    hr = torch.stack([e.hr for e in examples]).to(policy_device(policy))
    lr = lr_image(torch.stack([e.lr for e in examples]).to(hr.device), hr.shape[-2:], lr_size)
    lr_codes = M.vq_encode(policy.vq, lr).cpu()
    stage_codes = [M.vq_encode(policy.vq, V.downscale(hr, d)).cpu() for d in V.IMAGE_DIVISORS]
    return [{"prompt": prompt_ids(policy, lr_codes[i]), "images": [c[i] for c in stage_codes]}
            for i in range(len(examples))]


def target_ids(policy: M.Policy, example: V.Example, images: list[torch.Tensor], tags: bool) -> list[int]:
    """The cold-start target: the chain's texts (vlcot.chain_texts) around its three images, then end-of-turn."""
    texts = V.chain_texts(example.levels, example.caption, tags)
    enc = lambda s: policy.tokenizer.encode(s, add_special_tokens=False) if s else []  # noqa: E731
    ids = enc(texts[0])
    for codes, after in zip(images, texts[1:]):
        ids += V.image_tokens(codes, policy.layout) + enc(after)
    return ids + [policy.layout.eos]


def policy_device(policy: M.Policy) -> torch.device:
    return next(policy.vq.parameters()).device


# =====================================================================================================
# Sequences: padding, log-probabilities, constrained sampling
# =====================================================================================================


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> ids (B, P) left-padded and their attention mask (B, P)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: (B, T) mask -> (B, T)."""
    return (mask.cumsum(1) - 1).clamp_min(0)


def position_ids(ids: torch.Tensor, mask: torch.Tensor, layout: V.Layout) -> torch.Tensor:
    """The position ids of sequences (B, T) under layout.position_stride S: consecutive (skipping left padding) when
    S = 0; else the k-th image start (k = 0 for the first, the prompt's LR) jumps to first + k S, where `first` is the
    first image start's consecutive position, and the tokens after it count on from there. Example, S = 10:
    text text [img] a b text [img] c -> 0 1 2 3 4 5 12 13 (the second image's codes sit 10 after the first's)."""
    pos = positions(mask)
    stride = layout.position_stride
    if stride <= 0:
        return pos
    starts = (ids == layout.image_start) & mask.bool()
    k = starts.long().cumsum(1)  # 1 from the first image start on, 2 from the second ...
    seg_start = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values  # consecutive pos of the last start
    first = torch.where(starts & (k == 1), pos, torch.zeros_like(pos)).amax(1, keepdim=True)
    return torch.where(k >= 1, first + (k - 1) * stride + pos - seg_start, pos)


def token_temperatures(is_code: torch.Tensor, temperature: float, text_temperature: float = 0.0) -> torch.Tensor:
    """The sampling temperature of each sampled position: `temperature` for image codes, `text_temperature` for text
    (0 = `temperature`). One rule for the sampler and GRPO's log-probabilities, so the ratio of Eq.1 stays exact."""
    return torch.where(is_code, temperature, text_temperature or temperature).clamp_min(1e-6)


@torch.no_grad()
def sample_chains(model, prompts: list[list[int]], layout: V.Layout, sizes: list[tuple[int, int]],
                  max_new_tokens: int, generator: torch.Generator, temperature: float = 1.0, image_top_k: int = 0,
                  greedy_text: bool = False, synced: bool = False,
                  text_temperature: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one chain per prompt with a KV cache, constrained to Lumina's layout (vlcot.constraint):
    image codes only inside an image, the size tokens, end-of-line tokens and <eoss> forced. Image codes are drawn
    at `temperature`, text tokens at `text_temperature` (0 = the same).

    Returns completions (B, T) and their position kinds (B, T): vlcot.TEXT / CODE / FORCED / DONE (padding).
    `synced` (FSDP): every rank runs the same number of forward passes, until all ranks' chains ended."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, layout.pad)
    ids, mask = ids.to(device), mask.to(device)
    text_ok, code_ok = (m.to(device) for m in layout.masks(model.config.vocab_size))
    states = [V.DecodeState() for _ in prompts]
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(ids, mask, layout), use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1].float()
    tokens, kinds = [], []
    for _ in range(max_new_tokens):
        kind_step = torch.empty(len(prompts), dtype=torch.long)
        token_step = torch.empty(len(prompts), dtype=torch.long)
        sampled = []
        for i, s in enumerate(states):
            kind, forced = V.constraint(s, layout, sizes)
            kind_step[i] = kind
            if forced is not None:
                token_step[i] = forced
            else:
                sampled.append(i)
        if sampled:
            rows = torch.tensor(sampled)
            is_code = kind_step[rows] == V.CODE
            allowed = torch.where(is_code[:, None].to(device), code_ok[None], text_ok[None])
            temp = token_temperatures(is_code, temperature, text_temperature).to(device)
            z = logits[rows.to(device)].masked_fill(~allowed, -math.inf) / temp[:, None]
            if image_top_k > 0 and is_code.any():
                k = min(image_top_k, int(code_ok.sum()))
                kth = z.topk(k, dim=-1).values[:, -1:]
                z = torch.where(is_code[:, None].to(device) & (z < kth), -math.inf, z)
            draw = torch.multinomial(z.softmax(-1).cpu(), 1, generator=generator).squeeze(1)
            if greedy_text:
                draw = torch.where(is_code, draw, z.argmax(-1).cpu())
            token_step[rows] = draw
        states = [V.advance(s, int(t), layout, sizes) for s, t in zip(states, token_step)]
        tokens.append(token_step)
        kinds.append(kind_step)
        running = sum(s.phase != "done" for s in states)
        if synced:
            running = int(T.all_reduce_sum(torch.tensor([float(running)]))[0])
        if running == 0:
            break
        ids = torch.cat([ids, token_step[:, None].to(device)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = position_ids(ids, mask, layout)[:, -1:]  # the whole row: an image start jumps (O(T) per token, cheap)
        out = model(input_ids=token_step[:, None].to(device), attention_mask=mask, position_ids=pos,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
    return torch.stack(tokens, 1), torch.stack(kinds, 1)


def chain_log_probs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion: torch.Tensor,
                    kinds: torch.Tensor, layout: V.Layout, temperature: float = 1.0,
                    text_temperature: float = 0.0) -> torch.Tensor:
    """log pi(token | prefix) of every completion position under the CONSTRAINED policy the chains were sampled from:
    text positions renormalised over the text tokens, image positions over the codes, the temperatures of
    `sample_chains` applied; forced and padding positions read 0 (probability 1, no gradient).
    (B, P), (B, P), (B, T), (B, T) -> (B, T)."""
    device = next(model.parameters()).device
    ids = torch.cat([prompt_ids, completion], 1).to(device)
    mask = torch.cat([prompt_mask, (kinds != V.DONE).long()], 1).to(device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(ids, mask, layout)).logits
    kinds = kinds.to(device)
    is_code = kinds == V.CODE
    temp = token_temperatures(is_code, temperature, text_temperature)
    logits = logits[:, prompt_ids.shape[1] - 1:-1].float() / temp[..., None]  # (B, T, V) predicting completion
    text_ok, code_ok = (m.to(device) for m in layout.masks(logits.shape[-1]))
    allowed = torch.where(is_code[..., None], code_ok, text_ok)
    logp = RR.token_log_probs(logits.masked_fill(~allowed, -math.inf), completion.to(device).clamp_min(0))
    return torch.where((kinds == V.TEXT) | is_code, logp, torch.zeros_like(logp))


TOKEN_ADVANTAGES = ("chain", "split")


def token_advantages(parts: dict[str, torch.Tensor], kinds: torch.Tensor, group_ids: torch.Tensor,
                     mode: str = "chain") -> torch.Tensor:
    """The advantage of every completion position (N, T) from the rewards of the chains ({name: (N,)}), normalised in
    each group (Eq.3: (r - mean) / std of the group; a group whose rewards are equal gets 0).

    'chain' (paper): R = the sum of the rewards (Eq.5), one advantage per chain on all its tokens.
    'split' (an option, not the paper's): text positions get the advantage of the text rewards' sum (every reward
    but 'generation'), image-code positions that of 'generation' alone (0 without it), so a chain's degradation
    estimate is not credited to its ~190 sampled codes nor its picture to its text."""
    adv = lambda r: flow_grpo.group_advantages(r, group_ids, std_mode="group", eps=1e-4).nan_to_num(0.0)  # noqa: E731
    if mode == "chain":
        return adv(sum(parts.values()))[:, None].expand(kinds.shape)
    text = adv(sum(v for k, v in parts.items() if k != "generation"))
    image = adv(parts["generation"]) if "generation" in parts else torch.zeros_like(text)
    return torch.where(kinds == V.CODE, image[:, None], text[:, None])


def sampled_mask(kinds: torch.Tensor) -> torch.Tensor:
    """1 where the policy chose the token (text or image code), 0 at forced and padding positions. (B, T)."""
    return ((kinds == V.TEXT) | (kinds == V.CODE)).float()


# =====================================================================================================
# Rewards of a chain (the pure ones are in vlcot.py; here the visual experts of R_generation)
# =====================================================================================================


class QwenJudge:
    """R_generation by a VLM that sees the LR and the whole group at once (paper §3.3, Appendix A.3): one greedy
    answer with quality / realism / consistency per image (vlcot.judge_prompt / parse_judge_scores)."""

    def __init__(self, name: str, device: torch.device):
        if name == "tiny":
            self.model, self.processor = build_compass(0)
        else:
            from transformers import (  # the GPU path only
                AutoModelForImageTextToText,
                AutoProcessor,
            )

            path = T.find_checkpoint(name, "--judge-model", "Qwen/Qwen2.5-VL-7B-Instruct")
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
            self.processor = AutoProcessor.from_pretrained(path)
        self.model.to(device)

    @torch.no_grad()
    def __call__(self, lr: torch.Tensor, srs: list[torch.Tensor]) -> torch.Tensor:
        content = [{"type": "text", "text": "Input:"}, {"type": "image", "image": data.to_pil(lr)}]
        for i, sr in enumerate(srs):
            content += [{"type": "text", "text": f"\nImage {i + 1}:"}, {"type": "image", "image": data.to_pil(sr)}]
        content.append({"type": "text", "text": "\n" + V.judge_prompt(len(srs))})
        batch = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True, return_tensors="pt")
        batch = batch.to(self.model.device)
        out = self.model.generate(**batch, max_new_tokens=24 * len(srs), do_sample=False)
        text = self.processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return V.parse_judge_scores(text, len(srs))


def make_generation_reward(args: GRPOArgs, device: torch.device):
    """(LR (3, h, w), final images [(3, H, W)]) -> (K,) scores in [0, 1] (NaN where the expert gave none)."""
    if args.generation_reward == "qwen":
        return QwenJudge(args.judge_model, device)
    if args.generation_reward == "compass":
        scorer = compass.make_scorer(args.reward_model, url=args.reward_url or None,
                                     model_name=args.reward_model_name, device=device)
        # Eq.4 of F in [0, 1], Q in [1, 5] lies in [0, 5]: / 5 puts it on the scale of the other three rewards
        return lambda lr, srs: (scorer.score_group(data.to_pil(lr), [data.to_pil(s) for s in srs]).reward() / 5
                                ).clamp(0, 1).float()
    if args.generation_reward == "pyiqa":
        try:
            import pyiqa  # heavy and optional: only this option needs it

            metrics = [(pyiqa.create_metric(n, device=device), s) for n, s in
                       (("topiq_nr", 1.0), ("musiq", 0.01), ("maniqa-pipal", 1.0), ("clipiqa", 1.0))]
        except Exception as err:  # noqa: BLE001 - pyiqa raises many kinds when weights cannot be downloaded
            raise T.RunError(f"--generation-reward pyiqa: cannot build its metrics offline ({type(err).__name__}); "
                             f"put their weights in $TORCH_HOME or use compass / qwen") from None
        return lambda lr, srs: torch.stack([sum(m(s[None].to(device)).reshape(()).cpu() * w for m, w in metrics) / 4
                                            for s in srs]).float()
    raise T.RunError(f"--generation-reward {args.generation_reward}: choose qwen, compass or pyiqa")


def fill_missing(scores: torch.Tensor) -> torch.Tensor:
    """A chain the expert gave no score (NaN) gets its group's mean of the valid ones (no advantage either way)."""
    valid = ~torch.isnan(scores)
    fill = scores[valid].mean() if valid.any() else torch.tensor(0.0)
    return torch.where(valid, scores, fill)


def decode_text(policy: M.Policy, ids: list[int]) -> str:
    """Text tokens back to text, special tokens (the tags of real checkpoints) kept."""
    return policy.tokenizer.decode(ids, skip_special_tokens=False)


def read_completion(policy: M.Policy, completion: torch.Tensor) -> tuple[list, str]:
    """One sampled completion (T,) -> its segments (vlcot.split_completion) and its text with each complete image
    as vlcot.IMAGE_MARK (vlcot.render: what the text rewards read)."""
    segments = V.split_completion(completion.tolist(), policy.layout)
    return segments, V.render(segments, lambda ids: decode_text(policy, ids))


def chain_rewards(policy: M.Policy, completions: torch.Tensor, kinds: torch.Tensor, examples: list[V.Example],
                  group: int, names: list[str], generation_reward=None, planted: int | None = None
                  ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]:
    """Every reward of every chain. completions, kinds (N, T) with N = len(examples) x group (group members adjacent).
    Returns ({reward name: (N,)}, the decoded final image of each chain or None). Only COMPLETE images of the HR's
    size inside <final_image> are decoded; a chain that breaks the layout scores 0 on format and generation, never
    an error."""
    n = completions.shape[0]
    out = {k: torch.zeros(n) for k in names}
    finals: list[torch.Tensor | None] = [None] * n
    for i in range(n):
        ex = examples[i // group]
        segments, text = read_completion(policy, completions[i])
        if "format" in names:
            out["format"][i] = V.format_reward(text)
        if "degradation" in names:
            out["degradation"][i] = V.degradation_reward(text, ex.levels)
        if "understanding" in names:
            out["understanding"][i] = V.understanding_reward(text, ex.caption.objects if ex.caption else ())
        if "planted" in names:
            out["planted"][i] = V.planted_reward(completions[i], kinds[i], planted)
        codes = V.tagged_images(segments, lambda ids: decode_text(policy, ids))["final_image"]
        full = tuple(side // policy.downsample for side in ex.hr.shape[-2:])
        if codes is not None and tuple(codes.shape) == full:  # the sampler sizes images by their order, not their
            # tag: a chain that opens <final_image> first holds the coarse image there, which is not a final image
            with torch.no_grad():
                finals[i] = M.vq_decode(policy.vq, codes[None].to(policy_device(policy)))[0].cpu()
    if "generation" in names:
        for g in range(0, n, group):
            idx = [i for i in range(g, g + group) if finals[i] is not None]
            if idx:
                scores = fill_missing(generation_reward(examples[g // group].lr, [finals[i] for i in idx]))
                out["generation"][idx] = scores
    return out, finals


# =====================================================================================================
# Plumbing shared by the two training stages
# =====================================================================================================


def setup(args: RunArgs, finished: Path):
    """Distributed setup, seeds, the run folder claimed (one line if refused), the policy on its device."""
    dist_info = T.setup_distributed(args.device)
    T.seed_everything(args.seed, dist_info.rank)
    if args.batch_size % dist_info.world_size:
        raise T.RunError(f"--batch-size {args.batch_size}: must be divisible by the {dist_info.world_size} processes")
    out = Path(args.out)
    T.claim_run(out, args.resume, args.overwrite, finished, dist_info, asdict(args))
    policy = M.load_policy(args.model, vq=args.vq, tokenizer=args.tokenizer, device="cpu")
    policy.vq.to(dist_info.device).requires_grad_(False)
    return dist_info, out, policy


def check_sizes(crop_size: int, scale: int, policy: M.Policy) -> list[tuple[int, int]]:
    """The code grids of the chain's three images; RunError naming --crop-size when the HR does not divide."""
    unit = math.lcm(4, scale) * policy.downsample * policy.layout.grid
    if crop_size % unit or crop_size < 2 * unit:
        raise T.RunError(f"--crop-size {crop_size}: must be a multiple of {unit}, at least {2 * unit} (the coarse "
                         f"image is HR/4 and the LR HR/{scale}, coded by the VQ's {policy.downsample}x "
                         f"downsampling with {policy.layout.grid} codes per size token; a 1x1 code grid is degenerate: "
                         f"the VQ's GroupNorm has one value to normalise)")
    sizes = V.stage_sizes((crop_size, crop_size), policy.downsample)
    stride, tokens = policy.layout.position_stride, V.image_length(*sizes[-1])
    if stride and tokens >= stride:  # the next image would start inside this one's positions
        raise T.RunError(f"--crop-size {crop_size}: its final image is {tokens} tokens, more than this policy's position "
                         f"stride {stride} (realsr_r1.json position_stride) holds; use a smaller crop")
    return sizes


def data_source(spec: str, split: tuple[str, ...]):
    """'photos' / 'heldout' -> the photo names; otherwise the JSONL records."""
    if spec in ("photos", "heldout"):
        return split
    return load_records(spec)


def prepare_model(policy: M.Policy, dist_info: T.DistInfo, args: RunArgs, bf16: bool) -> list[torch.nn.Parameter]:
    """The policy on its device (sharded under --fsdp), trainable except Chameleon's unused encode-only VQ."""
    model = policy.model
    for name, p in model.named_parameters():
        p.requires_grad_(not M.is_unused(name))
    if args.fsdp and dist_info.world_size > 1:
        T.shard_from_rank0(model, list(model.model.layers), dist_info, bf16)
    else:
        model.to(dist_info.device)
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def cosine_lr(step: int, total: int, warmup: float, peak: float) -> float:
    """Linear warmup over `warmup` x total steps, then cosine decay to 0 (paper §4.1)."""
    w = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < w:
        return peak * (step + 1) / w
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The crops, degradations and sampling noise of one step and process: a function of (seed, step, rank) only,
    so a resumed run draws exactly what the uninterrupted one did."""
    return torch.Generator().manual_seed(data.item_seed(seed, step, rank))


def finish_step(args, stats: dict, done: int, log: Path, writer, dist_info, tag: str) -> None:
    """One JSONL line and the TensorBoard scalars of a step (rank 0)."""
    if not dist_info.is_main:
        return
    with open(log, "a") as f:
        f.write(json.dumps({"step": done, **stats}) + "\n")
    for key, value in stats.items():
        writer.add_scalar(f"{tag}/{key}", value, done)
    writer.flush()


def save_final(policy: M.Policy, out: Path, dist_info: T.DistInfo, sharded: bool) -> None:
    """The trained policy as a folder (`--model OUT` loads it), naming the VQ it was trained with."""
    weights = T.gather_full_state(policy.model, None, keep=lambda k: not M.is_unused(k))[0] if sharded else None
    if dist_info.is_main:
        M.save_policy(policy, out, weights)
        print(f"saved the policy to {out}", flush=True)


def checkpoint_and_maybe_stop(args, done, total, start, policy, optimizer, dist_info, stop, writer, ckpt_root):
    """Save at --save-every, at the end, on a signal or at --stop-after; returns an exit code when the run stops."""
    stopping = stop.requested()
    pausing = args.stop_after > 0 and done - start >= args.stop_after and done < total
    if done % args.save_every == 0 or done == total or stopping or pausing:
        T.save_training_checkpoint(ckpt_root, done, policy.model, optimizer, dist_info, keep_last=args.keep_last,
                                   keep=lambda k: not M.is_unused(k), sharded=args.fsdp and dist_info.world_size > 1)
    if stopping:
        return T.stopped(stop, writer, dist_info)
    if pausing:
        stop.restore()
        if writer is not None:
            writer.close()
        T.cleanup_distributed()
        if dist_info.is_main:
            print(f"paused after {args.stop_after} steps at step {done}; continue with --resume latest", flush=True)
        return 0
    return None


def resume_if_asked(args, policy, optimizer, dist_info, ckpt_root) -> int:
    """The step to start from (0, or the resumed checkpoint's)."""
    found = T.broadcast_object(T.resolve_resume(args.resume or None, ckpt_root) if dist_info.is_main else None)
    if found is None:
        return 0
    start = T.restore_training_checkpoint(found, policy.model, optimizer, dist_info,
                                          sharded=args.fsdp and dist_info.world_size > 1)["step"]
    if dist_info.is_main:
        print(f"resumed from {found} at step {start}", flush=True)
    return start


# =====================================================================================================
# sft: the cold start (Eq.4)
# =====================================================================================================


def sft(args: SFTArgs) -> int:
    if args.lr_size not in ("own", "output"):
        raise T.RunError(f"--lr-size {args.lr_size}: choose own or output")
    ranges = degradation_ranges(args.degradation)
    dist_info, out, policy = setup(args, Path(args.out) / "model.safetensors")
    check_sizes(args.crop_size, args.scale, policy)
    source = data_source(args.data, photos.TRAIN)
    policy.meta["lr_size"] = args.lr_size  # how this policy reads its LR, for grpo and eval
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and dist_info.device.type == "cuda")
    params = prepare_model(policy, dist_info, args, bf16)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ckpt_root = out / "checkpoints"
    start = resume_if_asked(args, policy, optimizer, dist_info, ckpt_root)
    log, writer = out / "losses.jsonl", None
    if dist_info.is_main:
        writer = T.summary_writer(out / "tb", start)
        T.truncate_jsonl(log, start)
    autocast = torch.autocast(dist_info.device.type, dtype=torch.bfloat16, enabled=bf16 and not args.fsdp)
    local = args.batch_size // dist_info.world_size
    stop = T.StopOnSignal()
    model = policy.model
    for step in range(start, args.steps):
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.warmup, args.lr)
        # 1. this step's HR crops, their recorded degradations and the whole chain as tokens
        g = step_generator(args.seed, step, dist_info.rank)
        examples = draw_examples(source, local, args.crop_size, args.scale, ranges, g)
        encoded = encode_examples(policy, examples, args.lr_size)
        seqs = [e["prompt"] + target_ids(policy, ex, e["images"], args.tags) for e, ex in zip(encoded, examples)]
        # 2. Eq.4: -sum_t log p(x_t | x_<t, I) over the chain's tokens (text AND image), the prompt and padding
        #    excluded; the sum is divided by the chain tokens of the whole step over all processes
        n_tokens = sum(len(s) - len(e["prompt"]) for s, e in zip(seqs, encoded))
        total_tokens = float(T.all_reduce_sum(torch.tensor([float(n_tokens)]))[0])
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, local, args.micro_batch):
            part = slice(i, i + args.micro_batch)
            ids, labels, mask = right_pad(seqs[part], [len(e["prompt"]) for e in encoded[part]], policy.layout.pad)
            with autocast:
                logits = model(input_ids=ids.to(dist_info.device), attention_mask=mask.to(dist_info.device),
                               position_ids=position_ids(ids, mask, policy.layout).to(dist_info.device)).logits
            ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                 ignore_index=-100, reduction="sum")
            (ce / total_tokens).backward()
            loss_sum += float(ce.detach())
        # 3. gradients summed over the processes (each already divided by the global token count), one AdamW step
        if not args.fsdp:
            T.all_reduce_grads(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        done = step + 1
        loss = float(T.all_reduce_sum(torch.tensor([loss_sum]))[0]) / total_tokens
        finish_step(args, {"loss": loss, "grad_norm": float(grad_norm), "lr": optimizer.param_groups[0]["lr"],
                           "seconds": time.time() - t0}, done, log, writer, dist_info, "sft")
        if dist_info.is_main and (done % 10 == 0 or done == args.steps):
            print(f"[sft] step {done}/{args.steps} loss {loss:.4f} ({time.time() - t0:.2f} s/step)", flush=True)
        code = checkpoint_and_maybe_stop(args, done, args.steps, start, policy, optimizer, dist_info, stop, writer,
                                         ckpt_root)
        if code is not None:
            return code
    stop.restore()
    save_final(policy, out, dist_info, args.fsdp and dist_info.world_size > 1)
    if writer is not None:
        writer.close()
    T.cleanup_distributed()
    return 0


def right_pad(seqs: list[list[int]], prompt_lens: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences -> ids (B, L), labels (B, L) with -100 on the prompt and the padding, attention mask (B, L)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[i, :len(s)] = torch.tensor(s)
        labels[i, p:len(s)] = torch.tensor(s[p:])
        mask[i, :len(s)] = 1
    return ids, labels, mask


def degradation_ranges(name: str) -> V.DegradationRanges:
    if name not in V.DEGRADATION_PRESETS:
        raise T.RunError(f"--degradation {name}: choose one of {', '.join(V.DEGRADATION_PRESETS)}")
    return V.DEGRADATION_PRESETS[name]


# =====================================================================================================
# grpo: VLCoT-GRPO (Eq.1-3, 5)
# =====================================================================================================


REWARD_NAMES = ("format", "degradation", "understanding", "generation", "planted")


def parse_augment(spec: str, prob: float) -> tuple[str, ...]:
    """--augment "colour,rotate" -> ("colour", "rotate"); an unknown kind or a share outside [0, 1] is one RunError
    line naming the flag, before any model is loaded."""
    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    unknown = [k for k in kinds if k not in V.AUGMENTATIONS]
    if unknown:
        raise T.RunError(f"--augment {spec}: unknown {', '.join(unknown)} (choose from {', '.join(V.AUGMENTATIONS)})")
    if not 0.0 <= prob <= 1.0:
        raise T.RunError(f"--augment-prob {prob}: a share between 0 and 1")
    return kinds


def parse_rewards(args: GRPOArgs, policy: M.Policy) -> tuple[list[str], int | None]:
    """The reward names of --rewards (RunError naming the flag) and the planted token id."""
    names = [r.strip() for r in args.rewards.split(",") if r.strip()]
    bad = [r for r in names if r not in REWARD_NAMES]
    if bad or not names:
        raise T.RunError(f"--rewards {args.rewards}: use some of {', '.join(REWARD_NAMES)}")
    planted = None
    if "planted" in names:
        ids = policy.tokenizer.encode(args.planted_word, add_special_tokens=False) if args.planted_word else []
        if len(ids) != 1:
            raise T.RunError(f"--planted-word {args.planted_word!r}: must be one token of the policy's vocabulary")
        planted = ids[0]
    return names, planted


def grpo(args: GRPOArgs) -> int:
    if args.token_advantages not in TOKEN_ADVANTAGES:
        raise T.RunError(f"--token-advantages {args.token_advantages}: choose chain or split")
    if args.text_temperature < 0:
        raise T.RunError(f"--text-temperature {args.text_temperature}: must be >= 0 (0 = --temperature)")
    ranges = degradation_ranges(args.degradation)
    augment = parse_augment(args.augment, args.augment_prob)
    dist_info, out, policy = setup(args, Path(args.out) / "model.safetensors")
    sizes = check_sizes(args.crop_size, args.scale, policy)
    names, planted = parse_rewards(args, policy)
    source = data_source(args.data, photos.TRAIN)
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and dist_info.device.type == "cuda")
    sharded = args.fsdp and dist_info.world_size > 1
    generation_reward = make_generation_reward(args, dist_info.device) if "generation" in names else None
    reference = None
    if args.beta > 0:  # the cold-start policy, frozen: Eq.2's pi_ref
        reference = M.load_policy(args.model, vq=args.vq, tokenizer=args.tokenizer).model.requires_grad_(False)
        if sharded:
            T.shard_from_rank0(reference, list(reference.model.layers), dist_info, bf16)
        else:
            reference.to(dist_info.device)
    params = prepare_model(policy, dist_info, args, bf16)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ckpt_root = out / "checkpoints"
    start = resume_if_asked(args, policy, optimizer, dist_info, ckpt_root)
    log, writer = out / "rewards.jsonl", None
    if dist_info.is_main:
        writer = T.summary_writer(out / "tb", start)
        T.truncate_jsonl(log, start)
    autocast = torch.autocast(dist_info.device.type, dtype=torch.bfloat16, enabled=bf16 and not sharded)
    local = args.batch_size // dist_info.world_size
    max_new = sum(V.image_length(r, c) for r, c in sizes) + args.text_budget
    model, layout = policy.model, policy.layout
    stop = T.StopOnSignal()
    for step in range(start, args.steps):
        t0 = time.time()
        g = step_generator(args.seed, step, dist_info.rank)
        # 1. this step's LR inputs (recorded degradations) and their prompts, each repeated G times
        examples = draw_examples(source, local, args.crop_size, args.scale, ranges, g, augment, args.augment_prob)
        encoded = encode_examples(policy, examples, policy.meta.get("lr_size", "own"))
        prompts = [e["prompt"] for e in encoded for _ in range(args.group)]
        # 2. G chains per LR from the current policy (= pi_old of Eq.1), constrained to the image layout
        model.eval()
        with autocast:
            completions, kinds = sample_chains(model, prompts, layout, sizes, max_new, g, args.temperature,
                                               args.image_top_k, args.greedy_text, sharded, args.text_temperature)
        model.train()
        # 3. the rewards (Eq.5: their sum) and the group-normalised advantages (Eq.3)
        parts, _ = chain_rewards(policy, completions, kinds, examples, args.group, names, generation_reward, planted)
        group_ids = torch.arange(local).repeat_interleave(args.group)
        advantages = token_advantages(parts, kinds, group_ids, args.token_advantages)  # (N, T)
        # 4. Eq.1-2 per token: clipped surrogate of ratio = pi / pi_old and A, + beta * KL_k3(pi || pi_ref), averaged
        #    over each chain's sampled tokens, then over the chains of the step (all processes)
        p_ids, p_mask = left_pad(prompts, layout.pad)
        n_total = local * args.group * dist_info.world_size
        old = torch.cat([chain_log_probs(model, p_ids[i:i + args.micro_batch], p_mask[i:i + args.micro_batch],
                                         completions[i:i + args.micro_batch], kinds[i:i + args.micro_batch], layout,
                                         args.temperature, args.text_temperature).detach()
                         for i in range(0, len(prompts), args.micro_batch)]) if args.ppo_epochs > 1 else None
        stats_loss = stats_kl = 0.0
        for _ in range(args.ppo_epochs):
            optimizer.zero_grad(set_to_none=True)
            for i in range(0, len(prompts), args.micro_batch):
                part = slice(i, i + args.micro_batch)
                with autocast:
                    new = chain_log_probs(model, p_ids[part], p_mask[part], completions[part], kinds[part], layout,
                                          args.temperature, args.text_temperature)
                before = new.detach() if old is None else old[part].to(new.device)
                adv = advantages[part].to(new.device)
                if args.clip_range > 0:
                    per_token = flow_grpo.clipped_surrogate(new, before, adv, args.clip_range)
                else:  # the public code: no clipping
                    per_token = -adv * torch.exp(new - before)
                if reference is not None:
                    with torch.no_grad(), autocast:
                        ref = chain_log_probs(reference, p_ids[part], p_mask[part], completions[part], kinds[part],
                                              layout, args.temperature, args.text_temperature)
                    kl = RR.kl_k3(new, ref)
                    per_token = per_token + args.beta * kl
                    stats_kl += float(RR.masked_mean(kl.detach(), sampled_mask(kinds[part]).to(kl.device)).sum())
                loss = RR.masked_mean(per_token, sampled_mask(kinds[part]).to(per_token.device)).sum() / n_total
                loss.backward()
                stats_loss += float(loss.detach())
            if not sharded:
                T.all_reduce_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
        done = step + 1
        # 5. log the step: each reward's mean over all processes, the chains' lengths, the KL
        means = {k: float(T.all_reduce_mean(v.mean().reshape(1))[0]) for k, v in parts.items()}
        stats = {**{f"reward_{k}": v for k, v in means.items()}, "reward": sum(means.values()),
                 "loss": float(T.all_reduce_sum(torch.tensor([stats_loss]))[0]) / args.ppo_epochs,
                 "kl": float(T.all_reduce_sum(torch.tensor([stats_kl]))[0]) / n_total / args.ppo_epochs,
                 "grad_norm": float(grad_norm), "tokens": float(sampled_mask(kinds).sum(1).mean()),
                 "seconds": time.time() - t0}
        finish_step(args, stats, done, log, writer, dist_info, "grpo")
        if dist_info.is_main and (done % 5 == 0 or done == args.steps):
            shown = " ".join(f"{k} {v:.3f}" for k, v in means.items())
            print(f"[grpo] step {done}/{args.steps} reward {stats['reward']:.3f} ({shown}) "
                  f"{time.time() - t0:.1f} s/step", flush=True)
        code = checkpoint_and_maybe_stop(args, done, args.steps, start, policy, optimizer, dist_info, stop, writer,
                                         ckpt_root)
        if code is not None:
            return code
    stop.restore()
    save_final(policy, out, dist_info, sharded)
    if writer is not None:
        writer.close()
    T.cleanup_distributed()
    return 0


# =====================================================================================================
# eval: held-out photographs, rewards and the final image against bicubic
# =====================================================================================================


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) x2 in [0, 1] -> (B,) dB."""
    return 10 * torch.log10(1 / (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10))


@torch.no_grad()
def evaluate_policy(policy: M.Policy, deg: list[V.Example], plain: list[V.Example], args: EvalArgs) -> dict:
    """One model on the held-out crops: chains from the recorded-degradation LRs (`deg`) give the format, degradation
    and understanding rewards; chains from the plain LRs (`plain`) give the final images, scored against the LR
    (LR consistency) and the HR. Returns the means and the final images (None where a chain broke the layout)."""
    sizes = check_sizes(args.crop_size, args.scale, policy)
    max_new = sum(V.image_length(r, c) for r, c in sizes) + args.text_budget
    results = {}
    for kind, examples in (("deg", deg), ("plain", plain)):
        encoded = encode_examples(policy, examples, policy.meta.get("lr_size", "own"))
        g = torch.Generator().manual_seed(args.seed)
        comps, kinds = sample_chains(policy.model, [e["prompt"] for e in encoded], policy.layout, sizes, max_new, g,
                                     args.temperature, args.image_top_k, args.greedy_text)
        results[kind] = chain_rewards(policy, comps, kinds, examples, 1, ["format", "degradation", "understanding"])
        if kind == "deg":  # the degradation step per component (chance: 1/3 each)
            hits = [V.degradation_hits(read_completion(policy, c)[1], e.levels) for c, e in zip(comps, examples)]
    parts, _ = results["deg"]
    _, finals = results["plain"]
    hr = torch.stack([e.hr for e in plain])
    lr = torch.stack([e.lr for e in plain])
    ok = [i for i, f in enumerate(finals) if f is not None]
    sr = torch.stack([finals[i] for i in ok]) if ok else torch.zeros(0, *hr.shape[1:])
    row = {k: float(v.mean()) for k, v in parts.items()}
    row.update({f"degradation_{c}": sum(h[c] for h in hits) / len(hits) for c in V.DEGRADATIONS})
    row.update(final_complete=len(ok) / len(finals))
    row.update(fidelity_row(sr, hr[ok], lr[ok]) if ok else {})
    return {"row": row, "finals": finals}


@torch.no_grad()  # the OARS row's images come from a pipeline that may keep their graph: metrics need none
def fidelity_row(sr: torch.Tensor, hr: torch.Tensor, lr: torch.Tensor) -> dict:
    """Means of LR consistency (dB), PSNR and SSIM to the HR of SR images (B, 3, H, W), and the LR consistency after
    the colour fix of the diffusion SR line (vlcot.colour_fix, sigma = the SR factor in HR px)."""
    ssim = create_metric("SSIM")  # Y-channel SSIM, weights-free
    scale = sr.shape[-1] // lr.shape[-1]
    consistency = lambda x: float(lr_consistency(x, lr, eight_bit=True).mean())  # noqa: E731
    return {"lr_consistency": consistency(sr), "psnr": float(psnr(sr, hr).mean()),
            "ssim": float(ssim(sr, hr).reshape(-1).mean()),
            "lr_consistency_colour_fix": consistency(V.colour_fix(sr, lr, scale))}


def heldout_examples(args: EvalArgs) -> tuple[list[V.Example], list[V.Example]]:
    """The same held-out crops twice: with a recorded degradation, and with the plain LR (data.plain_degrade)."""
    g = torch.Generator().manual_seed(args.seed)
    source = data_source(args.data, photos.HELDOUT)
    deg = draw_examples(source, args.crops, args.crop_size, args.scale, degradation_ranges(args.degradation), g)
    hr = torch.stack([e.hr for e in deg])
    lr = data.plain_degrade(hr, args.plain_sigma, args.scale)
    plain = [V.Example(e.hr, l, e.levels, e.caption, e.photo) for e, l in zip(deg, lr)]
    return deg, plain


def oars_args(flags: str) -> infer.Args | None:
    """--oars: infer.py's flags of an OARS policy, checked by infer.py's own parser before any work (None for '').
    A bad flag is one RunError line naming --oars and infer.py's message."""
    if not flags.strip():
        return None
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            return infer.parse_args(["--input", "-", *shlex.split(flags)])
    except SystemExit:
        reason = (message.getvalue().strip().splitlines() or ["invalid"])[-1].partition("error: ")[2]
        raise T.RunError(f"--oars {flags!r}: {reason or 'not infer.py flags'}") from None


@torch.no_grad()
def oars_finals(args: infer.Args, lr: torch.Tensor) -> torch.Tensor:
    """The OARS policy on the plain LRs (B, 3, h, w) -> (B, 3, scale h, scale w): infer.super_resolve_image per crop,
    each from infer.py's one seed as infer.py runs a folder, on infer.py's --device / --dtype (auto: bf16 on a GPU)."""
    device, dtype = infer.device_and_dtype(args)
    bb = infer.load_policy(args.model, args.sft, args.lora, dtype, device)
    sr = [infer.super_resolve_image(bb, x, args, torch.Generator().manual_seed(args.seed)) for x in lr]
    del bb  # the RealSR-R1 models load next
    return torch.stack(sr)


VQ_ROW = "HR through the VQ"
REFERENCE_ROWS = ("HR itself", VQ_ROW)


def evaluate(args: EvalArgs) -> dict:
    """The table (bicubic, each model, each model post-processed, the OARS policy) and the picture; writes OUT.json,
    OUT.md and OUT.png."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    oars = oars_args(args.oars)
    if args.back_projection < 0 or args.flat_gate < 0:
        raise T.RunError(f"--back-projection {args.back_projection} / --flat-gate {args.flat_gate}: must be >= 0")
    post = args.back_projection > 0 or args.flat_gate > 0
    deg, plain = heldout_examples(args)
    hr = torch.stack([e.hr for e in plain])
    lr = torch.stack([e.lr for e in plain])
    bicubic = F.interpolate(lr, scale_factor=args.scale, mode="bicubic", align_corners=False).clamp(0, 1)
    # two reference rows without a picture column: what the HR itself scores (LR consistency is not 100 dB: the plain
    # LR was made with another downscale than the check's), and the HR through the first model's VQ (what any chain
    # can reach at best: its final image is a VQ decode)
    table = {"HR itself": fidelity_row(hr, hr, lr), "bicubic": fidelity_row(bicubic, hr, lr)}
    columns = [F.interpolate(lr, scale_factor=args.scale, mode="nearest"), bicubic]
    # the OARS policy first (a missing checkpoint fails before the chains are sampled), its row last
    oars_sr = oars_finals(oars, lr) if oars is not None else None
    for name in args.models:
        policy = M.load_policy(name, vq=args.vq, device=device)
        if VQ_ROW not in table:
            round_trip = M.vq_decode(policy.vq, M.vq_encode(policy.vq, hr.to(device))).cpu()
            table[VQ_ROW] = fidelity_row(round_trip, hr, lr)
        result = evaluate_policy(policy, deg, plain, args)
        table[name] = result["row"]
        finals = torch.stack([f if f is not None else torch.full_like(hr[0], 0.5) for f in result["finals"]])
        columns.append(finals)
        ok = [i for i, f in enumerate(result["finals"]) if f is not None]
        if post:  # the same steps infer.py runs after the mini OARS policy's sampling (none without a final image)
            fixed = infer.post_process(finals[ok], lr[ok], args.back_projection, args.flat_gate) if ok else None
            table[f"{name} + post-process"] = fidelity_row(fixed, hr[ok], lr[ok]) if ok else {}
            columns.append(finals.index_copy(0, torch.tensor(ok), fixed) if ok else finals)
    if oars_sr is not None:
        table["OARS " + args.oars.strip()] = fidelity_row(oars_sr, hr, lr)
        columns.append(oars_sr)
    columns.append(hr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"crops": args.crops, "crop_size": args.crop_size, "plain_sigma": args.plain_sigma,
              "heldout": list(photos.HELDOUT) if args.data == "heldout" else args.data,
              "post_process": {"back_projection": args.back_projection, "flat_gate": args.flat_gate},
              "oars": args.oars,
              "columns": ["nearest", "bicubic", *[k for k in table if k not in ("bicubic", *REFERENCE_ROWS)], "HR"],
              "table": table}
    T.atomic_write_text(json.dumps(report, indent=1), out.with_suffix(".json"))
    T.atomic_write_text(markdown(table), out.with_suffix(".md"))
    rows = min(6, len(plain))
    grid = torch.cat([torch.cat([c[i] for c in columns], dim=-1) for i in range(rows)], dim=-2)
    data.save_image(grid, out.with_suffix(".png"))
    print(markdown(table))
    return report


def markdown(table: dict) -> str:
    """The evaluation table: one row per method."""
    keys = ["format", "degradation", "degradation_blur", "degradation_noise", "degradation_compression",
            "understanding", "final_complete", "lr_consistency", "lr_consistency_colour_fix", "psnr", "ssim"]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in table.items():
        cells = [f"{row[k]:.3f}" if k in row and not math.isnan(row[k]) else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# =====================================================================================================
# Command line
# =====================================================================================================


def add_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of `cls` and of its dataclass base, each with the docstring written under it."""
    base = next((b for b in cls.__mro__[1:] if is_dataclass(b)), None)
    own = set(cls.__dict__.get("__annotations__", {}))
    if base is not None:
        T.add_dataclass_args(parser, base, exclude=[f.name for f in fields(base) if f.name in own])
        T.add_dataclass_args(parser, cls, exclude=[f.name for f in fields(base) if f.name not in own])
    else:
        T.add_dataclass_args(parser, cls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    commands = {"sft": (SFTArgs, sft), "grpo": (GRPOArgs, grpo), "eval": (EvalArgs, evaluate)}
    for name, (cls, _) in commands.items():
        add_args(sub.add_parser(name, help=(cls.__doc__ or "").strip(), formatter_class=fmt), cls)
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = vars(parser.parse_args(argv))
    cls, run = commands[ns.pop("command")]
    args = T.dataclass_from_namespace(cls, ns)
    result = run(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    T.run_script(main)
