"""Backbone: tiny preset determinism, reproduction of the stock pipeline, packing, schedule, LoRA I/O."""

import numpy as np
import pytest
import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as stock

from common import backbone as B
from common import training as T


@pytest.fixture(scope="module")
def bb():
    return B.load_backbone("tiny")


def _image(h=64, w=48, seed=0):
    """An 8-bit image (so PIL and tensor views of it are identical) as a (3,h,w) tensor in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).float() / 255


def test_tiny_preset_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = B.build_tiny_components()
    after = torch.rand(1)
    b = B.build_tiny_components()
    assert torch.equal(before, after)  # the preset forks the RNG
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    c = B.build_tiny_components(seed=1)
    assert not torch.equal(next(a["transformer"].parameters()), next(c["transformer"].parameters()))


def test_save_and_from_pretrained_round_trip(bb, tmp_path):
    B.save_backbone(bb, tmp_path / "pipe")
    loaded = B.load_backbone(str(tmp_path / "pipe"))
    assert loaded.prompt_drop_idx == bb.prompt_drop_idx
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = getattr(bb, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    lr = _image(16, 16)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    # identical weights; float summation order may differ in the last bit between module instances
    assert torch.allclose(B.super_resolve(bb, lr, 3, generator=g1), B.super_resolve(loaded, lr, 3, generator=g2),
                          atol=1e-5)


def test_missing_model_folder_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(T.RunError, match="model_index.json"):
        B.load_backbone(str(tmp_path / "empty"))
    # a checkpoint that is neither on disk nor downloadable (offline): one line naming the flag and the way out
    with pytest.raises(T.RunError, match=r"--model Qwen/No-Such-Model: no such folder, and not in the local.*--model mini"):
        B.load_backbone("Qwen/No-Such-Model")
    with pytest.raises(T.RunError, match=r"--model \./nowhere: no such folder"):
        B.load_backbone("./nowhere")


def test_pack_unpack_round_trip_and_layout():
    x = torch.randn(2, 16, 1, 6, 8)
    packed = B.pack_latents(x)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(B.unpack_latents(packed, 6, 8), x)
    # token 0 holds the top-left 2x2 patch of every channel, channel-major
    assert torch.equal(packed[0, 0, :4], x[0, 0, 0, :2, :2].reshape(-1))
    # the pipeline's own static methods agree
    assert torch.equal(packed, stock.QwenImageEditPlusPipeline._pack_latents(x[:, :, 0], 2, 16, 6, 8))


def test_sigma_schedule_equals_scheduler_and_shift(bb):
    n, tokens = 6, 256
    sig = B.sigma_schedule(bb.scheduler, n, tokens)
    assert sig.shape == (n + 1,)
    assert sig[0] == pytest.approx(1.0) and sig[-1] == 0 and sig[-2] == pytest.approx(0.02)
    assert torch.all(sig[1:] < sig[:-1])
    # hand computation: mu at base_image_seq_len is base_shift; exponential shift then terminal stretch
    mu = 0.5
    s = np.linspace(1.0, 1 / n, n)
    shifted = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
    one_minus = 1 - shifted
    stretched = 1 - one_minus / (one_minus[-1] / (1 - 0.02))
    assert np.allclose(sig[:-1].numpy(), stretched, atol=1e-6)


def test_prompt_embedding_matches_stock_encoder(bb):
    """Without mm_token_type_ids our encoding equals the pipeline's; with it (M-RoPE) it differs."""
    pipe = bb.pipeline()
    view = B.vl_view(_image(64, 64))
    ours, mask = B.encode_prompt(bb, view, "make it sharp", pass_mm_token_type_ids=False)
    theirs, their_mask = pipe.encode_prompt(prompt="make it sharp", image=[view], device="cpu")
    assert mask is None and their_mask is None  # no padding: no mask, as the pipeline (the flash kernel stays usable)
    assert torch.allclose(ours, theirs, atol=1e-6)
    mrope, _ = B.encode_prompt(bb, view, "make it sharp", pass_mm_token_type_ids=True)
    assert mrope.shape == ours.shape and not torch.allclose(mrope, ours, atol=1e-6)


def test_sampler_reproduces_stock_pipeline(bb, monkeypatch):
    """Same condition, same noise, same steps: our batched Euler sampler == QwenImageEditPlusPipeline."""
    img = _image(32, 64)  # the (already upscaled) edit input; sides multiples of 32 as the pipeline rounds
    h, w = img.shape[-2:]
    cond = B.encode_condition_image(bb, img, "sharpen")
    noise = B.initial_noise(cond, 2, torch.Generator().manual_seed(3))
    sigmas = B.sigma_schedule(bb.scheduler, 5, cond.num_tokens)
    ours = B.sample(bb.transformer, cond, noise, sigmas)
    ours_img = B.decode(bb, ours, cond)

    # the pipeline resizes its VAE input to ~1 MP: make that area our output size
    monkeypatch.setattr(stock, "VAE_IMAGE_SIZE", h * w)
    pipe = bb.pipeline()
    out = pipe(image=B.to_pil(img), prompt_embeds=cond.prompt_embeds, prompt_embeds_mask=cond.prompt_mask,
               latents=noise, height=h, width=w, num_inference_steps=5, num_images_per_prompt=2,
               output_type="latent").images
    assert torch.allclose(ours, out, atol=1e-5), (ours - out).abs().max()
    theirs_img = pipe(image=B.to_pil(img), prompt_embeds=cond.prompt_embeds, prompt_embeds_mask=cond.prompt_mask,
                      latents=noise, height=h, width=w, num_inference_steps=5, num_images_per_prompt=2,
                      output_type="pt").images
    assert torch.allclose(ours_img, theirs_img, atol=1e-5)


def test_batched_sampling_equals_one_by_one(bb):
    cond = B.encode_condition(bb, _image(16, 16))
    noise = B.initial_noise(cond, 3, torch.Generator().manual_seed(0))
    sigmas = B.sigma_schedule(bb.scheduler, 4, cond.num_tokens)
    batched = B.sample(bb.transformer, cond, noise, sigmas)
    single = torch.cat([B.sample(bb.transformer, cond, noise[i:i + 1], sigmas) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # different noise, different samples


def test_condition_rejects_sizes_not_multiple_of_16(bb):
    with pytest.raises(ValueError, match="multiple of 16"):
        B.encode_condition_image(bb, _image(40, 48))


def _perturbed_lora(bb, seed=0, scale=0.05):
    """A rank-4 LoRA on `bb`'s transformer whose B matrices are random (peft starts them at zero, a no-op)."""
    B.add_lora(bb.transformer, rank=4, alpha=8, adapter_name="default")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft initialises B to zero: perturb it so the LoRA does something
        for name, p in bb.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_lora_file_loads_in_stock_pipeline_and_merges(tmp_path):
    bb = B.load_backbone("tiny")
    img = _image(32, 32)
    pipe_args = dict(image=B.to_pil(img), prompt="x", height=32, width=32, num_inference_steps=2,
                     output_type="latent")

    def run(pipe):
        return pipe(**pipe_args, generator=torch.Generator().manual_seed(0)).images

    base_out = run(bb.pipeline())
    _perturbed_lora(bb)
    lora_out = run(bb.pipeline())
    path = B.save_lora(bb.transformer, tmp_path / "lora.safetensors")

    # 1. the file has the pipeline's key format and the LoRA config in its metadata
    weights, config = B.read_lora_file(path)
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in weights)

    # 2. the stock pipeline's load_lora_weights accepts it and reproduces the adapter's output
    fresh = B.load_backbone("tiny")
    pipe = fresh.pipeline()
    assert torch.allclose(run(pipe), base_out)
    pipe.load_lora_weights(str(path))
    loaded_out = run(pipe)
    assert not torch.allclose(loaded_out, base_out, atol=1e-4)
    assert torch.allclose(loaded_out, lora_out, atol=1e-5)

    # 3. load_lora into a peft adapter equals the saved adapter
    again = B.load_backbone("tiny")
    B.load_lora(again.transformer, path, adapter_name="default")
    reloaded = B.lora_state_dict(again.transformer)
    original = B.lora_state_dict(bb.transformer)
    assert reloaded.keys() == original.keys()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)

    # 4. merged weights equal the unmerged adapter within 1e-5
    merged = B.load_backbone("tiny")
    B.merge_lora_files(merged.transformer, [(path, 1.0)])
    assert torch.allclose(run(merged.pipeline()), lora_out, atol=1e-5)

    # 5. the merge formula by hand on one module: W + (alpha/r) * B A
    key = "transformer_blocks.0.attn.to_q"
    w0 = B.load_backbone("tiny").transformer.state_dict()[f"{key}.weight"]
    expected = w0 + 2.0 * weights[f"{key}.lora_B.weight"] @ weights[f"{key}.lora_A.weight"]
    assert torch.allclose(merged.transformer.state_dict()[f"{key}.weight"], expected, atol=1e-6)


def test_lora_file_that_matches_nothing_is_rejected(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.q.lora_A.weight": torch.zeros(4, 8),
               "transformer.blocks.0.q.lora_B.weight": torch.zeros(8, 4)}, str(bad))
    bb = B.load_backbone("tiny")
    with pytest.raises(T.RunError, match="other.safetensors.*do not exist"):
        B.merge_lora_files(bb.transformer, [(bad, 1.0)])
    peft_style = tmp_path / "adapter_model.safetensors"
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(4, 8)}, str(peft_style))
    with pytest.raises(T.RunError, match="not a pipeline-format LoRA"):
        B.load_lora(bb.transformer, peft_style)
    with pytest.raises(T.RunError, match="nope.safetensors"):
        B.read_lora_file(tmp_path / "nope.safetensors")


def test_sigma_schedule_rejects_one_step(bb):
    with pytest.raises(ValueError, match="at least 2 steps"):
        B.sigma_schedule(bb.scheduler, 1, 64)
