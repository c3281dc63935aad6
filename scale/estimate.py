"""Peak GPU memory of every documented command at the paper's scale, measured without a GPU or the weights.

`scale/configs/` keeps the published configuration files of Qwen/Qwen-Image-Edit-2509 (transformer, VAE, text
encoder, scheduler) and Qwen/Qwen3-VL-8B-Instruct (COMPASS's and RefReward-SR's initialisation). Every model is
built from them on FAKE tensors (scale/fake.py: shapes, dtypes and devices, no data, no memory), and one step of
each documented command runs through the project's own functions: the RL policy with its two LoRA adapters,
a rollout step of the group, a VAE decode chunk, the NFT (or Flow-GRPO) update with gradient checkpointing and
the optimizer step; the SFT step of train_sft.py and the COMPASS step of train_compass.py under FSDP2 over 8
fake ranks (one process, a fake process group); the GRPO step of train_refreward.py; inference. The bytes of
every storage alive at once are counted (`MeasuredFakeMode`): the peak of each phase is the memory that GPU
needs, the peak over the phases the command's.

    python -m scale.estimate                  # the README table: every command, full depth (~15 min on 2 cores)
    python -m scale.estimate --depths 1 2     # fast: measured at 1 and 2 blocks/layers, extrapolated to full depth

Extrapolation: every quantity here grows linearly with the number of blocks (weights, their optimizer state,
the block inputs kept under gradient checkpointing), so peak(L) = peak(a) + (L - a) (peak(b) - peak(a)) / (b - a)
from two shallow depths a < b; tests/test_gpu_paths.py checks it against a deeper measurement.

Not measured (stated in the table's notes): the VL vision towers' activations (their patch indices are computed
from the image sizes' VALUES, which fake tensors do not have; their weights are counted), the allocator's
fragmentation and the CUDA context (~0.5-1 GB per GPU), NCCL buffers.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import rl_fr
import train_sft
from baselines import flow_grpo
from common import backbone as B
from scale.fake import MeasuredFakeMode, module_moves, track_fsdp_storage_resizes

CONFIGS = Path(__file__).resolve().parent / "configs"
QWEN_IMAGE = CONFIGS / "qwen_image_edit_2509"
QWEN3_VL = CONFIGS / "qwen3_vl_8b_instruct"
GB = 1e9
GPUS = {"H20 (96 GB)": 96, "H100 (80 GB)": 80}  # the paper's RL/SFT GPUs and the common alternative


def read_config(path: Path) -> dict:
    """A published config without its bookkeeping keys ("_class_name", "_diffusers_version", ...)."""
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------------------------------
# The models on the meta device (parameter counts) and on fake tensors (memory)
# ----------------------------------------------------------------------------------------------------


def build_on_meta() -> dict[str, torch.nn.Module]:
    """Qwen-Image-Edit-2509's transformer, VAE and text encoder and Qwen3-VL-8B, on the meta device."""
    import transformers
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    transformers.logging.set_verbosity_error()  # the published files use the older "rope_scaling" key
    with torch.device("meta"):
        return {
            "transformer": QwenImageTransformer2DModel(**read_config(QWEN_IMAGE / "transformer" / "config.json")),
            "vae": AutoencoderKLQwenImage(**read_config(QWEN_IMAGE / "vae" / "config.json")),
            "text_encoder": transformers.Qwen2_5_VLForConditionalGeneration(
                transformers.AutoConfig.from_pretrained(QWEN_IMAGE / "text_encoder")),
            "compass": transformers.Qwen3VLForConditionalGeneration(transformers.AutoConfig.from_pretrained(QWEN3_VL)),
        }


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def lora_size(transformer: torch.nn.Module, rank: int = 32) -> tuple[int, int]:
    """(number of LoRA target modules found, LoRA parameters of one adapter at `rank`)."""
    targets = [m for name, m in transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in B.LORA_TARGETS)]
    return len(targets), sum(rank * (m.in_features + m.out_features) for m in targets)


@contextmanager
def default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def fake_transformer(mode: MeasuredFakeMode, depth: int | None, dtype: torch.dtype):
    from diffusers import QwenImageTransformer2DModel

    config = read_config(QWEN_IMAGE / "transformer" / "config.json")
    config["num_layers"] = depth or config["num_layers"]
    with mode, default_dtype(dtype):
        return QwenImageTransformer2DModel(**config).requires_grad_(False)


def fake_vae(mode: MeasuredFakeMode, dtype: torch.dtype = torch.bfloat16):
    from diffusers import AutoencoderKLQwenImage

    with mode, default_dtype(dtype):
        vae = AutoencoderKLQwenImage(**read_config(QWEN_IMAGE / "vae" / "config.json")).requires_grad_(False)
    return B.single_frame_convs(vae)


def fake_vl(mode: MeasuredFakeMode, which: str, depth: int | None, dtype: torch.dtype):
    """The backbone's text encoder (Qwen2.5-VL-7B) or COMPASS's Qwen3-VL-8B, `depth` decoder layers."""
    import transformers

    transformers.logging.set_verbosity_error()
    path = QWEN_IMAGE / "text_encoder" if which == "text_encoder" else QWEN3_VL
    config = transformers.AutoConfig.from_pretrained(path)
    text = getattr(config, "text_config", config)
    text.num_hidden_layers = depth or text.num_hidden_layers
    for c in (config, text, getattr(config, "vision_config", None)):  # the published files say bfloat16
        if c is not None:
            c.dtype = dtype
    cls = (transformers.Qwen2_5_VLForConditionalGeneration if which == "text_encoder"
           else transformers.Qwen3VLForConditionalGeneration)
    with mode, default_dtype(dtype):
        return cls(config).requires_grad_(False)


def vl_forward(model, tokens: int, batch: int = 1, grad: bool = False):
    """The decoder of a VL model on `tokens` positions of embeddings (the vision tower's output stands in as
    random embeddings: its own activations are not measured); returns the logits."""
    width = model.config.get_text_config().hidden_size
    dtype = torch.bfloat16 if any(hasattr(p, "device_mesh") for p in model.parameters()) else model.dtype
    embeds = torch.randn(batch, tokens, width, dtype=dtype, requires_grad=grad)
    position_ids = torch.arange(tokens).view(1, 1, -1).expand(3, batch, -1)  # M-RoPE: (3, B, L)
    return model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False).logits


# ----------------------------------------------------------------------------------------------------
# One step of each documented command
# ----------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """The measured peaks (GB) of the phases of one command's step on one GPU."""

    phases: dict[str, float]
    notes: str = ""

    @property
    def peak(self) -> float:
        return max(self.phases.values())


class Phases:
    """Record the peak of each phase (the live bytes when it starts are the baseline it adds to)."""

    def __init__(self, mode: MeasuredFakeMode):
        self.mode, self.phases = mode, {}

    @contextmanager
    def __call__(self, name: str):
        gc.collect()
        gc.disable()  # the collector's timing would move the peak from run to run; collected between phases
        self.mode.reset_peak()
        try:
            with self.mode:
                yield
        finally:
            gc.enable()
        gc.collect()
        self.phases[name] = self.mode.peak / GB


def policy(mode: MeasuredFakeMode, depth: int | None, text_encoder: bool = True):
    """An RL process's models: the bf16 transformer with two fp32 LoRA adapters (rl_fr.setup_policy's layout),
    the bf16 VAE and text encoder. Returns (backbone-like object, trainable params, old params)."""
    tr = fake_transformer(mode, depth, torch.bfloat16)
    with mode, module_moves():
        for name in ("default", "old"):
            B.add_lora(tr, 32, 64, adapter_name=name)
        named = dict(tr.named_parameters())
        for n, p in named.items():
            if ".default." in n or ".old." in n:
                p.data = p.data.float()
        params = [p for n, p in sorted(named.items()) if ".default." in n]
        old = [named[n.replace(".default.", ".old.")] for n, _ in sorted(named.items()) if ".default." in n]
        for p in params:
            p.requires_grad_(True)
        tr.set_adapter("default")
    tr.enable_gradient_checkpointing()
    bb = B.Backbone.__new__(B.Backbone)
    bb.transformer, bb.vae = tr, fake_vae(mode)
    bb.text_encoder = fake_vl(mode, "text_encoder", None, torch.bfloat16) if text_encoder else None  # full depth
    bb.vae_scale_factor = 8
    return bb, params, old


def condition(mode: MeasuredFakeMode, side: int, text_tokens: int) -> B.Condition:
    n = (side // 16) ** 2
    with mode:
        return B.Condition(torch.randn(1, text_tokens, 3584, dtype=torch.bfloat16), None,
                           torch.randn(1, n, 64, dtype=torch.bfloat16), side, side, 8)


def measure_rl(depth: int | None, objective: str = "nft", side: int = 512, k: int = 24, rollout_batch: int = 24,
               train_batch: int = 4, fidelity: bool = True, text_tokens: int = 330) -> Step:
    """rl_fr.py / rl_nr.py on one GPU: conditioning, one rollout step of `rollout_batch`, one decode chunk, the
    fidelity metric on the group (FR), one update micro-batch with gradient checkpointing, the AdamW step."""
    mode = MeasuredFakeMode()
    bb, params, old = policy(mode, depth)
    phase = Phases(mode)
    args = rl_fr.parse_args(["--model", "tiny", "--objective", objective, "--train-batch", str(train_batch),
                             "--rollout-batch", str(rollout_batch)])
    args.bf16 = True
    sigmas = torch.linspace(1, 0, 7)
    with phase("weights"):
        pass
    with phase("conditioning (text encoder)"), torch.no_grad():
        vl_forward(bb.text_encoder, text_tokens)
    cond = condition(mode, side, text_tokens)
    n = cond.num_tokens
    with phase("rollout step"), torch.no_grad():
        with mode:
            noise = torch.randn(rollout_batch, n, 64)
        with B.active_adapter(bb.transformer, "old"), B.autocast(torch.device("cpu"), True):
            x0 = B.sample(bb.transformer, cond, noise, sigmas[:2])
        with mode:
            x0 = torch.cat([x0] * (k // rollout_batch))  # the group's K samples, kept for the update
    with phase("VAE decode chunk"):
        srs = B.decode(bb, x0, cond)  # (K,3,H,W): B.DECODE_CHUNK per call
    if fidelity:  # DISTS on the policy's GPU: a VGG16 over the group (its weights are pyiqa's; ~15M params)
        import torchvision

        with phase("fidelity (DISTS's VGG16 on the group)"), torch.no_grad():
            torchvision.models.vgg16().features(srs)
    r = torch.full((train_batch,), 0.7)
    with phase("update micro-batch"):
        if objective == "nft":
            loss = rl_fr.NFT(args, params, old).micro_loss(bb, cond, x0[:train_batch], r, torch.Generator(), sigmas)
        else:
            grpo = flow_grpo.FlowGRPO(args.flow_grpo, 6, rollout_batch, "global", 0.0, True)
            cond_m = B.repeat_condition(cond, rollout_batch)
            s = torch.full((rollout_batch,), 0.9)
            loss, _ = grpo.step_loss(bb, cond_m, x0[:rollout_batch], x0[:rollout_batch], s, s * 0.8, 0.95,
                                     torch.zeros(rollout_batch), torch.ones(rollout_batch))
        loss.sum().backward()
        del loss
    with phase("optimizer step"):
        opt = torch.optim.AdamW(params, lr=3e-4)
        opt.step()
    return Step(phase.phases, "vision tower of the text encoder not run")


def init_fake_group(world: int) -> None:
    """A fake process group of `world` ranks for FSDP2 in one process (torch's FakeProcessGroup)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_world_size() == world:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def shard(mode: MeasuredFakeMode, model: torch.nn.Module, blocks: list, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    init_fake_group(world)
    mesh = init_device_mesh("cpu", (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with mode:
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)


def measure_sft(depth: int | None, world: int = 8, side: int = 512, text_tokens: int = 330,
                offload_text_encoder: bool = False) -> Step:
    """train_sft.py --fsdp on `world` GPUs: float32 master weights, gradients and AdamW state sharded, bf16
    compute, gradient checkpointing, batch 1; the frozen text encoder and VAE in bf16 on every GPU."""
    mode = MeasuredFakeMode()
    tr = fake_transformer(mode, depth, torch.float32)
    tr.requires_grad_(True)
    tr.enable_gradient_checkpointing()
    with track_fsdp_storage_resizes(mode):
        shard(mode, tr, list(tr.transformer_blocks), world)
        vae = fake_vae(mode)
        te = None if offload_text_encoder else fake_vl(mode, "text_encoder", None, torch.bfloat16)  # full depth
        phase = Phases(mode)
        with phase("weights"):
            pass
        if te is not None:
            with phase("conditioning (text encoder)"), torch.no_grad():
                vl_forward(te, text_tokens)
        cond = condition(mode, side, text_tokens)
        with phase("VAE encode of the HR"), torch.no_grad():
            x0 = B.pack_latents(B.vae_encode(vae, torch.rand(1, 3, side, side))).float()
        with phase("forward + backward"):
            loss = train_sft.flow_matching_loss(tr, cond, x0, torch.Generator(), autocast=True)
            loss.backward()
            del loss
        with phase("optimizer step"):
            torch.optim.AdamW(tr.parameters(), lr=1e-5).step()
    return Step(phase.phases, "text encoder's vision tower not run" + ("; text encoder offloaded to the host"
                                                                       if offload_text_encoder else ""))


def measure_vl_training(depth: int | None, world: int = 8, sequences: int = 1, tokens: int = 700,
                        reference: bool = False, checkpointing: bool = True) -> Step:
    """train_compass.py train (sequences=1: per-device batch 1) or train_refreward.py train (sequences = answers
    per step, a frozen reference): Qwen3-VL-8B under FSDP2, float32 master weights + AdamW sharded, bf16
    compute, next-token loss over `tokens` positions."""
    mode = MeasuredFakeMode()
    model = fake_vl(mode, "compass", depth, torch.float32)
    model.requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inner = model.model
    with track_fsdp_storage_resizes(mode):
        shard(mode, model, [*inner.visual.blocks, *inner.language_model.layers], world)
        ref = None
        if reference:
            ref = fake_vl(mode, "compass", depth, torch.float32)
            shard(mode, ref, [*ref.model.visual.blocks, *ref.model.language_model.layers], world)
        phase = Phases(mode)
        with phase("weights"):
            pass
        model.train()
        with phase("forward + backward"):
            logits = vl_forward(model, tokens, sequences, grad=True)
            if ref is not None:
                with torch.no_grad():
                    vl_forward(ref, tokens, sequences)
            loss = logits.float().logsumexp(-1).mean()
            del logits
            loss.backward()
            del loss
        with phase("optimizer step"):
            torch.optim.AdamW(model.parameters(), lr=1e-5).step()
    note = "vision tower's activations not run (its weights are sharded and counted)"
    if reference:
        note += ("; one micro-batch of the GRPO update (--micro-batch 8); generation's KV cache for the step's 32 "
                 "answers (~4 GB) not run")
    return Step(phase.phases, note)


def measure_infer(depth: int | None, side: int = 512, text_tokens: int = 330) -> Step:
    """infer.py on one GPU: bf16 model, one 512x512 tile, one Euler step (the 40 steps repeat it), decode."""
    mode = MeasuredFakeMode()
    tr = fake_transformer(mode, depth, torch.bfloat16)
    bb = B.Backbone.__new__(B.Backbone)
    bb.transformer, bb.vae, bb.vae_scale_factor = tr, fake_vae(mode), 8
    te = fake_vl(mode, "text_encoder", None, torch.bfloat16)  # full depth: only the transformer's blocks vary
    phase = Phases(mode)
    with phase("weights"):
        pass
    with phase("conditioning (text encoder)"), torch.no_grad():
        vl_forward(te, text_tokens)
    cond = condition(mode, side, text_tokens)
    with phase("Euler step"), torch.no_grad():
        with mode:
            noise = torch.randn(1, cond.num_tokens, 64)
        x0 = B.sample(tr, cond, noise, torch.linspace(1, 0, 3)[:2])
    with phase("VAE decode"):
        B.decode(bb, x0, cond)
    return Step(phase.phases, "vision tower of the text encoder not run")


# The documented commands (README "The pipeline at full scale"): name -> (command, GPUs, how to measure)
COMMANDS = {
    "sft": ("torchrun --nproc_per_node 8 train_sft.py --hr-dir LSDIR/HR --fsdp", 8,
            lambda d: measure_sft(d)),
    "compass": ("torchrun --nproc_per_node 8 train_compass.py train --data COMPASS/compass.jsonl --root COMPASS "
                "--gradient-checkpointing", 8, lambda d: measure_vl_training(d)),
    "rl_fr": ("torchrun --nproc_per_node 8 rl_fr.py --hr-dir LSDIR/HR --reward-url http://reward-host:8000", 8,
              lambda d: measure_rl(d)),
    "rl_nr": ("torchrun --nproc_per_node 8 rl_nr.py --lora out/fr.safetensors --lr-dir COMPASS-20K/rl_lq "
              "--reward-url http://reward-host:8000", 8, lambda d: measure_rl(d, fidelity=False)),
    "flow_grpo": ("torchrun --nproc_per_node 8 rl_fr.py --objective flow_grpo --rollout-batch 4 --hr-dir LSDIR/HR "
                  "--reward-url http://reward-host:8000", 8, lambda d: measure_rl(d, "flow_grpo", rollout_batch=4)),
    "refreward": ("torchrun --nproc_per_node 8 -m refreward_sr.train_refreward train --data RefSR/pairs.jsonl", 8,
                  lambda d: measure_vl_training(d, sequences=8, tokens=900, reference=True)),
    "infer": ("python infer.py --sft out/sft --lora out/nr.safetensors --input LR --out SR", 1,
              lambda d: measure_infer(d)),
}
FSDP_COMMANDS = ("sft", "compass", "refreward")
FULL_DEPTH = 60  # the transformer's blocks; the VL decoders' layers scale with the same measured slope per step


def extrapolate(shallow: Step, deep: Step, depths: tuple[int, int], full: dict[str, int]) -> Step:
    """peak(L) per phase from two depths, L = the model's full depth (linear in the number of blocks)."""
    a, b = depths
    phases = {k: shallow.phases[k] + (full[k] - a) * (deep.phases[k] - shallow.phases[k]) / (b - a)
              for k in shallow.phases}
    return Step(phases, shallow.notes + f"; extrapolated from {a} and {b} blocks/layers")


def full_depths(name: str, step: Step) -> dict[str, int]:
    """The depth each phase scales with: the transformer's blocks (60; the text encoder is always built at its
    full depth) or Qwen3-VL's decoder layers (36; its vision tower always full)."""
    depth = 36 if name in ("compass", "refreward") else FULL_DEPTH
    return {k: depth for k in step.phases}


def measure(names: list[str], depths: tuple[int, ...] | None = None) -> dict[str, dict]:
    """{command: {"command", "gpus", "peak_gb", "phases", "notes"}}; full depth, or extrapolated from `depths`.

    Each FSDP2 command first runs once at depth 1, unmeasured: the first FSDP2 step of a model in a process fills
    DTensor's sharding-propagation caches by running its ops on full-size fake tensors once, which a GPU never
    holds (it would read ~8 GB too high).

    The fake process group the FSDP2 commands need is ended before returning: left behind, it makes any later
    training in this process believe it runs on 8 ranks (its logged loss, an all-reduce mean over a group that
    sums nothing, read 1/8 of the true one in the test suite)."""
    had_group = dist.is_initialized()
    results = {}
    try:
        for name in names:
            command, gpus, fn = COMMANDS[name]
            if name in FSDP_COMMANDS:
                fn(1)  # warm-up (see above)
            t0 = time.time()
            if depths:
                shallow, deep = fn(depths[0]), fn(depths[1])
                step = extrapolate(shallow, deep, depths, full_depths(name, shallow))
            else:
                step = fn(None)
            results[name] = {"command": command, "gpus": gpus, "peak_gb": round(step.peak, 1),
                             "phases": {k: round(v, 1) for k, v in step.phases.items()}, "notes": step.notes,
                             "seconds": round(time.time() - t0, 1)}
            print(f"[estimate] {name}: peak {step.peak:.1f} GB per GPU ({time.time() - t0:.0f} s)", flush=True)
    finally:
        if dist.is_initialized() and not had_group:
            dist.destroy_process_group()
    return results


# Time per step BY ARITHMETIC (no GPU has run these yet): FLOP of one step on one GPU / (40% of the GPU's dense bf16
# peak). A transformer call costs 2 x parameters x tokens; a training call 4x that with gradient checkpointing
# (forward, recompute, backward twice the forward).
PEAK_TFLOPS = {"H20 (96 GB)": 148, "H100 (80 GB)": 989}
MFU = 0.4
MMDIT, QWEN3_VL_8B = 20.43e9, 8.77e9
IMAGE_TOKENS = 2 * (512 // 16) ** 2 + 330  # target + condition + text tokens of a 512 x 512 output


def step_flop(name: str) -> float:
    """FLOP of one step of a documented command on one GPU (the paper's settings, §5.1)."""
    call = 2 * MMDIT * IMAGE_TOKENS
    return {
        "sft": 4 * call,                                               # batch 1
        "compass": 8 * 4 * 2 * QWEN3_VL_8B * 700,                      # global batch 64 / 8 GPUs, ~700 tokens
        "rl_fr": (24 * 6 + 24 * 5) * call,                             # K=24 x 6 rollout steps + update (old fwd + 4)
        "rl_nr": (24 * 6 + 24 * 5) * call,
        "flow_grpo": (24 * 6 + 24 * 5 * 4) * call,                     # update on 5 recorded transitions per sample
        "refreward": 32 * (4 + 1) * 2 * QWEN3_VL_8B * 900 + 32 * 48 * 2 * QWEN3_VL_8B,  # update + ref + sampling
        "infer": 40 * call,                                            # 40 Euler steps, one 512 x 512 image
    }[name]


def table(results: dict[str, dict]) -> str:
    """The README table: per command, peak memory per GPU (measured), which GPUs it fits, time per step (arithmetic)."""
    lines = ["| stage | command | GPUs | peak GB per GPU (measured) | fits | s per step H20 / H100 (arithmetic) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        fits = ", ".join(g for g, gb in GPUS.items() if r["peak_gb"] <= gb) or "none"
        secs = " / ".join(f"{step_flop(name) / (MFU * t * 1e12):.0f}" for t in PEAK_TFLOPS.values())
        lines.append(f"| {name} | `{r['command']}` | {r['gpus']} | {r['peak_gb']:.1f} | {fits} | {secs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--commands", nargs="*", default=list(COMMANDS), help="which documented commands")
    parser.add_argument("--depths", type=int, nargs=2, default=None,
                        help="measure at these two shallow depths and extrapolate (fast); default: full depth")
    parser.add_argument("--json", default=None, help="also write the measured numbers to this file")
    args = parser.parse_args(argv)
    unknown = [c for c in args.commands if c not in COMMANDS]
    if unknown:
        parser.error(f"--commands {' '.join(unknown)}: choose from {', '.join(COMMANDS)}")
    torch.set_grad_enabled(True)
    results = measure(args.commands, tuple(args.depths) if args.depths else None)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
