"""The negative-aware forward-process objective of OARS (paper §4, Eq.6-8), DiffusionNFT-style.

OARS trains both RL stages (full-reference and non-reference) with the same recipe:

    1. the OLD policy v_old samples K outputs per LR input (a "group"), e.g. 6 Euler steps (§5.1);
    2. each output gets a raw reward s_raw (Eq.4, or DISTS-based fidelity in the FR stage);
    3. groups whose rewards are high on average but barely differ are discarded          -> keep_groups
    4. each surviving sample gets an optimality probability
       r = 0.5 + 0.5 clip((s_raw - E_group[s_raw]) / std_group, -1, 1)                   -> optimality
    5. the sample x0 is re-noised on the forward process, x_t = (1 - t) x0 + t eps,
       with target velocity v = eps - x0 (Eq.5 form)                                     -> sample_train_timesteps
    6. the current policy v_theta and the frozen v_old define the implicit policies
       v+ = (1 - lam) v_old + lam v_theta (Eq.6),  v- = (1 + lam) v_old - lam v_theta (Eq.7) -> implicit_policies
    7. loss  r ||v+ - v||^2 + (1 - r) ||v- - v||^2  (Eq.8), optionally + kl_weight ||v_theta - v_ref||^2
                                                                                         -> nft_loss, kl_to_reference
    8. after the update, old <- decay * old + (1 - decay) * theta                        -> update_old_policy,
                                                                                            old_policy_decay

Intuition for Eq.8 with lam = 1: a sample with r = 1 is plain flow matching toward it (v+ = v_theta);
a sample with r = 0 trains the reflection 2 v_old - v_theta toward it, which pushes v_theta AWAY from
it, by the same amount v_old would have to move toward it. r = 0.5 gives no net pull (at v_theta = v_old).

Where the paper is silent the defaults follow the public DiffusionNFT code, and its other behaviours
are available as named options (each documented where it is defined):
    * std: population std (np.std in the public code), `unbiased=True` for the sample std;
    * std_mode="global": the public code's `global_std` (std over the whole batch, mean per group);
    * normalize="x0_adaptive": the public code's x0-space loss with adaptive per-sample weights;
    * sample_train_timesteps(mode="rollout_grid"): the public code trains at the rollout's sigma grid,
      the paper writes t ~ U(0, 1) (default "uniform");
    * old-policy EMA schedule decay = min(0.001 * step, 0.5) (public default; the paper says nothing);
    * KL to the reference (adapter disabled): the public code uses weight 1e-4; OARS does not mention
      a KL term, so the training scripts default to 0.

Every function is pure torch and copyable alone: none calls another (tests/test_nft.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "implicit_policies",
    "keep_groups",
    "kl_to_reference",
    "nft_loss",
    "old_policy_decay",
    "old_policy_deviation",
    "optimality",
    "sample_train_timesteps",
    "update_old_policy",
]


# ---------------------------------------------------------------------------------------------------
# Rewards -> optimality probability r (§4) and group filtering (§4, thresholds §5.1)
# ---------------------------------------------------------------------------------------------------


def optimality(
    rewards: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    clip: float = 1.0,
    std_mode: str = "group",
    unbiased: bool = False,
    min_std: float = 1e-6,
) -> Tensor:
    """Optimality probability r in [0, 1] of every sample (paper §4, the formula before Eq.6).

        r = 0.5 + 0.5 * clip((s - mean_g) / std, -clip, clip) / clip

    With the paper's clip = 1 this is exactly r = 0.5 + 0.5 clip((s - E[s]) / std, -1, 1). Other clip
    values follow the public DiffusionNFT code (advantage clipped to +-clip, then mapped linearly onto
    [0, 1]; its default there is 5).

    Args:
        rewards: (N,) raw rewards s_raw. NaN marks a sample without a valid reward (e.g. the reward
            server failed to parse an answer): it is ignored by every statistic and gets r = NaN, so
            that using it by accident makes the loss NaN instead of silently training on it. Drop such
            samples with the `keep_groups` mask (which excludes them) before calling `nft_loss`.
        group_ids: (N,) group key of each sample: an integer tensor or a sequence of hashables (e.g.
            the LR image id). A group is the K samples of ONE LR input. Key by the input's id, never by
            the prompt text: in SR every input shares the same prompt, so keying by text would merge
            all groups into one.
        clip: advantage clip c (paper: 1).
        std_mode: "group" (paper: std of the raw rewards in the group) or "global" (DiffusionNFT's
            `global_std` option: the mean stays per group, the std is over all valid rewards of the
            batch, which keeps the scale of r comparable across groups of very different spread).
        unbiased: False = population std (divide by n). The paper does not say; the public code uses
            np.std (population), and with it a group of two different rewards gives r in {0, 1}
            exactly. True = sample std (divide by n - 1).
        min_std: a std <= min_std counts as zero: every valid member of that group gets r = 0.5 (no
            signal). A tolerance, not an epsilon added to the std: identical rewards can give a std of
            ~1e-17 from float rounding, which would otherwise turn into r in {0, 1}.

    Returns:
        r: (N,) float, in [0, 1] for valid samples, NaN where the reward is NaN.

    With several processes, gather the rewards and ids of all ranks before calling this (a group's K
    samples may be spread over ranks, as in DiffusionNFT) and give each rank its slice of r.
    """
    if std_mode not in ("group", "global"):
        raise ValueError(f"optimality: std_mode must be 'group' or 'global', got {std_mode!r}")
    if clip <= 0:
        raise ValueError(f"optimality: clip must be > 0, got {clip}")
    if rewards.ndim != 1:
        raise ValueError(f"optimality: rewards must have shape (N,), got {tuple(rewards.shape)}")
    keys = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(keys) != rewards.shape[0]:
        raise ValueError(f"optimality: {len(keys)} group_ids for {rewards.shape[0]} rewards")
    groups = [torch.tensor([k == key for k in keys]) for key in dict.fromkeys(keys)]  # (N,) mask per group
    s = rewards.detach().double().cpu()  # statistics in float64
    valid = ~torch.isnan(s)  # (N,)
    r = torch.full_like(s, float("nan"))
    correction = 1 if unbiased else 0  # population (n) or sample (n - 1) std
    n_valid = int(valid.sum())
    global_std = s[valid].std(correction=correction) if n_valid > correction else None  # "global" mode
    for in_group in groups:
        members = in_group & valid  # (N,) valid members of the group
        n = int(members.sum())
        if n == 0:
            continue
        mean = s[members].mean()  # E_{pi_old(.|c)}[s_raw], estimated from the K samples of this LR
        if std_mode == "global":
            std = global_std
        else:
            std = s[members].std(correction=correction) if n > correction else None
        if std is None or not float(std) > min_std:
            r[members] = 0.5  # no spread in the group: no preference between its samples
            continue
        advantage = ((s[members] - mean) / std).clamp(-clip, clip)
        r[members] = 0.5 + 0.5 * advantage / clip  # r in [0, 1]
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return r.to(device=rewards.device, dtype=out_dtype)


def keep_groups(
    rewards: Tensor,
    group_ids: Tensor | Sequence[Hashable],
    mean_threshold: float = 0.9,
    var_threshold: float = 0.05,
    reward_scale: float = 5.0,
    min_group_size: int = 2,
    unbiased: bool = False,
) -> Tensor:
    """Mask of the samples to train on: drop "high mean, low variance" groups (§4; thresholds §5.1).

    A group (the K samples of one LR input) is discarded when, on the scaled rewards s = R / reward_scale,

        mean_g(s) > mean_threshold  AND  var_g(s) < var_threshold        (paper: 0.9 and 0.05)

    because its samples are nearly identical and already good, so they carry little contrastive signal.
    The paper gives the thresholds but not the scale they apply to; the COMPASS reward (Eq.4) spans about
    [0, 5] (F in [0, 1], Q in [1, 5]), so the default compares on R / 5, i.e. mean R > 4.5 and
    var R < 1.25. Pass reward_scale=1 to compare the raw rewards (for rewards already in [0, 1]).

    Also dropped (and the caller should count them, like every dropped sample):
        * groups with fewer than `min_group_size` valid (non-NaN) rewards: no meaningful statistics;
        * samples whose own reward is NaN (they have no optimality r).

    Args:
        rewards: (N,) raw rewards, NaN = invalid.
        group_ids: (N,) group key of each sample (integer tensor or sequence of hashables, the LR id).
        mean_threshold, var_threshold: the §5.1 thresholds on the scaled rewards.
        reward_scale: divide the rewards by this before comparing (default 5, see above).
        min_group_size: minimum number of valid samples a group needs to be kept.
        unbiased: False = population variance (same convention as `optimality`).

    Returns:
        keep: (N,) bool, True for samples to train on.
    """
    if reward_scale <= 0:
        raise ValueError(f"keep_groups: reward_scale must be > 0, got {reward_scale}")
    if rewards.ndim != 1:
        raise ValueError(f"keep_groups: rewards must have shape (N,), got {tuple(rewards.shape)}")
    keys = group_ids.tolist() if isinstance(group_ids, Tensor) else list(group_ids)
    if len(keys) != rewards.shape[0]:
        raise ValueError(f"keep_groups: {len(keys)} group_ids for {rewards.shape[0]} rewards")
    groups = [torch.tensor([k == key for k in keys]) for key in dict.fromkeys(keys)]  # (N,) mask per group
    s = rewards.detach().double().cpu() / reward_scale  # (N,) scaled rewards
    valid = ~torch.isnan(s)
    keep = torch.zeros(s.shape[0], dtype=torch.bool)
    for in_group in groups:
        members = in_group & valid
        n = int(members.sum())
        if n < max(min_group_size, 1):
            continue  # too few valid rewards to judge the group
        mean = s[members].mean()
        var = s[members].var(correction=1 if unbiased else 0) if n > int(unbiased) else torch.tensor(0.0)
        if mean > mean_threshold and var < var_threshold:
            continue  # §4: high mean but low variance -> ambiguous supervision, discard
        keep |= members
    return keep.to(rewards.device)


# ---------------------------------------------------------------------------------------------------
# The objective (Eq.6-8) and the reference KL
# ---------------------------------------------------------------------------------------------------


def implicit_policies(v_theta: Tensor, v_old: Tensor, lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """Implicit positive and negative policies (Eq.6, Eq.7).

        v+ = (1 - lam) v_old + lam v_theta        (Eq.6)
        v- = (1 + lam) v_old - lam v_theta        (Eq.7)

    Args:
        v_theta: (B, ...) velocity of the trainable policy (carries the gradient).
        v_old: (B, ...) velocity of the frozen old policy at the same x_t, t (detached here).
        lam: lambda (paper: 1.0; DiffusionNFT calls it beta).

    Returns:
        (v_pos, v_neg): two (B, ...) tensors.
    """
    if v_theta.shape != v_old.shape:
        raise ValueError(f"implicit_policies: v_theta {tuple(v_theta.shape)} != v_old {tuple(v_old.shape)}")
    v_old = v_old.detach()  # the old policy is frozen: no gradient through it
    v_pos = (1.0 - lam) * v_old + lam * v_theta  # Eq.6
    v_neg = (1.0 + lam) * v_old - lam * v_theta  # Eq.7
    return v_pos, v_neg


def nft_loss(
    v_theta: Tensor,
    v_old: Tensor,
    v_target: Tensor,
    r: Tensor,
    lam: float = 1.0,
    normalize: str = "none",
    x_t: Tensor | None = None,
    t: Tensor | None = None,
) -> Tensor:
    """Per-sample negative-aware loss (Eq.8); average it (plus any KL term) for the update.

        L = r ||v+ - v||^2 + (1 - r) ||v- - v||^2                                    (Eq.8)

    with v+ and v- from Eq.6-7 and ||.||^2 the MEAN of squares over the non-batch dimensions (a
    constant factor against the sum, as in the flow-matching loss Eq.5).

    normalize:
        "none" (default, the paper's Eq.8 as written).
        "x0_adaptive": the public DiffusionNFT code's loss. Each branch is measured in x0 space,
            x0_pred = x_t - t v_pred (the clean sample implied by a velocity under x_t = (1-t) x0 + t eps,
            v = eps - x0), against x0 = x_t - t v_target, and divided by a per-sample weight
            w = mean |x0_pred - x0| computed WITHOUT gradient (clamped at 1e-5), separately for the
            positive and the negative branch:
                L = r mean((x0+ - x0)^2) / w+ + (1 - r) mean((x0- - x0)^2) / w-.
            Since x0_pred - x0 = t (v - v_pred), each term equals t mean(e^2) / mean|e| with
            e = v_pred - v: the weight removes the per-sample scale of the error (an L1-like
            gradient size) and down-weights small t. The public code additionally divides by lam
            and multiplies by its advantage clip (5); both are 1 with the OARS values lam = 1,
            clip = 1, so they are not reproduced here.

    Args:
        v_theta: (B, ...) trainable velocity v_theta(x_t, t | c, x_LR).
        v_old: (B, ...) frozen old-policy velocity at the same inputs (no gradient).
        v_target: (B, ...) target velocity v = eps - x0 of the rollout sample x0.
        r: (B,) optimality probabilities in [0, 1] (from `optimality`), moved to v_theta's device (rewards are
            scored on the host, so r usually is a CPU tensor). A NaN in r (a sample without a reward) gives a
            NaN loss for that sample: drop such samples with the `keep_groups` mask first (the training loop
            checks this on the host; no device sync here).
        lam: lambda of Eq.6-7 (paper: 1.0).
        normalize: "none" or "x0_adaptive" (see above).
        x_t: (B, ...) noisy input, needed for "x0_adaptive".
        t: (B,) times in [0, 1], needed for "x0_adaptive".

    Returns:
        (B,) per-sample loss.
    """
    if not (v_theta.shape == v_old.shape == v_target.shape):
        raise ValueError(
            f"nft_loss: shapes differ: v_theta {tuple(v_theta.shape)}, v_old {tuple(v_old.shape)}, "
            f"v_target {tuple(v_target.shape)}"
        )
    B = v_theta.shape[0]
    if r.shape != (B,):
        raise ValueError(f"nft_loss: r must have shape ({B},), got {tuple(r.shape)}")
    dims = tuple(range(1, v_theta.ndim))  # all non-batch dims
    v_old = v_old.detach()  # the old policy is frozen (as in `implicit_policies`, inlined: copyable alone)
    v_pos = (1.0 - lam) * v_old + lam * v_theta  # Eq.6
    v_neg = (1.0 + lam) * v_old - lam * v_theta  # Eq.7
    v_target = v_target.detach()
    r = r.to(v_theta.device, v_theta.dtype)

    if normalize == "none":
        pos = ((v_pos - v_target) ** 2).mean(dim=dims)  # (B,) ||v+ - v||^2
        neg = ((v_neg - v_target) ** 2).mean(dim=dims)  # (B,) ||v- - v||^2
    elif normalize == "x0_adaptive":
        if x_t is None or t is None:
            raise ValueError("nft_loss: normalize='x0_adaptive' needs x_t (B, ...) and t (B,)")
        if x_t.shape != v_theta.shape or t.shape != (B,):
            raise ValueError(f"nft_loss: x_t {tuple(x_t.shape)} / t {tuple(t.shape)} do not match v_theta {tuple(v_theta.shape)}")
        t_b = t.to(v_theta.dtype).view(B, *([1] * (v_theta.ndim - 1)))  # (B, 1, ..., 1)
        x0 = (x_t - t_b * v_target).detach()  # the rollout sample: x_t - t (eps - x0) = x0
        x0_pos = x_t - t_b * v_pos  # (B, ...) x0 implied by v+
        x0_neg = x_t - t_b * v_neg  # (B, ...) x0 implied by v-
        with torch.no_grad():  # adaptive weights carry no gradient (float64 as in the public code)
            w_pos = (x0_pos.double() - x0.double()).abs().mean(dim=dims).clamp(min=1e-5).to(v_theta.dtype)
            w_neg = (x0_neg.double() - x0.double()).abs().mean(dim=dims).clamp(min=1e-5).to(v_theta.dtype)
        pos = ((x0_pos - x0) ** 2).mean(dim=dims) / w_pos  # (B,)
        neg = ((x0_neg - x0) ** 2).mean(dim=dims) / w_neg  # (B,)
    else:
        raise ValueError(f"nft_loss: normalize must be 'none' or 'x0_adaptive', got {normalize!r}")

    return r * pos + (1.0 - r) * neg  # Eq.8, (B,)


def kl_to_reference(v_theta: Tensor, v_ref: Tensor) -> Tensor:
    """Per-sample squared distance to the reference policy, ||v_theta - v_ref||^2 (mean over dims).

    For Gaussian flow policies this is (up to a time-dependent factor) the KL between the two
    one-step transition kernels, which is why DiffusionNFT calls it a KL term. The reference is the base
    model (LoRA adapter disabled). The caller adds `kl_weight * kl.mean()` to the loss: DiffusionNFT's
    default weight is 1e-4; OARS does not state a KL term, so the OARS scripts default to 0.

    Args:
        v_theta: (B, ...) trainable velocity.
        v_ref: (B, ...) reference velocity at the same inputs (detached here).

    Returns:
        (B,) per-sample squared distance.
    """
    if v_theta.shape != v_ref.shape:
        raise ValueError(f"kl_to_reference: v_theta {tuple(v_theta.shape)} != v_ref {tuple(v_ref.shape)}")
    return ((v_theta - v_ref.detach()) ** 2).mean(dim=tuple(range(1, v_theta.ndim)))


# ---------------------------------------------------------------------------------------------------
# Training timesteps
# ---------------------------------------------------------------------------------------------------


def sample_train_timesteps(
    n: int,
    generator: torch.Generator | None = None,
    mode: str = "uniform",
    rollout_sigmas: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Times t at which the rollout samples are re-noised for the loss (x_t = (1 - t) x0 + t eps).

    mode:
        "uniform" (default): t ~ U(0, 1), as the paper writes for Eq.5 and reuses for Eq.8.
        "rollout_grid": t drawn uniformly (with replacement) from the sampler's sigma grid, the
            public DiffusionNFT behaviour (it trains at the same, shifted, sigmas the rollout used;
            over an epoch it visits every grid point once per sample in random order, which this
            matches in distribution). Zeros (the grid's terminal sigma) are excluded: at t = 0 the
            target is the sample itself and the x0-space loss vanishes.

    Args:
        n: number of times to draw (one per sample).
        generator: torch.Generator for reproducibility (its device is used).
        mode: "uniform" or "rollout_grid".
        rollout_sigmas: (S,) or (S+1,) sigma grid of the rollout sampler, needed for "rollout_grid".

    Returns:
        t: (n,) float32 in [0, 1].
    """
    device = generator.device if generator is not None else torch.device("cpu")
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if mode == "rollout_grid":
        if rollout_sigmas is None:
            raise ValueError("sample_train_timesteps: mode='rollout_grid' needs rollout_sigmas (the sampler's sigma grid)")
        grid = torch.as_tensor(rollout_sigmas, dtype=torch.float32).flatten().to(device)
        grid = grid[grid > 0]
        if grid.numel() == 0:
            raise ValueError("sample_train_timesteps: rollout_sigmas has no positive sigma")
        idx = torch.randint(0, grid.numel(), (n,), generator=generator, device=device)
        return grid[idx]
    raise ValueError(f"sample_train_timesteps: mode must be 'uniform' or 'rollout_grid', got {mode!r}")


# ---------------------------------------------------------------------------------------------------
# The old policy: EMA of the trained policy
# ---------------------------------------------------------------------------------------------------


def update_old_policy(old_params: Iterable[Tensor], new_params: Iterable[Tensor], decay: float) -> None:
    """In place, without gradient:  old <- decay * old + (1 - decay) * new.

    decay = 0 copies the current policy into the old one. In the LoRA setting the two iterables are the
    parameters of the "old" and the "default" adapters, in the same order.

    Args:
        old_params: tensors of the old policy (modified in place).
        new_params: tensors of the current policy, same shapes and order.
        decay: EMA decay in [0, 1] (see `old_policy_decay`).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"update_old_policy: decay must be in [0, 1], got {decay}")
    old_list, new_list = list(old_params), list(new_params)
    if len(old_list) != len(new_list):
        raise ValueError(f"update_old_policy: {len(old_list)} old vs {len(new_list)} new parameters")
    with torch.no_grad():
        for i, (old, new) in enumerate(zip(old_list, new_list)):
            if old.shape != new.shape:
                raise ValueError(f"update_old_policy: parameter {i}: old {tuple(old.shape)} != new {tuple(new.shape)}")
            if old is new:
                raise ValueError(f"update_old_policy: parameter {i} is the same tensor in old and new")
            old.mul_(decay).add_(new.detach().to(old.dtype), alpha=1.0 - decay)


def old_policy_decay(
    step: int,
    schedule: str = "nft",
    rate: float = 0.001,
    max_decay: float = 0.5,
    flat_steps: int = 0,
) -> float:
    """EMA decay for `update_old_policy` after `step` optimizer steps.

    schedule:
        "nft" (default): decay = min(rate * (step - flat_steps), max_decay), 0 before flat_steps. With
            the defaults this is the public DiffusionNFT default min(0.001 * step, 0.5): the old policy
            follows the current one closely at first and lags more as training goes on. The paper does
            not describe its old policy beyond "frozen reference policy", so the public code's default
            is used. (DiffusionNFT's slower alternative: flat_steps=75, rate=0.0075, max_decay=0.999.)
        "copy": decay = 0, the old policy is the current one after every update (on-policy sampling).

    Returns:
        decay in [0, 1].
    """
    if schedule == "copy":
        return 0.0
    if schedule == "nft":
        if step < flat_steps:
            return 0.0
        return float(min(rate * (step - flat_steps), max_decay))
    raise ValueError(f"old_policy_decay: schedule must be 'nft' or 'copy', got {schedule!r}")


def old_policy_deviation(old_params: Iterable[Tensor], new_params: Iterable[Tensor]) -> float:
    """Relative L2 distance ||new - old|| / ||old|| over all parameters (for logging).

    Returns 0.0 when both are zero and inf when only the old parameters are all zero.
    """
    diff_sq, old_sq = 0.0, 0.0
    with torch.no_grad():
        for old, new in zip(old_params, new_params, strict=True):
            diff_sq += float(((new.detach().double() - old.detach().double()) ** 2).sum())
            old_sq += float((old.detach().double() ** 2).sum())
    if old_sq == 0.0:
        return 0.0 if diff_sq == 0.0 else math.inf
    return math.sqrt(diff_sq / old_sq)
