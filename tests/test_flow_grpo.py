"""Flow-GRPO: each formula against hand-worked numbers, the SDE's marginals, and the objective in the RL loop."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rl_fr
from baselines import flow_grpo as G
from common import training as T
from mini import serving

ROOT = Path(__file__).resolve().parents[1]


def test_noise_std_hand_worked():
    sigma = torch.tensor([0.5, 1.0], dtype=torch.float64)
    std = G.sde_noise_std(sigma, sigma_max=0.8, noise_level=0.7)
    assert std[0] == pytest.approx(0.7 * math.sqrt(0.5 / 0.5))
    assert std[1] == pytest.approx(0.7 * math.sqrt(1.0 / (1 - 0.8)))  # s = 1: the denominator uses sigma_max


def test_step_mean_hand_worked_and_euler_without_noise():
    x, v = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[-1.0]], dtype=torch.float64)
    s, s_next, std = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64), \
        torch.tensor([0.7], dtype=torch.float64)
    dt = -0.25
    expected = 2.0 * (1 + 0.49 / 1.0 * dt) + (-1.0) * (1 + 0.49 * 0.5 / 1.0) * dt  # 2(1 - .1225) - (1.245)(-.25)
    assert float(G.sde_step_mean(x, v, s, s_next, std)) == pytest.approx(expected)
    assert float(G.sde_step_mean(x, v, s, s_next, torch.zeros(1, dtype=torch.float64))) == pytest.approx(2.0 + 0.25)


def test_log_prob_is_the_gaussian_density_averaged():
    x = torch.tensor([[0.3, -0.2]])
    mean = torch.tensor([[0.1, 0.0]])
    std = torch.tensor([0.5])
    by_hand = np.mean([-(0.2 ** 2) / (2 * 0.25) - math.log(0.5) - 0.5 * math.log(2 * math.pi),
                       -(0.2 ** 2) / (2 * 0.25) - math.log(0.5) - 0.5 * math.log(2 * math.pi)])
    assert float(G.gaussian_log_prob(x, mean, std)) == pytest.approx(by_hand, abs=1e-6)
    # and sde_step's log-probability is that of its own transition: mean and std = std_t sqrt(s - s_next)
    x0, v = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    s, s_next = torch.full((3,), 0.6), torch.full((3,), 0.4)
    x1, lp, mu, std_t = G.sde_step(x0, v, s, s_next, sigma_max=0.9, noise_level=0.7,
                                   generator=torch.Generator().manual_seed(0))
    density = torch.distributions.Normal(mu, (std_t * math.sqrt(0.2)).view(3, 1, 1)).log_prob(x1).mean((1, 2))
    assert torch.allclose(lp, density, atol=1e-5)
    _, lp_again, _, _ = G.sde_step(x0, v, s, s_next, sigma_max=0.9, noise_level=0.7, x_next=x1)
    assert torch.equal(lp, lp_again)  # the training-time recomputation of a recorded transition


def test_sde_keeps_the_ode_marginals_on_a_gaussian():
    """x0 ~ N(m, s^2): with the exact velocity, the SDE sampler ends at N(m, s^2) like the ODE."""
    m, sd, n, steps = 1.5, 0.4, 20000, 200
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)

    def velocity(x, t):  # E[eps - x0 | x_t] for x_t = (1 - t) x0 + t eps
        a, b = 1 - t, t
        var = a * a * sd * sd + b * b
        return b * (x - a * m) / var - (m + a * sd * sd * (x - a * m) / var)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64)
    for j in range(steps):
        s, s_next = sigmas[j].expand(n), sigmas[j + 1].expand(n)
        x, _, _, _ = G.sde_step(x, velocity(x, sigmas[j]), s, s_next, float(sigmas[1]), 0.7, g)
        x = x.double()
    assert float(x.mean()) == pytest.approx(m, abs=0.02) and float(x.std()) == pytest.approx(sd, abs=0.02)


def test_group_advantages_hand_worked():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0, float("nan")])
    ids = [0, 0, 1, 1, 1]
    glob = G.group_advantages(rewards, ids, "global")  # global population std of [1, 3, 2, 2] = sqrt(0.5)
    assert torch.allclose(glob[:4], torch.tensor([-1, 1, 0, 0]) / (math.sqrt(0.5) + 1e-4), atol=1e-6)
    assert torch.isnan(glob[4])
    group = G.group_advantages(rewards, ids, "group", clip=0.5)  # group 0: std 1; group 1: std 0 -> 0 / 1e-4
    assert torch.allclose(group[:4], torch.tensor([-0.5, 0.5, 0.0, 0.0]), atol=1e-6)


def test_clipped_surrogate_hand_worked():
    old = torch.zeros(4)
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, 1.0, 2.0])
    loss = G.clipped_surrogate(lp, old, adv, clip_range=0.2)
    # ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2; A=-1: max(1.5, 1.2) = 1.5; ratio .5, A=+1: max(-.5, -.8) = -.5;
    # ratio 1: -A = -2
    assert torch.allclose(loss, torch.tensor([-1.2, 1.5, -0.5, -2.0]), atol=1e-6)
    lp = lp.clone().requires_grad_(True)
    G.clipped_surrogate(lp, old, adv, clip_range=0.2).sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([0.0, 1.5, -0.5, -2.0]), atol=1e-6)  # clipped terms give 0


def test_kl_hand_worked():
    mean, ref, std = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    assert float(G.sde_kl(mean, ref, std)) == pytest.approx((1 / (2 * 0.25) + 0) / 2)


def test_train_steps_drop_the_last_one():
    assert G.train_step_indices(6) == [0, 1, 2, 3, 4] and G.train_step_indices(10, 0.5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="trains no step"):
        G.train_step_indices(2, 0.1)


# ---------------------------------------------------------------------------------------------------
# in the RL loop
# ---------------------------------------------------------------------------------------------------

FAST = ["--model", "tiny", "--reward-model", "tiny", "--crop-size", "64", "--group-size", "4", "--rollout-batch", "4",
        "--rollout-steps", "3", "--sample-every", "0", "--lr", "1e-2", "--fidelity", "ssim", "--objective", "flow_grpo"]


@pytest.fixture(scope="module")
def hr_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hr")
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((64, 64, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return d


def test_ratio_is_exactly_one_before_the_update_and_resume_is_exact(hr_dir, tmp_path):
    common = [*FAST, "--hr-dir", str(hr_dir), "--save-every", "2"]
    rl_fr.main([*common, "--steps", "4", "--out", str(tmp_path / "a.safetensors")])
    rl_fr.main([*common, "--steps", "2", "--out", str(tmp_path / "b.safetensors")])
    rl_fr.main([*common, "--steps", "4", "--out", str(tmp_path / "b.safetensors"), "--resume", "latest"])
    log = [json.loads(x) for x in (tmp_path / "a" / "rewards.jsonl").read_text().splitlines()]
    # one optimizer step per RL step, taken after all ratios are computed: every ratio is exactly 1
    assert all(e["ratio_max_deviation"] == 0.0 for e in log) and all(e["grad_norm"] > 0 for e in log)
    a, _, _ = T.load_checkpoint(tmp_path / "a" / "checkpoints" / "step_000004")
    b, _, _ = T.load_checkpoint(tmp_path / "b" / "checkpoints" / "step_000004")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if ".default." in k and "lora_B" in k)


def test_objective_options_are_checked():
    with pytest.raises(SystemExit):
        rl_fr.parse_args(["--objective", "ppo"])
    with pytest.raises(SystemExit):
        rl_fr.parse_args(["--objective", "flow_grpo", "--lam", "1"])
    with pytest.raises(SystemExit):
        rl_fr.parse_args(["--clip-range", "0.2"])  # a Flow-GRPO option with the default objective (nft)
    nft_args, grpo_args = rl_fr.parse_args([]), rl_fr.parse_args(["--objective", "flow_grpo"])
    assert (nft_args.lam, nft_args.std_mode, nft_args.flow_grpo.noise_level) == (1.0, "group", None)
    assert (grpo_args.flow_grpo.noise_level, grpo_args.flow_grpo.clip_range, grpo_args.std_mode, grpo_args.lam) == \
        (0.7, 1e-4, "global", None)


def test_objective_errors_name_the_option(hr_dir, capsys):
    with pytest.raises(SystemExit):
        rl_fr.main(["--hr-dir", str(hr_dir), "--objective", "flow_grpo", "--old-decay", "copy"])
    assert "--old-decay is an option of --objective nft" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rl_fr.main(["--hr-dir", str(hr_dir), "--objective", "grpo"])
    assert "choose one of nft, flow_grpo" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes(hr_dir, tmp_path):
    out = tmp_path / "fr.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(serving.free_port()), "rl_fr.py", *FAST, "--hr-dir", str(hr_dir), "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (tmp_path / "fr" / "rewards.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and out.exists()
