"""GPU smoke test: every GPU code path of the project at REAL width, in minutes, with no download.

Random-weight models at the published widths (scale/configs/), with a few of their blocks/layers, bf16, on one
GPU inside a 1-rank NCCL process group: the RL policy (two LoRA adapters on the MMDiT), a group rollout, the VAE
decode, the NFT and the Flow-GRPO updates, an SFT step (float32 master weights, AdamW) and a COMPASS (Qwen3-VL)
forward/backward with AdamW. Every collective the scripts use runs once through common/training.py. Each phase
prints its time and peak memory; both are measured at two depths and extrapolated to the full models (60 MMDiT
blocks, 36 Qwen3-VL layers) and the documented batch (K = 24, 6 rollout steps, train batch 4).

    python -m scale.gpu_smoke                      # one GPU, ~3-5 minutes (depths 2 and 4)
    python -m scale.gpu_smoke --preset tiny        # CPU: the same code paths on the tiny configs (CI; seconds)

Writes the table to stdout and, with --json, the numbers to a file. The README's full-scale table quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import rl_fr
import train_sft
from baselines import flow_grpo
from common import backbone as B
from common import training as T
from common import vl_model as VL
from scale import estimate as E

K, ROLLOUT_STEPS, TRAIN_BATCH, SIDE, TEXT_TOKENS = 24, 6, 4, 512, 330  # the documented run (paper §5.1)


@dataclass
class Phase:
    seconds: float
    peak_gb: float


class Clock:
    """Time and peak memory of named phases (CUDA: synchronised, max_memory_allocated; CPU: time only)."""

    def __init__(self, device: torch.device):
        self.device, self.phases = device, {}

    @contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else float("nan")
        self.phases[name] = Phase(time.perf_counter() - t0, peak)


def build_policy(depth: int, device: torch.device, tiny: bool):
    """The RL backbone at real width with `depth` blocks (or the tiny preset), bf16, two fp32 LoRA adapters."""
    from diffusers import QwenImageTransformer2DModel

    if tiny:
        bb = B.load_backbone("tiny", dtype=torch.bfloat16, device=device)
    else:
        config = E.read_config(E.QWEN_IMAGE / "transformer" / "config.json")
        config["num_layers"] = depth
        with torch.device(device), E.default_dtype(torch.bfloat16):
            tr = QwenImageTransformer2DModel(**config)
            vae = B.single_frame_convs(_vae())
        bb = B.Backbone.__new__(B.Backbone)
        bb.transformer, bb.vae, bb.vae_scale_factor, bb.text_encoder = tr.requires_grad_(False), vae, 8, None
    args = rl_fr.parse_args(["--model", "tiny", "--train-batch", str(TRAIN_BATCH), "--rollout-batch", str(K)])
    args.bf16, args.gradient_checkpointing = True, True
    with torch.device(device):
        for name in ("default", "old"):
            B.add_lora(bb.transformer, 32, 64, adapter_name=name)
    named = dict(bb.transformer.named_parameters())
    params = [p for n, p in sorted(named.items()) if ".default." in n]
    old = [named[n.replace(".default.", ".old.")] for n, _ in sorted(named.items()) if ".default." in n]
    for p in params + old:
        p.data = p.data.float()
    for p in params:
        p.requires_grad_(True)
    bb.transformer.set_adapter("default")
    bb.transformer.enable_gradient_checkpointing()
    return bb, params, old, args


def _vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(**E.read_config(E.QWEN_IMAGE / "vae" / "config.json")).requires_grad_(False)


def run_depth(depth: int, device: torch.device, tiny: bool) -> dict[str, Phase]:
    """One pass over every phase with `depth` blocks/layers; returns {phase: Phase}. The tiny preset runs the same
    code on a group of 4 and a short text, so that it takes seconds on a CPU."""
    global K, TEXT_TOKENS
    if tiny:
        K, TEXT_TOKENS = TRAIN_BATCH, 16
    clock = Clock(device)
    bb, params, old, args = build_policy(depth, device, tiny)
    side, width = (64, bb.transformer.config.joint_attention_dim) if tiny else (SIDE, 3584)
    n = (side // (2 * bb.vae_scale_factor)) ** 2
    channels = bb.transformer.config.in_channels
    cond = B.Condition(torch.randn(1, TEXT_TOKENS, width, device=device, dtype=torch.bfloat16), None,
                       torch.randn(1, n, channels, device=device, dtype=torch.bfloat16), side, side,
                       bb.vae_scale_factor)
    sigmas = B.sigma_schedule(B.FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02,
        time_shift_type="exponential", use_dynamic_shifting=True), ROLLOUT_STEPS, n)
    g = torch.Generator().manual_seed(0)
    nft_obj = rl_fr.NFT(args, params, old)
    with clock(f"rollout (K={K}, {ROLLOUT_STEPS} steps)"):
        x0, _ = nft_obj.rollout(bb, cond, K, sigmas, g)
    with clock(f"VAE decode (K={K}, chunks of {B.DECODE_CHUNK})"):
        B.decode(bb, x0, cond)
    rewards = torch.linspace(0, 1, K)
    r = nft_obj.weights(rewards, torch.zeros(K, dtype=torch.long))
    keep = torch.ones(K, dtype=torch.bool)
    opt = torch.optim.AdamW(params, lr=3e-4)
    with clock(f"NFT update ({K} kept, train batch {TRAIN_BATCH}) + AdamW"):
        nft_obj.backward(bb, cond, sigmas, x0, None, keep, r, g, float(K))
        T.all_reduce_grads(params)  # the collectives of a step, through the helpers (1-rank NCCL)
        T.all_reduce_sum(torch.tensor([float(keep.sum())]))
        opt.step()
        opt.zero_grad(set_to_none=True)
    grpo = flow_grpo.FlowGRPO(flow_grpo.DEFAULTS, ROLLOUT_STEPS, TRAIN_BATCH, "global", 0.0, True)
    with clock(f"Flow-GRPO rollout ({TRAIN_BATCH} samples, SDE)"):
        x4, trajectory = grpo.rollout(bb, cond, TRAIN_BATCH, sigmas, g)
    with clock(f"Flow-GRPO update ({TRAIN_BATCH} samples x {grpo.terms} steps)"):
        grpo.backward(bb, cond, sigmas, x4, trajectory, torch.ones(TRAIN_BATCH, dtype=torch.bool),
                      grpo.weights(torch.linspace(0, 1, TRAIN_BATCH), torch.zeros(TRAIN_BATCH, dtype=torch.long)),
                      g, float(TRAIN_BATCH * grpo.terms))
    del bb, params, old, opt, x0, x4, trajectory
    torch.cuda.empty_cache() if device.type == "cuda" else None
    # the SFT step: float32 master weights of the transformer, bf16 autocast, gradient checkpointing, AdamW
    if tiny:
        tr = B.load_backbone("tiny", device=device).transformer
    else:
        from diffusers import QwenImageTransformer2DModel

        config = E.read_config(E.QWEN_IMAGE / "transformer" / "config.json")
        config["num_layers"] = depth
        with torch.device(device):
            tr = QwenImageTransformer2DModel(**config)
    tr = tr.float().requires_grad_(True)
    tr.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(tr.parameters(), lr=1e-5)
    x_hr = torch.randn(1, n, channels, device=device)
    with clock("SFT step (batch 1) + AdamW"):
        train_sft.flow_matching_loss(tr, cond, x_hr, g, autocast=True).backward()
        opt.step()
    del tr, opt
    torch.cuda.empty_cache() if device.type == "cuda" else None
    # COMPASS: Qwen3-VL's decoder at real width, `depth` layers, ~700 positions (two 512 px images + text)
    if tiny:
        model = VL.build_tiny_compass()[0].to(device)
    else:
        model = _qwen3_vl(depth, device)
    model.requires_grad_(True).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with clock("COMPASS forward/backward (700 tokens) + AdamW"), torch.autocast(device.type, dtype=torch.bfloat16):
        E.vl_forward(model, 700, grad=True).float().logsumexp(-1).mean().backward()
        opt.step()
    return clock.phases


def _qwen3_vl(depth: int, device: torch.device):
    import transformers

    config = transformers.AutoConfig.from_pretrained(E.QWEN3_VL)
    config.text_config.num_hidden_layers = depth
    with torch.device(device):
        return transformers.Qwen3VLForConditionalGeneration(config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--depths", type=int, nargs=2, default=[2, 4], help="blocks/layers of the two measured runs")
    parser.add_argument("--preset", choices=("real", "tiny"), default="real",
                        help="real widths on a GPU, or the tiny configs (the CPU check of the code paths)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    tiny = args.preset == "tiny"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"[gpu_smoke] {name}, preset {args.preset}, depths {args.depths}", flush=True)
    runs = {}
    for depth in ([1] if tiny else args.depths):
        runs[depth] = run_depth(depth, device, tiny)
        for phase, p in runs[depth].items():
            print(f"[gpu_smoke] depth {depth}: {phase}: {p.seconds:.2f} s, peak {p.peak_gb:.1f} GB", flush=True)
    result = {"device": name, "preset": args.preset, "depths": {d: {k: vars(v) for k, v in ph.items()}
                                                               for d, ph in runs.items()}}
    if not tiny:
        a, b = args.depths
        full = {}
        for phase in runs[a]:
            depth = 36 if phase.startswith("COMPASS") else 60
            pa, pb = runs[a][phase], runs[b][phase]
            slope_t, slope_m = (pb.seconds - pa.seconds) / (b - a), (pb.peak_gb - pa.peak_gb) / (b - a)
            full[phase] = {"seconds": pa.seconds + (depth - a) * slope_t, "peak_gb": pa.peak_gb + (depth - a) * slope_m}
        result["extrapolated"] = full
        print("| phase (extrapolated to the full model) | time (s) | peak GB |\n|---|---|---|")
        for phase, v in full.items():
            print(f"| {phase} | {v['seconds']:.1f} | {v['peak_gb']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
