"""The tiny model's tokenizer: a byte-level BPE trained offline on a built-in corpus, saved as
Qwen2.5-VL's tokenizer (``Qwen2Tokenizer`` with its special tokens and chat template).

The BPE uses Qwen2's pre-tokenizer, in which every digit is its own pre-token (so no merge ever
spans two digits: "123" is three tokens). Training is deterministic and takes no seed: the same
vocabulary and merges every time. Used by ``medloc.models.tiny`` (and ``medloc.models.shapes``).
"""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

from medloc.data.prompts import (
    BARE_LIST_SUFFIX,
    REC_QUESTION_TEMPLATE,
    THINK_ANSWER_SUFFIX,
    format_answer,
)

# Qwen2's pre-tokenizer split (a property of the Qwen2 tokenizer format, also what
# `transformers.Qwen2Tokenizer` rebuilds on load): `\p{N}` matches ONE digit, so digits are never
# merged with anything.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's special tokens, in the order of their ids in the real tokenizer (151643...151656).
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
QWEN25VL_SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    VISION_PAD,
    IMAGE_PAD,
    VIDEO_PAD,
)

# The Qwen2.5-VL chat template (same text structure as the one shipped with
# Qwen/Qwen2.5-VL-3B-Instruct): a default system turn, then each message as
# <|im_start|>role\n ... <|im_end|>\n, an image as <|vision_start|><|image_pad|><|vision_end|>
# (the processor expands the one <|image_pad|> to one token per merged 28x28 patch).
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


_CORPUS_QUERIES = (
    "the skin lesion", "the lesion", "the thyroid nodule", "the nodule", "the calcaneus",
    "the heel", "the heel bone", "the fracture", "the tumor", "the mass", "the target region",
    "the abnormal region", "the finding", "the pigmented lesion", "the dark nodule",
)  # fmt: skip
_CORPUS_THOUGHTS = (
    "The lesion is near the center of the image.",
    "The nodule is a dark region in the ultrasound image.",
    "The target is small and faint, in the lower part of the X-ray.",
    "I look for the region that differs from the background.",
)


def tokenizer_corpus() -> list[str]:
    """The fixed built-in text the tiny BPE is trained on (no randomness, no seed).

    It covers what the tokenizer will see: the chat scaffold, both prompt forms, answers in both
    formats with coordinates 0..600 (digits never merge, so numbers only teach the surrounding
    punctuation), and plain JSON.
    """
    lines: list[str] = []
    for _ in range(8):
        lines += ["system\nYou are a helpful assistant.", "user\n", "assistant\n"]
    for query in _CORPUS_QUERIES:
        question = REC_QUESTION_TEMPLATE.format(query=query)
        lines.append(f"{question} {THINK_ANSWER_SUFFIX}")
        lines.append(f"{question} {BARE_LIST_SUFFIX}")
    for i in range(120):
        # A deterministic spread of boxes: (7i mod 97, 13i mod 89) + size (20 + 3i mod 60).
        x1, y1 = (7 * i) % 97, (13 * i) % 89
        w, h = 20 + (3 * i) % 60, 20 + (5 * i) % 60
        box = [x1 * 5, y1 * 5, x1 * 5 + w, y1 * 5 + h]
        lines.append(format_answer(box, "bare_list"))
        thought = _CORPUS_THOUGHTS[i % len(_CORPUS_THOUGHTS)]
        lines.append(format_answer(box, "vlm_r1_json", think_text=thought))
        lines.append(json.dumps({"bbox_2d": box, "label": _CORPUS_QUERIES[i % 15]}))
    return lines


def train_tiny_tokenizer(bpe_vocab_size: int) -> Qwen2Tokenizer:
    """Train a byte-level BPE on `tokenizer_corpus()` and wrap it as a Qwen2.5-VL tokenizer.

    The BPE uses Qwen2's normaliser (NFC), pre-tokeniser (the regex above, then byte-level) and
    decoder, so `Qwen2Tokenizer` reloads it unchanged. Special tokens are appended after the BPE
    vocabulary, as in the real tokenizer; eos = <|im_end|>, pad = <|endoftext|>, no bos (as the real
    Qwen2.5-VL tokenizer_config says).
    """
    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]
    ]
    # Special tokens get the ids right after the BPE vocabulary, in Qwen2.5-VL's order.
    n_bpe = len(vocab)
    for offset, token in enumerate(QWEN25VL_SPECIAL_TOKENS):
        vocab[token] = n_bpe + offset

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[t for t in QWEN25VL_SPECIAL_TOKENS if t != ENDOFTEXT],
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=32768,
    )
    tokenizer.chat_template = QWEN25VL_CHAT_TEMPLATE
    for token in QWEN25VL_SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
            raise RuntimeError(f"special token {token} did not get an id in the tiny tokenizer")
    return tokenizer
