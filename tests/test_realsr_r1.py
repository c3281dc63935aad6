"""RealSR-R1: the rewards against hand-worked cases, the image layout and constrained decoding, the unmasked
Chameleon, the VQ, a planted reward learned by GRPO, exact resume, torchrun with 2 processes, bad input."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonForConditionalGeneration,
)

from common import training as T
from mini import serving
from realsr_r1 import model as M
from realsr_r1 import train_realsr_r1 as R
from realsr_r1 import vlcot as V

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("test_realsr_r1")


@pytest.fixture(scope="module")
def tiny():
    return M.tiny_policy()


def chain(images: bool = True, order=V.TAGS, image=V.IMAGE_MARK) -> str:
    """A rendered completion with the given tag order; text fields filled, image fields holding `image`."""
    fills = {"degradation": "light blur, heavy noise, medium compression", "rough_understand": "cup and table",
             "middle_understand": "a red cup", "final_understand": "brown foam"}
    return "".join(f"<{t}>{image if t in V.IMAGE_TAGS else fills[t]}</{t}>" for t in order)


# ---------------------------------------------------------------------------------------------------
# the rewards, hand-worked
# ---------------------------------------------------------------------------------------------------


def test_format_reward():
    assert V.format_reward(chain()) == 1.0
    assert V.format_reward(" \n" + chain().replace("><", ">\n<") + "\n") == 1.0  # whitespace between the steps
    swapped = list(V.TAGS)
    swapped[1], swapped[0] = swapped[0], swapped[1]
    assert V.format_reward(chain(order=swapped)) == 0.0  # tags out of order
    assert V.format_reward(chain(order=V.TAGS[:-1])) == 0.0  # the final image missing
    assert V.format_reward(chain(image=V.BROKEN_MARK)) == 0.0  # an image cut short
    assert V.format_reward(chain(image=V.IMAGE_MARK * 2)) == 0.0  # two images in one tag
    assert V.format_reward(chain(image="")) == 0.0  # an image tag without image
    assert V.format_reward(chain() + "<degradation>x</degradation>") == 0.0  # a step twice
    assert V.format_reward(chain() + " trailing words") == 0.0
    assert V.format_reward(chain().replace("cup and table", "cup " + V.IMAGE_MARK)) == 0.0  # image in a text field
    assert V.format_reward(chain().replace("</middle_understand>", "")) == 0.0  # an unclosed tag


def test_degradation_reward_and_levels():
    truth = {"blur": "light", "noise": "heavy", "compression": "medium"}
    assert V.degradation_reward(chain(), truth) == 1.0
    text = "<degradation>light blur, medium noise, medium compression</degradation>"
    assert V.degradation_reward(text, truth) == pytest.approx(2 / 3)
    assert V.degradation_hits(text, truth) == {"blur": True, "noise": False, "compression": True}
    assert V.degradation_hits("light blur", truth) == {"blur": False, "noise": False, "compression": False}
    assert V.degradation_reward("<degradation>Heavy noise</degradation>", truth) == pytest.approx(1 / 3)
    assert V.degradation_reward("<degradation>heavy noise, light noise</degradation>", truth) == pytest.approx(1 / 3)
    assert V.degradation_reward("light blur, heavy noise", truth) == 0.0  # no degradation field
    assert V.degradation_reward("<degradation></degradation>", truth) == 0.0
    # three equal intervals of each range (paper §3.2); JPEG: a LOW quality is heavy
    assert [V.level_of(x, 0.0, 12.0) for x in (0.0, 3.9, 4.1, 7.9, 8.1, 12.0)] == \
        ["light", "light", "medium", "medium", "heavy", "heavy"]
    assert [V.level_of(q, 50.0, 95.0, heavier_when_low=True) for q in (95, 81, 79, 50)] == \
        ["light", "light", "medium", "heavy"]
    params = {"blur_sigma": 2.3, "noise_sigma": 1.0, "jpeg_quality": 70}
    levels = V.degradation_levels(params, V.DEGRADATION_PRESETS["mini"])
    assert levels == {"blur": "heavy", "noise": "light", "compression": "medium"}
    assert V.degradation_text(levels) == "heavy blur, light noise, medium compression"


def test_understanding_reward():
    objects = ("cup", "saucer", "table")
    assert V.understanding_reward("<rough_understand>Cups and a table</rough_understand>", objects) == \
        pytest.approx(2 / 3)  # any case, plurals count
    assert V.understanding_reward("<rough_understand>a cupboard</rough_understand>", objects) == 0.0  # whole words
    assert V.understanding_reward("<rough_understand>cup, saucer and table</rough_understand>", objects) == 1.0
    assert V.understanding_reward("<middle_understand>cup</middle_understand>", objects) == 0.0  # coarse only
    assert V.understanding_reward("<rough_understand>cup</rough_understand>", ()) == 0.0
    assert V.ORACLE["coffee"].coarse == "cup, saucer and table"


def test_judge_answer_parsing():
    text = "Image 1: quality 8, realism 6, consistency 10\nImage 2: quality 4\nimage 3 : Quality: 2 realism 2 consistency 2"
    scores = V.parse_judge_scores(text, 3)
    assert scores[0] == pytest.approx(0.8) and math.isnan(scores[1]) and scores[2] == pytest.approx(0.2)
    assert R.fill_missing(scores)[1] == pytest.approx(0.5)


def test_recorded_degradation_is_a_function_of_its_parameters():
    hr = torch.rand(2, 3, 32, 32)
    params = [{"blur_sigma": 0.5, "noise_sigma": 0.0, "jpeg_quality": 95},
              {"blur_sigma": 2.0, "noise_sigma": 10.0, "jpeg_quality": 50}]
    a = V.apply_degradation(hr, params, torch.Generator().manual_seed(1))
    b = V.apply_degradation(hr, params, torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    drawn = [V.sample_degradation(g, V.DEGRADATION_PRESETS["mini"]) for _ in range(200)]
    assert all(0.2 <= p["blur_sigma"] <= 2.4 and 50 <= p["jpeg_quality"] <= 95 for p in drawn)


# ---------------------------------------------------------------------------------------------------
# layout, completions, decoding
# ---------------------------------------------------------------------------------------------------


def test_augment_kinds_hand_worked():
    """vlcot.augment: each kind's effect on a crop whose pixels are all different, the share it changes, and no draw
    from the generator without kinds (runs without --augment stay identical)."""
    hr = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    assert V.augment(hr, (), 1.0, g) is hr and torch.equal(g.get_state(), state)
    assert V.augment(hr, ("grey",), 0.0, g) is hr
    grey = V.augment(hr, ("grey",), 1.0, g)
    assert torch.allclose(grey, hr.mean(0).expand(3, -1, -1))
    turned = V.augment(hr, ("rotate",), 1.0, g)
    assert turned.shape == hr.shape and not torch.equal(turned, hr)
    assert any(torch.equal(turned, torch.rot90(hr, k, (-2, -1))) for k in (1, 2, 3))
    for _ in range(5):
        recoloured = V.augment(hr * 0.5, ("colour",), 1.0, g)  # x 0.5: no gain clips
        ratio = recoloured[:, None] / (hr[None] * 0.5)  # (out channel, in channel, H, W)
        matched = [[bool(torch.allclose(ratio[o, i], ratio[o, i].flatten()[0].expand_as(ratio[o, i])))
                    for i in range(3)] for o in range(3)]
        source = [row.index(True) for row in matched]  # each output channel is one input channel times a gain
        assert sorted(source) == [0, 1, 2]
        gains = [float(ratio[o, source[o], 0, 0]) for o in range(3)]
        assert all(0.8 <= x <= 1.2 for x in gains)
    changed = sum(not torch.equal(V.augment(hr, ("grey",), 0.3, g), hr) for _ in range(1000))
    assert 240 <= changed <= 360
    with pytest.raises(ValueError, match="'blur'"):
        V.augment(hr, ("blur",), 1.0, g)


def test_augmented_examples_keep_their_texts_and_recorded_degradation():
    """draw_examples with --augment: the same photographs, ORACLE captions and recorded levels as without it (the
    augmentation draws after them), only the crops (hence their LRs) differ; without it, the same generator gives the
    same LRs."""
    ranges = V.DEGRADATION_PRESETS["mini"]
    draw = lambda *aug: R.draw_examples(("chelsea", "coffee"), 6, 48, 4, ranges,  # noqa: E731
                                        torch.Generator().manual_seed(3), *aug)
    plain, again, augmented = draw(), draw(), draw(("grey",), 1.0)
    assert all(torch.equal(a.lr, b.lr) for a, b in zip(plain, again))
    assert [(e.photo, e.caption, e.levels) for e in augmented] == [(e.photo, e.caption, e.levels) for e in plain]
    assert all(torch.equal(a.hr, b.hr.mean(0).expand(3, -1, -1)) for a, b in zip(augmented, plain))


def test_image_layout_round_trip_and_breaks(tiny):
    layout = tiny.layout
    codes = torch.randint(64, (2, 3))
    ids = V.image_tokens(codes, layout)
    assert len(ids) == V.image_length(2, 3) and ids[0] == layout.image_start and ids[-1] == layout.image_end
    assert ids[3 + 3] == layout.new_line and ids[3 + 7] == layout.new_line  # each row of 3 codes + end of line
    assert torch.equal(V.read_image(ids, layout), codes)
    assert V.read_image(ids[:-3] + [layout.image_end], layout) is None  # a row cut short
    assert V.read_image(ids[:5], layout) is None  # cut short, no <eoss>
    bad = list(ids)
    bad[4] = tiny.tokenizer.encode("a", add_special_tokens=False)[0]  # a text token inside
    assert V.read_image(bad, layout) is None


def test_split_render_and_tagged_images(tiny):
    layout, tok = tiny.layout, tiny.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    dec = lambda ids: tok.decode(ids)  # noqa: E731
    a, b = torch.randint(64, (1, 1)), torch.randint(64, (2, 2))
    ids = enc("<rough_image>") + V.image_tokens(a, layout) + enc("</rough_image><final_image>") + \
        V.image_tokens(b, layout) + enc("</final_image>") + [layout.eos] + enc("after the end")
    segments = V.split_completion(ids, layout)
    assert [s.kind for s in segments] == ["text", "image", "text", "image", "text"]
    assert V.render(segments, dec) == f"<rough_image>{V.IMAGE_MARK}</rough_image><final_image>{V.IMAGE_MARK}</final_image>"
    images = V.tagged_images(segments, dec)
    assert torch.equal(images["rough_image"], a) and torch.equal(images["final_image"], b)
    assert images["middle_image"] is None
    cut = enc("<final_image>") + V.image_tokens(b, layout)[:-4]  # the final image cut short: broken, not decoded
    segments = V.split_completion(cut, layout)
    assert V.render(segments, dec) == f"<final_image>{V.BROKEN_MARK}" and \
        V.tagged_images(segments, dec)["final_image"] is None


def test_unmasked_forward_scores_image_tokens(tiny):
    ids = torch.tensor([tiny.tokenizer.encode("restore the image", add_special_tokens=False)])
    stock = ChameleonForConditionalGeneration(tiny.model.config)
    stock.load_state_dict(tiny.model.state_dict())
    codes = list(tiny.layout.code_ids)
    masked = stock(input_ids=ids).logits[0, -1, codes]
    unmasked = tiny.model(input_ids=ids).logits[0, -1]
    assert (masked == torch.finfo(masked.dtype).min).all()  # transformers: image tokens never generated
    assert torch.isfinite(unmasked).all()
    assert torch.allclose(unmasked[:5], stock(input_ids=ids).logits[0, -1, :5], atol=1e-5)  # same text logits


class Boosted(torch.nn.Module):
    """The tiny policy with a planted preference for opening images, so that random chains contain many."""

    def __init__(self, model, token: int, bias: float = 6.0):
        super().__init__()
        self.model, self.token, self.bias, self.config = model, token, bias, model.config

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[..., self.token] += self.bias
        return out


def test_constrained_decoding_keeps_the_layout(tiny):
    layout = tiny.layout
    sizes = V.stage_sizes((32, 64), 8)  # (1, 2), (2, 4), (4, 8)
    prompts = [tiny.tokenizer.encode("restore", add_special_tokens=False)] * 3 + [[5, 6, 7, 8, 9]]  # left padding
    g = torch.Generator().manual_seed(0)
    comps, kinds = R.sample_chains(Boosted(tiny.model, layout.image_start), prompts, layout, sizes, 150, g)
    codes = set(layout.code_ids)
    n_images = 0
    for ids, kind in zip(comps.tolist(), kinds.tolist()):
        for t, k in zip(ids, kind):
            assert (t in codes) == (k == V.CODE)  # image codes only where the layout asks for one
        segments = V.split_completion(ids, layout)
        images = [j for j, s in enumerate(segments) if s.kind == "image"]
        for k, j in enumerate(images):
            if j < len(segments) - 1 or segments[j].complete:  # only the length limit may cut the last one short
                assert segments[j].complete and tuple(segments[j].codes.shape) == sizes[min(k, 2)]  # H x (W + EOL)
            n_images += 1
        assert all(s.kind == "image" for s in segments if any(t in codes for t in s.ids))
    assert n_images >= 6
    # the log-probabilities of the constrained policy: forced and padding positions 0, sampled ones < 0
    p_ids, p_mask = R.left_pad(prompts, layout.pad)
    logp = R.chain_log_probs(tiny.model, p_ids, p_mask, comps, kinds, layout)
    assert (logp[(kinds == V.FORCED) | (kinds == V.DONE)] == 0).all()
    assert (logp[kinds == V.CODE] < 0).all() and torch.isfinite(logp).all()


def test_anchored_position_ids_hand_worked():
    layout = V.Layout(image_start=9, image_end=8, new_line=7, eos=6, pad=0, size_ids=(), code_ids=(),
                      position_stride=10)
    ids = torch.tensor([[0, 0, 1, 2, 9, 3, 4, 5, 9, 3, 4, 9, 3]])  # two left pads, then the docstring's example + 1
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    assert R.position_ids(ids, mask, layout).tolist() == [[0, 0, 0, 1, 2, 3, 4, 5, 12, 13, 14, 22, 23]]
    consecutive = V.Layout(9, 8, 7, 6, 0, (), ())
    assert R.position_ids(ids, mask, consecutive).tolist() == [[0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


def test_sampler_and_scorer_agree_on_anchored_positions(tiny):
    """Greedy chains sampled with a KV cache under a position stride: every chosen token is the argmax of the
    full-sequence forward that GRPO's log-probabilities use, so both see the same positions."""
    layout = replace(tiny.layout, position_stride=40)
    sizes = V.stage_sizes((32, 32), 8)
    lr_codes = torch.zeros(4, 4, dtype=torch.long)
    prompts = [tiny.tokenizer.encode("restore", add_special_tokens=False) + V.image_tokens(lr_codes, layout)] * 2
    prompts[1] = [5, 6] + prompts[1]  # left padding for the first
    model = Boosted(tiny.model, layout.image_start)
    comps, kinds = R.sample_chains(model, prompts, layout, sizes, 120, torch.Generator().manual_seed(0),
                                   image_top_k=1, greedy_text=True)
    p_ids, p_mask = R.left_pad(prompts, layout.pad)
    ids = torch.cat([p_ids, comps], 1)
    mask = torch.cat([p_mask, (kinds != V.DONE).long()], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=R.position_ids(ids, mask, layout)).logits
    logits = logits[:, p_ids.shape[1] - 1:-1]
    text_ok, code_ok = layout.masks(logits.shape[-1])
    chosen = (kinds == V.TEXT) | (kinds == V.CODE)
    allowed = torch.where((kinds == V.CODE)[..., None], code_ok, text_ok)
    best = logits.masked_fill(~allowed, -math.inf).argmax(-1)
    assert (kinds == V.CODE).sum() > 20 and (comps[chosen] == best[chosen]).all()
    assert (R.position_ids(ids, mask, layout) != R.positions(mask)).any()  # the stride did move positions
    shifted = R.chain_log_probs(tiny.model, p_ids, p_mask, comps, kinds, layout)
    plain = R.chain_log_probs(tiny.model, p_ids, p_mask, comps, kinds, tiny.layout)
    assert not torch.allclose(shifted, plain)


def test_text_temperature_applies_to_text_tokens_only(tiny):
    """grpo --text-temperature: near 0 the text is the argmax (the same chains as --greedy-text, image codes still
    drawn), and the log-probabilities divide only the text positions' logits by it (hand-worked from the logits)."""
    layout = tiny.layout
    sizes = V.stage_sizes((32, 32), 8)
    prompts = [tiny.tokenizer.encode("restore", add_special_tokens=False)] * 3
    model = Boosted(tiny.model, layout.image_start)
    cold, kinds = R.sample_chains(model, prompts, layout, sizes, 120, torch.Generator().manual_seed(3),
                                  text_temperature=1e-4)
    greedy, _ = R.sample_chains(model, prompts, layout, sizes, 120, torch.Generator().manual_seed(3),
                                greedy_text=True)
    assert (kinds == V.TEXT).sum() > 10 and (kinds == V.CODE).sum() > 20 and torch.equal(cold, greedy)
    p_ids, p_mask = R.left_pad(prompts, layout.pad)
    logp = R.chain_log_probs(tiny.model, p_ids, p_mask, cold, kinds, layout, temperature=1.0, text_temperature=2.0)
    ids = torch.cat([p_ids, cold], 1)
    mask = torch.cat([p_mask, (kinds != V.DONE).long()], 1)
    with torch.no_grad():
        logits = tiny.model(input_ids=ids, attention_mask=mask,
                            position_ids=R.position_ids(ids, mask, layout)).logits[:, p_ids.shape[1] - 1:-1].float()
    text_ok, code_ok = layout.masks(logits.shape[-1])
    picks = (kinds == V.TEXT).nonzero()[:3].tolist() + (kinds == V.CODE).nonzero()[:3].tolist()
    for b, t in picks:
        code = bool(kinds[b, t] == V.CODE)
        z = logits[b, t].masked_fill(~(code_ok if code else text_ok), -math.inf) / (1.0 if code else 2.0)
        assert math.isclose(float(logp[b, t]), float(z.log_softmax(-1)[cold[b, t]]), abs_tol=1e-4)


def test_vq_any_size_and_straight_through_gradient(tiny):
    vq = tiny.vq
    x = torch.rand(2, 3, 16, 40)
    codes = M.vq_encode(vq, x)
    assert codes.shape == (2, 2, 5) and M.vq_decode(vq, codes).shape == (2, 3, 16, 40)
    loss, stats, _ = M.vq_loss(vq, torch.rand(2, 3, 32, 32))
    loss.backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0 and math.isfinite(stats["psnr"])
    # the low-frequency term (mini build): lr_weight x the L2 of the 4x downscales, reported as a PSNR (peak 2)
    img = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        plain_loss, _, _ = M.vq_loss(vq, img)
        weighted, st, _ = M.vq_loss(vq, img, lr_weight=3.0)
        recon = M.vq_decode(vq, M.vq_encode(vq, img)) * 2 - 1  # clamped here, not in the loss: compare loosely
    low = 4 / 10 ** (st["lr_psnr"] / 10)
    assert float(weighted - plain_loss) == pytest.approx(3 * low, rel=1e-4)
    by_hand = (F.interpolate(recon, size=(8, 8), mode="bicubic", antialias=True)
               - F.interpolate(img * 2 - 1, size=(8, 8), mode="bicubic", antialias=True)).pow(2).mean()
    assert low == pytest.approx(float(by_hand), rel=0.2)
    z = M.vq_latents(vq, x)
    assert torch.allclose(z.norm(dim=1), torch.ones(2, 2, 5), atol=1e-5)  # LlamaGen's L2 normalisation


def test_crop_too_large_for_the_position_stride_is_named():
    mini = M.load_policy("mini")
    assert R.check_sizes(48, 4, mini)[-1] == (12, 12)  # 160 tokens in a stride of 256
    with pytest.raises(T.RunError, match="--crop-size 64: its final image is 276 tokens, more than this policy's "
                                         "position stride 256"):
        R.check_sizes(64, 4, mini)


def test_token_advantages_chain_and_split_hand_worked():
    # one group of 3 chains; positions: text, code, forced
    parts = {"format": torch.tensor([1.0, 0.0, 1.0]), "degradation": torch.tensor([1.0, 0.0, 0.0]),
             "generation": torch.tensor([0.0, 0.0, 0.6])}
    kinds = torch.tensor([[V.TEXT, V.CODE, V.FORCED]] * 3)
    groups = torch.zeros(3, dtype=torch.long)
    z = lambda r: (r - r.mean()) / (r.std(unbiased=False) + 1e-4)  # noqa: E731  Eq.3 in one group
    chain = R.token_advantages(parts, kinds, groups, "chain")
    assert torch.allclose(chain, z(torch.tensor([2.0, 0.0, 1.6]))[:, None].expand(3, 3), atol=1e-4)
    split = R.token_advantages(parts, kinds, groups, "split")
    assert torch.allclose(split[:, 0], z(torch.tensor([2.0, 0.0, 1.0])), atol=1e-4)  # text: format + degradation
    assert torch.allclose(split[:, 1], z(torch.tensor([0.0, 0.0, 0.6])), atol=1e-4)  # codes: generation alone
    no_generation = R.token_advantages({"format": parts["format"]}, kinds, groups, "split")
    assert (no_generation[:, 1] == 0).all() and no_generation[0, 0] > 0


@pytest.mark.slow
def test_quick_mini_build_runs_every_stage(tmp_path):
    """build_mini --quick (about 30 s): every stage writes what the next one reads, the policies carry the mini
    position stride, the VQ log has the low-frequency PSNR, the table has its reference rows."""
    from realsr_r1 import build_mini as B
    assert B.main(["--quick", "--work", str(tmp_path), "--threads", "1"]) == 0
    mini, work = tmp_path / "quick_mini", tmp_path / "quick"
    for name in ("sft", "grpo"):
        meta = json.loads((mini / name / M.META_FILE).read_text())
        assert meta["position_stride"] == M.MINI_POSITION_STRIDE and meta["vq"] == "../vq"
        assert M.load_policy(str(mini / name)).layout.position_stride == M.MINI_POSITION_STRIDE
    vq_log = [json.loads(x) for x in (work / "vq" / "losses.jsonl").read_text().splitlines()]
    assert len(vq_log) == B.QUICK.vq_steps and all(math.isfinite(e["lr_psnr"]) for e in vq_log)
    table = json.loads((mini / "eval.json").read_text())["table"]
    assert {"HR itself", R.VQ_ROW, str(mini / "sft"), str(mini / "grpo")} <= table.keys()


def test_mini_vq_learning_rate_is_a_cosine_to_a_tenth():
    from realsr_r1 import build_mini as B
    assert B.vq_learning_rate(0, 11, 1e-3) == pytest.approx(1e-3)
    assert B.vq_learning_rate(5, 11, 1e-3) == pytest.approx(0.55e-3)  # halfway: 0.1 + 0.9 x 0.5
    assert B.vq_learning_rate(10, 11, 1e-3) == pytest.approx(1e-4)


def test_cold_start_target_scores_full_marks(tiny):
    g = torch.Generator().manual_seed(3)
    examples = R.draw_examples(("coffee", "china"), 2, 64, 4, V.DEGRADATION_PRESETS["mini"], g)
    encoded = R.encode_examples(tiny, examples, "own")
    assert len(encoded[0]["prompt"]) == len(tiny.tokenizer.encode(V.PROMPT, add_special_tokens=False)) + \
        V.image_length(2, 2)  # the 16 px LR at its own size: 2x2 codes
    ids = torch.tensor(R.target_ids(tiny, examples[0], encoded[0]["images"], tags=True))
    kinds = torch.full_like(ids, V.TEXT)
    parts, finals = R.chain_rewards(tiny, ids[None], kinds[None], examples[:1], 1,
                                    ["format", "degradation", "understanding"])
    assert {k: float(v) for k, v in parts.items()} == {"format": 1.0, "degradation": 1.0, "understanding": 1.0}
    assert finals[0].shape == (3, 64, 64)
    untagged = R.target_ids(tiny, examples[0], encoded[0]["images"], tags=False)  # the public code's data
    assert R.chain_rewards(tiny, torch.tensor([untagged]), kinds[None, :len(untagged)], examples[:1], 1,
                           ["format"])[0]["format"] == 0


def test_broken_chains_score_by_the_rules_and_never_crash(tiny):
    g = torch.Generator().manual_seed(4)
    ex = R.draw_examples(("coffee",), 1, 64, 4, V.DEGRADATION_PRESETS["mini"], g)
    enc = R.encode_examples(tiny, ex, "own")[0]
    good = R.target_ids(tiny, ex[0], enc["images"], tags=True)
    cut = good[:-20]  # the final image cut short (e.g. by the length limit)
    swapped = R.target_ids(tiny, ex[0], enc["images"], tags=True)
    text = tiny.tokenizer.decode(swapped)
    order = tiny.tokenizer.encode(text.split("<rough_image>")[0].replace("<degradation>", "<X>").replace(
        "<rough_understand>", "<degradation>").replace("<X>", "<rough_understand>"), add_special_tokens=False)
    rest = swapped[len(tiny.tokenizer.encode(text.split("<rough_image>")[0], add_special_tokens=False)):]
    enc_text = lambda t: tiny.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
    coarse_as_final = enc_text("<final_image>") + V.image_tokens(enc["images"][0], tiny.layout) + \
        enc_text("</final_image>") + [tiny.layout.eos]  # the sampler gives the first image the coarse size
    chains = [good, cut, order + rest, [tiny.layout.image_start] * 3, [], coarse_as_final]
    width = max(map(len, chains))
    comps = torch.tensor([c + [tiny.layout.pad] * (width - len(c)) for c in chains])
    kinds = torch.where(comps == tiny.layout.pad, V.DONE, V.TEXT)
    parts, finals = R.chain_rewards(tiny, comps, kinds, ex * 6, 1, ["format", "degradation", "understanding"])
    assert parts["format"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert parts["degradation"][1] == 1.0  # the steps before the break still count
    assert finals[0] is not None and finals[1] is None and finals[2] is not None and finals[3] is None
    assert finals[0].shape == (3, 64, 64) and finals[5] is None  # a coarse image in <final_image> is no final image


# ---------------------------------------------------------------------------------------------------
# the stage script: GRPO learns a planted reward, exact resume, torchrun, errors
# ---------------------------------------------------------------------------------------------------

PLANTED = ["grpo", "--model", "tiny", "--rewards", "planted", "--planted-word", " the", "--crop-size", "64",
           "--batch-size", "4", "--group", "4", "--text-budget", "8", "--lr", "3e-2", "--device", "cpu"]


@pytest.mark.slow
def test_grpo_learns_a_planted_reward(tmp_path):
    assert R.main([*PLANTED, "--beta", "0", "--steps", "25", "--save-every", "1000", "--out", str(tmp_path / "p")]) == 0
    log = [json.loads(x) for x in (tmp_path / "p" / "rewards.jsonl").read_text().splitlines()]
    first, last = sum(e["reward_planted"] for e in log[:5]) / 5, sum(e["reward_planted"] for e in log[-5:]) / 5
    assert first < 0.1 and last > 0.5, (first, last)
    assert (tmp_path / "p" / "model.safetensors").exists() and M.load_policy(str(tmp_path / "p")).meta["vq"] == "tiny"


def checkpoint_tensors(folder: Path) -> dict:
    model, optim, state = T.load_checkpoint(T.list_checkpoints(folder / "checkpoints")[-1])
    return {**model, **optim, "step": torch.tensor(state["step"])}


@pytest.mark.parametrize("command", [
    ["sft", "--model", "tiny", "--crop-size", "64", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"],
    pytest.param([*PLANTED, "--beta", "0.1", "--ppo-epochs", "2"], marks=pytest.mark.slow)], ids=["sft", "grpo"])
def test_resume_is_exact(tmp_path, command):
    common = [*command, "--steps", "4", "--save-every", "2"]
    assert R.main([*common, "--out", str(tmp_path / "a")]) == 0
    assert R.main([*common, "--out", str(tmp_path / "b"), "--stop-after", "2"]) == 0  # paused after step 2
    assert [p.name for p in T.list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step_000002"]
    assert R.main([*common, "--out", str(tmp_path / "b"), "--resume", "latest"]) == 0
    a, b = checkpoint_tensors(tmp_path / "a"), checkpoint_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_file(str(tmp_path / "a" / "model.safetensors")).keys() == \
        load_file(str(tmp_path / "b" / "model.safetensors")).keys()
    log = "losses.jsonl" if command[0] == "sft" else "rewards.jsonl"
    la = [json.loads(x) for x in (tmp_path / "a" / log).read_text().splitlines()]
    lb = [json.loads(x) for x in (tmp_path / "b" / log).read_text().splitlines()]
    drop = lambda e: {k: v for k, v in e.items() if k != "seconds"}  # noqa: E731
    assert [drop(e) for e in la] == [drop(e) for e in lb]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "r1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(serving.free_port()), "-m", "realsr_r1.train_realsr_r1", *PLANTED, "--beta", "0.1", "--steps", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(x) for x in (out / "rewards.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and (out / "model.safetensors").exists()


@pytest.mark.parametrize("flags,message", [
    (["--crop-size", "60"], "--crop-size 60"),
    (["--crop-size", "32"], "--crop-size 32"),
    (["--rewards", "format,beauty"], "--rewards"),
    (["--rewards", "planted", "--planted-word", "two words"], "--planted-word"),
    (["--data", "missing.jsonl"], "--data missing.jsonl"),
    (["--degradation", "strong"], "--degradation strong"),
    (["--generation-reward", "clip"], "--generation-reward clip"),
    (["--token-advantages", "tokens"], "--token-advantages tokens"),
    (["--augment", "colour,blur"], "--augment colour,blur: unknown blur"),
    (["--augment", "grey", "--augment-prob", "1.5"], "--augment-prob 1.5"),
    (["--text-temperature", "-1"], "--text-temperature -1"),
])
def test_bad_flags_are_named(tmp_path, flags, message):
    base = ["grpo", "--model", "tiny", "--crop-size", "64", "--batch-size", "1", "--group", "2", "--steps", "1",
            "--generation-reward", "compass", "--reward-model", "tiny", "--device", "cpu", "--out", str(tmp_path / "x")]
    with pytest.raises(T.RunError, match=message.replace("-", r"\-")):
        R.main(base + flags)


def test_real_checkpoint_door_fails_in_one_line():
    with pytest.raises(T.RunError, match="--model"):
        M.load_policy("Alpha-VLLM/Lumina-mGPT-7B-512", vq="tiny")


def test_grpo_with_every_paper_reward_runs(tmp_path):
    """The four rewards of Eq.5 with the tiny COMPASS as the visual expert and the tiny Qwen judge: a step runs."""
    for expert in (["--generation-reward", "compass", "--reward-model", "tiny"],
                   ["--generation-reward", "qwen", "--judge-model", "tiny"]):
        out = tmp_path / expert[1]
        assert R.main(["grpo", "--model", "tiny", "--crop-size", "64", "--batch-size", "1", "--group", "2",
                       "--steps", "1", "--text-budget", "4", "--device", "cpu", *expert, "--out", str(out)]) == 0
        log = json.loads((out / "rewards.jsonl").read_text().splitlines()[0])
        assert {"reward_format", "reward_degradation", "reward_understanding", "reward_generation"} <= log.keys()


def test_eval_writes_table_and_picture(tmp_path):
    R.main(["sft", "--model", "tiny", "--crop-size", "64", "--batch-size", "1", "--steps", "1", "--device", "cpu",
            "--lr-size", "output", "--out", str(tmp_path / "s")])
    assert M.load_policy(str(tmp_path / "s")).meta["lr_size"] == "output"
    eval_args = ["eval", "--models", "tiny", str(tmp_path / "s"), "--crops", "2", "--text-budget", "4",
                 "--device", "cpu", "--out", str(tmp_path / "e"), "--oars", "--model tiny --steps 2"]
    with pytest.raises(T.RunError, match="--crop-size 48"):  # the default, the mini's: too small for the tiny 8x VQ
        R.main(eval_args)
    with pytest.raises(T.RunError, match="--oars '--model tiny --steps 1': --steps 1: at least 2"):
        R.main([*eval_args[:-1], "--model tiny --steps 1"])  # infer.py's own check, before any sampling
    assert R.main([*eval_args, "--crop-size", "64"]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    table = report["table"]
    s = str(tmp_path / "s")
    assert list(table) == ["HR itself", "bicubic", R.VQ_ROW, "tiny", "tiny + post-process", s,
                           f"{s} + post-process", "OARS --model tiny --steps 2"]
    assert report["columns"] == ["nearest", *[k for k in table if k not in R.REFERENCE_ROWS], "HR"]
    assert table["bicubic"]["lr_consistency"] > 25 and (tmp_path / "e.png").exists()
    for name in ("tiny", s):  # the degradation reward of each chain is the mean of its three components' hits
        parts = [table[name][f"degradation_{c}"] for c in V.DEGRADATIONS]
        assert sum(parts) / 3 == pytest.approx(table[name]["degradation"])
    # the references: the HR scores itself perfectly on PSNR / SSIM, and the random tiny VQ loses the picture
    assert table["HR itself"]["ssim"] == pytest.approx(1.0) and table["HR itself"]["psnr"] > 90
    assert table[R.VQ_ROW]["lr_consistency"] < table["HR itself"]["lr_consistency"] - 10
    # the picture: one 64 px column per entry of "columns", 2 crops
    assert Image.open(tmp_path / "e.png").size == (64 * len(report["columns"]), 2 * 64)
    # the tiny chains break the layout (no final image): their post-processed rows are empty, not an error
    for name in ("tiny", s):
        if "lr_consistency" not in table[name]:
            assert table[f"{name} + post-process"] == {}
        else:  # infer.post_process moves each final image's downscale onto its LR
            assert table[f"{name} + post-process"]["lr_consistency"] > table[name]["lr_consistency"]
    # the tiny OARS backbone's own defaults (no post-processing): a random model, far from its LR
    assert table["OARS --model tiny --steps 2"]["lr_consistency"] < table["bicubic"]["lr_consistency"]


@pytest.mark.slow
def test_shipped_mini_presets_reproduce_their_held_out_table(tmp_path):
    """The shipped VQ and GRPO model, evaluated as the build did (realsr_r1/build_mini.py's eval stage): the same
    held-out means as realsr_r1/mini/eval.json (the build is deterministic at one thread)."""
    recorded = json.loads((M.MINI_DIR / "eval.json").read_text())
    torch.set_num_threads(1)
    assert R.main(["eval", "--models", "mini", "--crops", str(recorded["crops"]), "--crop-size",
                   str(recorded["crop_size"]), "--degradation", "mini", "--text-budget", "64", "--device", "cpu",
                   "--out", str(tmp_path / "eval"), "--oars", ""]) == 0  # the OARS row is not checked here
    again = json.loads((tmp_path / "eval.json").read_text())["table"]
    for key in ("format", "degradation", "degradation_blur", "degradation_noise", "degradation_compression",
                "understanding", "lr_consistency", "ssim"):
        assert again["mini"][key] == pytest.approx(recorded["table"]["mini"][key], abs=1e-3), key
    for key in ("lr_consistency", "ssim"):  # the same final images after infer.py's post-processing
        assert again["mini + post-process"][key] == pytest.approx(recorded["table"]["mini + post-process"][key],
                                                                  abs=1e-3), key
    assert "OARS --model mini --sft mini" not in again
    # back-projection onto the LR: the chain's final images explain their LR far better (about 20 -> 44 dB)
    assert again["mini + post-process"]["lr_consistency"] > again["mini"]["lr_consistency"] + 15
    # the chain keeps the picture as far as its VQ lets it: within 8 dB of the HR's own round trip
    assert again["mini"]["lr_consistency"] > again[R.VQ_ROW]["lr_consistency"] - 8
    assert again["bicubic"]["lr_consistency"] == pytest.approx(recorded["table"]["bicubic"]["lr_consistency"], abs=1e-3)
