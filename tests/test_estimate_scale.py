"""The paper-scale models built from their published configs on the meta device, and fake-tensor memory."""

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


def test_fake_tensor_memory_counts_a_step_by_hand():
    """MeasuredFakeMode's bookkeeping on a two-layer MLP whose bytes are easy to count: weights, the saved
    activations of the forward, the gradients, AdamW's two moments; nothing is computed."""
    import torch

    from scale.fake import MeasuredFakeMode

    mode = MeasuredFakeMode()
    with mode:
        m = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
        weights = mode.live
        assert weights == 4 * (2 * 1024 * 4096 + 4096 + 1024)
        m(torch.randn(256, 1024)).pow(2).mean().backward()
        assert mode.live == 2 * weights  # + the gradients (the activations are freed)
        optimizer = torch.optim.AdamW(m.parameters())
        optimizer.step()
    assert mode.live >= 4 * weights  # weights + gradients + two moments
    assert mode.peak >= 4 * weights + 256 * 4096 * 4  # and, at the peak, at least the hidden activation
