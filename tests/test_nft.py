"""Tests of nft.py: hand-worked numbers for every function and a 2-D toy problem that must learn."""

import copy
import math

import pytest
import torch

from nft import (
    implicit_policies,
    keep_groups,
    kl_to_reference,
    nft_loss,
    old_policy_decay,
    old_policy_deviation,
    optimality,
    sample_train_timesteps,
    update_old_policy,
)

# ----------------------------------------------------------------------------------------------
# optimality r
# ----------------------------------------------------------------------------------------------


def test_optimality_single_group_by_hand():
    # s = [1, 2, 3, 6]: mean 3, population var (4 + 1 + 0 + 9) / 4 = 3.5
    # z = [-2, -1, 0, 3] / sqrt(3.5) = [-1.069, -0.535, 0, 1.604] -> clip to [-1, 1]
    r = optimality(torch.tensor([1.0, 2.0, 3.0, 6.0]), [0, 0, 0, 0])
    expected = torch.tensor([0.0, 0.5 - 0.5 / math.sqrt(3.5), 0.5, 1.0])  # 0.5 - 0.2673 = 0.2327
    torch.testing.assert_close(r, expected)


def test_optimality_sample_std_option():
    # unbiased: var = 14 / 3, std = 2.1602; z = [-0.926, -0.463, 0, 1.389]
    r = optimality(torch.tensor([1.0, 2.0, 3.0, 6.0]), [0, 0, 0, 0], unbiased=True)
    std = math.sqrt(14 / 3)
    expected = torch.tensor([0.5 - 0.5 * 2 / std, 0.5 - 0.5 / std, 0.5, 1.0])  # [0.0371, 0.2685, 0.5, 1]
    torch.testing.assert_close(r, expected)


def test_optimality_clip_option():
    # clip = 2: r = 0.5 + 0.25 * clip(z, -2, 2); no entry of z exceeds 2 here.
    r = optimality(torch.tensor([1.0, 2.0, 3.0, 6.0]), [0, 0, 0, 0], clip=2.0)
    z = torch.tensor([-2.0, -1.0, 0.0, 3.0]) / math.sqrt(3.5)
    torch.testing.assert_close(r, 0.5 + 0.25 * z)
    assert r[3] == pytest.approx(0.9009, abs=1e-4)


def test_optimality_two_interleaved_groups_keyed_by_id():
    # group 7 = [1, 2, 3, 6] at even positions, group 3 = four equal rewards (std 0 -> r = 0.5).
    rewards = torch.tensor([1.0, 5.0, 2.0, 5.0, 3.0, 5.0, 6.0, 5.0])
    ids = torch.tensor([7, 3, 7, 3, 7, 3, 7, 3])
    r = optimality(rewards, ids)
    expected_7 = torch.tensor([0.0, 0.5 - 0.5 / math.sqrt(3.5), 0.5, 1.0])
    torch.testing.assert_close(r[0::2], expected_7)
    torch.testing.assert_close(r[1::2], torch.full((4,), 0.5))
    # the same with string keys (LR image ids): only the grouping matters
    r_str = optimality(rewards, ["img_b", "img_a"] * 4)
    torch.testing.assert_close(r_str, r)
    # and a batch with all 8 in one group gives different numbers (groups are really separate)
    assert not torch.allclose(optimality(rewards, [0] * 8), r)


def test_optimality_zero_std_despite_rounding():
    # 0.1 * 3 is not exactly representable: the computed std is ~1e-17, not 0; must still be 0.5.
    for value in (0.1, 0.7, 4.3):
        r = optimality(torch.full((5,), value, dtype=torch.float64), [0] * 5)
        assert torch.equal(r, torch.full((5,), 0.5, dtype=torch.float64))


def test_optimality_two_samples_give_zero_and_one():
    r = optimality(torch.tensor([3.0, 4.0]), [0, 0])
    torch.testing.assert_close(r, torch.tensor([0.0, 1.0]))


def test_optimality_global_std_option():
    # groups A = [0, 2] (mean 1), B = [10, 14] (mean 12); global population std of [0, 2, 10, 14]:
    # mean 6.5, var (42.25 + 20.25 + 12.25 + 56.25) / 4 = 32.75, std 5.7228
    rewards = torch.tensor([0.0, 10.0, 2.0, 14.0])
    ids = ["A", "B", "A", "B"]
    g_std = math.sqrt(32.75)
    r = optimality(rewards, ids, std_mode="global")
    expected = torch.tensor([0.5 - 0.5 / g_std, 0.5 - 0.5 * 2 / g_std, 0.5 + 0.5 / g_std, 0.5 + 0.5 * 2 / g_std])
    torch.testing.assert_close(r, expected)  # [0.4126, 0.3253, 0.5874, 0.6747]
    # per-group std instead: every group has two values -> r in {0, 1}
    torch.testing.assert_close(optimality(rewards, ids), torch.tensor([0.0, 0.0, 1.0, 1.0]))


def test_optimality_nan_rewards_ignored_and_marked():
    # group 0 = [1, NaN, 3]: statistics of [1, 3] (mean 2, std 1) -> r = [0, NaN, 1]
    r = optimality(torch.tensor([1.0, float("nan"), 3.0]), [0, 0, 0])
    assert r[0] == 0.0 and r[2] == 1.0 and math.isnan(r[1])


def test_optimality_rejects_bad_arguments():
    with pytest.raises(ValueError, match="std_mode"):
        optimality(torch.ones(2), [0, 0], std_mode="batch")
    with pytest.raises(ValueError, match="group_ids"):
        optimality(torch.ones(3), [0, 0])


def test_groups_by_key_in_first_seen_order_and_shape_errors():
    r = torch.tensor([1.0, 5.0, 3.0, 7.0, 9.0])
    # keys "b", "a", "b", "c", "a": group b = {1, 3}, a = {5, 9}, c = {7} (alone: r = 0.5, dropped by the filter)
    assert optimality(r, ["b", "a", "b", "c", "a"]).tolist() == [0.0, 0.0, 1.0, 0.5, 1.0]
    assert keep_groups(r, ["b", "a", "b", "c", "a"], mean_threshold=99).tolist() == [True, True, True, False, True]
    assert optimality(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([7, 7, 7])).tolist() == [0.0, 0.5, 1.0]
    for fn in (optimality, keep_groups):
        with pytest.raises(ValueError, match=f"{fn.__name__}: 2 group_ids for 3 rewards"):
            fn(torch.zeros(3), [0, 1])
        with pytest.raises(ValueError, match=f"{fn.__name__}: rewards must have shape"):
            fn(torch.zeros(3, 1), [0, 1, 2])


# ----------------------------------------------------------------------------------------------
# keep_groups
# ----------------------------------------------------------------------------------------------


def test_keep_groups_by_hand():
    rewards = torch.tensor(
        [
            4.8, 4.9, 4.7, 4.8,  # g0: /5 -> mean 0.96 > 0.9, var 0.0002 < 0.05 -> DROP
            1.0, 2.0, 3.0, 6.0,  # g1: /5 -> mean 0.6 -> keep
            0.0, 5.0, 5.0, 5.0,  # g2: /5 -> mean 0.75 -> keep
        ]
    )  # fmt: skip
    ids = torch.arange(3).repeat_interleave(4)
    keep = keep_groups(rewards, ids)
    assert keep.tolist() == [False] * 4 + [True] * 8


def test_keep_groups_high_mean_high_variance_is_kept():
    # raw scale: g0 mean 1.0 > 0.9 but var 0.25 >= 0.05 -> keep; g1 mean 0.95, var 0.0025 -> drop;
    # g2 low mean, zero var -> keep (only "high mean AND low var" is dropped)
    rewards = torch.tensor([0.5, 1.5, 0.5, 1.5, 0.9, 1.0, 0.9, 1.0, 0.2, 0.2, 0.2, 0.2])
    ids = ["g0"] * 4 + ["g1"] * 4 + ["g2"] * 4
    keep = keep_groups(rewards, ids, reward_scale=1.0)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4


def test_keep_groups_reward_scale_option():
    rewards = torch.tensor([4.6, 4.7])  # mean 4.65, population var 0.0025
    assert keep_groups(rewards, [0, 0]).tolist() == [False, False]  # /5: mean 0.93, var 1e-4 -> drop
    assert keep_groups(rewards, [0, 0], reward_scale=1.0).tolist() == [False, False]  # raw: drop
    assert keep_groups(rewards, [0, 0], reward_scale=10.0).tolist() == [True, True]  # mean 0.465: keep
    # thresholds are arguments: with mean_threshold 0.95 the /5 group (mean 0.93) is kept
    assert keep_groups(rewards, [0, 0], mean_threshold=0.95).tolist() == [True, True]


def test_keep_groups_min_size_and_nan():
    nan = float("nan")
    rewards = torch.tensor([nan, 3.0, nan, 1.0, 2.0, 2.5])
    ids = [0, 0, 1, 1, 1, 2]
    keep = keep_groups(rewards, ids)
    # g0: one valid -> dropped; g1: two valid -> kept except its NaN sample; g2: single sample -> dropped
    assert keep.tolist() == [False, False, False, True, True, False]
    assert keep_groups(rewards, ids, min_group_size=1).tolist() == [False, True, False, True, True, True]


# ----------------------------------------------------------------------------------------------
# Eq.6-8
# ----------------------------------------------------------------------------------------------


def test_implicit_policies_by_hand():
    v_theta, v_old = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 5.0]])
    v_pos, v_neg = implicit_policies(v_theta, v_old, lam=0.5)
    torch.testing.assert_close(v_pos, torch.tensor([[2.0, 3.5]]))  # 0.5 * [3, 5] + 0.5 * [1, 2]
    torch.testing.assert_close(v_neg, torch.tensor([[4.0, 6.5]]))  # 1.5 * [3, 5] - 0.5 * [1, 2]
    v_pos, v_neg = implicit_policies(v_theta, v_old, lam=1.0)
    torch.testing.assert_close(v_pos, v_theta)
    torch.testing.assert_close(v_neg, torch.tensor([[5.0, 8.0]]))  # 2 v_old - v_theta


def test_nft_loss_by_hand_and_limits():
    # v_theta = [2, 0], v_old = [1, 0], v = [0, 0]:
    # r = 1: mean([2, 0]^2) = 2;  r = 0: v- = [0, 0] -> 0;  r = 0.5 -> 1;  r = 0.25 -> 0.5
    v_theta = torch.tensor([[2.0, 0.0]] * 4)
    v_old = torch.tensor([[1.0, 0.0]] * 4)
    v = torch.zeros(4, 2)
    loss = nft_loss(v_theta, v_old, v, torch.tensor([1.0, 0.0, 0.5, 0.25]))
    torch.testing.assert_close(loss, torch.tensor([2.0, 0.0, 1.0, 0.5]))


def test_nft_loss_reduces_as_algebra_says():
    g = torch.Generator().manual_seed(0)
    v_theta, v_old, v = (torch.randn(3, 4, 5, 6, generator=g) for _ in range(3))
    ones, zeros = torch.ones(3), torch.zeros(3)
    mse = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2, 3))
    pos = mse(v_theta, v)  # r = 1: plain flow matching toward v
    neg = mse(2 * v_old - v_theta, v)  # r = 0: the reflection is trained toward v
    torch.testing.assert_close(nft_loss(v_theta, v_old, v, ones), pos)
    torch.testing.assert_close(nft_loss(v_theta, v_old, v, zeros), neg)
    torch.testing.assert_close(nft_loss(v_theta, v_old, v, 0.5 * ones), 0.5 * (pos + neg))


@pytest.mark.parametrize("r_value, expected", [(1.0, [1.8, 0.0]), (0.0, [2.2, 0.0])])
def test_nft_loss_gradient_direction(r_value, expected):
    # v_old = v_theta (detached) at the start, v = [0, 0]. d/dv_theta mean((v_theta - v)^2) = [2, 0];
    # for r = 0, d/dv_theta mean((2 v_old - v_theta - v)^2) = -(2 v_old - v_theta - v) = -[2, 0].
    v_theta = torch.nn.Parameter(torch.tensor([[2.0, 0.0]]))
    v_old = v_theta.detach().clone()
    opt = torch.optim.SGD([v_theta], lr=0.1)
    nft_loss(v_theta, v_old, torch.zeros(1, 2), torch.tensor([r_value])).mean().backward()
    opt.step()
    torch.testing.assert_close(v_theta.detach(), torch.tensor([expected]))  # toward v (r=1) / away (r=0)


def test_no_gradient_reaches_the_old_policy_or_the_target():
    v_theta, v_old, v = (torch.randn(2, 3, requires_grad=True) for _ in range(3))
    for normalize in ("none", "x0_adaptive"):
        loss = nft_loss(v_theta, v_old, v, torch.tensor([0.2, 0.9]), normalize=normalize,
                        x_t=torch.randn(2, 3), t=torch.tensor([0.3, 0.7]))  # fmt: skip
        loss.sum().backward()
        assert v_theta.grad is not None and v_old.grad is None and v.grad is None


def test_nft_loss_x0_adaptive_by_hand():
    # t = 0.5, x_t = [1, 1], v = [0, 2] -> x0 = x_t - t v = [1, 0]
    # v+ = v_theta = [3, 2] -> x0+ = [-0.5, 0], e+ = [-1.5, 0]: mean e^2 = 1.125, w+ = 0.75 -> 1.5
    # v- = 2 [1, 1] - [3, 2] = [-1, 0] -> x0- = [1.5, 1], e- = [0.5, 1]: 0.625 / 0.75 = 0.8333
    # r = 0.25: 0.25 * 1.5 + 0.75 * 0.8333 = 1.0
    v_theta = torch.tensor([[3.0, 2.0]], requires_grad=True)
    kwargs = {"v_old": torch.tensor([[1.0, 1.0]]), "v_target": torch.tensor([[0.0, 2.0]])}
    x_t, t = torch.tensor([[1.0, 1.0]]), torch.tensor([0.5])
    loss = nft_loss(v_theta, r=torch.tensor([0.25]), normalize="x0_adaptive", x_t=x_t, t=t, **kwargs)
    torch.testing.assert_close(loss, torch.tensor([1.0]))
    # gradient with the weight held fixed (detached): r = 1 -> d/dv mean((x_t - t v - x0)^2) / w
    # = 2 e+ (-t) / D / w+ = 2 [-1.5, 0] (-0.5) / 2 / 0.75 = [1, 0]
    loss1 = nft_loss(v_theta, r=torch.tensor([1.0]), normalize="x0_adaptive", x_t=x_t, t=t, **kwargs)
    (grad,) = torch.autograd.grad(loss1.sum(), v_theta)
    torch.testing.assert_close(grad, torch.tensor([[1.0, 0.0]]))
    with pytest.raises(ValueError, match="x_t"):
        nft_loss(v_theta, r=torch.tensor([1.0]), normalize="x0_adaptive", **kwargs)


def test_nft_loss_nan_r_marks_only_its_sample():
    """No host sync in the loss: a NaN r (a sample without a reward) makes exactly that sample's loss NaN (the RL
    loop drops such samples with keep_groups and checks r on the host before the update)."""
    v = torch.ones(2, 3)
    loss = nft_loss(v, torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, float("nan")]))
    assert loss[0] == 1.0 and math.isnan(loss[1])  # r = 0.5: 0.5 * 1 + 0.5 * 1 with v+ = v, v- = -v


def test_kl_to_reference_by_hand():
    kl = kl_to_reference(torch.tensor([[2.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    torch.testing.assert_close(kl, torch.tensor([2.5, 0.0]))  # mean(4, 1), mean(0, 0)


# ----------------------------------------------------------------------------------------------
# timesteps and old policy
# ----------------------------------------------------------------------------------------------


def test_sample_train_timesteps_modes():
    t1 = sample_train_timesteps(10000, torch.Generator().manual_seed(1))
    t2 = sample_train_timesteps(10000, torch.Generator().manual_seed(1))
    assert torch.equal(t1, t2) and t1.shape == (10000,)
    assert 0.0 <= t1.min() and t1.max() <= 1.0 and abs(t1.mean().item() - 0.5) < 0.02
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])  # a 4-step rollout grid with terminal 0
    tg = sample_train_timesteps(400, torch.Generator().manual_seed(2), mode="rollout_grid", rollout_sigmas=sigmas)
    assert set(tg.tolist()) == {1.0, 0.75, 0.5, 0.25}  # every grid point, never the terminal 0
    with pytest.raises(ValueError, match="rollout_sigmas"):
        sample_train_timesteps(4, None, mode="rollout_grid")


def test_update_old_policy_ema_numbers():
    old = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    new = [torch.tensor([3.0, 6.0], requires_grad=True), torch.tensor([[4.0]])]
    update_old_policy(old, new, decay=0.25)
    torch.testing.assert_close(old[0], torch.tensor([2.5, 5.0]))  # 0.25 [1, 2] + 0.75 [3, 6]
    torch.testing.assert_close(old[1], torch.tensor([[3.0]]))
    update_old_policy(old, new, decay=0.0)  # "copy"
    torch.testing.assert_close(old[0], torch.tensor([3.0, 6.0]))
    with pytest.raises(ValueError, match="parameter 0"):
        update_old_policy([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_old_policy_decay_schedules():
    assert old_policy_decay(0) == 0.0
    assert old_policy_decay(100) == pytest.approx(0.1)  # 0.001 * 100
    assert old_policy_decay(1000) == 0.5  # capped
    assert old_policy_decay(1000, schedule="copy") == 0.0
    slow = {"rate": 0.0075, "max_decay": 0.999, "flat_steps": 75}  # DiffusionNFT's alternative schedule
    assert old_policy_decay(75, **slow) == 0.0
    assert old_policy_decay(175, **slow) == pytest.approx(0.75)
    assert old_policy_decay(1000, **slow) == 0.999


def test_old_policy_deviation():
    assert old_policy_deviation([torch.tensor([3.0, 4.0])], [torch.tensor([3.0, 5.0])]) == pytest.approx(0.2)
    assert old_policy_deviation([torch.zeros(2)], [torch.zeros(2)]) == 0.0


# ----------------------------------------------------------------------------------------------
# toy problem: the full loop must raise the reward
# ----------------------------------------------------------------------------------------------

TARGET = torch.tensor([2.0, 0.0])


class ToyVelocity(torch.nn.Module):
    """v(x, t) for 2-D points: an MLP on (x, t)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


@torch.no_grad()
def euler_sample(model: torch.nn.Module, eps: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """x_1 = eps -> x_0 with x <- x + (s_next - s) v (Eq.5 convention)."""
    x, sigmas = eps, torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * model(x, sigmas[i].expand(x.shape[0]))
    return x


def toy_reward(x: torch.Tensor) -> torch.Tensor:
    return -(x - TARGET).norm(dim=1)  # prefers the right-hand mode


def two_modes(n: int, g: torch.Generator) -> torch.Tensor:
    sign = torch.randint(0, 2, (n,), generator=g) * 2.0 - 1.0
    return torch.stack([2.0 * sign, torch.zeros(n)], dim=1) + 0.3 * torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("normalize", ["none", "x0_adaptive"])
def test_toy_nft_raises_reward(normalize):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = ToyVelocity()
    # flow-matching pretraining on two modes at (-2, 0) and (2, 0) (the "cold start", Eq.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        x0, eps, t = two_modes(256, g), torch.randn(256, 2, generator=g), torch.rand(256, generator=g)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
        loss = ((model(x_t, t) - (eps - x0)) ** 2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    eval_eps = torch.randn(512, 2, generator=torch.Generator().manual_seed(123))
    start = toy_reward(euler_sample(model, eval_eps))
    assert -2.6 < start.mean() < -1.4  # about half the samples in the wrong mode (distance 4)

    old_start = copy.deepcopy(model)
    old = copy.deepcopy(model).requires_grad_(False)  # the frozen old policy v_old
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    groups, k, kept = 16, 8, 0
    for step in range(1, 61):  # step = optimizer steps done after this iteration
        # 1. rollouts with the old policy, K per group
        x0 = euler_sample(old, torch.randn(groups * k, 2, generator=g))
        # 2-4. reward, filter, optimality
        rewards = toy_reward(x0)
        group_ids = torch.arange(groups).repeat_interleave(k)
        keep = keep_groups(rewards, group_ids, reward_scale=1.0)
        r = optimality(rewards, group_ids)[keep]
        x0 = x0[keep]
        kept += int(keep.sum())
        # 5. forward process on fresh noise
        t = sample_train_timesteps(x0.shape[0], g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
        # 6-7. Eq.6-8
        with torch.no_grad():
            v_old = old(x_t, t)
        loss = nft_loss(model(x_t, t), v_old, eps - x0, r, normalize=normalize, x_t=x_t, t=t).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        # 8. old policy EMA
        update_old_policy(old.parameters(), model.parameters(), old_policy_decay(step))
    assert kept == 60 * groups * k  # rewards here are negative: the high-mean filter never fires
    end = toy_reward(euler_sample(model, eval_eps))
    gap = 0.0 - start.mean()  # the best reward is 0
    assert end.mean() > start.mean() + 0.6 * gap, (start.mean().item(), end.mean().item())
    # the mass moves to the rewarded mode: about half the samples start there, nearly all end there
    right_start = (euler_sample(old_start, eval_eps)[:, 0] > 0).float().mean()
    right_end = (euler_sample(model, eval_eps)[:, 0] > 0).float().mean()
    assert 0.35 < right_start < 0.65 and right_end > 0.9, (right_start.item(), right_end.item())


def test_every_function_is_copyable_alone():
    """nft.py's claim: no function calls another of the module, so each one can be copied into a project alone."""
    import ast
    import inspect

    import nft

    tree = ast.parse(inspect.getsource(nft))
    own = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert set(nft.__all__) <= own
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            called = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
            assert not called & (own - {node.name}), f"{node.name} calls {called & own}"
