"""A Qwen tokenizer built locally, for the tiny presets.

The real checkpoints (Qwen-Image-Edit-2509's Qwen2.5-VL text encoder, Qwen3-VL for COMPASS) ship a
151k-token byte-level BPE vocabulary. Tests, CI and the demo cannot download it, so the tiny presets use
the same tokenizer CLASS (`Qwen2Tokenizer`) with a vocabulary made of the 256 byte-level symbols and no
merges, plus the Qwen special tokens. Every string still tokenizes (one token per byte), chat templates
and vision placeholders work unchanged, and digits are single tokens exactly as in the real vocabulary,
which the COMPASS scorer relies on (digit-probability read-out, see reward.py).

Deterministic: the vocabulary is a pure function of the code, so every process builds the same one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Tokenizer

# The special tokens of the Qwen2.5-VL / Qwen3-VL vocabularies that the processors and templates use.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A chat template with the same rendering as Qwen's VL templates (system turn, "<|im_start|>role\n",
# one "<|vision_start|><|image_pad|><|vision_end|>" per image, "Picture N: " when add_vision_id).
# Newlines are emitted as strings because Jinja strips bare newlines next to `{%- -%}`.
QWEN_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' and default_system is defined -%}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] in ['image', 'image_url'] or 'image' in content -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{ 'Picture ' + image_count.value|string + ': ' }}{%- endif -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content -%}"
    "{{ content['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def word_merges(texts: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that make every WORD of `texts` one token (letters only, with its leading space).

    The words are the byte-level pre-tokens of the texts (" quality" -> "Ġquality") made only of letters,
    so digits, punctuation and newlines stay one token per byte: a number such as "0.83" is still the
    four tokens "0" "." "8" "3", which the COMPASS digit read-out needs. Special tokens ("<|im_end|>")
    are not words. Each word is built left to right ("Ġq" + "u" -> "Ġqu", ...). Merges of words after
    a space come first, then those of words at a line start, each group by the length of what it
    produces: a word-start merge then never loses a pair to a merge from inside another word, so every
    listed word is exactly one token.
    """
    produced: dict[str, tuple[str, str]] = {}
    for text in texts:
        text = re.sub(r"<\|[A-Za-z0-9_]+\|>", "\n", text)
        for piece, _ in ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text):
            if not re.fullmatch(r"Ġ?[A-Za-z]{2,}", piece):
                continue
            for end in range(2, len(piece) + 1):
                produced.setdefault(piece[:end], (piece[:end - 1], piece[end - 1]))
    return [produced[t] for t in sorted(produced, key=lambda t: (not t.startswith("Ġ"), len(t), t))]


def build_byte_tokenizer(model_max_length: int = 32768, words_from: Iterable[str] = ()) -> Qwen2Tokenizer:
    """Return a `Qwen2Tokenizer` over the 256 byte-level symbols plus the Qwen special tokens.

    Token ids: 0..255 are the byte symbols in `ByteLevel.alphabet()` sorted order, then (with
    `words_from`) one token per merge of `word_merges(words_from)`, then the special tokens in
    `QWEN_SPECIAL_TOKENS` order. Without `words_from` there are no merges: one token per byte (the tiny
    presets). The mini presets pass the fixed texts they read (system prompt, instructions, task text):
    each of their words becomes one token, so a 300-character prompt costs ~50 tokens instead of 300.
    """
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges = word_merges(words_from)
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS})
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer
