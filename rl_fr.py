"""Full-reference online RL stage of OARS (paper §4 "Full-Reference RL Stage", §5.1).

LoRA (rank 32, alpha 64) on the BASE Qwen-Image-Edit-2509 weights, trained with the negative-aware
forward-process objective (DiffusionNFT, Eq.6-8, nft.py). Per step and per LR image:

    condition once  ->  K=24 rollouts from the OLD policy (6 Euler steps)  ->  reward
    R = Eq.4(F, Q_LR, Q_SR), F = 1 - DISTS(SR, HR) against the reference (Eq.1), Q_LR/Q_SR from COMPASS
    ->  drop high-mean/low-variance groups  ->  r = 0.5 + 0.5 clip((R - mean)/std, -1, 1)
    ->  fresh noise x_t = (1-t) x0 + t eps on the kept samples, v = eps - x0
    ->  L = r ||v+ - v||^2 + (1-r) ||v- - v||^2  (Eq.8)  ->  Adam on the LoRA  ->  old <- EMA(theta)

One copy of the backbone in memory: the trainable policy is peft adapter "default", the old policy a
second adapter "old" on the same modules, the reference (for the optional KL) the adapters disabled.

`--objective flow_grpo` swaps the NFT rollout and update for Flow-GRPO's (flow_grpo.py, the paper's
Table 7 comparison): rollouts from the current policy with the ODE turned into an SDE, per-step Gaussian
log-probabilities recorded, group-normalised advantages, the PPO-clipped likelihood ratio on the first
`--timestep-fraction` of the steps, and the optional KL to the reference. Data, rewards, group filter,
LoRA on the base, checkpoints and logs are shared.

Tiny or mini preset on a CPU (SSIM fidelity needs no weights; COMPASS tiny/mini in-process):
    python rl_fr.py --model tiny --hr-dir data/hr --crop-size 64 --group-size 8 --steps 20 --fidelity ssim
    python rl_fr.py --model mini --reward-model mini --hr-dir data/hr --crop-size 64 --group-size 8 \
        --rollout-batch 8 --train-batch 8 --lr 1e-3 --steps 48 --fidelity ssim
Full scale, 8 GPUs (paper: LSDIR, K=24, reward model served by vLLM on another machine):
    torchrun --nproc_per_node 8 rl_fr.py --model Qwen/Qwen-Image-Edit-2509 --hr-dir LSDIR/HR \
        --reward-url http://reward-host:8000 --reward-model-name compass --bf16 --gradient-checkpointing
Resume:  ... --resume latest
Writes out/fr.safetensors (the LoRA in the stock pipeline's format, loadable by
`QwenImageEditPlusPipeline.load_lora_weights`, `infer.py --lora` and `rl_nr.py --lora`), and under
out/fr/: checkpoints/, tb/ (TensorBoard), samples/ (LR | K samples | HR grids), rewards.jsonl.

Distributed choice: every group (the K samples of one LR) is generated on ONE rank, so group statistics
are exact without communication; gradients of the LoRA parameters are all-reduced by hand after the
accumulation (ranks may keep different numbers of samples after filtering, which a DDP wrapper, one
all-reduce per backward, cannot handle without deadlocking).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import backbone as B
import flow_grpo
import nft
import training as T
from data import HRFolderDataset, PairedFolderDataset, save_image


@dataclass
class Args:
    model: str = B.REAL_MODEL
    """the BASE weights RL trains on: Qwen/Qwen-Image-Edit-2509 (paper) or its local diffusers folder; 'mini' /
    'tiny' for the laptop presets"""
    init: str = "base"
    """'base' (paper) or 'sft': put the LoRA on the SFT weights instead (Table 5 ablation; needs --sft)"""
    sft: str | None = None
    """SFT transformer weights for --init sft: train_sft.py's folder, its file, or 'mini'"""
    lora: str | None = None
    """start from this LoRA file (rl_nr.py starts from rl_fr.py's output)"""
    hr_dir: str | None = None
    """HR folder degraded on the fly (full-reference stage)"""
    lr_dir: str | None = None
    """LR folder: paired with --hr-dir by file name (FR), or alone (rl_nr.py)"""
    out: str = "out/fr.safetensors"
    """final LoRA file; the run folder is next to it without the suffix (out/fr/)"""
    crop_size: int = 512
    """HR crop (paper: 512 px); LR = crop/4"""
    scale: int = 4
    lrs_per_step: int = 1
    """LR images (groups) per process per step (paper: per-GPU batch size 1)"""
    group_size: int = 24
    """K rollouts per LR (paper §5.1: 24)"""
    rollout_batch: int = 24
    """rollouts per forward pass (K in one batch when memory allows)"""
    rollout_steps: int = 6
    """Euler steps per rollout (paper §5.1: 6 for training)"""
    train_batch: int = 4
    """samples per forward/backward in the NFT update (gradients are accumulated over all kept samples;
    Flow-GRPO trains on the rollout chunks of --rollout-batch, so its ratios are exactly 1 before the update)"""
    objective: str = "nft"
    """'nft' (paper: the negative-aware forward-process objective, Eq.6-8) or 'flow_grpo' (Table 7)"""
    steps: int = 1000
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 32
    lora_alpha: int = 64
    lam: float | None = None
    """NFT only: lambda of Eq.6-7 (default 1)"""
    clip: float | None = None
    """NFT only: clip range of the normalised reward in r (paper: 1)"""
    std_mode: str | None = None
    """group normalisation: 'group' (std of the group; default for nft, paper) or 'global' (std of the batch;
    default for flow_grpo as its public code, DiffusionNFT's global_std)"""
    filter_mean: float = 0.9
    filter_var: float = 0.05
    reward_scale: float = 5.0
    """the filter compares mean/var of R / reward_scale (Eq.4 spans ~[0,5]; the paper does not say)"""
    loss_normalize: str | None = None
    """NFT only: 'none' (Eq.8 as written, default) or 'x0_adaptive' (DiffusionNFT's x0-space weighting)"""
    kl_weight: float = 0.0
    """weight of the KL to the reference (adapters off): NFT ||v_theta - v_ref||^2 (DiffusionNFT uses 1e-4; the
    paper does not mention a KL), Flow-GRPO the transition KL (its public default: 0)"""
    train_timesteps: str | None = None
    """NFT only: 'uniform' t~U(0,1) (default) or 'rollout_grid' (DiffusionNFT: the rollout's sigmas)"""
    old_decay: str | None = None
    """NFT only: old-policy EMA 'nft' decay=min(0.001*step, 0.5) (default, DiffusionNFT) or 'copy' (old = theta)"""
    noise_level: float | None = None
    """Flow-GRPO only: SDE noise level a (public default 0.7; its Qwen-Image-Edit-2509 config: 0.9)"""
    clip_range: float | None = None
    """Flow-GRPO only: PPO clip of the likelihood ratio (public default 1e-4)"""
    adv_clip: float | None = None
    """Flow-GRPO only: advantage clip (public default 5)"""
    timestep_fraction: float | None = None
    """Flow-GRPO only: train the first int(rollout steps x fraction) steps (public default 0.99: all but the last)"""
    fidelity: str = "dists"
    """F against the HR: 'dists' (paper, Eq.1), 'lpips', 'ssim', 'texture' or 'blend' (no downloaded weights;
    texture = evaluate.texture_fidelity, a DISTS analogue that does not pay for blur; blend = their mean)"""
    reward_model: str = "out/compass"
    """COMPASS for Q_LR/Q_SR, in-process: the folder train_compass.py wrote (default: its default output), a hub
    name, or 'mini' / 'tiny'. The paper serves it instead: --reward-url"""
    reward_url: str | None = None
    """OpenAI-compatible server (vLLM) instead of in-process scoring, e.g. http://host:8000"""
    reward_model_name: str = "compass"
    reward_concurrency: int = 8
    reward_timeout: float = 600.0
    """seconds to keep retrying a reward server that does not answer (backoff up to 30 s between tries); then
    every rank stops with one line naming the URL, the last checkpoint kept"""
    reward_views: int = 1
    """average COMPASS's readings over this many flips/rotations of each (LR, SR) pair, in-process or served
    (reward.LocalScorer / RemoteScorer views; 1 = the paper's single reading, 8 = all, at 8x the scoring cost)"""
    reward_form: str = "compass"
    """'compass' (Eq.4), 'gain' or 'gated' (Table 8 ablations)"""
    reward: str = "compass"
    """'compass' (the paper: Eq.4 from COMPASS's F, Q_LR, Q_SR) or 'refreward' (RefReward-SR: each sample's win rate
    over the group's other samples by pairwise LR-conditioned verdicts; in the FR stage the HR is then unused)"""
    refreward_model: str = "out/refreward"
    """RefReward-SR model for --reward refreward (in-process; --reward-url serves it instead): the folder
    train_refreward.py wrote (default: its default output), 'mini' or 'tiny'"""
    refreward_mode: str = "winrate"
    """'winrate' (all pairs of the group) or 'anchor' (each sample against the bicubic upscale)"""
    gamma: float = 7.0
    prompt: str = B.DEFAULT_PROMPT
    bf16: bool | None = None
    """bfloat16 base weights and autocast (LoRA and optimizer in float32); default: on when training on a GPU"""
    gradient_checkpointing: bool | None = None
    """recompute each block's activations in the backward pass (the NFT update at train batch 4 peaks at ~111 GB
    per GPU without it, ~47 GB with it: estimate_scale.py); default: on for the real model, off for mini/tiny"""
    seed: int = 0
    log_every: int = 1
    sample_every: int = 50
    save_every: int = 50
    keep_last: int = 3
    resume: str | None = None


# Options of one objective only, with their defaults (None in Args = "the objective's default").
OBJECTIVE_OPTIONS = {
    "nft": dict(lam=1.0, clip=1.0, loss_normalize="none", train_timesteps="uniform", old_decay="nft"),
    "flow_grpo": dict(noise_level=0.7, clip_range=1e-4, adv_clip=5.0, timestep_fraction=0.99),
}
STD_MODE = {"nft": "group", "flow_grpo": "global"}


def parse_args(argv: list[str] | None = None, defaults: dict | None = None, doc: str = __doc__) -> Args:
    """CLI from the Args dataclass (one flag per field, its docstring as help); rl_nr.py changes `defaults`.

    Options of the other objective are refused by name; unset ones get the chosen objective's defaults."""
    args, parser = T.parse_dataclass_args(Args, argv, doc.split("\n")[0], defaults)
    if args.objective not in OBJECTIVE_OPTIONS:
        parser.error(f"--objective {args.objective}: choose one of {', '.join(OBJECTIVE_OPTIONS)}")
    for objective, options in OBJECTIVE_OPTIONS.items():
        for name, default in options.items():
            if objective != args.objective and getattr(args, name) is not None:
                parser.error(f"--{name.replace('_', '-')} is an option of --objective {objective}; it does nothing "
                             f"with --objective {args.objective}")
            if objective == args.objective and getattr(args, name) is None:
                setattr(args, name, default)
    args.std_mode = args.std_mode or STD_MODE[args.objective]
    if args.init == "sft" and not args.sft:
        parser.error("--init sft needs --sft (the folder train_sft.py wrote)")
    if args.group_size < 2:
        parser.error("--group-size must be >= 2 (group statistics need two samples)")
    if args.reward not in ("compass", "refreward"):
        parser.error(f"--reward {args.reward}: choose compass or refreward")
    return args


def resolve_defaults(args: Args, device: torch.device) -> None:
    """Fill the options whose default depends on where the run is: bf16 on GPUs, gradient checkpointing for the
    real model (the laptop presets are small enough without it, and faster)."""
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.model not in ("tiny", "mini")


def policy_autocast(args: Args, device: torch.device):
    """The one autocast of every policy forward pass, rollouts and updates alike: a rollout computed without
    it and an update with it differ by ~3e-5 in the likelihood ratio before any step (Flow-GRPO's clip range
    is 1e-4), because peft computes the LoRA in float32 outside autocast and in bfloat16 inside."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(args.bf16))


# ====================================================================================================
# The policy: base (or SFT) weights + trainable adapter "default" + old-policy adapter "old"
# ====================================================================================================


@contextmanager
def active_adapter(transformer, name: str | None):
    """Run with adapter `name` active (None = adapters disabled: the reference model); back to "default".

    peft's set_adapter moves requires_grad to the active adapter, so the trainable one is always
    re-activated before the caller's backward.
    """
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


def setup_policy(args: Args, device: torch.device) -> tuple[B.Backbone, list[torch.Tensor], list[torch.Tensor]]:
    """Load the backbone, attach both adapters; returns (backbone, trainable params, old params) aligned."""
    bb = B.load_backbone(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, device=device)
    if args.init == "sft":
        B.load_transformer_weights(bb.transformer, args.sft, args.model)
    tr = bb.transformer
    with torch.random.fork_rng():  # peft draws A from the global RNG, seeded per rank: every rank must
        torch.manual_seed(args.seed)  # start from the SAME adapter, so its draw uses the run's seed alone
        for name in ("default", "old"):
            if args.lora:
                B.load_lora(tr, args.lora, adapter_name=name)
            else:
                B.add_lora(tr, args.lora_rank, args.lora_alpha, adapter_name=name)
    # peft draws A randomly per adapter: start old == theta exactly
    named = dict(tr.named_parameters())
    theta_names = sorted(n for n in named if ".default." in n)
    params = [named[n] for n in theta_names]
    old = [named[n.replace(".default.", ".old.")] for n in theta_names]
    with torch.no_grad():
        for o, p in zip(old, params):
            o.copy_(p)
    tr.set_adapter("default")
    for p in params:  # LoRA weights train in fp32 even when the base runs in bf16
        p.data = p.data.float()
        p.requires_grad_(True)
    for o in old:
        o.data = o.data.float()
    if args.gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    return bb, params, old


# ====================================================================================================
# Rollouts and the NFT update
# ====================================================================================================


@dataclass
class Group:
    """The K rollouts of one LR image (a group of Eq.8's statistics) and what was computed for them."""

    item: dict             # the dataset item: "lr" (3,h,w), "name", and "hr" in the FR stage
    cond: B.Condition      # encoded once, shared by the rollouts and the update
    sigmas: torch.Tensor   # the rollout's sigma grid (N+1,), also the 'rollout_grid' training timesteps
    x0: torch.Tensor       # (K,N,4C) rollout results in latent tokens
    srs: torch.Tensor      # (K,3,H,W) decoded SR images
    scores: "object"       # reward.Scores (F, q_lr, q_sr, valid)
    R: torch.Tensor        # (K,) Eq.4 reward, NaN where the score is invalid
    trajectory: "Trajectory | None" = None  # Flow-GRPO only: the stochastic path and its log-probabilities


@dataclass
class Trajectory:
    """What Flow-GRPO keeps of one group's SDE rollouts for its update (the memory NFT does not need)."""

    latents: torch.Tensor    # (K,T+1,N,4C) x_0 .. x_T: the inputs and outputs of the T trained steps
    log_probs: torch.Tensor  # (K,T) log p(x_{j+1} | x_j) under the rollout policy (flow_grpo.sde_step)


@torch.no_grad()
def rollout(bb: B.Backbone, cond: B.Condition, k: int, sigmas: torch.Tensor, chunk: int,
            generator: torch.Generator, autocast=None) -> torch.Tensor:
    """K samples x0 (K,N,4C) for ONE condition from the OLD policy on `sigmas`, `chunk` per forward pass,
    under `autocast` (the update's, `policy_autocast`)."""
    noise = B.initial_noise(cond, k, generator)
    with active_adapter(bb.transformer, "old"), autocast or nullcontext():
        return torch.cat([B.sample(bb.transformer, cond, noise[i:i + chunk], sigmas) for i in range(0, k, chunk)])


@torch.no_grad()
def rollout_sde(bb: B.Backbone, cond: B.Condition, k: int, sigmas: torch.Tensor, chunk: int,
                generator: torch.Generator, args: Args) -> tuple[torch.Tensor, Trajectory]:
    """Flow-GRPO rollouts: K samples of the CURRENT policy (adapter "default") with every Euler step made
    stochastic (flow_grpo.sde_step); the first T = len(train steps) transitions and their log-probabilities
    are kept. Returns (x0 (K,N,4C), Trajectory)."""
    trained = flow_grpo.train_step_indices(len(sigmas) - 1, args.timestep_fraction)
    noise = B.initial_noise(cond, k, generator)
    tr, dt = bb.transformer, cond.image_latents.dtype
    x0s, paths, log_probs = [], [], []
    autocast = policy_autocast(args, cond.image_latents.device)  # the update's: ratios are exactly 1 at first
    with active_adapter(tr, "default"):
        for i in range(0, k, chunk):
            x = noise[i:i + chunk].to(cond.image_latents.device, torch.float32)
            m = x.shape[0]
            cond_m = B.repeat_condition(cond, m)
            path, lps = [x], []
            for j in range(len(sigmas) - 1):
                s, s_next = sigmas[j].expand(m).to(x.device), sigmas[j + 1].expand(m).to(x.device)
                with autocast:
                    v = B.velocity(tr, x.to(dt), s, cond_m)
                x, lp, _, _ = flow_grpo.sde_step(x, v, s, s_next, float(sigmas[1]), args.noise_level, generator)
                if j in trained:
                    path.append(x)
                    lps.append(lp)
            x0s.append(x)
            paths.append(torch.stack(path, dim=1))
            log_probs.append(torch.stack(lps, dim=1))
    return torch.cat(x0s), Trajectory(torch.cat(paths), torch.cat(log_probs))


def grpo_backward(bb: B.Backbone, group: "Group", keep: torch.Tensor, advantages: torch.Tensor, args: Args,
                  normaliser: float) -> tuple[float, list[torch.Tensor]]:
    """Accumulate d/dtheta of Flow-GRPO's loss over one group's kept samples and trained steps.

    The micro-batches are the rollout's chunks (same samples, same batch size), so before the optimizer
    step every recomputed log-probability equals the recorded one and the ratio is exactly 1. Each
    (sample, step) loss is divided by `normaliser` (kept samples x trained steps over all ranks). Returns
    (summed loss, the ratios of the kept samples (T per chunk)).
    """
    tr, traj, sigmas = bb.transformer, group.trajectory, group.sigmas
    dt = group.cond.image_latents.dtype
    autocast = policy_autocast(args, group.x0.device)
    total, ratios = 0.0, []
    for i in range(0, traj.latents.shape[0], args.rollout_batch):
        kept = keep[i:i + args.rollout_batch]
        if not kept.any():
            continue
        lat, old_lp, adv = traj.latents[i:i + args.rollout_batch], traj.log_probs[i:i + args.rollout_batch], \
            advantages[i:i + args.rollout_batch].nan_to_num(0.0)
        m = lat.shape[0]
        cond_m = B.repeat_condition(group.cond, m)
        for j in range(traj.log_probs.shape[1]):
            s, s_next = sigmas[j].expand(m).to(lat.device), sigmas[j + 1].expand(m).to(lat.device)
            # 1. the current policy's transition x_j -> x_{j+1} (recorded at rollout), with gradients
            with autocast:
                v = B.velocity(tr, lat[:, j].to(dt), s, cond_m)
            _, lp, mean, std_t = flow_grpo.sde_step(lat[:, j], v, s, s_next, float(sigmas[1]), args.noise_level,
                                                    x_next=lat[:, j + 1])
            # 2. PPO-clipped likelihood ratio against the rollout's log-probability
            loss = flow_grpo.clipped_surrogate(lp, old_lp[:, j], adv, args.clip_range)  # (m,)
            if args.kl_weight > 0:  # 3. optional KL to the reference transition (adapters disabled)
                with torch.no_grad(), active_adapter(tr, None), autocast:
                    v_ref = B.velocity(tr, lat[:, j].to(dt), s, cond_m)
                mean_ref = flow_grpo.sde_step_mean(lat[:, j].float(), v_ref.float(), s.float(), s_next.float(), std_t)
                loss = loss + args.kl_weight * flow_grpo.sde_kl(mean, mean_ref, std_t)
            loss = loss * kept
            (loss.sum() / normaliser).backward()
            total += float(loss.detach().sum())
            ratios.append(torch.exp(lp - old_lp[:, j]).detach()[kept])
    return total, ratios


def nft_micro_loss(bb: B.Backbone, cond: B.Condition, x0: torch.Tensor, r: torch.Tensor, args: Args,
                   generator: torch.Generator, rollout_sigmas: torch.Tensor) -> torch.Tensor:
    """Eq.8 for one micro-batch: kept samples x0 (m,N,4C) of one condition with their optimality r (m,) ->
    per-sample loss (m,) carrying the gradient of the trainable adapter."""
    tr, autocast, m = bb.transformer, policy_autocast(args, x0.device), x0.shape[0]
    x0 = x0.float()
    cond_m = B.repeat_condition(cond, m)
    # 1. fresh noise on the kept samples: x_t = (1-t) x0 + t eps, target v = eps - x0 (Eq.5 form)
    t = nft.sample_train_timesteps(m, generator, args.train_timesteps, rollout_sigmas).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v_target = eps - x0
    # 2. the frozen old policy v_old (Eq.6-7 mix it with v_theta)
    with torch.no_grad(), active_adapter(tr, "old"), autocast:
        v_old = B.velocity(tr, x_t, t, cond_m).float()
    # 3. the current policy v_theta, with gradients (adapter "default")
    with autocast:
        v_theta = B.velocity(tr, x_t, t, cond_m).float()
    loss = nft.nft_loss(v_theta, v_old, v_target, r, args.lam, args.loss_normalize, x_t, t)  # Eq.8, (m,)
    if args.kl_weight > 0:  # optional: stay near the reference (adapters off), DiffusionNFT-style
        with torch.no_grad(), active_adapter(tr, None), autocast:
            v_ref = B.velocity(tr, x_t, t, cond_m).float()
        loss = loss + args.kl_weight * nft.kl_to_reference(v_theta, v_ref)
    return loss


def nft_backward(bb: B.Backbone, cond: B.Condition, x0: torch.Tensor, r: torch.Tensor, args: Args,
                 generator: torch.Generator, rollout_sigmas: torch.Tensor, normaliser: float) -> float:
    """Accumulate d/dtheta of Eq.8 over the kept samples x0 (M,N,4C) of one condition, with r (M,), in
    micro-batches of --train-batch.

    The loss of each sample is divided by `normaliser` (the number of kept samples over all ranks), so
    the accumulated gradient is the mean over the global batch. Returns the summed (unnormalised) loss.
    """
    total = 0.0
    for i in range(0, x0.shape[0], args.train_batch):
        loss = nft_micro_loss(bb, cond, x0[i:i + args.train_batch], r[i:i + args.train_batch], args, generator,
                              rollout_sigmas)
        (loss.sum() / normaliser).backward()
        total += float(loss.detach().sum())
    return total


# ====================================================================================================
# Rewards: full-reference (this stage) — F against the HR, Q_LR and Q_SR from COMPASS
# ====================================================================================================

# A reward function maps one dataset item and its K decoded samples (K,3,H,W) to reward.Scores.
RewardFn = Callable[[dict, torch.Tensor], "object"]


def make_compass_scorer(args: Args, synthetic: bool, device: torch.device):
    """The COMPASS scorer: a remote OpenAI-compatible server (--reward-url) or in-process (--reward-model) on the
    policy's device."""
    import reward

    return reward.make_scorer(args.reward_model, args.reward_url, args.reward_model_name, synthetic,
                              args.reward_concurrency, device=device, views=args.reward_views,
                              retry_for=args.reward_timeout)


def make_refreward(args: Args, device: torch.device) -> RewardFn:
    """RefReward-SR as the reward: per-sample win rates of LR-conditioned pairwise verdicts (refreward.py)."""
    import refreward

    model, processor = (None, None) if args.reward_url else refreward.load_refreward(args.refreward_model,
                                                                                     device=str(device))
    scorer = refreward.RefRewardScorer(model, processor, url=args.reward_url, model_name=args.reward_model_name,
                                       mode=args.refreward_mode, concurrency=args.reward_concurrency)
    return lambda item, srs: scorer.score_group(B.to_pil(item["lr"]), [B.to_pil(s) for s in srs])


def make_fr_reward(args: Args, device: torch.device) -> RewardFn:
    """F = fidelity(SR, HR) (Eq.1 with DISTS by default) on the policy's device; Q_LR, Q_SR from COMPASS (one
    Q_LR per group)."""
    import reward

    if args.reward == "refreward":
        return make_refreward(args, device)
    fidelity = reward.FidelityScorer(args.fidelity, device=device)
    compass = make_compass_scorer(args, synthetic=False, device=device)

    def score(item: dict, srs: torch.Tensor) -> reward.Scores:
        quality = compass.score_group(B.to_pil(item["lr"]), [B.to_pil(s) for s in srs])
        hr = item["hr"][None].expand_as(srs).to(srs.device)
        quality.F = fidelity.fidelity(srs, hr).float().cpu()
        return quality

    return score


# ====================================================================================================
# The online RL loop (shared with rl_nr.py)
# ====================================================================================================


def run(args: Args, dataset: torch.utils.data.Dataset,
        reward_fn_factory: Callable[[Args, torch.device], RewardFn]) -> Path:
    import reward

    # ------------------------------------------------------------------ setup (plumbing)
    dist_info = T.setup_distributed()
    generator = T.seed_everything(args.seed, dist_info.rank)       # per-rank noise: different rollouts per GPU
    resolve_defaults(args, dist_info.device)
    out_file = Path(args.out)
    run_dir = out_file.with_suffix("")
    ckpt_root = run_dir / "checkpoints"
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=1))
    bb, params, old_params = setup_policy(args, dist_info.device)
    reward_fn = reward_fn_factory(args, dist_info.device)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    start_step, invalid_total = 0, 0
    resume_from = T.resolve_resume(args.resume, ckpt_root)
    if resume_from is not None:  # both adapters, optimizer, RNGs, step (= data position)
        state = T.restore_training_checkpoint(resume_from, bb.transformer, optimizer, dist_info, generator)
        start_step, invalid_total = state["step"], state.get("invalid_total", 0)
        if dist_info.is_main:
            print(f"resumed from {resume_from} at step {start_step}")

    guard = T.NonFiniteGuard(10)
    batches = T.infinite_batches(dataset, args.lrs_per_step, dist_info, args.seed, start_step, 0,
                                 lambda items: items)  # a list of items: LR sizes may differ
    rewards_log = run_dir / "rewards.jsonl"
    writer = None
    if dist_info.is_main:  # logs continue at the checkpoint: what a killed run logged after it is dropped
        writer = T.summary_writer(run_dir / "tb", start_step)
        if start_step == 0:
            rewards_log.unlink(missing_ok=True)
        T.truncate_jsonl(rewards_log, start_step)

    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc=f"RL {run_dir.name}",
               disable=not dist_info.is_main)
    for step in bar:
        t_start = time.perf_counter()
        model_time = reward_time = 0.0  # policy forward/backward, reward scoring; the rest is RL bookkeeping
        _, items = next(batches)
        groups: list[Group] = []
        failure = None  # the first error of this rank's generation and scoring, agreed on by all ranks below
        for item in items:
            if failure is not None:
                break
            t0 = time.perf_counter()
            # 1. condition once per LR
            cond = B.encode_condition(bb, item["lr"].to(bb.device), args.prompt, args.scale)
            # 2. K rollouts (6 Euler steps), batched: NFT samples the old policy's ODE; Flow-GRPO the
            #    current policy's SDE, keeping the path and its log-probabilities
            sigmas = B.sigma_schedule(bb.scheduler, args.rollout_steps, cond.num_tokens)
            trajectory = None
            if args.objective == "nft":
                x0 = rollout(bb, cond, args.group_size, sigmas, args.rollout_batch, generator,
                             policy_autocast(args, bb.device))
            else:
                x0, trajectory = rollout_sde(bb, cond, args.group_size, sigmas, args.rollout_batch, generator, args)
            srs = B.decode(bb, x0, cond)
            model_time += time.perf_counter() - t0
            # 3. reward: Eq.4 from (F, Q_LR, Q_SR); invalid scores drop out of their group
            t0 = time.perf_counter()
            try:
                scores = reward_fn(item, srs)
            except T.RunError as err:  # e.g. the reward server stayed down for --reward-timeout seconds
                failure = err
                continue
            reward_time += time.perf_counter() - t0
            R = reward.combine_reward(scores.F, scores.q_lr, scores.q_sr, args.reward_form, args.gamma).float()
            R = torch.where(scores.valid, R, torch.full_like(R, float("nan")))
            groups.append(Group(item, cond, sigmas, x0, srs, scores, R, trajectory))

        T.raise_if_any_rank_failed(failure)  # every rank stops with the failed rank's message, not a NCCL timeout

        # 4. group filter, then per group (the K samples of one LR, on this rank) the optimality r (NFT)
        #    or the advantage (Flow-GRPO)
        all_R = torch.cat([g.R for g in groups])
        group_ids = torch.cat([torch.full((args.group_size,), i) for i in range(len(groups))])
        keep = nft.keep_groups(all_R, group_ids, args.filter_mean, args.filter_var, args.reward_scale)
        if args.objective == "nft":
            r = nft.optimality(all_R, group_ids, args.clip, args.std_mode)
        else:
            r = flow_grpo.group_advantages(all_R, group_ids, args.std_mode, clip=args.adv_clip)
        weight = 1 if args.objective == "nft" else len(flow_grpo.train_step_indices(args.rollout_steps,
                                                                                     args.timestep_fraction))
        n_keep_global = float(T.all_reduce_sum(torch.tensor([float(keep.sum())])))  # kept samples, all ranks
        invalid = int(sum((~g.scores.valid).sum() for g in groups))
        invalid_total += invalid

        # 5. update of the LoRA, gradients summed over ranks: NFT on fresh noise of the kept samples
        #    (Eq.6-8), Flow-GRPO on their recorded transitions
        optimizer.zero_grad(set_to_none=True)
        loss_sum, ratios = 0.0, []
        normaliser = max(n_keep_global, 1.0) * weight
        t0 = time.perf_counter()
        for g, kept, r_g in zip(groups, keep.split(args.group_size), r.split(args.group_size)):
            if not kept.any():
                continue
            if args.objective == "nft":  # r stays on the host here; nft_loss moves it to the velocities' device
                loss_sum += nft_backward(bb, g.cond, g.x0[kept.to(g.x0.device)], r_g[kept], args, generator, g.sigmas,
                                         normaliser)
            else:
                group_loss, group_ratios = grpo_backward(bb, g, kept, r_g, args, normaliser)
                loss_sum += group_loss
                ratios += group_ratios
        model_time += time.perf_counter() - t0
        T.all_reduce_grads(params)
        loss = torch.tensor(loss_sum / normaliser)
        grad_norm = torch.tensor(0.0)
        if n_keep_global > 0 and guard.ok(loss):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            if args.objective == "nft":  # 6. old policy <- EMA of theta (DiffusionNFT's min(0.001 step, 0.5))
                nft.update_old_policy(old_params, params, nft.old_policy_decay(step, args.old_decay))
        step_time = time.perf_counter() - t_start

        # ------------------------------------------------------------------ logging, samples, checkpoints
        done = step + 1
        stats = reward_stats(groups, keep, r, invalid)
        if ratios:  # Flow-GRPO: how far the update's likelihood ratios were from 1 (exactly 0 before a step)
            ratio = torch.cat(ratios)
            stats.update(ratio_max_deviation=float((ratio - 1).abs().max()),
                         clipped_fraction=float(((ratio - 1).abs() > args.clip_range).float().mean()))
        stats.update(loss=float(loss), grad_norm=float(grad_norm), step=done,
                     old_deviation=nft.old_policy_deviation(old_params, params) if args.objective == "nft" else 0.0,
                     policy_time_share=model_time / step_time, reward_time_share=reward_time / step_time,
                     other_time_share=1 - (model_time + reward_time) / step_time, step_time=step_time)
        group_rewards = {g.item["name"]: float(g.R[~torch.isnan(g.R)].mean()) for g in groups}  # per LR image
        if dist_info.is_main:
            bar.set_postfix(R=f"{stats['reward_mean']:.3f}", kept=f"{stats['kept_fraction']:.2f}")
            with open(rewards_log, "a") as f:
                f.write(json.dumps({**stats, "group_rewards": group_rewards}) + "\n")
            if done % args.log_every == 0:
                for key, value in stats.items():
                    if key != "step" and value == value:  # skip NaN (stats holds floats only)
                        writer.add_scalar(f"rl/{key}", value, done)
                writer.add_scalar("rl/invalid_total", invalid_total, done)
                finite_r = r[~torch.isnan(r)]
                if finite_r.numel():
                    writer.add_histogram("rl/r", finite_r, done)
                writer.flush()  # on disk with the step: a kill loses nothing logged
            if args.sample_every and done % args.sample_every == 0:
                write_group_grid(groups[0].item, groups[0].srs, args.scale, run_dir / "samples" / f"step_{done:06d}.png")
        if done % args.save_every == 0 or done == args.steps:
            T.save_training_checkpoint(ckpt_root, done, bb.transformer, optimizer, dist_info, generator,
                                       keep=is_lora, keep_last=args.keep_last, invalid_total=invalid_total)
            if dist_info.is_main:
                B.save_lora(bb.transformer, out_file, "default")

    T.check_ranks_in_sync(params)
    if dist_info.is_main:
        B.save_lora(bb.transformer, out_file, "default")
        print(f"wrote {out_file}")
        writer.close()
    T.cleanup_distributed()
    return out_file


def is_lora(name: str) -> bool:
    """Checkpointed RL weights: both adapters (trainable "default" and "old"); the base is not saved."""
    return ".default." in name or ".old." in name


def reward_stats(groups: list[Group], keep: torch.Tensor, r: torch.Tensor, invalid: int) -> dict[str, float]:
    """Means over this step's samples (NaN-safe) for logging and the demo report."""
    def nanmean(x: torch.Tensor) -> float:
        x = x.float()
        return float(x[~torch.isnan(x)].mean()) if (~torch.isnan(x)).any() else float("nan")

    R = torch.cat([g.R for g in groups])
    cat = lambda attr: torch.cat([getattr(g.scores, attr).float() for g in groups])  # noqa: E731
    valid = ~torch.isnan(R)
    return dict(reward_mean=nanmean(R), reward_std=float(R[valid].std()) if valid.sum() > 1 else 0.0,
                F=nanmean(cat("F")), q_lr=nanmean(cat("q_lr")), q_sr=nanmean(cat("q_sr")),
                kept_fraction=float(keep.float().mean()), invalid=float(invalid),
                r_mean=nanmean(r))  # NFT: the optimality r; Flow-GRPO: the advantage


def write_group_grid(item: dict, srs: torch.Tensor, scale: int, path: Path, max_samples: int = 8) -> None:
    """LR (bicubic) | up to 8 samples | HR (when there is one), side by side."""
    tiles = [B.upscale(item["lr"][None].float(), scale)[0]] + [s.float().cpu() for s in srs[:max_samples]]
    if "hr" in item:
        tiles.append(item["hr"].float())
    save_image(torch.cat(tiles, dim=-1), path)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if not args.hr_dir:
        raise SystemExit("--hr-dir is required: the full-reference stage needs HR images (see rl_nr.py for LR only)")
    if args.lr_dir:
        dataset = PairedFolderDataset(args.lr_dir, args.hr_dir, crop_size=args.crop_size, scale=args.scale,
                                      flip=True, seed=args.seed)
    else:
        dataset = HRFolderDataset(args.hr_dir, crop_size=args.crop_size, scale=args.scale, seed=args.seed)
    dataset.check()
    return run(args, dataset, make_fr_reward)


if __name__ == "__main__":
    T.run_script(main)
