"""Build the mini COMPASS reward model from scratch on a CPU, through the project's own pipeline.

COMPASS (paper §3) is a Qwen3-VL fine-tuned on COMPASS-20K: LR inputs, SR outputs of many methods, labels
from the three-stage annotation (Eq.1-3). This script makes the same thing in miniature, from the
photographs that ship inside installed packages (photos.py; the HELDOUT photos are never trained on):

    1. pretrain   the analogue of Qwen3-VL's pretraining: synthetic (LR, candidate) pairs whose candidates
                  are photo crops or bicubic upscales with random blur / noise / JPEG / sharpening, labelled
                  by `train_compass.py annotate --calibration none` (absolute scores: F = SSIM to the HR,
                  Q = the weights-free SNB score, evaluate.snb_quality), trained with `train_compass.py
                  train` from random weights. It teaches the vision tower to see degradations.
                                                               -> mini/compass_base/ (save_pretrained)
                  (`--perception-steps N` first warms the vision tower on damaged / clean crop pairs,
                  one score per damage: `perception_warmup`; with --pretrained, before the train stage)
                  (`--pretrained mini` starts the later stages from the shipped one instead)
    2. data       COMPASS-20K in miniature: 16x16 LR made by data.py's degradation (and some by a plain
                  blur + bicubic downscale) from 64x64 crops, and SR outputs of 12 "methods": the mini
                  backbone's own BASE and SFT samples at 40 steps and at the RL stages' 6 steps, an
                  over-sharpened SFT sample, and classical operators (bicubic, nearest, blur, unsharp mask,
                  noise, JPEG, the HR itself); training groups from the training photos, held-out groups
                  from the held-out photos. The training groups also get the failures a reward must not
                  pay for (FAILURES: damaged HRs, the SFT sample with a periodic pattern, a colour cast or
                  speckle; --no-failure-candidates leaves them out) and, with --policy-loras, the rollouts
                  of RL policies trained against an earlier COMPASS: a hack round (below)
    3. annotate   `train_compass.py annotate`: F = SSIM to the HR (Eq.1 with a weights-free distance;
                  --fidelity texture for evaluate.texture_fidelity),
                  stage 1 anchors = SNB on the SR and on the LR as the model sees it (--lr-view sr), stage 2
                  = exhaustive pairwise ranking by FSIM to the HR (a weights-free perceptual FR metric in the
                  role of the paper's trained compare model), stage 3 = Eq.2-3 calibration
    4. train      `train_compass.py train` from the pretrained model (answer-only loss, cosine LR; --augment
                  flips/rotates each pair at random)           -> mini/compass/  (save_pretrained)
    5. eval       `python -m evaluation.sriqa` on the held-out groups in the SRIQA-Bench layout (MOS = 20 x Eq.4 of
                  the calibrated labels), answer parse rate, Spearman of predicted F and Q_SR with the labels,
                  and the Table 3 cases: models trained the same way on absolute labels / without F, and
                  gamma 5 / 7 / 9 / linear                            -> mini/compass_eval.{md,json}
    6. refreward  RefReward-SR from the COMPASS of step 4: `train_refreward.py pairs` (label margin 1.0), a
                  warm-up on answers that read both candidates before the verdict, then GRPO; scored on held-out
                  pairs, in the SRIQA table and on mini/reward_checks.py's unambiguous pairs
                                                          -> mini/refreward/, mini/refreward_eval.json

The mini model is the real Qwen3VLForConditionalGeneration with a small config: text width 128 x 8
layers (--text-layers; the shipped mini/compass has 4, which read out less of F), RoPE base 5e6 ** (1/4)
(--rope-theta), vision depth 3 x 96 with PATCH 4, so a 64x64 image costs 64 vision tokens (the 8B's patch
16 would give 4, too few to see blur or noise at this size; patch 8 gave 16, and the model then could not
learn F: README "The mini presets"); the byte tokenizer gets one token per word of the task text, so the
real prompt is kept and costs ~110 tokens instead of ~390.

A hack round: RL against the COMPASS just built (rl_nr.py --reward-model <its folder>), then the build again
with that LoRA as candidates, starting from that COMPASS (--pretrained <its folder> --epochs 1); the
annotation labels the policy's outputs like every other candidate, and mini/reward_checks.py measures what
the round changed on held-out photos.

    python -m mini.build_compass                      # everything, resumable (needs the mini backbone)
    python -m mini.build_compass --stage eval         # one part: pretrain | data | annotate | train | eval
    python -m mini.build_compass --quick --out /tmp/m --work /tmp/w   # a few steps of each part (tests)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import infer
import reward
from common import backbone as B
from common import compass_text as CT
from common import data, presets
from common import training as T
from common import vl_model as VL
from common.commands import run_command
from common.data import load_image, to_pil
from evaluation.sriqa import write_sriqa_layout
from mini import photos
from mini.build_backbone import gaussian_blur, plain_lr
from train_compass import AGAINST_ORDER, load_records


# The mini architecture (VL.build_compass): ~2.6M parameters.
MINI_COMPASS = dict(
    text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, mrope_section=[4, 6, 6]),
    vision=dict(depth=3, hidden_size=96, intermediate_size=256, num_heads=4, deepstack_visual_indexes=[1, 2]),
    patch_size=4, min_pixels=32 * 32, max_pixels=128 * 128,
)
TEXTS = ["Input image:", "\nEnhanced image:", CT.TASK_FULL, CT.TASK_QUALITY]  # words -> tokens
GENERATIVE = ("mini_base", "mini_base_6", "mini_sft", "mini_sft_6", "mini_sft_sharpened")


@dataclass
class Args:
    out: str = str(presets.ROOT)
    """where mini/compass/ and the evaluation are written"""
    work: str = "out/mini_compass_build"
    """scratch folder: images, JSONL, checkpoints, logs"""
    backbone: str = "mini"
    """the backbone whose BASE and SFT samples are candidates ('mini' = the shipped preset, or a folder)"""
    sft: str = "mini"
    """its SFT weights ('mini' = shipped)"""
    lr_degradation: str = "mini"
    """data stage: the degradation of 3 in 4 COMPASS LRs (a data.DEGRADATIONS name; the rest are plain blur +
    bicubic). 'mini' (data.MINI_DEGRADATION, scaled to 64 -> 16 px crops) is the world the mini backbone runs in;
    'realesrgan' (the paper's ranges, sized for 256 px crops; they leave a 16 px LR no 8-16 px content) built the
    COMPASS shipped before the z_dim 8 backbone"""
    stage: str = "all"
    """all | pretrain | data | annotate | train | eval | refreward"""
    quick: bool = False
    """a few steps of every stage (tests)"""
    seed: int = 0
    train_seed: int = 0
    """seed of the COMPASS and Table 3 trainings' sample order and augmentation (`train_compass.py --seed`);
    the data stay those of --seed, so runs with another --train-seed measure the training's own spread"""
    threads: int = 2
    pretrained: str = ""
    """start the COMPASS, Table 3 and RefReward-SR training from this pretrained model instead of the
    pretrain stage's own output: a save_pretrained folder, or 'mini' = the shipped mini/compass_base
    (which the pretrain stage wrote; it saves that stage's hour here). The pretrain stage is then skipped"""
    perception_steps: int = 0
    """steps of `perception_warmup` (not in the paper): the vision tower learns to see blur, noise, JPEG, nearest
    upscales, periodic patterns and colour casts before any COMPASS training: on the random weights before the
    pretrain stage, or on --pretrained's model before the train stage. 0 = none (the shipped models were built
    without it); 600 made the vision tower of the round-1 COMPASS order 94-100% of held-out clean / damaged
    pairs of every kind (README "Why the round-1 model misorders the unambiguous pairs")"""
    perception_lr: float = 5e-4
    perception_check_crops: int = 48
    """held-out crops of the `perception_check` the warm-up logs before and after"""
    pretrain_groups: int = 800
    pretrain_epochs: int = 6
    pretrain_lr: float = 1e-3
    against_order: str = "flat"
    """`train_compass.py annotate --against-order`: stage 3 in a group whose SNB anchors disagree with its FSIM
    order. flat (shipped): one Q_SR for the whole group, which happened in 40% of the training groups once the
    failure candidates joined; sorted: the group's anchors handed out in the FSIM order, measured on 1,600 round-2
    groups; round 2 trained on them (README "Why the round-1 model misorders the unambiguous pairs")"""
    fidelity: str = "ssim"
    """the labels' F (`train_compass.py annotate --fidelity`; the paper: DISTS, whose weights are not
    here): ssim (shipped), texture (evaluate.texture_fidelity, a weights-free DISTS analogue that does not
    pay for blur) or blend ((ssim + texture) / 2); the last two measured, not shipped: README "OARS in
    miniature"""
    patch_size: int = MINI_COMPASS["patch_size"]
    """the vision tower's patch: 4 = 64 vision tokens per 64x64 image (shipped), 8 = 16"""
    text_layers: int = MINI_COMPASS["text"]["num_hidden_layers"]
    """decoder layers of the text model: 8 (mini/compass_base). The shipped mini/compass has 4 (its first build:
    held-out Spearman of F 0.546 at one view, 0.613 over 8; after the hack round it ships with, 0.633 over 8 on
    the z_dim 8 backbone's groups); 8-layer builds reached 0.571-0.625 at one view (README "The mini presets")"""
    freeze_vision: bool = False
    """`train_compass.py train --freeze-vision` of the COMPASS stage and the Table 3 models: the vision tower
    stays as the pretrained (or perception-warmed) model has it, only the language model learns. Off (shipped)"""
    rope_theta: float = 5e6 ** 0.25
    """the text model's RoPE base (shipped: 5e6 ** 0.25 = 47.287). The 8B's 5e6 on a 32-dim head leaves each
    image axis ONE useful frequency; the fourth root makes the head's 16 frequencies exactly the 8B's 16
    highest (README "The mini presets")"""
    pretrain_foreign: int = 2
    """pretraining candidates per group (of 6 random operators) replaced by `foreign_detail` ones: sharp
    images whose detail the LR does not support (the shipped recipe uses 2; at patch 8 they gave no gain,
    and their effect at patch 4 alone was not measured; README "The mini presets")"""
    train_groups: int = 1600
    """12 pairs each: 19,200 pairs, the size of the paper's training set (§5.1); at 640 the model over-fits"""
    heldout_groups: int = 48
    epochs: int = 3
    """§5.1 trains 8 epochs; the mini model over-fits long before (README "The mini presets")"""
    augment: str = "dihedral"
    """`train_compass.py train --augment` of the COMPASS stage and the Table 3 models: one of the 8
    flips/rotations of each pair (its labels, SSIM and SNB, do not depend on orientation; none = paper)"""
    fidelity_weight: float = 1.0
    """`train_compass.py train --fidelity-weight` of the COMPASS stage: loss weight of the answer's Fidelity
    line (the Table 3 models answer without F); 1 (shipped). 3 did not help: one epoch each from
    mini/compass_base on the same data and seed, held-out All-Acc 51.8 vs 54.4, Spearman F 0.557 vs 0.567
    (README "The mini presets")"""
    rank_weight: float = 0.0
    """`train_compass.py train --rank-weight` of the COMPASS stage: a ranking loss on the read-out beside the answer
    cross-entropy (0 = the answer tokens alone; README "The mini presets" measures 1 on round 2's data)"""
    lr: float = 5e-4
    batch: int = 16
    views: int = presets.MINI_COMPASS_VIEWS
    """eval stage: COMPASS's readings averaged over this many flips/rotations of each pair (`train_compass.py
    eval --views`, reward.LocalScorer views) in every table and Spearman; recorded in compass_eval.json. 8
    (the shipped evaluation's) lifted the held-out Spearman of F above 0.6 for every model measured, 1 is the
    paper's single reading (README "The mini presets")"""
    failure_candidates: bool = True
    """data stage: add FAILURES to the training groups (damaged HRs; the SFT sample with a periodic pattern,
    a colour cast or speckle): the artefacts RL found in the mini COMPASS, as labelled candidates. The
    held-out groups keep the 12 methods, so every round's table reads the same pairs; the failures are
    measured on held-out photos by mini/reward_checks.py"""
    policy_loras: list[str] = field(default_factory=list)
    """data stage: RL LoRA files (rl_nr.py / rl_fr.py outputs) whose rollouts' samples (BASE + LoRA, 6 steps)
    join the training groups as candidates rl_<file stem>: one hack round = RL against a COMPASS, its
    outputs labelled by `annotate`, COMPASS retrained (README "The mini presets")"""
    ablations: bool = True
    """also train the Table 3 models (absolute labels, no F) with the same budget"""
    refreward_start: str = "compass"
    """RefReward-SR starts from: 'compass' (this build's trained COMPASS, which already reads one image) or
    'pretrained' (the pretraining stage's model / --pretrained, as the earlier builds did). Not in the seed
    papers (RefReward-SR starts from a general VLM); at mini scale only a model that already reads SR quality
    learned to compare (mini/README.md, "Mini RefReward-SR")"""
    refreward_margin: float = 1.0
    """RefReward-SR: training pairs only where the two candidates' label rewards (Eq.4) differ by at least this
    (`train_refreward.py pairs --margin`); the held-out pairs keep that command's default"""
    refreward_warmup: int = 600
    """RefReward-SR: warm-up steps before GRPO (`train_refreward.py train --warmup-steps`; on round 2's data
    1,200 scored lower on held-out pairs than 600: the judge fits the training photos)"""
    refreward_warmup_verdicts: str = "readings"
    """RefReward-SR: the warm-up's verdicts (`--warmup-verdicts`): 'readings' (the verdict after both
    candidates' label rewards in the think), 'labelled' (the verdict alone) or 'random' (a format warm-up, as
    the first mini RefReward-SR, which answered by position)"""
    refreward_warmup_lr: float = 3e-4
    """RefReward-SR: the warm-up's learning rate (at 1e-3 the mini judge's readings collapse to the mean)"""
    refreward_steps: int = 40
    """RefReward-SR: GRPO steps (--refreward-prompts pairs x --refreward-group answers each)"""
    refreward_prompts: int = 8
    """RefReward-SR: labelled pairs per GRPO step (`train_refreward.py train --prompts`)"""
    refreward_group: int = 8
    """RefReward-SR: sampled answers per pair, the GRPO group (`train_refreward.py train --group`)"""
    refreward_lr: float = 1e-4
    """RefReward-SR: GRPO's learning rate (`train_refreward.py train --lr`, whose default is DeepSeekMath's 1e-6
    for billion-parameter models)"""
    refreward_eval_groups: int = 8
    """RefReward-SR is scored on the first N held-out groups (every pair in both orders; 66 pairs a group)"""
    refreward_check_crops: int = 48
    """RefReward-SR: held-out crops of the unambiguous pairs (`mini.reward_checks --crops`)"""


# ====================================================================================================
# candidates
# ====================================================================================================


def unsharp(x: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """Unsharp mask: x + amount (x - blur(x)), clipped (the over-sharpening that NR rewards can invite)."""
    return (x + amount * (x - gaussian_blur(x, torch.full((x.shape[0],), sigma)))).clamp(0, 1)


def uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def degraded(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """One classical operator with a random strength on (1,3,H,W)."""
    if kind == "blur":
        return gaussian_blur(x, torch.tensor([uniform(g, 0.8, 2.2)])).clamp(0, 1)
    if kind == "sharpen":
        return unsharp(x, uniform(g, 0.8, 3.0))
    if kind == "noise":
        sigma = torch.tensor([uniform(g, 0.01, 0.07)])
        return data.add_gaussian_noise(x, sigma, torch.tensor([bool(torch.rand((), generator=g) < 0.3)]), g)
    if kind == "jpeg":
        return data.jpeg(x, [round(uniform(g, 8, 40))])
    raise ValueError(kind)


def make_lr(hr: torch.Tensor, g: torch.Generator, seed: int, degradation: str = "realesrgan") -> torch.Tensor:
    """(1,3,64,64) -> (1,3,16,16): data.py's degradation `degradation` (a data.DEGRADATIONS name; 3 in 4) or a
    plain blur + bicubic."""
    if float(torch.rand((), generator=g)) < 0.25:
        return plain_lr(hr)
    return data.degrade(hr, data.DEGRADATIONS[degradation], generator=torch.Generator().manual_seed(seed))


def write_group(root: Path, name: str, hr: torch.Tensor, lr: torch.Tensor, srs: dict[str, torch.Tensor]) -> None:
    """The `annotate` folder layout: lr/NAME.png, gt/NAME.png, sr/<method>/NAME.png."""
    data.save_image(lr, root / "lr" / f"{name}.png")
    data.save_image(hr, root / "gt" / f"{name}.png")
    for method, img in srs.items():
        data.save_image(img, root / "sr" / method / f"{name}.png")


def foreign_detail(hr: torch.Tensor, other: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A sharp image whose detail is not the LR's: the low-pass of `hr` (its colours and coarse shapes)
    plus the high-pass of another crop `other`, amplified 0.7-1.5x. It looks like a photograph but the
    LR does not support its detail, like a generative SR sample that invents texture."""
    sigma = torch.tensor([uniform(g, 1.0, 2.5)])
    detail = other - gaussian_blur(other, sigma)
    return data.quantize((gaussian_blur(hr, sigma) + uniform(g, 0.7, 1.5) * detail).clamp(0, 1))


def pretrain_data(folder: Path, n: int, seed: int, foreign: int = 0) -> None:
    """Synthetic attribute pairs: per group the HR, its bicubic upscale, random operators on either, and
    `foreign` candidates with foreign detail (8 per group in all)."""
    g = torch.Generator().manual_seed(seed)
    hrs = photos.random_crops(photos.TRAIN, n, 64, g)
    kinds = ("blur", "sharpen", "noise", "jpeg")
    for i in tqdm(range(n), desc="pretrain data"):
        hr = data.quantize(hrs[i:i + 1])
        lr = make_lr(hr, g, data.item_seed(seed, 1, i))
        up = B.upscale(lr)
        srs = {"hr": hr, "bicubic": up}
        for j in range(6 - foreign):
            source = "hr" if j % 2 else "up"
            kind = kinds[int(torch.randint(len(kinds), (), generator=g))]
            srs[f"{source}_{kind}_{j}"] = degraded(hr if source == "hr" else up, kind, g)
        for j in range(foreign):
            srs[f"foreign_{j}"] = foreign_detail(hr, hrs[(i + 1 + j) % n][None], g)
        write_group(folder, f"p{i:05d}", hr[0], lr[0], {k: v[0] for k, v in srs.items()})


def compass_data(folder: Path, names: tuple[str, ...], n: int, seed: int, bb: B.Backbone, sft: str,
                 chunk: int = 32, degradation: str = "realesrgan") -> None:
    """COMPASS-20K in miniature: n groups of 12 methods from crops of the named photos."""
    g = torch.Generator().manual_seed(seed)
    hr = data.quantize(photos.random_crops(names, n, 64, g))
    lr = torch.cat([make_lr(hr[i:i + 1], g, data.item_seed(seed, 2, i), degradation) for i in range(n)])
    up = B.upscale(lr)
    methods = {"HR": hr, "bicubic": up, "nearest": F.interpolate(lr, scale_factor=4, mode="nearest")}
    for kind in ("blur", "sharpen", "noise", "jpeg"):
        methods[kind] = torch.cat([degraded(up[i:i + 1], kind, g) for i in range(n)])
    base_weights = {k: v.clone() for k, v in bb.transformer.state_dict().items()}
    for prefix, weights in (("mini_base", None), ("mini_sft", sft)):
        if weights is not None:
            B.load_transformer_weights(bb.transformer, weights, "mini")
        for steps, suffix in ((40, ""), (6, "_6")):  # inference (§5.1: 40) and the RL rollouts' 6 steps
            methods[prefix + suffix] = torch.cat([
                B.super_resolve_many(bb, lr[i:i + chunk], steps, seed * 1000 + steps * 10_000 + i)
                for i in tqdm(range(0, n, chunk), desc=f"{prefix}{suffix} samples")])
    bb.transformer.load_state_dict(base_weights)
    methods["mini_sft_sharpened"] = torch.cat([unsharp(methods["mini_sft"][i:i + 1], uniform(g, 1.0, 2.5))
                                               for i in range(n)])
    for i in range(n):
        write_group(folder, f"g{seed}_{i:05d}", hr[i], lr[i], {m: v[i] for m, v in methods.items()})


# The failures a reward model must not pay for, as candidates of the training groups (--failure-candidates):
# damaged HRs (a clean image beats itself damaged) and the SFT sample with the artefacts RL policies found in
# the mini COMPASS (a periodic grid with a colour cast, speckle); over-sharpening is mini_sft_sharpened.
FAILURES = ("hr_blur", "hr_noise", "hr_jpeg", "mini_sft_pattern", "mini_sft_cast", "mini_sft_speckle")


def periodic_pattern(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A periodic artefact of random period (2-8 px), phase, orientation and amplitude (0.03-0.12) on (1,3,H,W):
    a sinusoidal grating or a lattice of brightened (or darkened) rows and columns, in one colour."""
    h, w = x.shape[-2:]
    period = int(torch.randint(2, 9, (), generator=g))
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    phase = int(torch.randint(period, (), generator=g))
    if float(torch.rand((), generator=g)) < 0.5:  # lattice
        wave = (((yy + phase) % period == 0) | ((xx + phase) % period == 0)).float()
    else:  # grating at a random angle
        angle = uniform(g, 0, math.pi)
        wave = torch.cos(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
    colour = 0.5 + torch.rand(3, generator=g)  # a tint, not grey
    sign = 1 if float(torch.rand((), generator=g)) < 0.7 else -1
    return (x + sign * uniform(g, 0.03, 0.12) * colour[:, None, None] * wave).clamp(0, 1)


def colour_cast(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A colour cast on (1,3,H,W): per-channel gain (+-15%) and offset (+-0.08)."""
    gain = 1 + 0.15 * (2 * torch.rand(3, generator=g) - 1)
    offset = 0.08 * (2 * torch.rand(3, generator=g) - 1)
    return (x * gain[:, None, None] + offset[:, None, None]).clamp(0, 1)


def failure_candidates(hr: torch.Tensor, sft: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """FAILURES of one group, from its HR and its mini_sft sample (1,3,64,64), random strengths."""
    sigma = torch.tensor([uniform(g, 0.02, 0.08)])
    speckle = data.add_gaussian_noise(sft, sigma, torch.tensor([False]), g)  # clipped to [0, 1]
    return {"hr_blur": degraded(hr, "blur", g), "hr_noise": degraded(hr, "noise", g),
            "hr_jpeg": degraded(hr, "jpeg", g), "mini_sft_pattern": periodic_pattern(sft, g),
            "mini_sft_cast": colour_cast(sft, g), "mini_sft_speckle": speckle}


def policy_method(lora: str) -> str:
    """The candidate name of an RL policy's samples: rl_<file stem>."""
    return "rl_" + Path(lora).stem


def write_method(folder: Path, method: str, names: list[str], images: torch.Tensor) -> None:
    """sr/<method>/NAME.png of every group, whole or absent: written aside, then moved into place."""
    partial = folder / "partial" / method
    for name, img in zip(names, images):
        data.save_image(img, partial / f"{name}.png")
    partial.rename(folder / "sr" / method)


def add_candidates(folder: Path, seed: int, failures: bool, loras: tuple[str, ...], backbone: str,
                   chunk: int = 32) -> None:
    """Add candidates to every group of a `compass_data` folder (resumable: a method already there is kept):
    FAILURES (with `failures`) and the samples of RL policies as their rollouts drew them (the BASE + each
    LoRA of `loras`, 6 steps: rl_fr.py / rl_nr.py train the LoRA on the base), i.e. the outputs an RL round
    against a COMPASS was paid for, labelled by `annotate` like the rest."""
    names = sorted(p.stem for p in (folder / "lr").glob("*.png"))
    if (folder / "partial").exists():  # an interrupted earlier run
        shutil.rmtree(folder / "partial")
    missing = [m for m in FAILURES if not (folder / "sr" / m).exists()] if failures else []
    if missing:  # all drawn again from the seed (the same images), the missing ones written
        g = torch.Generator().manual_seed(seed)
        made = {m: [] for m in missing}
        for name in tqdm(names, desc="failure candidates"):
            hr, sft_sample = (load_image(folder / d / f"{name}.png")[None] for d in ("gt", "sr/mini_sft"))
            for method, img in failure_candidates(hr, sft_sample, g).items():
                if method in made:
                    made[method].append(data.quantize(img[0]))
        for method, images in made.items():
            write_method(folder, method, names, images)
    for k, lora in enumerate(loras):
        if (folder / "sr" / policy_method(lora)).exists():
            continue
        bb = infer.load_policy(backbone, None, (lora,))
        lr = torch.stack([load_image(folder / "lr" / f"{name}.png") for name in names])
        samples = torch.cat([B.super_resolve_many(bb, lr[i:i + chunk], 6, seed * 1000 + 7_000 * (k + 1) + i)
                             for i in tqdm(range(0, len(names), chunk), desc=policy_method(lora))])
        write_method(folder, policy_method(lora), names, samples)
    if (folder / "partial").exists():
        (folder / "partial").rmdir()  # empty: every method moved into sr/


# ====================================================================================================
# perception warm-up of the vision tower
# ====================================================================================================

# The damages the warm-up teaches the vision tower to see: one score direction each, in this order.
PERCEPTION_KINDS = ("blur", "noise", "jpeg", "nearest", "pattern", "cast")


def perception_damage(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """One PERCEPTION_KINDS damage of random strength on a (1,3,64,64) crop."""
    if kind == "blur":
        return gaussian_blur(x, torch.tensor([uniform(g, 0.8, 2.5)])).clamp(0, 1)
    if kind == "noise":
        return data.add_gaussian_noise(x, torch.tensor([uniform(g, 0.01, 0.15)]), torch.tensor([False]), g)
    if kind == "jpeg":
        return data.jpeg(x, [round(uniform(g, 5, 40))])
    if kind == "nearest":
        return F.interpolate(plain_lr(x), scale_factor=4, mode="nearest")
    if kind == "pattern":
        return periodic_pattern(x, g)
    if kind == "cast":
        return colour_cast(x, g)
    raise ValueError(kind)


def perception_scores(model, processor, head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) crops -> (B, K): the K kind scores of `head` on each merged vision token (what the decoder
    reads), averaged over the image's tokens."""
    inputs = processor.image_processor(images=[to_pil(t) for t in x], return_tensors="pt")
    tokens = model.model.visual(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    return head(tokens).reshape(len(x), -1, head.out_features).mean(1)


@torch.no_grad()
def perception_check(model, processor, head: torch.nn.Linear, kinds: tuple[str, ...], seed: int,
                     n: int = 48) -> dict[str, float]:
    """Per kind, the fraction of `n` held-out crops (photos.HELDOUT, never trained on) whose damaged copy scores
    above the clean crop in that kind's score: 0.5 is chance, 1.0 sees the damage every time."""
    g = torch.Generator().manual_seed(seed)
    clean = data.quantize(photos.random_crops(photos.HELDOUT, n, 64, g))
    base = perception_scores(model, processor, head, clean)
    result = {}
    for k, kind in enumerate(kinds):
        damaged = torch.cat([perception_damage(clean[i:i + 1], kind, g) for i in range(n)])
        result[kind] = round(float((perception_scores(model, processor, head, damaged)[:, k] > base[:, k]).float()
                                   .mean()), 3)
    return result


def perception_warmup(src: Path, dst: Path, steps: int, lr: float, seed: int, log: Path, batch: int = 12,
                      kinds: tuple[str, ...] = PERCEPTION_KINDS, check_crops: int = 48) -> list[float]:
    """Teach the vision tower of the COMPASS model in `src` to see the damages a reward must not pay for, before
    any COMPASS training; the model (only its vision tower changed) goes to `dst`. Returns the step losses.

    Not in the paper: its Qwen3-VL-8B comes with a pretrained vision encoder; the mini one starts from random
    weights, and annotated labels alone did not teach it noise or JPEG (README "Why the round-1 model
    misorders the unambiguous pairs"). Each step draws `batch` training-photo crops and gives each one damage
    of `kinds` at a random strength; a linear head on the merged vision tokens scores each kind, and the loss
    asks the damaged copy's score of ITS kind to exceed the clean crop's by a margin:
        softplus(2 - 4 (s_k(damaged) - s_k(clean)))
    One score per kind: blur and nearest take detail away, noise, JPEG and patterns add it, so no single score
    of "damage" is monotone in both (one shared score learned noise to 0.73 of held-out pairs in 600 steps,
    separate ones to 1.00 in 300). AdamW, linear warm-up over the first 50 steps, gradients clipped at 1; the
    head is discarded. `log` gets the mean loss every 50 steps and `perception_check` before and after."""
    if (dst / "config.json").exists():
        return []
    torch.manual_seed(seed)
    model, processor = VL.load_compass(str(src))
    model.train()
    vision = model.model.visual
    head = torch.nn.Linear(vision.config.out_hidden_size, len(kinds))
    opt = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    with open(log, "a") as f:
        def check(step: int) -> None:
            held_out = perception_check(model, processor, head, kinds, seed, check_crops)
            f.write(json.dumps({"step": step, "heldout": held_out}) + "\n")

        check(0)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 50)
            clean = data.quantize(photos.random_crops(photos.TRAIN, batch, 64, g))
            kind = torch.randint(len(kinds), (batch,), generator=g)
            damaged = torch.cat([perception_damage(clean[i:i + 1], kinds[int(kind[i])], g) for i in range(batch)])
            s = perception_scores(model, processor, head, torch.cat([clean, damaged]))
            margin = (s[batch:] - s[:batch]).gather(1, kind[:, None])[:, 0]
            loss = F.softplus(2.0 - 4.0 * margin).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vision.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % 50 == 0 or step + 1 == steps:
                f.write(json.dumps({"step": step + 1, "loss": float(np.mean(losses[-50:]))}) + "\n")
                f.flush()
        check(steps)
    partial = dst.with_name(dst.name + ".partial")
    model.save_pretrained(partial)
    processor.save_pretrained(partial)
    shutil.rmtree(dst, ignore_errors=True)
    partial.rename(dst)
    return losses


# ====================================================================================================
# the project's commands
# ====================================================================================================


def run(args: list[str], log: Path) -> None:
    """One command line of the project, in this process (common/commands.py), its output in `log`."""
    tqdm.write("$ " + " ".join(args))
    run_command(args, log)


def annotate_command(folder: Path, out: Path, calibration: str = "rank", fidelity: str = "ssim",
                     against_order: str = "flat") -> list[str]:
    """The `train_compass.py annotate` command line of the mini annotation (module docstring, step 3)."""
    return ["train_compass.py", "annotate", "--lr-dir", str(folder / "lr"), "--sr-dir", str(folder / "sr"),
            "--gt-dir", str(folder / "gt"), "--out", str(out), "--root", str(folder), "--fidelity", fidelity,
            "--anchor", "snb", "--lr-view", "sr", "--compare", "fr", "--compare-metric", "fsim",
            "--calibration", calibration, "--against-order", against_order, "--device", "cpu"]


def annotate(folder: Path, out: Path, log: Path, calibration: str = "rank", fidelity: str = "ssim",
             against_order: str = "flat") -> None:
    run(annotate_command(folder, out, calibration, fidelity, against_order), log)


def train(model: str, data_file: Path, root: Path, out: Path, epochs: int, lr: float, batch: int, log: Path,
          max_steps: int = 0, augment: str = "none", seed: int = 0, fidelity_weight: float = 1.0,
          freeze_vision: bool = False, rank_weight: float = 0.0) -> None:
    run(["train_compass.py", "train", "--model", model, "--data", str(data_file), "--root", str(root),
         "--out", str(out), "--epochs", str(epochs), "--global-batch", str(batch), "--per-device-batch",
         str(batch), "--lr", str(lr), "--warmup-steps", "100", "--device", "cpu", "--resume", "latest",
         "--augment", augment, "--seed", str(seed), "--fidelity-weight", str(fidelity_weight),
         "--rank-weight", str(rank_weight),
         *(["--max-steps", str(max_steps)] if max_steps else []), *(["--freeze-vision"] if freeze_vision else [])],
        log)


def fresh_sriqa_layout(records: list, root: Path, dst: Path) -> Path:
    """`dst` rebuilt from scratch as the SRIQA-Bench layout of held-out `records` (images under `root`), the folder
    evaluation.sriqa scores; the build's base and SFT samples are its generative methods."""
    shutil.rmtree(dst, ignore_errors=True)
    write_sriqa_layout(records, root, dst, generative=lambda m: m in GENERATIVE)
    return dst


def publish(src: Path, dst: Path, *ignore: str) -> None:
    """Replace `dst` by the trained model in `src`, without its checkpoints, logs, settings and the `ignore`
    patterns."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "tb", "losses.json", "args.json", *ignore))


def without_fidelity(src: Path, dst: Path) -> Path:
    """The same records with F removed: the quality-only prompt (Table 3 cases without explicit fidelity)."""
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    T.atomic_write_text("".join(json.dumps({k: v for k, v in r.items() if k != "F"}) + "\n" for r in rows), dst)
    return dst


# ====================================================================================================
# evaluation beyond the table: parse rate, Spearman
# ====================================================================================================


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def label_agreement(model: str, records: list, root: Path, views: int = 1) -> dict:
    """Answer parse rate (free generation) and Spearman of predicted F / Q_SR / Q_LR (read over `views`
    orientations) with the labels."""
    compass, processor = VL.load_compass(model)
    lr = [to_pil(load_image(root / r.lr)) for r in records]
    sr = [to_pil(load_image(root / r.sr)) for r in records]
    free = reward.LocalScorer(compass, processor, synthetic=True, mode="text").score(lr, sr)
    expected = reward.LocalScorer(compass, processor, synthetic=True, views=views).score(lr, sr)
    labels = {k: np.array([getattr(r, k) for r in records], dtype=float) for k in ("F", "q_sr", "q_lr")}
    return {"parse_rate": float(free.valid.float().mean()), "pairs": len(records),
            **{f"spearman_{k}": spearman(getattr(expected, k).numpy(), labels[k]) for k in labels}}


CHECK_GROUPS = 6  # the small held-out set that the build records and the tests recompute


def agreement_check(folder: Path, groups: int, seed: int, backbone: str, sft: str, model: str,
                    fidelity: str = "ssim", views: int = 1, degradation: str = "realesrgan",
                    against_order: str = "flat") -> dict:
    """label_agreement on `groups` held-out groups rebuilt from seeds (candidates, `annotate`, scoring):
    the build records it in compass_eval.json and the tests recompute it from the shipped weights."""
    if folder.exists():
        shutil.rmtree(folder)
    compass_data(folder, photos.HELDOUT, groups, seed + 22, B.load_backbone(backbone), sft, degradation=degradation)
    annotate(folder, folder / "check.jsonl", folder / "annotate.log", fidelity=fidelity, against_order=against_order)
    return {"groups": groups, "lr_degradation": degradation, "against_order": against_order,
            **label_agreement(model, load_records(folder / "check.jsonl", folder), folder, views)}


# ====================================================================================================
# main
# ====================================================================================================

QUICK = dict(perception_steps=2, perception_check_crops=2, pretrain_groups=3, pretrain_epochs=1, train_groups=2,
             heldout_groups=2, epochs=1, batch=4,
             refreward_warmup=2, refreward_steps=2, refreward_prompts=2, refreward_group=4, refreward_margin=0.1,
             refreward_eval_groups=2, refreward_check_crops=1)


def main(argv: list[str] | None = None) -> None:
    args, parser = T.parse_dataclass_args(Args, argv, __doc__.split("\n")[0])
    if args.stage not in ("all", "pretrain", "data", "annotate", "train", "eval", "refreward"):
        parser.error(f"--stage {args.stage}: choose all, pretrain, data, annotate, train, eval or refreward")
    if args.fidelity not in reward.WEIGHTS_FREE_FIDELITY:  # dists / lpips need downloaded weights
        parser.error(f"--fidelity {args.fidelity}: choose {' / '.join(reward.WEIGHTS_FREE_FIDELITY)}")
    if args.lr_degradation not in data.DEGRADATIONS:
        parser.error(f"--lr-degradation {args.lr_degradation}: choose one of {', '.join(data.DEGRADATIONS)}")
    if args.against_order not in AGAINST_ORDER:
        parser.error(f"--against-order {args.against_order}: choose {' or '.join(AGAINST_ORDER)}")
    if args.perception_steps < 0:
        parser.error(f"--perception-steps {args.perception_steps}: must be >= 0 (0 = no perception warm-up)")
    for lora in args.policy_loras:
        if not Path(lora).is_file():
            parser.error(f"--policy-loras {lora}: no such file (an rl_fr.py / rl_nr.py LoRA output)")
    if args.refreward_start not in ("compass", "pretrained"):
        parser.error(f"--refreward-start {args.refreward_start}: choose compass or pretrained")
    if (args.stage == "refreward" and args.refreward_start == "compass"
            and not (Path(args.out) / "compass" / "config.json").is_file()):
        parser.error(f"--stage refreward --refreward-start compass: {Path(args.out) / 'compass'} holds no trained "
                     "COMPASS (run the train stage first, or --refreward-start pretrained)")
    if args.pretrained and args.stage == "pretrain":
        parser.error("--stage pretrain with --pretrained: the pretrained model is given, nothing to pretrain")
    if args.quick:
        args = Args(**{**asdict(args), **QUICK})
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    # what the COMPASS, Table 3 and RefReward-SR models start from (files checked before any work)
    if args.pretrained == "mini":
        pretrained = presets.mini_compass_base()
    elif args.pretrained:
        pretrained = presets.checked_model_folder(Path(args.pretrained), "--pretrained model",
                                                  presets.REBUILD_COMPASS_BASE)
    else:
        pretrained = work / "pretrained"
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    want = lambda s: args.stage in ("all", s) and not (s == "pretrain" and args.pretrained)  # noqa: E731

    def timed(name: str, fn) -> None:
        t0 = time.time()
        fn()
        times[name] = round(times.get(name, 0.0) + time.time() - t0, 1)
        T.atomic_write_text(json.dumps(times, indent=1), times_path)

    def perceived(model: Path) -> Path:
        """`model`, or its perception-warmed copy in WORK/perceived_<name> (made once) with --perception-steps."""
        if not args.perception_steps:
            return model
        out_dir = work / f"perceived_{model.name}"
        perception_warmup(model, out_dir, args.perception_steps, args.perception_lr, args.seed + 31,
                          work / f"perception_{model.name}.jsonl", check_crops=args.perception_check_crops)
        return out_dir

    def pretrain() -> None:
        init = work / "init"
        if not (init / "config.json").exists():  # random weights of the mini architecture
            config = {**MINI_COMPASS, "patch_size": args.patch_size,
                      "text": {**MINI_COMPASS["text"], "rope_theta": args.rope_theta,
                               "num_hidden_layers": args.text_layers}}
            model, processor = VL.build_compass(args.seed, words_from=TEXTS, **config)
            model.save_pretrained(init)
            processor.save_pretrained(init)
        start = perceived(init)
        folder = work / "pretrain"
        if not (folder / "pretrain.jsonl").exists():
            pretrain_data(folder, args.pretrain_groups, args.seed + 11, args.pretrain_foreign)
            annotate(folder, folder / "pretrain.jsonl", work / "annotate_pretrain.log", calibration="none",
                     fidelity=args.fidelity)
        train(str(start), folder / "pretrain.jsonl", folder, work / "pretrained", args.pretrain_epochs,
              args.pretrain_lr, args.batch, work / "train_pretrain.log")
        publish(work / "pretrained", out / "compass_base")

    def make_data() -> None:
        bb = B.load_backbone(args.backbone)
        for split, names, n, seed in (("train", photos.TRAIN, args.train_groups, args.seed + 21),
                                      ("heldout", photos.HELDOUT, args.heldout_groups, args.seed + 22)):
            if not (work / split / "lr").exists():
                compass_data(work / split, names, n, seed, bb, args.sft, degradation=args.lr_degradation)
        add_candidates(work / "train", args.seed + 23, args.failure_candidates, tuple(args.policy_loras),
                       args.backbone)

    def annotate_all() -> None:
        for split in ("train", "heldout"):
            annotate(work / split, work / split / f"{split}.jsonl", work / f"annotate_{split}.log",
                     fidelity=args.fidelity, against_order=args.against_order)
        if args.ablations:  # the absolute labels are for the Table 3 models only
            annotate(work / "train", work / "train" / "train_absolute.jsonl", work / "annotate_train_absolute.log",
                     calibration="none", fidelity=args.fidelity)

    def train_all() -> None:
        # from scratch the pretrain stage's start was warmed; a given --pretrained model is warmed here
        start = perceived(pretrained) if args.pretrained else pretrained
        train(str(start), work / "train" / "train.jsonl", work / "train", work / "compass", args.epochs,
              args.lr, args.batch, work / "train_compass.log", augment=args.augment, seed=args.train_seed,
              fidelity_weight=args.fidelity_weight, freeze_vision=args.freeze_vision, rank_weight=args.rank_weight)
        publish(work / "compass", out / "compass")
        if args.ablations:  # Table 3: the same budget on other labels
            for name, src in (("calibrated_noF", work / "train" / "train.jsonl"),
                              ("absolute_noF", work / "train" / "train_absolute.jsonl")):
                records = without_fidelity(src, work / "train" / f"train_{name}.jsonl")
                train(str(start), records, work / "train", work / f"ablation_{name}", args.epochs, args.lr,
                      args.batch, work / f"train_{name}.log", augment=args.augment, seed=args.train_seed,
                      freeze_vision=args.freeze_vision)

    def evaluate_all() -> None:
        records = load_records(work / "heldout" / "heldout.jsonl", work / "heldout")
        sriqa = fresh_sriqa_layout(records, work / "heldout", work / "sriqa_heldout")
        rows = {}

        def accuracy(name: str, model: Path, *extra: str) -> None:
            run(["-m", "evaluation.sriqa", "--reward-model", str(model), "--sriqa-root", str(sriqa), "--out",
                 str(work / f"eval_{name}"), "--baselines", "PSNR", "SSIM", "piqe", "SNB", "--device", "cpu", "--reward-views",
                 str(args.views), *extra],
                work / f"eval_{name}.log")
            import csv

            with open(work / f"eval_{name}" / "sriqa_accuracy.csv") as f:
                rows[name] = list(csv.DictReader(f))

        # Table 3 cases 4-6 (and the fixed linear combination, gamma -> inf) from the same answers: one row
        # "COMPASS gamma G" each, kept in compass_eval.json as its own table "gamma_G"
        accuracy("main", out / "compass", "--extra-gammas", "5", "9", "inf")
        for row in [r for r in rows["main"] if r["method"].startswith("COMPASS gamma ")]:
            rows["main"].remove(row)
            rows["gamma_" + row["method"].split()[-1]] = [{**row, "method": "COMPASS"}]
        if args.ablations:
            for name in ("calibrated_noF", "absolute_noF"):
                accuracy(name, work / f"ablation_{name}", "--real-prompt", "--baselines")
        agreement = label_agreement(str(out / "compass"), records, work / "heldout", args.views)
        check = agreement_check(work / "check", min(CHECK_GROUPS, args.heldout_groups), args.seed, args.backbone,
                                args.sft, str(out / "compass"), args.fidelity, args.views, args.lr_degradation,
                                args.against_order)
        result = {"tables": rows, "agreement": agreement, "agreement_check": check, "views": args.views,
                  "heldout_groups": args.heldout_groups, "train_groups": args.train_groups,
                  "ablations": args.ablations, "failure_candidates": args.failure_candidates,
                  "policy_loras": [policy_method(x) for x in args.policy_loras]}
        T.atomic_write_text(json.dumps(result, indent=1), out / "compass_eval.json")
        T.atomic_write_text(eval_markdown(result), out / "compass_eval.md")
        print(eval_markdown(result))

    def refreward_all() -> None:
        """RefReward-SR on the same data: pairs from the annotations, the warm-up and GRPO from this build's
        COMPASS (--refreward-start), then held-out accuracy: its own and in the SRIQA table next to COMPASS on
        the first --refreward-eval-groups held-out groups (every pair asked in both orders: ~0.7 s an answer
        here), and the unambiguous pairs of mini/reward_checks.py."""
        for split, margin in (("train", ["--margin", str(args.refreward_margin)]), ("heldout", [])):
            run(["-m", "refreward_sr.train_refreward", "pairs", "--compass", str(work / split / f"{split}.jsonl"), "--out",
                 str(work / split / "pairs.jsonl"), *margin], work / f"pairs_{split}.log")
        start = out / "compass" if args.refreward_start == "compass" else pretrained
        # --max-new-tokens 56: a readings answer, `<think>A 3.1 B 1.2</think><answer>A</answer>`, is 44 tokens of
        # the mini byte-level tokenizer
        run(["-m", "refreward_sr.train_refreward", "train", "--model", str(start), "--data",
             str(work / "train" / "pairs.jsonl"), "--out", str(work / "refreward"), "--warmup-steps",
             str(args.refreward_warmup), "--warmup-verdicts", args.refreward_warmup_verdicts,
             "--steps", str(args.refreward_steps), "--prompts",
             str(args.refreward_prompts), "--group", str(args.refreward_group), "--lr", str(args.refreward_lr),
             "--warmup-lr", str(args.refreward_warmup_lr), "--max-new-tokens", "56", "--device", "cpu",
             "--resume", "latest"], work / "train_refreward.log")
        final = out / "refreward"
        publish(work / "refreward", final, "*.jsonl", "reference.safetensors")
        # scored on the first --refreward-eval-groups of the COMPASS evaluation's held-out groups (both orders of
        # every pair: 132 answers a group)
        held_out = work / "heldout" / "refreward_heldout.jsonl"
        lines = [(json.loads(line)["group"], line)
                 for line in (work / "heldout" / "heldout.jsonl").read_text().splitlines()]
        groups = list(dict.fromkeys(group for group, _ in lines))[:args.refreward_eval_groups]
        T.atomic_write_text("".join(line + "\n" for group, line in lines if group in groups), held_out)
        run(["-m", "refreward_sr.train_refreward", "pairs", "--compass", str(held_out), "--out",
             str(work / "heldout" / "refreward_pairs.jsonl")], work / "pairs_refreward_heldout.log")
        run(["-m", "refreward_sr.train_refreward", "eval", "--model", str(final), "--data",
             str(work / "heldout" / "refreward_pairs.jsonl"), "--out", str(out / "refreward_eval.json")],
            work / "eval_refreward_pairs.log")
        sriqa = fresh_sriqa_layout(load_records(held_out, work / "heldout"), work / "heldout", work / "sriqa_refreward")
        run(["-m", "evaluation.sriqa", "--reward-model", str(out / "compass"), "--refreward-model", str(final),
             "--sriqa-root", str(sriqa), "--out", str(work / "eval_refreward"), "--baselines", "PSNR", "SSIM",
             "--device", "cpu"], work / "eval_refreward.log")
        add_sriqa_table(out / "refreward_eval.json", work / "eval_refreward" / "sriqa_accuracy.csv")
        run(["-m", "mini.reward_checks", "--compass", "", "--refreward", str(final), "--crops",
             str(args.refreward_check_crops), "--out", str(work / "refreward_checks")], work / "refreward_checks.log")
        result = json.loads((out / "refreward_eval.json").read_text())
        checks = json.loads((work / "refreward_checks" / "results.json").read_text())
        T.atomic_write_text(json.dumps({**result, "heldout_groups": len(groups), "unambiguous": checks},
                                       indent=1), out / "refreward_eval.json")

    for name, fn in (("pretrain", pretrain), ("data", make_data), ("annotate", annotate_all), ("train", train_all),
                     ("eval", evaluate_all), ("refreward", refreward_all)):
        if want(name):
            timed(name, fn)
    print(f"stage times (s): {times}")


def add_sriqa_table(eval_json: Path, csv_path: Path) -> None:
    """Put the SRIQA-style table (RefReward-SR next to COMPASS, PSNR, SSIM) into the RefReward evaluation."""
    import csv

    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    result = json.loads(eval_json.read_text())
    T.atomic_write_text(json.dumps({**result, "sriqa_table": rows}, indent=1), eval_json)


def eval_markdown(result: dict) -> str:
    """The accuracy table (main model and baselines), the Table 3 cases and the label agreement."""
    main_rows = result["tables"]["main"]
    lines = [f"Held-out groups: {result['heldout_groups']} (photos {', '.join(photos.HELDOUT)}, never trained on); "
             "MOS = 20 x Eq.4 of the calibrated labels.", "",
             "| type | method | Reg-Acc | Gen-Acc | All-Acc | pairs | note |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['type']} | {r['method']} | {r['Reg-Acc']} | {r['Gen-Acc']} | {r['All-Acc']} | {r['pairs_all']} | "
              f"{r['note']} |" for r in main_rows]
    compass = lambda name: next(r for r in result["tables"][name] if r["method"] == "COMPASS")  # noqa: E731
    cases = [("1", "absolute labels, no F (R = Q_SR)", "absolute_noF"),
             ("2", "calibrated labels, no F (R = Q_SR)", "calibrated_noF"),
             ("3", "calibrated + F, fixed combination R = F Q_LR + dQ (gamma -> inf)", "gamma_inf"),
             ("4", "calibrated + F, Eq.4 gamma 5", "gamma_5"), ("5", "calibrated + F, Eq.4 gamma 7", "main"),
             ("6", "calibrated + F, Eq.4 gamma 9", "gamma_9")]
    lines += ["", "Table 3 cases (All-Acc, same held-out pairs; the MOS itself uses gamma 7):", "",
              "| case | model / reward | All-Acc |", "|---|---|---|"]
    lines += [f"| {c} | {text} | {compass(name)['All-Acc']} |" for c, text, name in cases if name in result["tables"]]
    lines += [f"\nNote: {note}" for note in result.get("notes", [])]  # e.g. where a row's model came from
    a = result["agreement"]
    lines += ["", f"Answer parse rate (free generation, {a['pairs']} held-out pairs): {a['parse_rate']:.1%}; Spearman "
              f"with the labels: F {a['spearman_F']:.3f}, Q_SR {a['spearman_q_sr']:.3f}, Q_LR {a['spearman_q_lr']:.3f}."]
    if result.get("views", 1) > 1:
        lines += ["", f"COMPASS's readings (tables and Spearman) are means over {result['views']} flips/rotations of each "
                  "pair (--views)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
