"""The RealSR-R1 model: Lumina-mGPT (a Chameleon decoder) that writes text AND image tokens, and its VQ tokenizer.

Three doors on one code path (as every model of this project, README "Models"):

    a real checkpoint   --model Alpha-VLLM/Lumina-mGPT-7B-512 (or a PURE folder; model_type chameleon, loads into
                        transformers' Chameleon classes with only model.vqmodel.* missing) with --vq PATH: the
                        LlamaGen VQ (8x, 16,384 codes of 8 dims, L2-normalised; paper §3.2 "Tokenization") as a
                        JanusVQVAE folder (config.json + model.safetensors: transformers' JanusVQVAE has LlamaGen's
                        VQModel layout; convert the .pt once, this project never loads pickles)
    'tiny'              random weights from tiny configs of the same classes (tests)
    'mini-sft', 'mini'  the trained laptop presets (the cold start and the GRPO model, realsr_r1/mini/, rebuilt by
                        `python -m realsr_r1.build_mini`)
    a folder            what train_realsr_r1.py wrote (policy + tokenizer + realsr_r1.json naming its VQ)

Two things transformers does not do as RealSR-R1 needs (checked in transformers 5.23):

  * `ChameleonForConditionalGeneration.forward` sets every image-token logit to the lowest float (Chameleon was
    released without image generation) and has no switch: `RealSRR1ForCausalLM` computes
    lm_head(model(...).last_hidden_state) unmasked. Where image tokens may appear is decided by the layout
    (vlcot.constraint), not by the model.
  * `JanusVQVAE.encode` skips LlamaGen's L2 normalisation, its forward gives the encoder no gradient and its
    `decode` takes only one fixed square grid: `vq_encode`, `vq_decode` and `vq_loss` below are LlamaGen's
    quantiser in a few lines (cosine nearest code, straight-through gradient, any grid size).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import AddedToken
from transformers import AutoTokenizer, ChameleonConfig, JanusVQVAEConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonForConditionalGeneration,
)
from transformers.models.janus.modeling_janus import JanusVQVAE

from common import presets
from common.byte_tokenizer import build_byte_tokenizer
from common.training import (
    RunError,
    atomic_save_safetensors,
    atomic_write_text,
    find_checkpoint,
)
from evaluation.evaluate import bicubic_down
from realsr_r1 import vlcot as V

REAL_MODEL = "Alpha-VLLM/Lumina-mGPT-7B-512"
"""The paper's foundation (§3.2); a PURE checkpoint folder (the public code's start) loads the same way."""
REAL_GRID = 4
"""Lumina's size tokens count 32-px units: 4 codes of the 8x VQ (PURE's item processor)."""
MINI_DIR = Path(__file__).resolve().parent / "mini"
META_FILE = "realsr_r1.json"
REBUILD_MINI = "python -m realsr_r1.build_mini"

# ---- presets: sizes of the same classes ------------------------------------------------------------

TINY = {"policy": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        "vq": dict(base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, latent_channels=8,
                   num_embeddings=64)}
"""Tiny: a 2-layer Chameleon of width 32 and an 8x VQ of 64 codes, random weights (~0.3M parameters in all)."""
MINI = {"policy": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
        "vq": dict(base_channels=32, channel_multiplier=[1, 2, 2], num_res_blocks=1, latent_channels=32,
                   num_embeddings=1024)}
"""Mini: a 4-layer Chameleon of width 128 (1.5M with its ~2.4k-token vocabulary) and a 4x VQ in LlamaGen's layout with
1,024 codes of 8 dims (1.0M): 48 px HR -> 12x12 codes, 1/2 -> 6x6, 1/4 -> 3x3, the LR upscaled into the prompt 12x12.
Why 4x and not LlamaGen's 8x: the paper lowers the downsampling for fidelity (§3.2, 16x -> 8x); at 8x a 64 px crop
is 8x8 codes of 10 bits for 16x16 LR pixels, too few to keep the picture (an 8x pilot: 14.5 dB after 200 steps),
at 4x one code stands for one LR pixel."""
MINI_POSITION_STRIDE = 256
"""vlcot.Layout.position_stride of the mini presets: each image of the chain starts 256 positions after the previous
one (an image of 12x12 codes is 160 tokens, the texts between images stay under 96 with the build's --text-budget 64;
longer texts only make positions repeat; a --crop-size whose final image would not fit is refused by
train_realsr_r1.check_sizes). The first mini build used consecutive ids: its 4-layer policy never
learned to copy the LR into the final image (13 dB LR consistency, greedy codes included)."""
MAX_GRIDS = 64  # size tokens <reserved08800>..<reserved08864> in the tiny / mini vocabularies


# =====================================================================================================
# The policy: Chameleon without the image-token mask
# =====================================================================================================


class RealSRR1ForCausalLM(ChameleonForConditionalGeneration):
    """Lumina-mGPT as RealSR-R1 uses it: next-token logits over text AND image tokens.

    Same weights and names as ChameleonForConditionalGeneration (a Lumina-mGPT / PURE checkpoint loads
    unchanged); only the forward differs: the logits are lm_head(hidden) for every token, image tokens included.
    """

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, inputs_embeds=None,
                use_cache: bool | None = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, V) (the last `logits_to_keep` positions when > 0)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), past_key_values=out.past_key_values)


def build_tokenizer(num_codes: int, max_grids: int = MAX_GRIDS):
    """The tiny / mini vocabulary: the project's byte-level Qwen tokenizer with one token per word of the fixed
    texts (vlcot.vocabulary_texts), the 14 VLCoT tags as single tokens, Lumina's layout tokens and one
    "IMGIMG..Z" token per VQ code (Chameleon's naming). Deterministic: every process builds the same one."""
    tokenizer = build_byte_tokenizer(words_from=V.vocabulary_texts())
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in V.TAG_TOKENS])
    layout = [V.IMAGE_START, V.IMAGE_END, V.NEW_LINE] + [V.size_token(n) for n in range(max_grids + 1)]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in layout])
    tokenizer.add_tokens([AddedToken(V.image_token_name(k), special=True, normalized=False) for k in range(num_codes)])
    return tokenizer


def build_policy(tokenizer, sizes: dict, seed: int = 0, max_positions: int = 1024) -> RealSRR1ForCausalLM:
    """A Chameleon of the given sizes over `tokenizer`'s vocabulary, random weights drawn under `seed` (the
    caller's RNG untouched). Its own ChameleonVQVAE (encode-only, unused here) is the smallest one allowed."""
    config = ChameleonConfig(
        vocab_size=len(tokenizer), num_key_value_heads=sizes["num_attention_heads"], max_position_embeddings=max_positions,
        vocabulary_map=tokenizer.get_vocab(), rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        vq_config=dict(embed_dim=4, num_embeddings=4, latent_channels=4, base_channels=32, channel_multiplier=[1],
                       num_res_blocks=1, attn_resolutions=[]),
        **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RealSRR1ForCausalLM(config).eval()


def policy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a policy checkpoint holds: all but Chameleon's unused encode-only VQ (`model.vqmodel.*`,
    which Lumina-mGPT checkpoints do not have either)."""
    return {k: v for k, v in model.state_dict().items() if not is_unused(k)}


def is_unused(name: str) -> bool:
    return ".vqmodel." in f".{name}"


# =====================================================================================================
# The VQ tokenizer (LlamaGen's VQModel in transformers' JanusVQVAE layout)
# =====================================================================================================


def build_vq(sizes: dict, seed: int = 0) -> JanusVQVAE:
    """A JanusVQVAE (= LlamaGen VQModel) with `sizes` (8 dims per code, LlamaGen's), random weights under `seed`."""
    config = JanusVQVAEConfig(embed_dim=8, num_patches=8, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return JanusVQVAE(config).eval()


def vq_downsample(vq: JanusVQVAE) -> int:
    """Pixels per code side: 2^(levels - 1) (8 for LlamaGen's [1, 2, 2, 4] and the tiny VQ, 4 for the mini's)."""
    return 2 ** (len(vq.config.channel_multiplier) - 1)


def vq_latents(vq: JanusVQVAE, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1] -> L2-normalised latents (B, D, H/8, W/8) (LlamaGen normalises both the
    latents and the codebook, so the nearest code is the one of largest cosine)."""
    return F.normalize(vq.quant_conv(vq.encoder(images * 2 - 1)), dim=1)


def vq_codebook(vq: JanusVQVAE) -> torch.Tensor:
    """(K, D) unit code vectors."""
    return F.normalize(vq.quantize.embedding.weight, dim=1)


def nearest_codes(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """z (B, D, h, w) unit vectors, codebook (K, D) -> codes (B, h, w) of largest cosine."""
    return torch.einsum("bdhw,kd->bkhw", z, codebook).argmax(1)


@torch.no_grad()
def vq_encode(vq: JanusVQVAE, images: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1], H and W multiples of the downsampling -> codes (B, H/8, W/8) long."""
    return nearest_codes(vq_latents(vq, images), vq_codebook(vq))


def decode_latents(vq: JanusVQVAE, zq: torch.Tensor) -> torch.Tensor:
    """Quantised latents (B, D, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (unclamped: the training target)."""
    return vq.decoder(vq.post_quant_conv(zq))


def vq_decode(vq: JanusVQVAE, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, h, w) of ANY grid -> images (B, 3, 8h, 8w) in [0, 1]."""
    zq = vq_codebook(vq)[codes].permute(0, 3, 1, 2)  # (B, D, h, w)
    return ((decode_latents(vq, zq) + 1) / 2).clamp(0, 1)


def vq_loss(vq: JanusVQVAE, images: torch.Tensor, beta: float = 0.25, lr_weight: float = 0.0,
            scale: int = 4) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """LlamaGen's VQ objective on a batch (B, 3, H, W) in [0, 1] (without its LPIPS and GAN terms, which need
    downloaded weights): L2 reconstruction through the straight-through estimator z + sg(e - z), codebook
    ||sg(z) - e||^2 and commitment beta ||z - sg(e)||^2 on the unit vectors. Returns (loss, stats, codes).

    `lr_weight` > 0 adds lr_weight x the L2 between the reconstruction and the image both downscaled by `scale`
    (`evaluate.bicubic_down`, the LR-consistency check's downscale): not LlamaGen's; the mini VQ uses it because an SR
    chain's final image can keep its LR only as well as the tokenizer's round trip keeps the low frequencies, which
    a small VQ trained briefly on a CPU otherwise learns last (stats["lr_psnr"] reports that round trip)."""
    z = vq_latents(vq, images)
    book = vq_codebook(vq)
    codes = nearest_codes(z.detach(), book.detach())
    e = book[codes].permute(0, 3, 1, 2)
    zq = z + (e - z).detach()  # straight-through: the decoder's gradient reaches the encoder
    recon = decode_latents(vq, zq)
    rec = (recon - (images * 2 - 1)).pow(2).mean()  # LlamaGen's default reconstruction loss: l2
    codebook = (e - z.detach()).pow(2).mean()
    commit = (e.detach() - z).pow(2).mean()
    size = (images.shape[-2] // scale, images.shape[-1] // scale)
    low = (bicubic_down(recon, size) - bicubic_down(images * 2 - 1, size)).pow(2).mean()
    loss = rec + codebook + beta * commit + lr_weight * low
    with torch.no_grad():
        mse = ((recon.clamp(-1, 1) + 1) / 2 - images).pow(2).mean()
    stats = {"l2": float(rec.detach()), "codebook": float(codebook.detach()), "commit": float(commit.detach()),
             "psnr": float(10 * torch.log10(1 / mse.clamp_min(1e-10))),
             "lr_psnr": float(10 * torch.log10(4 / low.detach().clamp_min(1e-10)))}  # [-1, 1] units: peak 2
    return loss, stats, codes


# =====================================================================================================
# Doors: tiny / mini / folder / real checkpoint
# =====================================================================================================


@dataclass
class Policy:
    """A RealSR-R1 model ready to use: the Chameleon, its tokenizer, the layout ids, its VQ and its settings."""

    model: RealSRR1ForCausalLM
    tokenizer: object
    layout: V.Layout
    vq: JanusVQVAE
    meta: dict  # {"grid", "num_codes", "downsample", "lr_size", "vq"}

    @property
    def downsample(self) -> int:
        return vq_downsample(self.vq)


def tiny_policy(seed: int = 0) -> Policy:
    """The tiny preset: random Chameleon + random VQ (64 codes)."""
    tokenizer = build_tokenizer(TINY["vq"]["num_embeddings"])
    model = build_policy(tokenizer, TINY["policy"], seed)
    vq = build_vq(TINY["vq"], seed)
    meta = {"grid": 1, "num_codes": TINY["vq"]["num_embeddings"], "lr_size": "own", "vq": "tiny"}
    return Policy(model, tokenizer, V.Layout.from_tokenizer(tokenizer, meta["num_codes"], MAX_GRIDS), vq, meta)


def load_vq(name: str, device: str | torch.device = "cpu") -> JanusVQVAE:
    """'tiny', 'mini' (realsr_r1/mini/vq) or a JanusVQVAE folder (config.json + model.safetensors)."""
    if name == "tiny":
        return build_vq(TINY["vq"]).to(device)
    folder = MINI_DIR / "vq" if name == "mini" else Path(name)
    if name == "mini":
        presets.checked_model_folder(folder, "RealSR-R1 mini VQ", REBUILD_MINI + " --stage vq")
    if not (folder / "config.json").is_file():
        raise RunError(f"--vq {name}: no VQ folder there (config.json + model.safetensors of a JanusVQVAE, e.g. "
                       f"LlamaGen's vq_ds8_c2i converted to safetensors), nor 'tiny' / 'mini'")
    vq = JanusVQVAE(JanusVQVAEConfig.from_pretrained(str(folder)))
    vq.load_state_dict(load_file(str(folder / "model.safetensors")))  # strict: every weight of the VQ
    return vq.to(device).eval()


def save_vq(vq: JanusVQVAE, folder: str | Path) -> Path:
    """A VQ folder `load_vq` reads: config.json + model.safetensors."""
    folder = Path(folder)
    vq.config.save_pretrained(str(folder))
    atomic_save_safetensors(vq.state_dict(), folder / "model.safetensors")
    return folder


def mini_folder(name: str) -> Path:
    """The checked folder of a mini preset ('mini-sft' = the cold start, 'mini' = after VLCoT-GRPO)."""
    folder = MINI_DIR / ("sft" if name == "mini-sft" else "grpo")
    stage = "sft" if name == "mini-sft" else "grpo"
    presets.check_files([folder / META_FILE], f"RealSR-R1 {name} preset", f"{REBUILD_MINI} --stage {stage}")
    return presets.checked_model_folder(folder, f"RealSR-R1 {name} preset", f"{REBUILD_MINI} --stage {stage}")


def load_policy(name: str, vq: str = "", tokenizer: str = "", device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Policy:
    """Open one door (module docstring). `vq` overrides the policy's own VQ (required for a real checkpoint),
    `tokenizer` names the text tokenizer of a real checkpoint when its folder has none."""
    if name == "tiny":
        policy = tiny_policy()
        if vq:
            policy.vq, policy.meta["vq"] = load_vq(vq), absolute_vq_name(vq)
        policy.model.to(device=device, dtype=dtype)
        policy.vq.to(device)
        return policy
    folder = mini_folder(name) if name in ("mini", "mini-sft") else None
    if folder is None and (Path(name) / META_FILE).is_file():
        folder = Path(name)
    if folder is not None:  # a folder this project wrote: everything named in its realsr_r1.json
        meta = json.loads((folder / META_FILE).read_text())
        tok = AutoTokenizer.from_pretrained(str(folder))
        model = read_policy_folder(folder, dtype)
        # in memory the VQ is named absolutely ('tiny', 'mini' or a path); on disk relative to the folder
        meta["vq"] = absolute_vq_name(vq) if vq else (meta["vq"] if meta["vq"] in ("tiny", "mini") else str((folder / meta["vq"]).resolve()))
        vq_model = load_vq(meta["vq"])
        layout = V.Layout.from_tokenizer(tok, meta["num_codes"], MAX_GRIDS, meta["grid"],
                                         meta.get("position_stride", 0))
        return Policy(model.to(device), tok, layout, vq_model.to(device), meta)
    return load_real(name, vq, tokenizer, device, dtype)


def absolute_vq_name(vq: str) -> str:
    """'tiny' / 'mini' as they are, a folder as an absolute path."""
    return vq if vq in ("tiny", "mini") else str(Path(vq).resolve())


def read_policy_folder(folder: Path, dtype: torch.dtype) -> RealSRR1ForCausalLM:
    """A policy folder written by `save_policy`: its config, then its safetensors (only model.vqmodel.* may be
    missing)."""
    model = RealSRR1ForCausalLM(ChameleonConfig.from_pretrained(str(folder)))
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
    if unexpected or any(not is_unused(k) for k in missing):
        raise RunError(f"{folder}/model.safetensors does not fit its config.json (missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}); rebuild it")
    return model.to(dtype).eval()


def quiet_from_pretrained(path: str, dtype: torch.dtype, **kwargs) -> RealSRR1ForCausalLM:
    """from_pretrained without the warning that model.vqmodel.* is missing (it is unused, and absent from
    Lumina-mGPT checkpoints)."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return RealSRR1ForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    finally:
        logger.setLevel(level)


def load_real(name: str, vq: str, tokenizer: str, device, dtype) -> Policy:
    """A Lumina-mGPT / PURE checkpoint + the LlamaGen VQ. When the tokenizer has fewer image tokens than the VQ
    has codes (Lumina-mGPT: 8,192 for its own VQ), the missing "IMGIMG" tokens are added and the embeddings
    resized, as the paper grows the vocabulary to 73,728 for LlamaGen's 16,384 codes (§3.2 "Tokenization")."""
    path = find_checkpoint(name, "--model", REAL_MODEL)
    if not vq:
        raise RunError("--vq: a real checkpoint needs the LlamaGen VQ (8x, 16,384 codes) as a JanusVQVAE folder")
    vq_model = load_vq(vq, device)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or path)
    except (OSError, ValueError) as err:
        raise RunError(f"--tokenizer {tokenizer or path}: no text tokenizer there ({type(err).__name__}); pass "
                       f"Lumina-mGPT's tokenizer folder with --tokenizer") from None
    num_codes = vq_model.config.num_embeddings
    names = [V.image_token_name(k) for k in range(num_codes)]
    missing = [n for n in names if n not in tok.get_vocab()]
    if missing:
        tok.add_tokens([AddedToken(n, special=True, normalized=False) for n in missing])
    config = ChameleonConfig.from_pretrained(path)
    config.vocabulary_map = tok.get_vocab()
    model = quiet_from_pretrained(path, dtype, config=config)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok))
    meta = {"grid": REAL_GRID, "num_codes": num_codes, "lr_size": "own", "vq": absolute_vq_name(vq)}
    layout = V.Layout.from_tokenizer(tok, num_codes, MAX_GRIDS, REAL_GRID)
    return Policy(model.to(device), tok, layout, vq_model, meta)


def save_policy(policy: Policy, folder: str | Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a policy folder: config.json + model.safetensors (without the unused model.vqmodel.*), the
    tokenizer, and realsr_r1.json whose "vq" names the VQ folder relative to this one (not copied: the mini
    presets share one VQ)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = policy_weights(policy.model) if weights is None else {k: v for k, v in weights.items() if not is_unused(k)}
    policy.model.config.save_pretrained(str(folder))
    atomic_save_safetensors(weights, folder / "model.safetensors")
    policy.tokenizer.save_pretrained(str(folder))
    meta = dict(policy.meta, vq=vq_reference(policy.meta["vq"], folder))
    atomic_write_text(json.dumps(meta, indent=1), folder / META_FILE)
    return folder


def vq_reference(vq_folder: str | Path, policy_folder: str | Path) -> str:
    """How a policy folder names its VQ: relative when both live side by side (the mini presets), else absolute."""
    if str(vq_folder) == "tiny":
        return "tiny"
    vq_folder = MINI_DIR / "vq" if str(vq_folder) == "mini" else vq_folder
    return os.path.relpath(Path(vq_folder).resolve(), Path(policy_folder).resolve())
