"""Full-reference online RL stage of OARS (paper §4 "Full-Reference RL Stage", §5.1), and the RL loop both
RL stages run (rl_nr.py calls `run` with its own data and reward).

LoRA (rank 32, alpha 64) on the BASE Qwen-Image-Edit-2509 weights, trained with the negative-aware
forward-process objective (DiffusionNFT, Eq.6-8, nft.py). Per step and per LR image:

    condition once  ->  K=24 rollouts from the OLD policy (6 Euler steps)  ->  reward
    R = Eq.4(F, Q_LR, Q_SR), F = 1 - DISTS(SR, HR) against the reference (Eq.1), Q_LR/Q_SR from COMPASS
    ->  drop high-mean/low-variance groups  ->  r = 0.5 + 0.5 clip((R - mean)/std, -1, 1)
    ->  fresh noise x_t = (1-t) x0 + t eps on the kept samples, v = eps - x0
    ->  L = r ||v+ - v||^2 + (1-r) ||v- - v||^2  (Eq.8)  ->  Adam on the LoRA  ->  old <- EMA(theta)

One copy of the backbone in memory: the trainable policy is peft adapter "default", the old policy a
second adapter "old" on the same modules, the reference (for the optional KL) the adapters disabled.

Two seams, each chosen once: `--objective flow_grpo` swaps the NFT rollout and update for Flow-GRPO's (the
paper's Table 7 baseline, baselines/flow_grpo.py: SDE rollouts of the current policy, the PPO-clipped ratio
on the recorded steps); `--reward refreward` swaps COMPASS for RefReward-SR's pairwise win rates
(refreward_sr/refreward.py). Data, group filter, LoRA on the base, checkpoints and logs are shared.

Tiny or mini preset on a CPU (SSIM fidelity needs no weights; COMPASS tiny/mini in-process):
    python rl_fr.py --model tiny --reward-model tiny --hr-dir data/hr --crop-size 64 --group-size 8 --steps 20 \
        --fidelity ssim
    python rl_fr.py --model mini --reward-model mini --hr-dir data/hr --crop-size 64 --group-size 8 \
        --rollout-batch 8 --train-batch 8 --steps 48 --fidelity ssim
Full scale, 8 GPUs (paper: LSDIR, K=24, COMPASS served by vLLM on another machine; --model defaults to
Qwen/Qwen-Image-Edit-2509, and on GPUs bf16 and gradient checkpointing are on by default):
    torchrun --nproc_per_node 8 rl_fr.py --hr-dir LSDIR/HR --reward-url http://reward-host:8000
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
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import nft
import reward
from baselines import flow_grpo
from common import backbone as B
from common import training as T
from common.data import HRFolderDataset, PairedFolderDataset, save_image
from refreward_sr import refreward


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
    """LR folder: paired by file name with the HR folder (full-reference stage), or alone (rl_nr.py)"""
    out: str = "out/fr.safetensors"
    """final LoRA file; the run folder is next to it without the suffix (out/fr/)"""
    crop_size: int = 512
    """HR crop (paper: 512 px); LR = crop/4"""
    scale: int = 4
    """upscaling factor (the paper's 4x)"""
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
    """'nft' (paper: the negative-aware forward-process objective, Eq.6-8) or 'flow_grpo' (Table 7 baseline)"""
    steps: int = 1000
    """optimizer steps (one group per LR image per process each)"""
    lr: float = 3e-4
    """Adam learning rate of the LoRA (paper §5.1: 3e-4)"""
    weight_decay: float = 1e-4
    """AdamW weight decay (paper §5.1: 1e-4)"""
    max_grad_norm: float = 1.0
    """gradient clipping norm (paper silent)"""
    lora_rank: int = 32
    """LoRA rank (paper §5.1: 32)"""
    lora_alpha: int = 64
    """LoRA alpha (paper §5.1: 64)"""
    lam: float | None = None
    """NFT only: lambda of Eq.6-7 (default 1)"""
    clip: float | None = None
    """NFT only: clip range of the normalised reward in r (paper: 1)"""
    std_mode: str | None = None
    """group normalisation: 'group' (std of the group; default for nft, paper) or 'global' (std of the batch;
    default for flow_grpo as its public code, DiffusionNFT's global_std)"""
    filter_mean: float = 0.9
    """drop groups whose mean of R / --reward-scale is above this AND variance below --filter-var (§5.1: 0.9)"""
    filter_var: float = 0.05
    """the variance threshold of the group filter (§5.1: 0.05)"""
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
    fidelity: str = "dists"
    """F against the HR: 'dists' (paper, Eq.1), 'lpips', 'ssim', 'texture' or 'blend' (no downloaded weights;
    texture = evaluate.texture_fidelity, a DISTS analogue that does not pay for blur; blend = their mean)"""
    reward: str = "compass"
    """'compass' (the paper: Eq.4 from COMPASS's F, Q_LR, Q_SR) or 'refreward' (RefReward-SR: each sample's win rate
    over the group's other samples by pairwise LR-conditioned verdicts; in the FR stage the HR is then unused)"""
    reward_model: str = "out/compass"
    """COMPASS for Q_LR/Q_SR, in-process: the folder train_compass.py wrote (default: its default output), a hub
    name, or 'mini' / 'tiny'. The paper serves it instead: --reward-url"""
    reward_url: str | None = None
    """OpenAI-compatible server (vLLM) instead of in-process scoring, e.g. http://host:8000"""
    reward_model_name: str = "compass"
    """the model name the server serves (vLLM --served-model-name)"""
    reward_concurrency: int = 8
    """requests in flight to the reward server"""
    reward_timeout: float = 600.0
    """seconds to keep retrying a reward server that does not answer (backoff up to 30 s between tries); then
    every rank stops with one line naming the URL, the last checkpoint kept"""
    reward_views: int = 1
    """average COMPASS's readings over this many flips/rotations of each (LR, SR) pair, in-process or served
    (reward.LocalScorer / RemoteScorer views; 1 = the paper's single reading, 8 = all, at 8x the scoring cost)"""
    reward_form: str = "compass"
    """'compass' (Eq.4), 'gain' or 'gated' (Table 8 ablations)"""
    gamma: float = 7.0
    """gamma of Eq.4 (paper: 7)"""
    prompt: str = B.DEFAULT_PROMPT
    """the "enhance" instruction c"""
    bf16: bool | None = None
    """bfloat16 base weights and autocast (LoRA and optimizer in float32); default: on when training on a GPU"""
    gradient_checkpointing: bool | None = None
    """recompute each block's activations in the backward pass (the NFT update at train batch 4 peaks at ~111 GB
    per GPU without it, ~47 GB with it: scale/estimate.py); default: on for the real model, off for mini/tiny"""
    seed: int = 0
    """seed of the data order, the noise and the LoRA's initialisation (every rank adds its rank to it)"""
    log_every: int = 1
    """TensorBoard scalars every N steps"""
    sample_every: int = 50
    """write an LR | samples | HR picture every N steps (0: never)"""
    save_every: int = 50
    """checkpoint every N steps (and at the last)"""
    keep_last: int = 3
    """checkpoints kept"""
    resume: str | None = None
    """'latest' (the newest checkpoint of the run folder) or a checkpoint folder"""
    overwrite: bool = False
    """start over in a run folder that holds a run (deletes its checkpoints, logs and final LoRA); without it such
    a folder is refused unless --resume"""
    flow_grpo: flow_grpo.Options = field(default_factory=flow_grpo.Options)
    """Flow-GRPO's own options (--objective flow_grpo)"""
    refreward: refreward.Options = field(default_factory=refreward.Options)
    """RefReward-SR's own options (--reward refreward)"""


# NFT's options with their defaults (None in Args = "the objective's default"); Flow-GRPO's: flow_grpo.DEFAULTS.
NFT_DEFAULTS = dict(lam=1.0, clip=1.0, loss_normalize="none", train_timesteps="uniform", old_decay="nft")
STD_MODE = {"nft": "group", "flow_grpo": "global"}


def parse_args(argv: list[str] | None = None, defaults: dict | None = None, doc: str = __doc__,
               exclude: tuple[str, ...] = ()) -> Args:
    """CLI from the Args dataclass (one flag per field, its docstring as help); rl_nr.py changes `defaults` and
    leaves out the options it has no use for (`exclude`).

    Options of the other objective are refused by name; unset ones get the chosen objective's defaults."""
    args, parser = T.parse_dataclass_args(Args, argv, doc.split("\n")[0], defaults, exclude)
    if args.objective not in STD_MODE:
        parser.error(f"--objective {args.objective}: choose one of {', '.join(STD_MODE)}")
    grpo_set = {k: v for k, v in asdict(args.flow_grpo).items() if v is not None}
    nft_set = [k for k in NFT_DEFAULTS if getattr(args, k) is not None]
    if args.objective == "nft":
        if grpo_set:
            parser.error(f"--{next(iter(grpo_set)).replace('_', '-')} is an option of --objective flow_grpo; it does "
                         f"nothing with --objective nft")
        for name, default in NFT_DEFAULTS.items():
            setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    else:
        if nft_set:
            parser.error(f"--{nft_set[0].replace('_', '-')} is an option of --objective nft; it does nothing with "
                         f"--objective {args.objective}")
        args.flow_grpo = flow_grpo.Options(**{**asdict(flow_grpo.DEFAULTS), **grpo_set})
    args.std_mode = args.std_mode or STD_MODE[args.objective]
    if args.init == "sft" and not args.sft:
        parser.error("--init sft needs --sft (the folder train_sft.py wrote)")
    if args.group_size < 2:
        parser.error("--group-size must be >= 2 (group statistics need two samples)")
    if args.reward not in ("compass", "refreward"):
        parser.error(f"--reward {args.reward}: choose compass or refreward")
    for name in ("steps", "lrs_per_step", "rollout_batch", "rollout_steps", "train_batch", "lora_rank", "lora_alpha",
                 "save_every", "keep_last", "reward_concurrency", "reward_views", "scale", "crop_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    for name in ("lr", "gamma", "reward_timeout", "reward_scale"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be > 0")
    if args.rollout_steps < 2:
        parser.error(f"--rollout-steps {args.rollout_steps}: the flow-matching schedule needs at least 2 steps")
    if args.crop_size % (4 * args.scale):
        parser.error(f"--crop-size {args.crop_size}: must be a multiple of 4 x --scale ({4 * args.scale})")
    return args


def resolve_defaults(args: Args, device: torch.device) -> None:
    """Fill the options whose default depends on where the run is: bf16 on GPUs, gradient checkpointing for the
    real model (the laptop presets are small enough without it, and faster)."""
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = args.model not in ("tiny", "mini")


# ====================================================================================================
# The policy: base (or SFT) weights + trainable adapter "default" + old-policy adapter "old"
# ====================================================================================================


def setup_policy(args: Args, device: torch.device) -> tuple[B.Backbone, list[torch.Tensor], list[torch.Tensor]]:
    """Load the backbone, attach both adapters; returns (backbone, trainable params, old params) aligned."""
    bb = B.load_backbone(args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32, device=device)
    if args.init == "sft":
        B.load_transformer_weights(bb.transformer, args.sft, args.model)
    tr = bb.transformer
    with torch.random.fork_rng(devices=[]):  # peft draws A from the global RNG, seeded per rank: every rank must
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
# The OARS objective: rollouts of the OLD policy, the optimality r, Eq.8 on fresh noise, old <- EMA(theta)
# (Flow-GRPO's objective, with the same methods, is baselines/flow_grpo.FlowGRPO)
# ====================================================================================================


class NFT:
    """The negative-aware forward-process objective (§4, Eq.6-8, nft.py) on the backbone's two adapters."""

    name = "nft"
    terms = 1  # loss terms per kept sample (the normaliser counts kept samples)

    def __init__(self, args: Args, params: list[torch.Tensor], old_params: list[torch.Tensor]):
        self.args, self.params, self.old_params = args, params, old_params

    @torch.no_grad()
    def rollout(self, bb: B.Backbone, cond: B.Condition, k: int, sigmas: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, None]:
        """K samples x0 (K,N,4C) for ONE condition from the OLD policy's ODE on `sigmas`, --rollout-batch per
        forward pass, under the update's autocast."""
        noise, chunk = B.initial_noise(cond, k, generator), self.args.rollout_batch
        with B.active_adapter(bb.transformer, "old"), B.autocast(bb.device, self.args.bf16):
            x0 = torch.cat([B.sample(bb.transformer, cond, noise[i:i + chunk], sigmas) for i in range(0, k, chunk)])
        return x0, None

    def weights(self, rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """The optimality r of every sample (§4): 0.5 + 0.5 clip((R - mean_g) / std_g, -1, 1)."""
        return nft.optimality(rewards, group_ids, self.args.clip, self.args.std_mode)

    def micro_loss(self, bb: B.Backbone, cond: B.Condition, x0: torch.Tensor, r: torch.Tensor,
                   generator: torch.Generator, rollout_sigmas: torch.Tensor) -> torch.Tensor:
        """Eq.8 for one micro-batch: kept samples x0 (m,N,4C) with their r (m,) -> per-sample loss (m,), carrying
        the gradient of the trainable adapter."""
        args, tr, m = self.args, bb.transformer, x0.shape[0]
        x0, cond_m = x0.float(), B.repeat_condition(cond, m)
        # 1. fresh noise on the kept samples: x_t = (1-t) x0 + t eps, target v = eps - x0 (Eq.5 form)
        t = nft.sample_train_timesteps(m, generator, args.train_timesteps, rollout_sigmas).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        v_target = eps - x0
        # 2. the frozen old policy v_old (Eq.6-7 mix it with v_theta)
        with torch.no_grad(), B.active_adapter(tr, "old"), B.autocast(x0.device, args.bf16):
            v_old = B.velocity(tr, x_t, t, cond_m).float()
        # 3. the current policy v_theta, with gradients (adapter "default")
        with B.autocast(x0.device, args.bf16):
            v_theta = B.velocity(tr, x_t, t, cond_m).float()
        loss = nft.nft_loss(v_theta, v_old, v_target, r, args.lam, args.loss_normalize, x_t, t)  # Eq.8, (m,)
        if args.kl_weight > 0:  # optional: stay near the reference (adapters off), DiffusionNFT-style
            with torch.no_grad(), B.active_adapter(tr, None), B.autocast(x0.device, args.bf16):
                v_ref = B.velocity(tr, x_t, t, cond_m).float()
            loss = loss + args.kl_weight * nft.kl_to_reference(v_theta, v_ref)
        return loss

    def backward(self, bb: B.Backbone, cond: B.Condition, sigmas: torch.Tensor, x0: torch.Tensor, extra: None,
                 kept: torch.Tensor, r: torch.Tensor, generator: torch.Generator, normaliser: float) -> float:
        """Accumulate d/dtheta of Eq.8 over one group's kept samples, --train-batch at a time; each sample's loss
        divided by `normaliser` (kept samples over all ranks: the gradient is the global mean). r stays on the
        host; nft_loss moves it to the velocities' device. Returns the summed loss."""
        x0, r, total, batch = x0[kept.to(x0.device)], r[kept], 0.0, self.args.train_batch
        if bool(torch.isnan(r).any()):  # on the host: keep_groups drops samples without a reward
            raise ValueError("NFT.backward: r is NaN for a kept sample (keep_groups keeps only rewarded samples)")
        for i in range(0, x0.shape[0], batch):
            loss = self.micro_loss(bb, cond, x0[i:i + batch], r[i:i + batch], generator, sigmas)
            (loss.sum() / normaliser).backward()
            total += float(loss.detach().sum())
        return total

    def after_step(self, step: int) -> None:
        """old <- decay old + (1 - decay) theta (DiffusionNFT's decay min(0.001 step, 0.5) by default)."""
        nft.update_old_policy(self.old_params, self.params, nft.old_policy_decay(step, self.args.old_decay))

    def stats(self) -> dict[str, float]:
        return dict(old_deviation=nft.old_policy_deviation(self.old_params, self.params))


def make_objective(args: Args, params: list[torch.Tensor], old_params: list[torch.Tensor]):
    """The objective of the run, chosen once: NFT (the paper) or Flow-GRPO (its Table 7 baseline)."""
    if args.objective == "nft":
        return NFT(args, params, old_params)
    return flow_grpo.FlowGRPO(args.flow_grpo, args.rollout_steps, args.rollout_batch, args.std_mode, args.kl_weight,
                              bool(args.bf16))


# ====================================================================================================
# Rewards: the seam of both RL stages. FR: F against the HR, Q_LR and Q_SR from COMPASS; NR: all three
# from COMPASS; or RefReward-SR's pairwise win rates for either
# ====================================================================================================

# A reward function maps one dataset item and its K decoded samples (K,3,H,W) to reward.Scores.
RewardFn = Callable[[dict, torch.Tensor], reward.Scores]


def make_reward(args: Args, device: torch.device, full_reference: bool) -> RewardFn:
    """The reward of an RL stage, chosen once. COMPASS (the paper): in the full-reference stage F = fidelity(SR,
    HR) (Eq.1, DISTS by default) on the policy's device and Q_LR, Q_SR from COMPASS; in the non-reference stage
    F, Q_LR, Q_SR all from COMPASS (its fidelity prompt). Served (--reward-url) or in-process on the policy's
    device; Q_LR shared by the group. --reward refreward: RefReward-SR's win rates instead."""
    if args.reward == "refreward":
        return refreward.group_reward(args.refreward, args.reward_url, args.reward_model_name,
                                      args.reward_concurrency, device)
    compass = reward.make_scorer(args.reward_model, args.reward_url, args.reward_model_name,
                                 synthetic=not full_reference, concurrency=args.reward_concurrency, device=device,
                                 views=args.reward_views, retry_for=args.reward_timeout)
    fidelity = reward.FidelityScorer(args.fidelity, device=device) if full_reference else None

    def score(item: dict, srs: torch.Tensor) -> reward.Scores:
        scores = compass.score_group(B.to_pil(item["lr"]), [B.to_pil(s) for s in srs])
        if fidelity is not None:  # Eq.1 against the HR replaces COMPASS's F
            scores.F = fidelity.fidelity(srs, item["hr"][None].expand_as(srs).to(srs.device)).float().cpu()
        return scores

    return score


# ====================================================================================================
# The online RL loop (both stages)
# ====================================================================================================


@dataclass
class Group:
    """The K rollouts of one LR image (a group of Eq.8's statistics) and what was computed for them."""

    item: dict             # the dataset item: "lr" (3,h,w), "name", and "hr" in the FR stage
    cond: B.Condition      # encoded once, shared by the rollouts and the update
    sigmas: torch.Tensor   # the rollout's sigma grid (N+1,), also the 'rollout_grid' training timesteps
    x0: torch.Tensor       # (K,N,4C) rollout results in latent tokens
    extra: object          # what the objective keeps of the rollout (Flow-GRPO: its trajectory; NFT: None)
    srs: torch.Tensor      # (K,3,H,W) decoded SR images
    scores: reward.Scores  # F, q_lr, q_sr, valid
    R: torch.Tensor        # (K,) Eq.4 reward, NaN where the score is invalid


def run(args: Args, dataset: torch.utils.data.Dataset,
        make_reward_fn: Callable[[Args, torch.device], RewardFn] = partial(make_reward, full_reference=True)
        ) -> Path | int:
    """Train the LoRA of `args` on `dataset` with the reward of `make_reward_fn(args, device)`; returns the final
    LoRA file (or 130 when stopped by Ctrl-C / SIGTERM, after a checkpoint). rl_fr.py runs it with the
    full-reference reward, rl_nr.py with the non-reference one."""
    # ------------------------------------------------------------------ setup (plumbing)
    dist_info = T.setup_distributed()
    generator = T.seed_everything(args.seed, dist_info.rank)       # per-rank noise: different rollouts per GPU
    resolve_defaults(args, dist_info.device)
    out_file = Path(args.out)
    run_dir = out_file.with_suffix("")
    ckpt_root = run_dir / "checkpoints"
    # a finished or interrupted run in this folder is never replaced by accident (--resume / --overwrite)
    T.claim_run(run_dir, args.resume, args.overwrite, out_file, dist_info, asdict(args))
    bb, params, old_params = setup_policy(args, dist_info.device)
    reward_fn = make_reward_fn(args, dist_info.device)
    objective = make_objective(args, params, old_params)
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

    stop = T.StopOnSignal()  # Ctrl-C / SIGTERM: checkpoint at the end of the step, then the resume command
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc=f"RL {run_dir.name}",
               disable=not dist_info.is_main)
    for step in bar:
        t_start = time.perf_counter()
        model_time = reward_time = 0.0  # policy forward/backward, reward scoring; the rest is RL bookkeeping
        _, items = next(batches)
        groups: list[Group] = []
        failure = None  # the first error of this rank's scoring, agreed on by all ranks below
        for item in items:
            t0 = time.perf_counter()
            # 1. condition once per LR
            cond = B.encode_condition(bb, item["lr"].to(bb.device), args.prompt, args.scale)
            # 2. K rollouts (6 Euler steps), batched: NFT samples the old policy's ODE; Flow-GRPO the current
            #    policy's SDE, keeping the path and its log-probabilities
            sigmas = B.sigma_schedule(bb.scheduler, args.rollout_steps, cond.num_tokens)
            x0, extra = objective.rollout(bb, cond, args.group_size, sigmas, generator)
            srs = B.decode(bb, x0, cond)
            model_time += time.perf_counter() - t0
            # 3. reward: Eq.4 from (F, Q_LR, Q_SR); invalid scores drop out of their group
            t0 = time.perf_counter()
            try:
                scores = reward_fn(item, srs)
            except T.RunError as err:  # e.g. the reward server stayed down for --reward-timeout seconds
                failure = err
                break
            reward_time += time.perf_counter() - t0
            R = reward.combine_reward(scores.F, scores.q_lr, scores.q_sr, args.reward_form, args.gamma).float()
            R = torch.where(scores.valid, R, torch.full_like(R, float("nan")))
            groups.append(Group(item, cond, sigmas, x0, extra, srs, scores, R))
        T.raise_if_any_rank_failed(failure)  # every rank stops with the failed rank's message, not a NCCL timeout

        # 4. group filter, then per group (the K samples of one LR, on this rank) the optimality r (NFT)
        #    or the advantage (Flow-GRPO)
        all_R = torch.cat([g.R for g in groups])
        group_ids = torch.cat([torch.full((args.group_size,), i) for i in range(len(groups))])
        keep = nft.keep_groups(all_R, group_ids, args.filter_mean, args.filter_var, args.reward_scale)
        w = objective.weights(all_R, group_ids)
        n_keep_global = float(T.all_reduce_sum(torch.tensor([float(keep.sum())])))  # kept samples, all ranks
        invalid = int(sum((~g.scores.valid).sum() for g in groups))
        invalid_total += invalid

        # 5. update of the LoRA, gradients summed over ranks: NFT on fresh noise of the kept samples
        #    (Eq.6-8), Flow-GRPO on their recorded transitions
        optimizer.zero_grad(set_to_none=True)
        loss_sum, normaliser = 0.0, max(n_keep_global, 1.0) * objective.terms
        t0 = time.perf_counter()
        for g, kept, w_g in zip(groups, keep.split(args.group_size), w.split(args.group_size)):
            if bool(kept.any()):
                loss_sum += objective.backward(bb, g.cond, g.sigmas, g.x0, g.extra, kept, w_g, generator, normaliser)
        model_time += time.perf_counter() - t0
        T.all_reduce_grads(params)
        loss = torch.tensor(loss_sum / normaliser)
        grad_norm = torch.tensor(0.0)
        if n_keep_global > 0 and guard.ok(loss):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            objective.after_step(step)  # 6. NFT: old policy <- EMA of theta
        step_time = time.perf_counter() - t_start

        # ------------------------------------------------------------------ logging, samples, checkpoints
        done = step + 1
        stats = reward_stats(groups, keep, w, invalid)
        stats.update(objective.stats())
        stats.update(loss=float(loss), grad_norm=float(grad_norm), step=done,
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
                finite_w = w[~torch.isnan(w)]
                if finite_w.numel():
                    writer.add_histogram("rl/r", finite_w, done)
                writer.flush()  # on disk with the step: a kill loses nothing logged
            if args.sample_every and done % args.sample_every == 0:
                write_group_grid(groups[0].item, groups[0].srs, args.scale, run_dir / "samples" / f"step_{done:06d}.png")
        stopping = stop.requested()
        if done % args.save_every == 0 or done == args.steps or stopping:  # checkpoints hold the LoRA of their step
            T.save_training_checkpoint(ckpt_root, done, bb.transformer, optimizer, dist_info, generator,
                                       keep=is_lora, keep_last=args.keep_last, invalid_total=invalid_total)
        if stopping:
            bar.close()
            return T.stopped(stop, writer, dist_info)
    stop.restore()

    T.check_ranks_in_sync(params)
    if dist_info.is_main:  # the final LoRA, written once, at the end: its metadata names its step and arguments
        B.save_lora(bb.transformer, out_file, "default",
                    metadata={"oars_step": str(args.steps), "oars_args": json.dumps(asdict(args))})
        print(f"wrote {out_file}")
        writer.close()
    T.cleanup_distributed()
    return out_file


def is_lora(name: str) -> bool:
    """Checkpointed RL weights: both adapters (trainable "default" and "old"); the base is not saved."""
    return ".default." in name or ".old." in name


def reward_stats(groups: list[Group], keep: torch.Tensor, w: torch.Tensor, invalid: int) -> dict[str, float]:
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
                r_mean=nanmean(w))  # NFT: the optimality r; Flow-GRPO: the advantage


def write_group_grid(item: dict, srs: torch.Tensor, scale: int, path: Path, max_samples: int = 8) -> None:
    """LR (bicubic) | up to 8 samples | HR (when there is one), side by side."""
    tiles = [B.upscale(item["lr"][None].float(), scale)[0]] + [s.float().cpu() for s in srs[:max_samples]]
    if "hr" in item:
        tiles.append(item["hr"].float())
    save_image(torch.cat(tiles, dim=-1), path)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if not args.hr_dir:
        raise T.RunError("--hr-dir is required: the full-reference stage needs HR images (see rl_nr.py for LR only)")
    if args.lr_dir:
        dataset = PairedFolderDataset(args.lr_dir, args.hr_dir, crop_size=args.crop_size, scale=args.scale,
                                      flip=True, seed=args.seed)
    else:
        dataset = HRFolderDataset(args.hr_dir, crop_size=args.crop_size, scale=args.scale, seed=args.seed)
    dataset.check()
    return run(args, dataset)


if __name__ == "__main__":
    T.run_script(main)
