"""Build the mini preset of the SR backbone from scratch on a CPU: VAE, base model, then SFT (train_sft.py).

The paper's RL (§4) puts a LoRA on the BASE model, a general image-editing model (Qwen-Image-Edit-2509),
and merges it into the SFT model, the base after the flow-matching cold start (Eq.5). This script makes
the same two points in miniature, with small configs of the real classes and only photographs that ship
inside installed packages (photos.py; the four HELDOUT photos are never trained on):

    1. data   HR crops of the training photos for train_sft.py            -> WORK/hr/
    2. vae    AutoencoderKLQwenImage from scratch (4x spatial, --z-dim channels), L1 + MSE on random crops,
              then the per-channel latent mean/std that normalise its latents (as the real VAE's config)
    3. base   the MMDiT QwenImageTransformer2DModel trained by flow matching on a MIX of image-to-image
              tasks, each under its own instruction (denoise, deblur, remove JPEG blocks, upscale 2x,
              black and white, keep, and "enhance" = the SR prompt on mildly degraded inputs). It is a
              general restoration/editing model that has never seen a 4x Real-ESRGAN-degraded input:
              not yet the SR expert                                  -> OUT/backbone/ (pipeline folder)
    4. sft    the cold start itself, by this project's train_sft.py on WORK/hr/ (degradation on the fly:
              --sft-degradation, optionally mixed with plain LR; Eq.5) -> OUT/sft/transformer.safetensors
    5. eval   PSNR / SSIM (Y) and sharpness of bicubic, base, SFT and HR on held-out 64x64 crops with two
              kinds of 16x16 LR (data.py's degradation; plain blur + bicubic downscale), and a picture
                                                                     -> OUT/backbone_eval.{md,json,png}

The text encoder (Qwen2.5-VL) and the processor are the tiny preset's configs with random, frozen
weights (the real text encoder is frozen too); only the tokenizer differs: byte-level with one token per
word of the fixed texts the model reads (byte_tokenizer.word_merges), so prompts stay the real ones.

    python -m mini.build_backbone                   # everything, resumable: re-run to continue
    python -m mini.build_backbone --stage eval      # one part: data | vae | base | sft | eval
    python -m mini.build_backbone --quick --out /tmp/mini --work /tmp/mini_work   # a few steps (tests)

The shipped preset was built with the defaults: the recipe measured for a mini SFT that keeps the picture
(mini/README.md, "A mini SFT that keeps the picture"): an 8-channel latent, the SFT on the mini degradation
mixed half and half with plain LR, cosine schedule, 2000 steps. The earlier preset (z_dim 32, Real-ESRGAN
LR at the paper's parameters, constant lr, 3500 steps) lost the picture:

    python -m mini.build_backbone --z-dim 32 --sft-degradation realesrgan --sft-plain-fraction 0 \
        --sft-lr-schedule constant --sft-steps 3500

On this CPU the frozen text encoder and VAE cost more than the transformer's step, so base and SFT train
on each encoded pair 4 times on average (--reuse, training.ReusePool): twice the transformer steps per hour.

Each training stage checkpoints into WORK/ (atomic, every --save-every steps) and continues from there
when run again; WORK/times.json records how long each stage took.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import backbone as B
from common import data, presets
from common import training as T
from common.commands import run_command
from evaluation import evaluate
from mini import photos
from train_sft import flow_matching_loss


@dataclass
class Args:
    out: str = str(presets.ROOT)
    """where mini/backbone/, mini/sft/ and the evaluation are written"""
    work: str = "out/mini_build"
    """scratch folder: HR crops, checkpoints, logs (resumable)"""
    stage: str = "all"
    """all | data | vae | base | sft | eval"""
    quick: bool = False
    """a few steps of every stage (tests); never writes over the shipped preset unless --out says so"""
    seed: int = 0
    """seed of every stage (crops, noise, initial weights)"""
    threads: int = 2
    """torch threads"""
    vae_steps: int = 16000
    """VAE training steps"""
    vae_batch: int = 16
    """VAE crops per step"""
    vae_crop: int = 32
    """the VAE is fully convolutional: small crops train it cheaply"""
    vae_lr: float = 1e-3
    """VAE AdamW learning rate (warm-up, then cosine to 0)"""
    z_dim: int = 8
    """latent channels of the 4x VAE (the transformer's in/out channels follow: 4 z_dim packed, z_dim out).
    The shipped preset: 8. A smaller latent leaves a sampler fewer ways to put speckle into the decoded
    picture, at some cost in reconstruction (the mini README compares 8 and 32)"""
    vae_latent_noise: float = 0.0
    """decoder robustness: half the VAE training crops decode their latent plus N(0, (s std_c)^2), s ~
    U(0, this), std_c the batch's per-channel latent std; the decoder then turns small latent errors (a
    sampler's) into blur instead of speckle. 0 = off (the shipped preset)"""
    decoder_steps: int = 0
    """after the VAE stage, fine-tune only its decoder this many steps on noisy latents (--decoder-latent-noise;
    the encoder, the latents and their normalisation stay as they are). 0 = off (the shipped preset: at z_dim
    8, 1500 steps changed none of the SR bars; at z_dim 32 they cut speckle, mini/README.md)"""
    decoder_latent_noise: float = 1.0
    """the decoder fine-tune's noise: half the crops decode latent + N(0, (s std_c)^2), s ~ U(0, this), std_c the
    latents' per-channel std from the VAE's config"""
    decoder_lr: float = 2e-4
    """the decoder fine-tune's AdamW learning rate (warm-up, then cosine to 0)"""
    base_steps: int = 4500
    """base model steps (flow matching on the task mix)"""
    base_batch: int = 16
    """base model pairs per step"""
    base_lr: float = 5e-4
    """base model AdamW learning rate (warm-up, then cosine to 0)"""
    sft_steps: int = 2000
    """train_sft.py --steps"""
    sft_batch: int = 16
    """train_sft.py --batch-size"""
    sft_lr: float = 2e-4
    """train_sft.py --lr"""
    sft_degradation: str = "mini"
    """train_sft.py --degradation: 'realesrgan' (the paper's parameters, sized for 256 px crops) or 'mini'
    (data.MINI_DEGRADATION, sized for the 64 px crops; the shipped preset)"""
    sft_plain_fraction: float = 0.5
    """train_sft.py --plain-fraction: the share of SFT pairs whose LR is a plain blur + bicubic downscale"""
    sft_lr_schedule: str = "cosine"
    """train_sft.py --lr-schedule: constant or cosine"""
    reuse: int = 4
    """base and SFT train on each encoded pair this many times on average (training.ReusePool; on this CPU
    the text encoder + VAE cost more than the transformer step)"""
    hr_crops: int = 2000
    """96x96 HR crops written for train_sft.py (it takes random 64x64 crops of them)"""
    eval_crops: int = 32
    """held-out crops of the evaluation stage"""
    eval_steps: int = 40
    """Euler steps of the evaluation (paper §5.1: 40 at inference)"""
    save_every: int = 500
    """checkpoint every N steps of each stage"""


# ====================================================================================================
# The mini architecture: the real classes with small configs
# ====================================================================================================

def mini_vae_config(z_dim: int) -> dict:
    """4x spatial VAE (three levels, two downsamples), `z_dim` latent channels; ~2M parameters."""
    return dict(base_dim=16, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True])


# MMDiT: 4 double-stream blocks of width 192 (3 heads x 64); in_channels = 4 z_dim (2x2 packing) = 128.
# Width limited the fit: the velocity v = eps - x0 makes the network carry the 128-dim noisy token through
# its residual stream besides the content, and at width 128 it could not even match copying the bicubic
# latent at t = 1. An SR-only probe (700 steps from scratch, held-out loss averaged over t): width 128
# 0.636, width 192 0.508 (the SFT loss fell 0.421 -> 0.330; its samples' SSIM barely moved: README).
# Heads of 64 leave 28 RoPE dimensions per spatial axis (14 frequencies): a target token finds the
# condition token at its own position faster than with heads of 32 (copy-task probe: one-step x0 error
# 0.54 vs 0.61). Both transformers are shipped in float16 (save_half).
def mini_transformer_config(z_dim: int) -> dict:
    return dict(patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=4, attention_head_dim=64,
                num_attention_heads=3, joint_attention_dim=32, axes_dims_rope=(8, 28, 28))


MINI_VAE = mini_vae_config(Args.z_dim)  # the shipped preset's configs
MINI_TRANSFORMER = mini_transformer_config(Args.z_dim)
HR_SIZE = 64  # output side of every training sample (LR 16x16)

# The base model's tasks: instruction -> how its input is made from a clean crop (and its target).
# "enhance" uses the SR prompt c of Eq.5 on MILD single degradations; 4x Real-ESRGAN inputs are left to SFT.
BASE_TASKS = {
    "enhance": B.DEFAULT_PROMPT,
    "denoise": "Remove the noise from this photo.",
    "deblur": "Remove the blur from this photo.",
    "dejpeg": "Remove the JPEG compression artifacts from this photo.",
    "upscale2x": "Upscale this photo 2x.",
    "grey": "Make this photo black and white.",
    "keep": "Keep this photo exactly as it is.",
}
TEXTS = [B._TEMPLATE_PREFIX, B._IMAGE_SLOT, *BASE_TASKS.values()]  # the words the tokenizer knows


def build_untrained(seed: int, z_dim: int = Args.z_dim) -> B.Backbone:
    """The mini backbone with random weights: the tiny preset's text side with a word tokenizer, and the
    mini VAE and transformer with `z_dim` latent channels. Deterministic for a seed (forked RNG)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    parts = B.build_tiny_components(seed, words_from=TEXTS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z = z_dim  # identity normalisation until vae_stage measures the real one
        parts["vae"] = AutoencoderKLQwenImage(**mini_vae_config(z), latents_mean=[0.0] * z, latents_std=[1.0] * z)
        parts["transformer"] = QwenImageTransformer2DModel(**mini_transformer_config(z))
    B.single_frame_convs(parts["vae"])
    for m in (parts["vae"], parts["transformer"], parts["text_encoder"]):
        m.requires_grad_(False).eval()
    return B.Backbone(**parts, prompt_drop_idx=B.prompt_drop_index(parts["processor"].tokenizer), name="mini")


# ====================================================================================================
# 1. data
# ====================================================================================================


def data_stage(args: Args, work: Path) -> Path:
    """HR crops (96 px) of the training photos for train_sft.py, written once."""
    folder = work / "hr"
    if len(list(folder.glob("*.png"))) == args.hr_crops:
        return folder
    crops = photos.random_crops(photos.TRAIN, args.hr_crops, 96, torch.Generator().manual_seed(args.seed + 1))
    for i, crop in enumerate(tqdm(crops, desc="HR crops")):
        data.save_image(crop, folder / f"{i:05d}.png")
    return folder


# ====================================================================================================
# 2. VAE
# ====================================================================================================


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """vae.decode without its final clamp to [-1, 1] (which has no gradient outside), for training:
    z (B,C,1,h,w) raw latents -> (B,3,H,W) in about [0, 1]. The same cached single-frame path as
    `AutoencoderKLQwenImage._decode`."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    vae._conv_idx = [0]
    out = vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return (out[:, :, 0] + 1) / 2


def encode_raw(vae, images: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) in [0,1] -> raw (not normalised) posterior modes (B,C,1,h,w), with gradients."""
    return vae.encode(images.unsqueeze(2) * 2 - 1).latent_dist.mode()


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images in [0, 1] (RGB, for monitoring the VAE)."""
    return -10 * torch.log10(((x.clamp(0, 1) - y) ** 2).mean((1, 2, 3)).clamp_min(1e-10))


def vae_stage(args: Args, work: Path) -> Path:
    """Train the mini VAE; returns the folder of the final VAE (save_pretrained)."""
    from diffusers import AutoencoderKLQwenImage

    final = work / "vae" / "final"
    if (final / "config.json").exists():
        return final
    vae = build_untrained(args.seed, args.z_dim).vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 200, args.vae_steps))
    g = torch.Generator().manual_seed(args.seed + 2)
    start = resume(work / "vae" / "checkpoints", vae, opt, g, sched)
    # monitoring only: crops of the TRAINING photos from another stream (held-out photos are for eval)
    monitor = photos.random_crops(photos.TRAIN, 16, HR_SIZE, torch.Generator().manual_seed(args.seed + 3))
    T.truncate_jsonl(work / "vae" / "log.jsonl", start)  # a resumed run logs each step once
    log = open(work / "vae" / "log.jsonl", "a")
    for step in tqdm(range(start, args.vae_steps), initial=start, total=args.vae_steps, desc="VAE"):
        x = photos.random_crops(photos.TRAIN, args.vae_batch, args.vae_crop, g)
        z = noisy_latent(encode_raw(vae, x), args.vae_latent_noise, g)
        loss = reconstruction_loss(decode_unclamped(vae, z), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if done % 250 == 0 or done == args.vae_steps:
            with torch.no_grad():
                p = float(psnr(decode_unclamped(vae, encode_raw(vae, monitor)), monitor).mean())
            log.write(json.dumps({"step": done, "loss": loss.item(), "monitor_psnr": p}) + "\n")
            log.flush()
        if done % args.save_every == 0 or done == args.vae_steps:
            checkpoint(work / "vae" / "checkpoints", done, vae, opt, g, sched)
    # the latent normalisation of the real VAE's config: per-channel mean / std of the posterior modes
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        crops = photos.random_crops(photos.TRAIN, 256, HR_SIZE, torch.Generator().manual_seed(args.seed + 4))
        z = torch.cat([encode_raw(vae, c) for c in crops.split(32)])  # (N,C,1,h,w)
    mean = z.mean((0, 2, 3, 4))
    std = z.std((0, 2, 3, 4))
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean],
                           latents_std=[round(float(v), 6) for v in std])
    AutoencoderKLQwenImage.save_pretrained(vae, final)
    return final


def reconstruction_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The VAE's training loss: L1 for detail plus a little MSE for PSNR."""
    return (y - x).abs().mean() + 0.1 * ((y - x) ** 2).mean()


def noisy_latent(z: torch.Tensor, max_scale: float, g: torch.Generator,
                 std: torch.Tensor | None = None) -> torch.Tensor:
    """z (B,C,1,h,w) with N(0, (s std_c)^2) added, s ~ U(0, max_scale) for a random half of the batch and 0 for
    the other half (std_c: `std`, (1,C,1,1,1), or else the batch's per-channel std). max_scale 0 returns z."""
    if max_scale <= 0:
        return z
    s = torch.rand(len(z), generator=g) * max_scale * (torch.rand(len(z), generator=g) < 0.5)
    noise = torch.randn(z.shape, generator=g)
    std = z.detach().std((0, 2, 3, 4), keepdim=True) if std is None else std
    return z + s.view(-1, 1, 1, 1, 1) * std * noise


def decoder_stage(args: Args, work: Path, vae_dir: Path) -> Path:
    """Fine-tune only the decoder (post_quant_conv + decoder) of the trained VAE on noisy latents, so that it
    turns a sampler's small latent errors into blur instead of speckle; the encoder (so the latents the base
    and SFT learn, and their normalisation) is unchanged. A few minutes: no checkpoints, a rerun starts over."""
    from diffusers import AutoencoderKLQwenImage

    final = work / "decoder" / "final"
    if (final / "config.json").exists():
        return final
    vae = B.single_frame_convs(AutoencoderKLQwenImage.from_pretrained(vae_dir)).float().requires_grad_(False)
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 100, args.decoder_steps))
    g = torch.Generator().manual_seed(args.seed + 11)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    for _ in tqdm(range(args.decoder_steps), desc="decoder"):
        x = photos.random_crops(photos.TRAIN, args.vae_batch, args.vae_crop, g)
        with torch.no_grad():
            z = encode_raw(vae, x)
        loss = reconstruction_loss(decode_unclamped(vae, noisy_latent(z, args.decoder_latent_noise, g, std)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval().requires_grad_(False)
    AutoencoderKLQwenImage.save_pretrained(vae, final)
    return final


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))


def checkpoint(root: Path, step: int, model, opt, generator, sched) -> None:
    T.save_training_checkpoint(root, step, model, opt, T.DistInfo(0, 1, 0, torch.device("cpu")), generator,
                               sched, keep_last=2)


def resume(root: Path, model, opt, generator, sched) -> int:
    """Continue from the newest checkpoint under `root` (0 if none)."""
    found = T.resolve_resume("latest", root)
    if found is None:
        return 0
    state = T.restore_training_checkpoint(found, model, opt, T.DistInfo(0, 1, 0, torch.device("cpu")), generator,
                                          sched)
    tqdm.write(f"resumed {root.parent.name} from {found}")
    return state["step"]


# ====================================================================================================
# 3. base: a general image-to-image model (multi-task flow matching)
# ====================================================================================================


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) blurred with an isotropic Gaussian of std sigma[i] px each (21x21 kernels)."""
    kernels = torch.stack([data.gaussian_family_kernel(21, float(s), float(s)) for s in sigma])
    return data.filter2d(x, kernels)


def task_pair(task: str, hr: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of one base task for one clean crop hr (3,H,W)."""
    x, u = hr[None], float(torch.rand((), generator=g))
    if task == "enhance":  # one MILD degradation, chosen at random
        task = ("deblur", "denoise", "dejpeg", "upscale2x")[int(torch.randint(4, (), generator=g))]
        u *= 0.4
    if task == "denoise":
        noisy = data.add_gaussian_noise(x, torch.tensor([(3 + 37 * u) / 255]), torch.tensor([u < 0.3]), g)
        return data.quantize(noisy)[0], hr
    if task == "deblur":
        return gaussian_blur(x, torch.tensor([0.6 + 2.4 * u]))[0].clamp(0, 1), hr
    if task == "dejpeg":
        return data.jpeg(x, [round(90 - 80 * u)])[0], hr
    if task == "upscale2x":
        h, w = hr.shape[-2:]
        small = F.interpolate(x, size=(h // 2, w // 2), mode="area")
        return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)[0], hr
    if task == "grey":
        return hr, (0.299 * hr[0] + 0.587 * hr[1] + 0.114 * hr[2]).expand(3, -1, -1)
    return hr, hr  # keep


def base_items(bb: B.Backbone, hr: torch.Tensor, g: torch.Generator) -> list[tuple[B.Condition, torch.Tensor]]:
    """A mixed-task batch: each crop gets a task; one (condition, target latent tokens (1,N,4C)) per crop."""
    names = list(BASE_TASKS)
    weights = torch.tensor([3.0] + [1.0] * (len(names) - 1))  # "enhance" (the SR prompt) most often
    conds, targets = [], []
    for crop in hr:
        task = names[int(torch.multinomial(weights, 1, generator=g))]
        source, target = task_pair(task, crop, g)
        conds.append(B.encode_condition_image(bb, source, BASE_TASKS[task]))
        targets.append(target)
    with torch.no_grad():
        x0 = B.pack_latents(B.vae_encode(bb.vae, torch.stack(targets)))
    return list(zip(conds, x0.split(1)))


def base_stage(args: Args, work: Path, out: Path, vae_dir: Path) -> Path:
    """Train the mini base transformer on the task mix; saves the whole pipeline to OUT/backbone/."""
    from diffusers import AutoencoderKLQwenImage

    bb = build_untrained(args.seed, args.z_dim)
    bb.vae = B.single_frame_convs(AutoencoderKLQwenImage.from_pretrained(vae_dir)).eval().requires_grad_(False)
    tr = bb.transformer.train().requires_grad_(True)
    opt = torch.optim.AdamW(tr.parameters(), lr=args.base_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 100, args.base_steps))
    g = torch.Generator().manual_seed(args.seed + 5)
    start = resume(work / "base" / "checkpoints", tr, opt, g, sched)
    # a resumed base run refills its pool with fresh crops (it resumes, not bit for bit)
    pool = T.ReusePool(args.reuse, lambda: photos.random_crops(photos.TRAIN, args.base_batch, HR_SIZE, g),
                       lambda hr: base_items(bb, hr, g), g)
    pool.prefill(start)
    T.truncate_jsonl(work / "base" / "log.jsonl", start)
    log = open(work / "base" / "log.jsonl", "a")
    for step in tqdm(range(start, args.base_steps), initial=start, total=args.base_steps, desc="base"):
        items = pool(step)
        cond, x0 = B.stack_pairs(items)
        loss = flow_matching_loss(tr, cond, x0, g)  # Eq.5, the same loss as the cold start
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if done % 50 == 0:
            log.write(json.dumps({"step": done, "loss": float(loss)}) + "\n")
            log.flush()
        if done % args.save_every == 0 or done == args.base_steps:
            checkpoint(work / "base" / "checkpoints", done, tr, opt, g, sched)
    tr.eval().requires_grad_(False)
    folder = out / "backbone"
    if folder.exists():
        shutil.rmtree(folder)
    B.save_backbone(bb, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    save_half(weights, weights)
    return folder


# ====================================================================================================
# 4. SFT: the project's own cold-start script on the base
# ====================================================================================================


def sft_stage(args: Args, work: Path, out: Path, hr_dir: Path, base_dir: Path) -> Path:
    cmd = ["train_sft.py", "--model", str(base_dir), "--hr-dir", str(hr_dir), "--crop-size",
           str(HR_SIZE), "--batch-size", str(args.sft_batch), "--steps", str(args.sft_steps), "--lr", str(args.sft_lr),
           "--warmup-steps", str(min(50, args.sft_steps)), "--reuse", str(args.reuse), "--seed", str(args.seed),
           "--degradation", args.sft_degradation, "--plain-fraction", str(args.sft_plain_fraction),
           "--lr-schedule", args.sft_lr_schedule,
           "--save-every", str(args.save_every), "--sample-every", str(args.save_every), "--sample-steps", "20",
           "--out", str(work / "sft"), "--resume", "latest"]
    tqdm.write("$ " + " ".join(cmd) + f"    (its output: {work / 'sft.log'})")
    run_command(cmd, work / "sft.log")
    target = out / "sft" / "transformer.safetensors"
    save_half(work / "sft" / "transformer.safetensors", target)
    return target


def save_half(source: Path, target: Path) -> None:
    """Rewrite a transformer's float32 safetensors as float16 (atomically): the shipped mini base and SFT
    take half the bytes (the 40 MB budget) and load into float32 models like any checkpoint. The rounding
    (relative 5e-4) happens once, before the evaluation and before SFT starts from the base."""
    from safetensors.torch import load_file

    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(source)).items()}
    T.atomic_save_safetensors(state, target)


# ====================================================================================================
# 5. evaluation on held-out crops
# ====================================================================================================


def plain_lr(hr: torch.Tensor) -> torch.Tensor:
    """The second LR kind: a mild Gaussian blur (sigma 1.2 HR px) then a bicubic 4x downscale, 8-bit."""
    return data.plain_degrade(hr, 1.2)


def eval_set(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n held-out HR crops (n,3,64,64) and their LR of both kinds {"realesrgan", "plain"} (n,3,16,16).

    Crop i's degradation draws from its own generator (seed, i), so any subset reproduces exactly."""
    hr = photos.random_crops(photos.HELDOUT, n, HR_SIZE, torch.Generator().manual_seed(seed))
    return hr, {"realesrgan": data.degrade_each(hr, data.DegradationConfig(), seed), "plain": plain_lr(hr)}


def evaluate_methods(bb: B.Backbone, sft: str | Path, hr: torch.Tensor, lrs: dict[str, torch.Tensor],
                     steps: int, seed: int = 0) -> dict:
    """{"table": {lr kind: {method: {metric: per-crop values}}}, "outputs": the images} for bicubic, base,
    SFT, HR, and "VAE" = the HR through the VAE (its reconstruction: the ceiling of any SR result)."""
    base_weights = {k: v.clone() for k, v in bb.transformer.state_dict().items()}
    with torch.no_grad():
        recon = B.vae_decode(bb.vae, B.vae_encode(bb.vae, hr))
    outputs = {kind: {"bicubic": B.upscale(lr), "base": B.super_resolve_many(bb, lr, steps, seed)}
               for kind, lr in lrs.items()}
    B.load_transformer_weights(bb.transformer, sft, "mini")
    for kind, lr in lrs.items():
        outputs[kind]["SFT"] = B.super_resolve_many(bb, lr, steps, seed)
        outputs[kind]["VAE"] = recon
        outputs[kind]["HR"] = hr
    bb.transformer.load_state_dict(base_weights)
    metrics = {name: evaluate.create_metric(name) for name in ("PSNR", "SSIM")}
    table = {}
    for kind, methods in outputs.items():
        table[kind] = {}
        for method, sr in methods.items():
            row = {name: [float(v) for v in m(sr, hr).flatten()] for name, m in metrics.items() if method != "HR"}
            row["sharpness"] = evaluate.sharpness(sr).tolist()
            table[kind][method] = row
    return {"table": table, "outputs": outputs}


def eval_stage(args: Args, out: Path) -> dict:
    """Write OUT/backbone_eval.json (per-crop values), .md (means) and .png (a picture per LR kind)."""
    bb = B.load_backbone(str(out / "backbone"))
    hr, lrs = eval_set(args.eval_crops, args.seed + 100)
    result = evaluate_methods(bb, out / "sft" / "transformer.safetensors", hr, lrs, args.eval_steps, args.seed)
    table = result["table"]
    record = {"crops": args.eval_crops, "steps": args.eval_steps, "seed": args.seed, "table": table}
    T.atomic_write_text(json.dumps(record, indent=1), out / "backbone_eval.json")
    lines = [f"Held-out crops: {args.eval_crops} x 64x64 from {', '.join(photos.HELDOUT)}; LR 16x16; "
             f"{args.eval_steps} Euler steps, one sample per LR. PSNR / SSIM on Y (YCbCr); sharpness = mean "
             "gradient magnitude of Y (evaluate.sharpness; HR is the reference).", "",
             "| LR kind | method | PSNR | SSIM | sharpness |", "|---|---|---|---|---|"]
    for kind, methods in table.items():
        for method, row in methods.items():
            mean = {k: sum(v) / len(v) for k, v in row.items()}
            cells = [f"{mean['PSNR']:.2f}" if "PSNR" in mean else "-", f"{mean['SSIM']:.4f}" if "SSIM" in mean else "-",
                     f"{mean['sharpness']:.4f}"]
            lines.append(f"| {kind} | {method} | " + " | ".join(cells) + " |")
    T.atomic_write_text("\n".join(lines) + "\n", out / "backbone_eval.md")
    columns = []  # per LR kind, up to 8 crops: bicubic | base | SFT | HR
    for kind, methods in result["outputs"].items():
        tiles = [torch.cat([methods[m][i] for m in ("bicubic", "base", "SFT", "HR")], dim=-1)
                 for i in range(min(8, len(hr)))]
        columns.append(torch.cat(tiles, dim=-2))
    grid = torch.cat(columns, dim=-1)
    data.save_image(F.interpolate(grid[None], scale_factor=2, mode="nearest")[0], out / "backbone_eval.png")
    print("\n".join(lines))
    return record


# ====================================================================================================
# main
# ====================================================================================================


QUICK = dict(vae_steps=3, vae_batch=2, base_steps=3, base_batch=2, sft_steps=2, sft_batch=2, hr_crops=8,
             eval_crops=2, eval_steps=2, save_every=2)


def main(argv: list[str] | None = None) -> None:
    args, parser = T.parse_dataclass_args(Args, argv, __doc__.split("\n")[0])
    if args.stage not in ("all", "data", "vae", "base", "sft", "eval"):
        parser.error(f"--stage {args.stage}: choose all, data, vae, base, sft or eval")
    if args.quick:
        args = Args(**{**asdict(args), **QUICK})
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    for d in (work / "vae", work / "base", out):
        d.mkdir(parents=True, exist_ok=True)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}

    def timed(name, fn):
        t0 = time.time()
        result = fn()
        times[name] = round(times.get(name, 0.0) + time.time() - t0, 1)  # a resumed stage adds up
        T.atomic_write_text(json.dumps(times, indent=1), times_path)
        return result

    want = lambda s: args.stage in ("all", s)  # noqa: E731
    hr_dir = timed("data", lambda: data_stage(args, work)) if want("data") or want("sft") else work / "hr"
    vae_dir = timed("vae", lambda: vae_stage(args, work)) if want("vae") or want("base") else work / "vae" / "final"
    if args.decoder_steps and (want("vae") or want("base")):  # the backbone is saved with the fine-tuned decoder
        vae_dir = timed("decoder", lambda: decoder_stage(args, work, vae_dir))
    if want("base"):
        timed("base", lambda: base_stage(args, work, out, vae_dir))
    if want("sft"):
        timed("sft", lambda: sft_stage(args, work, out, hr_dir, out / "backbone"))
    if want("eval"):
        timed("eval", lambda: eval_stage(args, out))
    print(f"stage times (s): {times}")


if __name__ == "__main__":
    main()
