"""What a GPU run does, checked without a GPU: bf16 on the CPU, fake cuda tensors, NCCL's device rule, the paper's
defaults, rank failures, and the memory of the documented commands at the real configs."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import infer
import rl_fr
import rl_nr
import train_compass
import train_sft
from baselines import flow_grpo
from common import backbone as B
from common import training as T
from mini import serving
from refreward_sr import train_refreward
from scale import estimate as E
from scale.fake import MeasuredFakeMode, cuda_autocast, fake_copy, fake_process_group, module_moves

ROOT = Path(__file__).resolve().parents[1]
RL = ["--model", "tiny", "--reward-model", "tiny", "--crop-size", "64", "--group-size", "4", "--rollout-batch", "4",
      "--rollout-steps", "3", "--sample-every", "0", "--fidelity", "ssim", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """HR photos (96 px), LQ images, a COMPASS labels file and a RefReward-SR pairs file."""
    root = tmp_path_factory.mktemp("gpu_paths")
    rng = np.random.default_rng(0)
    for sub in ("hr", "lq"):
        (root / sub).mkdir()
    for i in range(2):
        Image.fromarray((rng.random((96, 96, 3)) * 255).astype(np.uint8)).save(root / "hr" / f"{i}.png")
    Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / "lq" / "a.png")
    rows, pairs = [], []
    for g in range(2):
        for sub in ("lr", "sr/A", "sr/B"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(root / "lr" / f"{g}.png")
        for m in ("A", "B"):
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / "sr" / m / f"{g}.png")
            rows.append({"lr": f"lr/{g}.png", "sr": f"sr/{m}/{g}.png", "group": str(g), "method": m,
                         "F": 0.8, "q_lr": 2.0, "q_sr": 3.5 if m == "A" else 2.5})
        pairs.append({"lr": f"lr/{g}.png", "sr_a": f"sr/A/{g}.png", "sr_b": f"sr/B/{g}.png", "preferred": "a",
                      "group": str(g)})
    (root / "compass.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


# ---------------------------------------------------------------------------------------------------
# 1. Every stage in bfloat16 (what --bf16 / the GPU default runs), tiny preset, on the CPU
# ---------------------------------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_every_oars_stage_runs_in_bf16(data, tmp_path):
    """SFT, FR, NR, Flow-GRPO and inference with bf16 weights and autocast: finite losses, images out. Before the
    decode fix the first rollout's float32 latents met the bf16 VAE ("Input type (float) and bias type
    (c10::BFloat16) should be the same"); before the shared autocast Flow-GRPO's ratio was ~3e-5 from 1."""
    train_sft.main(["--model", "tiny", "--hr-dir", str(data / "hr"), "--crop-size", "64", "--steps", "2", "--bf16",
                    "--out", str(tmp_path / "sft"), "--sample-every", "0"])
    sft_losses = json.loads((tmp_path / "sft" / "train_log.json").read_text())["losses"]
    assert len(sft_losses) == 2 and all(math.isfinite(x) for x in sft_losses)
    fr = rl_fr.main([*RL, "--hr-dir", str(data / "hr"), "--steps", "2", "--bf16", "--out", str(tmp_path / "fr.safetensors")])
    nr = rl_nr.main([*RL[:-4], "--lr", "1e-2", "--lora", str(fr), "--lr-dir", str(data / "lq"), "--steps", "2",
                     "--bf16", "--out", str(tmp_path / "nr.safetensors")])
    grpo = rl_fr.main([*RL, "--objective", "flow_grpo", "--hr-dir", str(data / "hr"), "--steps", "2", "--bf16",
                       "--out", str(tmp_path / "grpo.safetensors")])
    for lora in (fr, nr, grpo):
        log = _jsonl(lora.with_suffix("") / "rewards.jsonl")
        assert len(log) == 2 and all(math.isfinite(e["loss"]) and math.isfinite(e["reward_mean"]) for e in log)
    assert all(e["ratio_max_deviation"] == 0.0 for e in _jsonl(grpo.with_suffix("") / "rewards.jsonl"))
    assert infer.main(["--model", "tiny", "--sft", str(tmp_path / "sft"), "--lora", str(nr), "--dtype", "bf16",
                       "--input", str(data / "lq"), "--out", str(tmp_path / "sr"), "--steps", "2"]) == 0
    sr = np.asarray(Image.open(tmp_path / "sr" / "a.png"))
    assert sr.shape == (64, 64, 3) and sr.std() > 0


@pytest.mark.slow
def test_refreward_grpo_shards_the_judge_over_two_processes(data, tmp_path):
    """train_refreward.py under torchrun: the judge and its reference sharded by FSDP2 (before: a float32 replica
    with AdamW and a reference copy on every GPU, ~175 GB for the 8B), generation kept in step across ranks whose
    answers end at different lengths (synced_gpus), per-rank checkpoint shards."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(serving.free_port()), "-m", "refreward_sr.train_refreward", "train", "--model", "tiny", "--data",
           str(data / "pairs.jsonl"), "--out", str(tmp_path / "rr"), "--warmup-steps", "1", "--steps", "1",
           "--prompts", "2", "--group", "4", "--micro-batch", "4", "--max-new-tokens", "8", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = tmp_path / "rr" / "checkpoints" / "step_000002"
    assert {p.name for p in step.glob("model.rank*.safetensors")} == {"model.rank0.safetensors", "model.rank1.safetensors"}
    assert (tmp_path / "rr" / "config.json").exists() and len(_jsonl(tmp_path / "rr" / "rewards.jsonl")) == 2


@pytest.mark.slow
def test_compass_sft_and_refreward_grpo_run_in_bf16(data, tmp_path):
    train_compass.main(["train", "--model", "tiny", "--data", str(data / "compass.jsonl"), "--out",
                        str(tmp_path / "compass"), "--global-batch", "2", "--per-device-batch", "2", "--epochs", "1",
                        "--bf16", "on", "--device", "cpu"])
    losses = json.loads((tmp_path / "compass" / "losses.json").read_text())["losses"]
    assert losses and all(math.isfinite(x) for x in losses)
    train_refreward.main(["train", "--model", "tiny", "--data", str(data / "pairs.jsonl"), "--out",
                          str(tmp_path / "rr"), "--warmup-steps", "1", "--steps", "1", "--prompts", "2", "--group", "4",
                          "--micro-batch", "3", "--max-new-tokens", "8", "--bf16", "on", "--device", "cpu"])
    log = _jsonl(tmp_path / "rr" / "rewards.jsonl")
    assert len(log) == 2 and all(math.isfinite(e["loss"]) for e in log) and "warmup_loss" in log[0]


# ---------------------------------------------------------------------------------------------------
# 2. Devices and dtypes on a fake GPU (torch's FakeTensorMode: checked like on a GPU, nothing computed)
# ---------------------------------------------------------------------------------------------------


def test_rl_and_sft_steps_keep_every_tensor_on_the_gpu(monkeypatch):
    """Policy setup, rollout, decode, the NFT and Flow-GRPO losses and the SFT loss on fake cuda tensors, bf16,
    with the rewards (hence r and the advantages) on the host as reward.py returns them. Before the fix r and the
    advantages stayed on the CPU: "Expected all tensors to be on the same device". (The backward pass needs a
    real CUDA device: a fake one stops in the autograd engine, see scale/fake.py; memory is measured on fake
    CPU tensors instead, test_documented_commands_fit_the_gpus.)"""
    mode = MeasuredFakeMode()
    real = B.load_backbone("tiny")
    for module in (real.transformer, real.vae, real.text_encoder):
        fake_copy(module, mode, "cuda", torch.bfloat16)
    monkeypatch.setattr(B, "load_backbone", lambda *a, **k: real)
    args = rl_fr.parse_args(["--model", "tiny", "--bf16", "--gradient-checkpointing", "--train-batch", "2"])
    cuda = torch.device("cuda")
    with mode, module_moves(), cuda_autocast():
        bb, params, old = rl_fr.setup_policy(args, cuda)
        assert {p.device.type for p in bb.transformer.parameters()} == {"cuda"}
        assert {(p.dtype, p.requires_grad) for p in params} == {(torch.float32, True)}
        assert {p.dtype for n, p in bb.transformer.named_parameters() if "lora" not in n} == {torch.bfloat16}
        n = (64 // 16) ** 2
        cond = B.Condition(torch.randn(1, 40, 32, device=cuda, dtype=torch.bfloat16), None,
                           torch.randn(1, n, 64, device=cuda, dtype=torch.bfloat16), 64, 64, 8)
    sigmas = B.sigma_schedule(bb.scheduler, 3, n)  # host tensors, as in rl_fr.run
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])    # host tensors, as reward.py returns them; the group
    ids = torch.zeros(4, dtype=torch.long)           # statistics are computed on the host, as in rl_fr.run
    nft_objective = rl_fr.NFT(args, params, old)
    grpo = flow_grpo.FlowGRPO(flow_grpo.DEFAULTS, 3, 4, "global", 0.0, True)
    r, adv = nft_objective.weights(rewards, ids), grpo.weights(rewards, ids)
    with mode, cuda_autocast():
        x0, _ = nft_objective.rollout(bb, cond, 4, sigmas, torch.Generator())
        srs = B.decode(bb, x0, cond)
        assert (x0.device.type, x0.dtype, srs.device.type, srs.shape) == ("cuda", torch.float32, "cuda", (4, 3, 64, 64))
        loss = nft_objective.micro_loss(bb, cond, x0[:2], r[:2], torch.Generator(), sigmas)
        assert (loss.device.type, loss.dtype, loss.shape) == ("cuda", torch.float32, (2,))
        x0, trajectory = grpo.rollout(bb, cond, 4, sigmas, torch.Generator())
        m = 4
        s, s_next = sigmas[0].expand(m).to(cuda), sigmas[1].expand(m).to(cuda)
        step, _ = grpo.step_loss(bb, B.repeat_condition(cond, m), trajectory.latents[:, 0], trajectory.latents[:, 1],
                                 s, s_next, float(sigmas[1]), trajectory.log_probs[:, 0], adv)
        assert step.device.type == "cuda" and trajectory.latents.device.type == "cuda"
        sft_loss = train_sft.flow_matching_loss(bb.transformer, B.repeat_condition(cond, 2), x0[:2].float(),
                                                torch.Generator(), autocast=True)
        assert sft_loss.device.type == "cuda" and sft_loss.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# 3. NCCL's rule: collectives take tensors on the GPU only
# ---------------------------------------------------------------------------------------------------


def test_collective_helpers_under_a_backend_registered_for_cuda_only():
    """A 2-rank process group served for "cuda" only, as NCCL's is (a collective on a CPU tensor fails with
    NCCL's own error), on fake cuda tensors: every helper takes the host tensors the scripts pass it (a summed
    loss, a sample count, a checksum, a generator state) and hands back a tensor on the caller's device.
    tests/test_layout.py checks that no collective is called outside these helpers."""
    fake_process_group(2, "cuda")
    try:
        assert T.comm_device().type == "cuda"
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.tensor([1.0]))  # what the scripts did before: NCCL refuses it
        mode = MeasuredFakeMode()
        with mode:
            for host in (torch.tensor(0.5), torch.tensor([3.0]), torch.tensor([1.0], dtype=torch.float64)):
                assert T.all_reduce_sum(host).device.type == "cpu"
                assert T.all_reduce_mean(host).device.type == "cpu"
            state = torch.Generator().manual_seed(0).get_state()  # what every checkpoint gathers
            gathered = T.all_gather(state)
            assert len(gathered) == 2 and gathered[0].device.type == "cpu" and gathered[0].shape == state.shape
            param = torch.nn.Parameter(torch.zeros(3, device="cuda"))
            param.grad = torch.ones(3, device="cuda")
            T.all_reduce_grads([param])
            assert param.grad.device.type == "cuda"
            T.barrier()
    finally:
        dist.destroy_process_group()


def test_a_failed_rank_stops_every_rank_with_its_message(tmp_path):
    """raise_if_any_rank_failed: rank 1 fails (its reward server is down), rank 0 does not; both stop at once
    with rank 1's message (one line each), exit code 2, instead of rank 0 waiting in its next collective."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from common import training as T
        from reward import RewardServerError

        def main():
            info = T.setup_distributed("cpu")
            error = RewardServerError("reward server http://127.0.0.1:9/v1 did not answer") if info.rank == 1 else None
            T.raise_if_any_rank_failed(error)
            T.all_reduce_sum(torch.ones(1))  # never reached: rank 0 would wait here for rank 1
            print("not reached")

        T.run_script(main)
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(serving.free_port()), str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "not reached" not in proc.stdout
    assert "error: rank 1 failed: RewardServerError: reward server http://127.0.0.1:9/v1" in proc.stderr
    assert "error: reward server http://127.0.0.1:9/v1 did not answer" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# 4. The paper's defaults, and what a real run without its checkpoints says
# ---------------------------------------------------------------------------------------------------


def test_a_stage_without_model_flags_means_the_papers_models():
    args = rl_fr.parse_args([])
    assert (args.model, args.reward_model, args.lora_rank, args.lora_alpha, args.group_size, args.lr) == \
        ("Qwen/Qwen-Image-Edit-2509", "out/compass", 32, 64, 24, 3e-4)
    rl_fr.resolve_defaults(args, torch.device("cuda"))
    assert args.bf16 and args.gradient_checkpointing  # the documented command needs no --bf16 / --gradient-...
    tiny = rl_fr.parse_args(["--model", "tiny"])
    rl_fr.resolve_defaults(tiny, torch.device("cpu"))
    assert not tiny.bf16 and not tiny.gradient_checkpointing
    assert train_sft.parse_args(["--hr-dir", "x"]).model == "Qwen/Qwen-Image-Edit-2509"
    assert infer.parse_args(["--input", "x"]).model == "Qwen/Qwen-Image-Edit-2509"
    assert train_refreward.TrainArgs().model == "Qwen/Qwen3-VL-8B-Instruct"


def test_missing_checkpoints_are_one_line_naming_them(data, tmp_path, monkeypatch):
    """In the process (T.run_script prints a RunError as its one line and exits with 2: tests/test_user_errors.py)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(T.RunError) as err:
        infer.main(["--input", str(data / "lq"), "--out", str(tmp_path / "o")])
    assert "\n" not in str(err.value)
    assert "--model Qwen/Qwen-Image-Edit-2509: no such folder, and not in the local Hugging Face cache" in str(err.value)
    assert "--model mini" in str(err.value)
    with pytest.raises(T.RunError) as err:
        rl_nr.main(["--model", "tiny", "--lr-dir", str(data / "lq"), "--out", str(tmp_path / "nr.safetensors")])
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("COMPASS checkpoint out/compass: no such folder")
    assert not list((tmp_path / "o").glob("*")) and not (tmp_path / "nr.safetensors").exists()  # before any work


# ---------------------------------------------------------------------------------------------------
# 5. Memory: what the fixes bound, and the documented commands at the real configs
# ---------------------------------------------------------------------------------------------------


def test_the_fidelity_metric_and_in_process_compass_run_on_the_policys_gpu(monkeypatch):
    """Before the fix DISTS ran on the CPU (~20 s per step at one thread) and an in-process COMPASS was loaded on
    the CPU whatever the policy's device."""
    devices = {}
    monkeypatch.setattr(rl_fr.reward, "FidelityScorer", lambda metric, device: devices.setdefault("F", device))
    monkeypatch.setattr(rl_fr.reward, "make_scorer", lambda *a, device, **k: devices.setdefault("Q", device))
    rl_fr.make_reward(rl_fr.parse_args(["--model", "tiny"]), torch.device("cuda", 3), full_reference=True)
    assert devices == {"F": torch.device("cuda", 3), "Q": torch.device("cuda", 3)}


def test_rl_checkpoints_copy_only_the_adapters():
    bb = B.load_backbone("tiny")
    for name in ("default", "old"):
        B.add_lora(bb.transformer, 4, 8, adapter_name=name)
    weights, _ = T.gather_full_state(bb.transformer, None, keep=rl_fr.is_lora)
    assert weights and all(rl_fr.is_lora(k) for k in weights)


def test_decode_in_chunks_is_exact_and_bounds_the_vaes_peak():
    bb = B.load_backbone("tiny")
    cond = B.Condition(torch.zeros(1, 4, 32), None, torch.zeros(1, 16, 64), 64, 64, 8)
    tokens = torch.randn(6, 16, 64)
    torch.testing.assert_close(B.decode(bb, tokens, cond, chunk=2), B.decode(bb, tokens, cond, chunk=6))
    peaks = {}
    for chunk in (4, 24):  # the real VAE at 512 px: a group of 24 at once vs the default chunks of 4
        mode = MeasuredFakeMode()
        vae = E.fake_vae(mode)
        with mode:
            z = torch.randn(24, 16, 1, 64, 64, dtype=torch.bfloat16)
            mode.reset_peak()
            torch.cat([B.vae_decode(vae, c) for c in z.split(chunk)])
        peaks[chunk] = mode.peak / 1e9
    assert peaks[24] > 15 > peaks[4]  # measured: ~20 GB of activations vs ~3.5 GB


def test_fsdp_sft_loads_the_transformer_on_the_host_once_per_node(monkeypatch):
    """Under --fsdp rank 0 reads the transformer into host memory and the other ranks build it on the meta device
    (before the fix rank 0 loaded it in float32 onto its GPU: 81.7 GB); bf16 runs load every part in bf16 and the
    offloaded text encoder stays on the host."""
    calls = []
    monkeypatch.setattr(train_sft.B, "load_backbone", lambda model, **kw: calls.append(kw))
    args = train_sft.parse_args(["--hr-dir", "x", "--fsdp", "--bf16", "--offload-text-encoder"])
    for rank in (0, 1):
        train_sft.load_for_training(args, T.DistInfo(rank, 8, rank, torch.device("cuda", rank)), sharded=True)
    assert [c["transformer_device"] for c in calls] == ["cpu", "cpu"]
    assert [c["transformer_on_meta"] for c in calls] == [False, True]
    assert {c["dtype"] for c in calls} == {torch.bfloat16} and {c["text_encoder_device"] for c in calls} == {"cpu"}


def test_text_encoder_offload_moves_it_for_the_encoding_and_back():
    """--offload-text-encoder: the bf16 encoder waits on the host and crosses to the GPU for an encoding (fake
    cuda here), instead of running in float32 on one CPU thread."""
    bb = B.load_backbone("tiny", dtype=torch.bfloat16)
    mode = MeasuredFakeMode()
    fake_copy(bb.text_encoder, mode, "cpu")
    with mode, module_moves():
        with B.text_encoder_on(bb, "cuda"):
            assert bb.text_encoder.device.type == "cuda" and bb.text_encoder.dtype == torch.bfloat16
        assert bb.text_encoder.device.type == "cpu"


def test_streamed_sft_weights_and_merged_lora_in_bf16_match_float32(tmp_path):
    """infer.py loads the SFT weights one tensor at a time into the bf16 model and merges the LoRA weight by
    weight in float32 on its device: the weights of merging in float32 and casting once, within one bf16
    rounding (the SFT weights are rounded to bf16 before the merge instead of after)."""
    from safetensors.torch import save_file

    source = B.load_backbone("tiny").transformer
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "transformer.safetensors"))
    lora_model = B.load_backbone("tiny").transformer
    B.add_lora(lora_model, 4, 8)
    with torch.no_grad():
        for n, p in lora_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    B.save_lora(lora_model, tmp_path / "lora.safetensors")
    ours = infer.load_policy("tiny", str(tmp_path), (str(tmp_path / "lora.safetensors"),), torch.bfloat16, "cpu")
    reference = infer.load_policy("tiny", str(tmp_path), (str(tmp_path / "lora.safetensors"),), torch.float32, "cpu")
    for (name, a), b in zip(ours.transformer.state_dict().items(), reference.transformer.state_dict().values()):
        assert a.dtype == torch.bfloat16
        # bf16 keeps 8 significant bits: within one rounding step at the tensor's scale
        assert float((a.float() - b).abs().max()) <= 2 ** -7 * float(b.abs().max()) + 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("name", list(E.COMMANDS))
def test_documented_commands_fit_the_gpus(name):
    """The memory of one step of each documented command at the real configs (60 MMDiT blocks, Qwen3-VL-8B),
    measured on fake tensors, extrapolated from 4 and 8 blocks/layers (scale/estimate.py): each fits the paper's
    H20 (96 GB) with room to spare for the CUDA context, and the README says which also fit an 80 GB H100.
    One command per test, so that the two test workers share them."""
    r = E.measure([name], (4, 8))[name]
    assert r["peak_gb"] < 92, (name, r)
    fits_h100 = r["peak_gb"] <= 78
    readme = (ROOT / "README.md").read_text()
    assert f"| {name} |" in readme, f"README table has no row for {name}"
    row = next(line for line in readme.splitlines() if line.startswith(f"| {name} |"))
    assert ("H100" in row) == fits_h100, (name, r["peak_gb"], row)


@pytest.mark.slow
def test_gpu_smoke_test_runs_its_code_paths_on_the_cpu(tmp_path):
    """scale/gpu_smoke.py on the tiny configs (CI has no GPU): every phase of the real-width GPU run, once."""
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "-m", "scale.gpu_smoke", "--preset", "tiny", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    phases = json.loads(out.read_text())["depths"]["1"]
    assert len(phases) == 7 and all(p["seconds"] > 0 for p in phases.values())
    assert any(name.startswith("NFT update") for name in phases) and any("COMPASS" in name for name in phases)
