"""Flow-GRPO (Liu et al. 2025): trajectory-level policy-gradient RL for flow matching, the paper's Table 7 baseline.

OARS trains with the forward-process NFT objective (nft.py) and compares it with Flow-GRPO (appendix,
"Comparison with Flow-GRPO", Table 7), which treats every denoising step as an action of a stochastic
policy. `rl_fr.py --objective flow_grpo` (and rl_nr.py) runs it in the same loop, data, rewards, group
filter and LoRA-on-base as NFT; only the rollout and the update differ. The top of this file is the math
as pure functions; the bottom (`FlowGRPO`) is the objective the RL loop calls:

    1. rollout: the deterministic Euler ODE becomes an SDE with the same marginals (noise level a),
           x_{j+1} = mean(x_j, v_theta(x_j, s_j)) + std_j sqrt(s_j - s_{j+1}) z,    z ~ N(0, I)   -> sde_step
       and the Gaussian log-probability of every transition is recorded                       -> gaussian_log_prob
    2. advantages A = (R - mean_group(R)) / (std + 1e-4), clipped to +-5                      -> group_advantages
    3. for a subset of the steps (the first `timestep_fraction` of them), re-run v_theta on the
       stored x_j, recompute log p(x_{j+1} | x_j), and minimise the PPO clipped surrogate
           max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)),   ratio = exp(log p - log p_old)   -> clipped_surrogate
       plus beta x the KL of the transition to the reference policy (adapters disabled)         -> sde_kl

Conventions as in the rest of the project: x_s = (1 - s) x0 + s eps, v = eps - x0, s goes 1 -> 0, so
dt = s_{j+1} - s_j < 0. Defaults are the public code's (yifan123/flow_grpo, config/base.py): noise level
0.7, clip range 1e-4, advantage clip 5, timestep fraction 0.99, KL weight 0, the std of the whole batch
(global_std) with eps 1e-4. Its Qwen-Image-Edit-2509 configuration uses noise level 0.9 and an SDE
window of 4 of 10 steps; pass those values to reproduce it.

The math functions are pure torch (`sde_step` composes `sde_noise_std`, `sde_step_mean` and
`gaussian_log_prob`; copy them together); `FlowGRPO` uses them with the backbone.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from common import backbone as B

__all__ = ["FlowGRPO", "Options", "Trajectory", "clipped_surrogate", "gaussian_log_prob", "group_advantages",
           "sde_kl", "sde_noise_std", "sde_step", "sde_step_mean", "train_step_indices"]


def sde_noise_std(sigma: Tensor, sigma_max: float, noise_level: float = 0.7) -> Tensor:
    """std_t = a sqrt(s / (1 - s)): the diffusion coefficient of the SDE whose marginals equal the ODE's.

    At s = 1 the denominator 1 - s is 0; the public code then uses 1 - sigma_max, where sigma_max is the
    schedule's SECOND sigma (the first one below 1), keeping s = 1 in the numerator.

    Args:
        sigma: (B,) or scalar current noise level s in (0, 1].
        sigma_max: the schedule's sigmas[1].
        noise_level: a (public default 0.7; 0.9 in its Qwen-Image-Edit-2509 config).
    Returns:
        std_t with the shape of `sigma` (float32 or float64 as `sigma`).
    """
    return noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.as_tensor(sigma_max, dtype=sigma.dtype),
                                                             sigma)))


def sde_step_mean(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, std_t: Tensor) -> Tensor:
    """Mean of x_{j+1} given x_j: one Euler step of the reverse-time SDE

        dx = [v + std_t^2 / (2 s) (x + (1 - s) v)] dt + std_t dw,   dt = s_{j+1} - s_j < 0,
        mean = x (1 + std_t^2 / (2 s) dt) + v (1 + std_t^2 (1 - s) / (2 s)) dt.

    With std_t = 0 it is the ODE's Euler step x + v dt.

    Args:
        x, v: (B, ...) current latents and velocity v_theta(x, s).
        sigma, sigma_next: (B,) current and next noise levels.
        std_t: (B,) from `sde_noise_std`.
    Returns:
        (B, ...) the mean.
    """
    shape = (-1,) + (1,) * (x.ndim - 1)
    s, dt, std = sigma.view(shape), (sigma_next - sigma).view(shape), std_t.view(shape)
    return x * (1 + std ** 2 / (2 * s) * dt) + v * (1 + std ** 2 * (1 - s) / (2 * s)) * dt


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per-sample Gaussian log-density of x under N(mean, std^2 I), AVERAGED over the non-batch elements.

        log p = mean_i [ -(x_i - mean_i)^2 / (2 std^2) - log std - log sqrt(2 pi) ]

    The average (not the sum) is the public code's choice: it keeps log-ratios small, which is why its PPO
    clip range can be 1e-4. `x` is the sampled next latent (no gradient); the gradient flows through `mean`.

    Args:
        x, mean: (B, ...). std: (B,) transition std (std_t sqrt(-dt)).
    Returns:
        (B,) log-probabilities.
    """
    shape = (-1,) + (1,) * (x.ndim - 1)
    std = std.view(shape)
    lp = -((x.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, x.ndim)))


def sde_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, sigma_max: float, noise_level: float = 0.7,
             generator: torch.Generator | None = None, x_next: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic step x_j -> x_{j+1} and its log-probability (float32 throughout).

    Rollout: `x_next=None` draws x_{j+1} = mean + std_t sqrt(-dt) z. Training: pass the stored x_next to get
    the log-probability of the same transition under the current velocity `v`.

    Args:
        x, v: (B, ...) latents at sigma and the velocity there.
        sigma, sigma_next: (B,) noise levels of this step and the next (sigma_next < sigma).
        sigma_max: the schedule's sigmas[1] (see `sde_noise_std`).
        noise_level: a.
        generator: for the rollout noise.
        x_next: (B, ...) the transition's result, or None to sample it.
    Returns:
        (x_next (B, ...), log_prob (B,), mean (B, ...), std_t (B,)).
    """
    x, v, sigma, sigma_next = x.float(), v.float(), sigma.float(), sigma_next.float()
    std_t = sde_noise_std(sigma, sigma_max, noise_level)
    mean = sde_step_mean(x, v, sigma, sigma_next, std_t)
    step_std = std_t * torch.sqrt(sigma - sigma_next)  # std_t sqrt(-dt)
    if x_next is None:
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x_next = mean + step_std.view((-1,) + (1,) * (x.ndim - 1)) * z
    return x_next, gaussian_log_prob(x_next.float(), mean, step_std), mean, std_t


def train_step_indices(num_steps: int, timestep_fraction: float = 0.99) -> list[int]:
    """The rollout steps whose transitions are trained: the first int(num_steps x fraction) of them.

    The public default 0.99 drops the LAST step: its transition std is tiny (s_{j+1} = 0 is close), so its
    Gaussian log-density is huge and ratios overflow. 6 steps -> [0, 1, 2, 3, 4].
    """
    n = int(num_steps * timestep_fraction)
    if n < 1:
        raise ValueError(f"timestep_fraction {timestep_fraction} of {num_steps} steps trains no step")
    return list(range(n))


def group_advantages(rewards: Tensor, group_ids: Tensor | Sequence[Hashable], std_mode: str = "global",
                     eps: float = 1e-4, clip: float = 5.0) -> Tensor:
    """GRPO advantages A = (R - mean_group(R)) / (std + eps), clipped to [-clip, clip].

    The mean is always per group (the K samples of one LR). std_mode "global" (public default, global_std):
    the population std of all valid rewards of the batch; "group": of the group's own rewards. NaN rewards
    (invalid scores) are ignored by the statistics and get A = NaN (drop them with nft.keep_groups).

    Args:
        rewards: (N,). group_ids: (N,) group key of each sample.
    Returns:
        (N,) advantages.
    """
    if std_mode not in ("global", "group"):
        raise ValueError(f"group_advantages: std_mode must be 'global' or 'group', got {std_mode!r}")
    keys = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(keys) != rewards.shape[0]:
        raise ValueError(f"group_advantages: {len(keys)} group_ids for {rewards.shape[0]} rewards")
    s = rewards.detach().double().cpu()
    valid = ~torch.isnan(s)
    out = torch.full_like(s, float("nan"))
    global_std = s[valid].std(correction=0) if valid.any() else torch.tensor(0.0, dtype=torch.float64)
    for key in dict.fromkeys(keys):
        members = torch.tensor([k == key for k in keys]) & valid
        if not members.any():
            continue
        std = global_std if std_mode == "global" else s[members].std(correction=0)
        out[members] = ((s[members] - s[members].mean()) / (std + eps)).clamp(-clip, clip)
    return out.to(rewards.device, rewards.dtype if rewards.is_floating_point() else torch.float32)


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float = 1e-4) -> Tensor:
    """PPO's clipped surrogate per sample: max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), ratio = exp(lp - lp_old).

    Minimising it raises the likelihood of positive-advantage transitions and lowers that of negative ones,
    until the ratio leaves [1 - eps, 1 + eps] in the advantage's direction (then the gradient is 0).

    Args:
        log_prob: (B,) under the current policy (carries the gradient).
        old_log_prob: (B,) recorded at rollout time.
        advantages: (B,) already clipped (`group_advantages`); computed on the host from the rewards, moved
            here to the log-probabilities' device.
        clip_range: eps (public default 1e-4, small because log-probs are per-element averages).
    Returns:
        (B,) losses.
    """
    ratio = torch.exp(log_prob - old_log_prob.detach())
    advantages = advantages.detach().to(ratio.device, ratio.dtype)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))


def sde_kl(mean: Tensor, mean_ref: Tensor, std_t: Tensor) -> Tensor:
    """KL of the current transition to the reference one (same variance): mean_i (mu_i - mu_ref_i)^2 / (2 std_t^2).

    As the public code, the divisor is std_t^2 without the |dt| of the transition variance (so this is the
    exact per-element KL times |dt|). The reference is the base model: LoRA adapters disabled.

    Args:
        mean, mean_ref: (B, ...) transition means under the policy and the reference. std_t: (B,).
    Returns:
        (B,) KL values.
    """
    shape = (-1,) + (1,) * (mean.ndim - 1)
    return ((mean - mean_ref.detach()) ** 2 / (2 * std_t.view(shape) ** 2)).mean(dim=tuple(range(1, mean.ndim)))


# ====================================================================================================
# The objective for the RL loop (rl_fr.run): rollout, advantages, update
# ====================================================================================================


@dataclass
class Options:
    """Flow-GRPO options (--objective flow_grpo; None = the public code's default, `DEFAULTS`)"""

    noise_level: float | None = None
    """SDE noise level a (public default 0.7; its Qwen-Image-Edit-2509 config: 0.9)"""
    clip_range: float | None = None
    """PPO clip of the likelihood ratio (public default 1e-4)"""
    adv_clip: float | None = None
    """advantage clip (public default 5)"""
    timestep_fraction: float | None = None
    """train the first int(rollout steps x fraction) steps (public default 0.99: all but the last)"""


DEFAULTS = Options(noise_level=0.7, clip_range=1e-4, adv_clip=5.0, timestep_fraction=0.99)


@dataclass
class Trajectory:
    """What Flow-GRPO keeps of one group's SDE rollouts for its update (the memory NFT does not need)."""

    latents: Tensor    # (K,T+1,N,4C) x_0 .. x_T: the inputs and outputs of the T trained steps
    log_probs: Tensor  # (K,T) log p(x_{j+1} | x_j) under the rollout policy (sde_step)


class FlowGRPO:
    """Flow-GRPO as an objective of the RL loop, on the backbone's adapters ("default" = the policy).

    rollout: the CURRENT policy's SDE, keeping the trained transitions and their log-probabilities;
    weights: group-normalised advantages; backward: the clipped surrogate on the recorded transitions, in
    the rollout's own chunks (same samples, same batch size), so before the optimizer step every recomputed
    log-probability equals the recorded one and the ratio is exactly 1; no old-policy update.
    """

    name = "flow_grpo"

    def __init__(self, options: Options, rollout_steps: int, rollout_batch: int, std_mode: str, kl_weight: float,
                 bf16: bool):
        self.o, self.chunk, self.std_mode, self.kl_weight, self.bf16 = options, rollout_batch, std_mode, kl_weight, bf16
        self.trained = train_step_indices(rollout_steps, options.timestep_fraction)
        self.terms = len(self.trained)  # loss terms per kept sample: the normaliser counts (sample, step) pairs
        self.ratios: list[Tensor] = []

    @torch.no_grad()
    def rollout(self, bb: B.Backbone, cond: B.Condition, k: int, sigmas: Tensor,
                generator: torch.Generator) -> tuple[Tensor, Trajectory]:
        """K samples of the current policy with every Euler step made stochastic (`sde_step`); the first
        T trained transitions and their log-probabilities are kept. Returns (x0 (K,N,4C), Trajectory)."""
        noise = B.initial_noise(cond, k, generator)
        tr, dt, device = bb.transformer, cond.image_latents.dtype, cond.image_latents.device
        x0s, paths, log_probs = [], [], []
        with B.active_adapter(tr, "default"):
            for i in range(0, k, self.chunk):
                x = noise[i:i + self.chunk].to(device, torch.float32)
                m = x.shape[0]
                cond_m = B.repeat_condition(cond, m)
                path, lps = [x], []
                for j in range(len(sigmas) - 1):
                    s, s_next = sigmas[j].expand(m).to(device), sigmas[j + 1].expand(m).to(device)
                    with B.autocast(device, self.bf16):  # the update's autocast: ratios are exactly 1 at first
                        v = B.velocity(tr, x.to(dt), s, cond_m)
                    x, lp, _, _ = sde_step(x, v, s, s_next, float(sigmas[1]), self.o.noise_level, generator)
                    if j in self.trained:
                        path.append(x)
                        lps.append(lp)
                x0s.append(x)
                paths.append(torch.stack(path, dim=1))
                log_probs.append(torch.stack(lps, dim=1))
        return torch.cat(x0s), Trajectory(torch.cat(paths), torch.cat(log_probs))

    def weights(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """(N,) group-normalised, clipped advantages (NaN rewards give 0)."""
        return group_advantages(rewards, group_ids, self.std_mode, clip=self.o.adv_clip)

    def step_loss(self, bb: B.Backbone, cond_m: B.Condition, x: Tensor, x_next: Tensor, s: Tensor, s_next: Tensor,
                  sigma_max: float, old_log_prob: Tensor, advantages: Tensor) -> tuple[Tensor, Tensor]:
        """One recorded transition x_j -> x_{j+1} of m samples: (per-sample loss (m,), log-probabilities (m,))."""
        tr = bb.transformer
        # 1. the current policy's transition, with gradients
        with B.autocast(x.device, self.bf16):
            v = B.velocity(tr, x.to(cond_m.image_latents.dtype), s, cond_m)
        _, lp, mean, std_t = sde_step(x, v, s, s_next, sigma_max, self.o.noise_level, x_next=x_next)
        # 2. PPO-clipped likelihood ratio against the rollout's log-probability
        loss = clipped_surrogate(lp, old_log_prob, advantages, self.o.clip_range)  # (m,)
        if self.kl_weight > 0:  # 3. optional KL to the reference transition (adapters disabled)
            with torch.no_grad(), B.active_adapter(tr, None), B.autocast(x.device, self.bf16):
                v_ref = B.velocity(tr, x.to(cond_m.image_latents.dtype), s, cond_m)
            mean_ref = sde_step_mean(x.float(), v_ref.float(), s.float(), s_next.float(), std_t)
            loss = loss + self.kl_weight * sde_kl(mean, mean_ref, std_t)
        return loss, lp

    def backward(self, bb: B.Backbone, cond: B.Condition, sigmas: Tensor, x0: Tensor, trajectory: Trajectory,
                 kept: Tensor, advantages: Tensor, generator: torch.Generator, normaliser: float) -> float:
        """Accumulate d/dtheta over one group's kept samples and trained steps; each (sample, step) loss divided
        by `normaliser` (kept samples x trained steps over all ranks). Returns the summed loss."""
        total = 0.0
        for i in range(0, trajectory.latents.shape[0], self.chunk):
            keep = kept[i:i + self.chunk]
            if not bool(keep.any()):
                continue
            lat, old_lp = trajectory.latents[i:i + self.chunk], trajectory.log_probs[i:i + self.chunk]
            adv, keep = advantages[i:i + self.chunk].nan_to_num(0.0), keep.to(lat.device)
            m = lat.shape[0]
            cond_m = B.repeat_condition(cond, m)
            for j in range(trajectory.log_probs.shape[1]):
                s, s_next = sigmas[j].expand(m).to(lat.device), sigmas[j + 1].expand(m).to(lat.device)
                loss, lp = self.step_loss(bb, cond_m, lat[:, j], lat[:, j + 1], s, s_next, float(sigmas[1]),
                                          old_lp[:, j], adv)
                loss = loss * keep
                (loss.sum() / normaliser).backward()
                total += float(loss.detach().sum())
                self.ratios.append(torch.exp(lp - old_lp[:, j]).detach()[keep].cpu())
        return total

    def after_step(self, step: int) -> None:
        """Flow-GRPO samples the current policy: no old policy to update."""

    def stats(self) -> dict[str, float]:
        """How far this step's likelihood ratios were from 1 (exactly 0 before the update), then reset."""
        if not self.ratios:
            return {}
        ratio, self.ratios = torch.cat(self.ratios), []
        return dict(ratio_max_deviation=float((ratio - 1).abs().max()),
                    clipped_fraction=float(((ratio - 1).abs() > self.o.clip_range).float().mean()))
