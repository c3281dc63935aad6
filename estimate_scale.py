"""The paper-scale models checked without their weights, and the memory / time estimate of the README.

`configs/` keeps the published configuration files of Qwen/Qwen-Image-Edit-2509 (the diffusers pipeline:
transformer, VAE, text encoder, scheduler) and of Qwen/Qwen3-VL-8B-Instruct (COMPASS's initialisation),
as JSON. This script builds every model from them on the META device (shapes, no memory, no download)
and measures what the estimate needs:

  * parameter counts per component;
  * the LoRA targets of `backbone.LORA_TARGETS` found in the real transformer (§5.1: rank 32, alpha 64)
    and the size of one adapter;
  * one MMDiT block at FULL width run forward and backward on the CPU (float32, random weights) on a
    short sequence: the bytes autograd keeps per token for the backward pass, i.e. the activation memory
    per token and block without gradient checkpointing (with it, one block's worth is live at a time).

Then it prints the README section "Memory and time at the paper's scale" from those numbers.

    python estimate_scale.py                 # measures (about a minute, ~3 GB RAM) and prints the section
    python estimate_scale.py --tokens 256    # shorter sequence for the block measurement
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import backbone as B

CONFIGS = Path(__file__).resolve().parent / "configs"
QWEN_IMAGE = CONFIGS / "qwen_image_edit_2509"
QWEN3_VL = CONFIGS / "qwen3_vl_8b_instruct"


def read_config(path: Path) -> dict:
    """A published config without its bookkeeping keys ("_class_name", "_diffusers_version", ...)."""
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


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


def block_activation_bytes_per_token(config: dict, tokens: int = 512, text_tokens: int = 64) -> float:
    """Bytes autograd saves for backward per (image) token in ONE full-width MMDiT block, float32.

    The block of the real config is built with random weights on the CPU and run on `tokens` image tokens
    and `text_tokens` text tokens; every tensor saved for backward is counted once (by storage).
    """
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope, QwenImageTransformerBlock

    dim = config["num_attention_heads"] * config["attention_head_dim"]
    torch.manual_seed(0)
    block = QwenImageTransformerBlock(dim, config["num_attention_heads"], config["attention_head_dim"])
    rope = QwenEmbedRope(theta=10000, axes_dim=list(config["axes_dims_rope"]), scale_rope=True)
    side = int(tokens ** 0.5)
    img = torch.randn(1, side * side, dim, requires_grad=True)
    txt = torch.randn(1, text_tokens, dim, requires_grad=True)
    temb = torch.randn(1, dim)
    freqs = rope([(1, side, side)], device=torch.device("cpu"), max_txt_seq_len=text_tokens)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        txt_out, img_out = block(hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=None,
                                 temb=temb, image_rotary_emb=freqs)
    (img_out.float().pow(2).mean() + txt_out.float().pow(2).mean()).backward()  # the graph is a real one
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)
    return activations / (side * side + text_tokens)


def measure(tokens: int = 512) -> dict:
    """Every number of the estimate, measured on this machine from the published configs."""
    models = build_on_meta()
    t = read_config(QWEN_IMAGE / "transformer" / "config.json")
    n_targets, lora = lora_size(models["transformer"])
    t0 = time.time()
    per_token = block_activation_bytes_per_token(t, tokens)
    return {
        "params": {name: count(m) for name, m in models.items()},
        "blocks": t["num_layers"], "width": t["num_attention_heads"] * t["attention_head_dim"],
        "lora_targets": n_targets, "lora_params_r32": lora, "block_bytes_per_token_fp32": per_token,
        "block_measure_seconds": time.time() - t0,
    }


def section(m: dict, side: int = 512, k: int = 24, rollout_steps: int = 6, text_tokens: int = 300,
            tflops: float = 60.0) -> str:
    """The README section from the measured numbers (one RL GPU, §5.1 settings)."""
    p = m["params"]
    latent = side // 8 // 2
    image_tokens = latent * latent
    seq = 2 * image_tokens + text_tokens  # target + condition + text tokens
    gb = 1e9
    lora_fp32 = 4 * m["lora_params_r32"] / gb
    weights = 2 * (p["transformer"] + p["text_encoder"] + p["vae"]) / gb + 2 * lora_fp32  # bf16 + 2 adapters
    act_bf16 = m["block_bytes_per_token_fp32"] / 2  # bf16 autocast keeps about half the bytes
    # with checkpointing: each block's input (seq x width, bf16) is kept, plus one block's saved tensors live
    act_sample_ckpt = (m["blocks"] * seq * m["width"] * 2 + seq * act_bf16) / gb
    act_sample_full = seq * act_bf16 * m["blocks"] / gb
    forward = 2 * p["transformer"] * seq  # FLOP of one transformer call on one sample
    rollout = k * rollout_steps * forward
    update = k * 5 * forward  # old forward + forward + backward (2x) + recompute
    step_s = (rollout + update) / (tflops * 1e12)
    lines = [
        f"Measured by `python estimate_scale.py` from the published configs in `configs/` (models built on the meta "
        "device; one MMDiT block at full width run on the CPU).", "",
        "| component | parameters |", "|---|---|",
        f"| Qwen-Image-Edit-2509 transformer ({m['blocks']} blocks, width {m['width']}) | {p['transformer'] / 1e9:.2f}B |",
        f"| text encoder (Qwen2.5-VL-7B) | {p['text_encoder'] / 1e9:.2f}B |",
        f"| VAE | {p['vae'] / 1e9:.3f}B |",
        f"| COMPASS (Qwen3-VL-8B-Instruct) | {p['compass'] / 1e9:.2f}B |", "",
        f"- **LoRA** (`backbone.LORA_TARGETS`): {m['lora_targets']} target projections found, rank 32 -> "
        f"{m['lora_params_r32'] / 1e6:.1f}M parameters per adapter; two adapters (trainable + old policy) in fp32 = "
        f"{2 * lora_fp32:.2f} GB, AdamW state {2 * lora_fp32:.2f} GB, gradients {lora_fp32:.2f} GB.",
        f"- **Weights per RL GPU**: transformer + text encoder + VAE in bf16 + the adapters = {weights:.1f} GB (one copy: "
        f"the old policy is the second adapter, the reference the adapters disabled; the text encoder, "
        f"{2 * p['text_encoder'] / gb:.1f} GB, can be offloaded after conditioning).",
        f"- **Activations**: one block keeps {m['block_bytes_per_token_fp32'] / 1e3:.0f} kB per token in fp32 for its "
        f"backward pass (measured), ~{act_bf16 / 1e3:.0f} kB in bf16. A {side}x{side} output is {image_tokens} target + "
        f"{image_tokens} condition + ~{text_tokens} text = {seq} tokens: {act_sample_full:.1f} GB per sample through all "
        f"blocks without gradient checkpointing, ~{act_sample_ckpt:.2f} GB with it (block inputs plus one block live).",
        f"- **Compute per RL step per GPU** (one LR, K={k}, {rollout_steps} rollout steps): one transformer call on one "
        f"sample = 2 x params x tokens = {forward / 1e12:.0f} TFLOP; rollouts {k} x {rollout_steps} calls = "
        f"{rollout / 1e15:.1f} PFLOP, update ~5 call-equivalents per kept sample = {update / 1e15:.1f} PFLOP: about "
        f"{step_s / 60:.0f} min per step at {tflops:.0f} TFLOP/s sustained.",
        f"- **Full SFT of the transformer** needs ~16 B/parameter (fp32 weights, gradients, two AdamW moments) = "
        f"{16 * p['transformer'] / gb:.0f} GB: `train_sft.py --fsdp` shards it over the GPUs.",
        f"- **COMPASS SFT** (full parameters, AdamW): {16 * p['compass'] / gb:.0f} GB of states, sharded by FSDP2.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="image tokens of the full-width block measurement")
    parser.add_argument("--json", default=None, help="also write the measured numbers to this file")
    args = parser.parse_args(argv)
    m = measure(args.tokens)
    print(section(m))
    if args.json:
        Path(args.json).write_text(json.dumps(m, indent=1))
    return m


if __name__ == "__main__":
    main()
