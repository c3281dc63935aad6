"""The paper-scale models built from their published configs on the meta device (estimate_scale.py)."""

import pytest

from scale import estimate as E


@pytest.fixture(scope="module")
def models():
    return E.build_on_meta()


def test_published_configs_give_the_known_parameter_counts(models):
    counts = {name: E.count(m) for name, m in models.items()}
    # Qwen-Image is a "20B" MMDiT; its text encoder is Qwen2.5-VL-7B (8.29B with its vision tower and
    # untied head); Qwen3-VL-8B-Instruct has 8.77B (model card)
    assert counts["transformer"] == pytest.approx(20.43e9, rel=2e-3)
    assert counts["text_encoder"] == pytest.approx(8.29e9, rel=2e-3)
    assert counts["compass"] == pytest.approx(8.77e9, rel=2e-3)
    assert 0.1e9 < counts["vae"] < 0.15e9
    assert all(p.is_meta for m in models.values() for p in m.parameters())  # nothing was allocated


def test_lora_targets_and_size_at_rank_32(models):
    n, size = E.lora_size(models["transformer"], rank=32)
    # 60 blocks x 8 attention projections (q, k, v, out of the image stream and of the text stream),
    # all 3072 -> 3072: 32 x (3072 + 3072) parameters each
    assert n == 60 * 8
    assert size == 60 * 8 * 32 * (3072 + 3072)


@pytest.mark.slow
def test_full_width_block_activation_memory_per_token():
    config = E.read_config(E.QWEN_IMAGE / "transformer" / "config.json")
    per_token = E.block_activation_bytes_per_token(config, tokens=64, text_tokens=16)
    width = 3072
    # at least the MLP's 4x-wide hidden state (GELU input and output) of both streams in fp32, and far below
    # what a whole block's parameters would be if they were (wrongly) counted
    assert 2 * 4 * width * 4 < per_token < 2e6
    section = E.section({"params": {k: 1e9 for k in ("transformer", "text_encoder", "vae", "compass")},
                         "blocks": 60, "width": width, "lora_targets": 480, "lora_params_r32": 94371840,
                         "block_bytes_per_token_fp32": per_token})
    assert "2348 tokens" in section and "94.4M parameters" in section
