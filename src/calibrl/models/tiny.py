"""Tiny vision-language and language models built offline, from configs only.

Why: the trainer, its tests and the CPU demos need the real Hugging Face model classes that TRL's
GRPOTrainer drives (Qwen2.5-VL, LLaVA, Qwen2), but nothing may be downloaded. So every model here
is a freshly initialised config-built model, and its tokenizer is a byte-level BPE trained locally
on the task text.

Tokenizer choices, each one measured to matter:
- every digit 0-9 is its own token (the pre-tokenizer isolates digits), so numbers in answers and
  expert traces tokenise the same way wherever they appear;
- `<think>`, `</think>`, `<answer>`, `</answer>` are ordinary (non-special) added tokens: TRL decodes
  completions with `skip_special_tokens=True` before calling reward functions, so special tags
  would vanish and every format reward would be 0;
- chat and vision markers are special tokens; eos is `<|im_end|>`, pad (and unk) is `<|endoftext|>`;
- left padding, as batched generation needs.

Processors: Qwen2.5-VL uses `TinyQwen2_5_VLProcessor` (see `processor.py`; `AutoProcessor` works once
`calibrl.models` is imported, `load_processor` always works), LLaVA the stock `LlavaProcessor`, and
Qwen2 has a tokenizer only.
"""

from __future__ import annotations

import json
import os

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLImageProcessorPil,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)
from transformers.processing_utils import ProcessorMixin

from calibrl.models.processor import TinyQwen2_5_VLProcessor

FAMILIES = ("qwen2_5_vl", "llava", "qwen2")

# Text: hidden size, layers, attention heads / KV heads, MLP width. Vision: hidden size and depth
# (heads of 16 dims, MLP twice as wide). Parameter counts are for the Qwen2.5-VL family.
SIZES: dict[str, dict[str, int]] = {
    "nano": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vision_hidden=32, vision_depth=1),
    "small": dict(hidden=128, layers=4, heads=4, kv_heads=2, mlp=256, vision_hidden=64, vision_depth=2),
    "base": dict(hidden=256, layers=4, heads=8, kv_heads=4, mlp=512, vision_hidden=128, vision_depth=2),
    "large": dict(hidden=512, layers=6, heads=8, kv_heads=4, mlp=1024, vision_hidden=128, vision_depth=4),
}

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
LLAVA_IMAGE_TOKEN = "<image>"
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]  # ordinary tokens, never special
EOS_TOKEN, PAD_TOKEN = "<|im_end|>", "<|endoftext|>"

IMAGE_PLACEHOLDER = {
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": LLAVA_IMAGE_TOKEN,
    "qwen2": "",  # text-only: image blocks render as nothing
}

# Qwen2.5-VL image processing: sides round to multiples of 28 px (patch 14 x merge 2), so a 28 px
# square is 1 image token and 56 px is 4; at most 64 image tokens per image.
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 28 * 28, 28 * 28 * 64
# LLaVA: every image is resized to a fixed square, giving (56 / 14) ** 2 = 16 image tokens.
LLAVA_IMAGE_SIZE, LLAVA_PATCH_SIZE = 56, 14
MAX_POSITIONS = 4096

# Pre-tokenizer split: contractions | optional non-letter + letters | ONE digit | optional space +
# punctuation run (+ newlines) | whitespace ending in newlines | whitespace not followed by text |
# other whitespace. This is the same split (and NFC normaliser) that transformers' `Qwen2Tokenizer`
# rebuilds when `AutoTokenizer` reloads a directory whose config says `qwen2`, so a saved Qwen2
# tokenizer reloads identically.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def chat_template(family: str) -> str:
    """Qwen-style Jinja chat template; `{"type": "image"}` blocks render as the family's placeholder.

    Content may be a string or a list of `{"type": "text", "text": ...}` / `{"type": "image"}` blocks.
    Each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; `add_generation_prompt` appends
    `<|im_start|>assistant\\n`. No default system prompt is inserted.
    """
    _check_family(family)
    placeholder = IMAGE_PLACEHOLDER[family]
    return (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string %}"
        "{{- message['content'] }}"
        "{%- elif message['content'] is not none %}"
        "{%- for part in message['content'] %}"
        "{%- if part['type'] == 'image' %}"
        "{{- '" + placeholder + "' }}"
        "{%- elif part['type'] == 'text' %}"
        "{{- part['text'] }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{%- endif %}"
    )


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")


def _special_tokens(family: str) -> list[str]:
    if family == "qwen2_5_vl":
        return CHAT_TOKENS + QWEN_VISION_TOKENS
    if family == "llava":
        return CHAT_TOKENS + [LLAVA_IMAGE_TOKEN]
    return list(CHAT_TOKENS)


def _default_corpus() -> list[str]:
    """The task text, imported lazily: `calibrl.tasks` is optional for callers passing a corpus."""
    from calibrl.tasks import task_corpus

    return task_corpus()


def build_tokenizer(
    corpus: list[str] | None = None, family: str = "qwen2_5_vl", vocab_size: int = 512, seed: int = 0
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` (default: `calibrl.tasks.task_corpus()`) and wrap it.

    `vocab_size` counts the 256 byte symbols, the special tokens and the learnt merges; the four
    tag tokens are added on top, so `len(tokenizer)` is at most `vocab_size + 4` (less when the
    corpus runs out of pairs to merge). BPE training is deterministic given the corpus; `seed` is
    accepted for a uniform API and does not change the result.
    """
    _check_family(family)
    del seed  # BPE training has no randomness
    corpus = _default_corpus() if corpus is None else corpus
    if not isinstance(corpus, (list, tuple)) or not all(isinstance(t, str) for t in corpus):
        raise TypeError("corpus must be a list of strings")
    if not corpus:
        raise ValueError("corpus is empty: nothing to train the tokenizer on")
    specials = _special_tokens(family)
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus specials ({256 + len(specials)})")

    # Tags and markers are whole tokens already: keep them out of the text the merges are learnt from.
    def strip_markers(text: str) -> str:
        for token in specials + TAG_TOKENS:
            text = text.replace(token, " ")
        return text

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((strip_markers(t) for t in corpus), trainer=trainer, length=len(corpus))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,  # as Qwen does; byte-level BPE never emits it
        extra_special_tokens=[t for t in specials if t not in (EOS_TOKEN, PAD_TOKEN)],
        padding_side="left",
        model_max_length=MAX_POSITIONS,
        chat_template=chat_template(family),
    )
    tokenizer.add_tokens(TAG_TOKENS)  # special_tokens=False: they survive skip_special_tokens decoding
    return tokenizer


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    token_id = tokenizer.get_vocab().get(token)  # not convert_tokens_to_ids: that maps unknowns to unk
    if token_id is None:
        raise ValueError(f"tokenizer has no {token!r} token")
    return token_id


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies over (time, height, width), as Qwen does: 1/4, rest halved."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _text_kwargs(size: dict[str, int], tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=size["hidden"],
        intermediate_size=size["mlp"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=None,
        eos_token_id=_token_id(tokenizer, EOS_TOKEN),
        pad_token_id=_token_id(tokenizer, PAD_TOKEN),
    )


def _config(family: str, size: dict[str, int], tokenizer: PreTrainedTokenizerFast):
    text = _text_kwargs(size, tokenizer)
    vision_heads = max(1, size["vision_hidden"] // 16)
    if family == "qwen2_5_vl":
        head_dim = size["hidden"] // size["heads"]
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(head_dim),
        }
        vision = dict(
            depth=size["vision_depth"],
            hidden_size=size["vision_hidden"],
            intermediate_size=2 * size["vision_hidden"],
            num_heads=vision_heads,
            out_hidden_size=size["hidden"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[size["vision_depth"] - 1],
        )
        return Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=_token_id(tokenizer, "<|image_pad|>"),
            video_token_id=_token_id(tokenizer, "<|video_pad|>"),
            vision_start_token_id=_token_id(tokenizer, "<|vision_start|>"),
            vision_end_token_id=_token_id(tokenizer, "<|vision_end|>"),
            tie_word_embeddings=False,
        )
    if family == "llava":
        vision = SiglipVisionConfig(
            hidden_size=size["vision_hidden"],
            intermediate_size=2 * size["vision_hidden"],
            num_hidden_layers=size["vision_depth"],
            num_attention_heads=vision_heads,
            image_size=LLAVA_IMAGE_SIZE,
            patch_size=LLAVA_PATCH_SIZE,
            vision_use_head=False,  # LLaVA reads patch features; the pooling head would get no gradient
        )
        # SigLIP's `post_layernorm` stays unused too (LLaVA takes the last hidden state before it),
        # as in real LLaVA + SigLIP models: DDP needs `find_unused_parameters`, which TRL sets for VLMs.
        return LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text, tie_word_embeddings=False),
            image_token_id=_token_id(tokenizer, LLAVA_IMAGE_TOKEN),
            image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH_SIZE) ** 2,
            vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    return Qwen2Config(**text, tie_word_embeddings=False)


def _processing_class(family: str, tokenizer: PreTrainedTokenizerFast):
    template = chat_template(family)
    if family == "qwen2_5_vl":
        image_processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
        return TinyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    if family == "llava":
        image_processor = SiglipImageProcessorPil(size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE})
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=LLAVA_PATCH_SIZE,
            vision_feature_select_strategy="full",
            chat_template=template,
            image_token=LLAVA_IMAGE_TOKEN,
            num_additional_image_tokens=0,
        )
    return tokenizer


_MODEL_CLASSES = {
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "llava": LlavaForConditionalGeneration,
    "qwen2": Qwen2ForCausalLM,
}


def build_tiny_model(
    family: str = "qwen2_5_vl", size: str = "small", corpus: list[str] | None = None, seed: int = 0
) -> tuple[PreTrainedModel, ProcessorMixin | PreTrainedTokenizerFast]:
    """Build a freshly initialised float32 model and its processing class (processor, or tokenizer for qwen2).

    The same (family, size, corpus, seed) gives the same weights bit for bit; the global torch RNG
    is left untouched. The model is returned in training mode.
    """
    _check_family(family)
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {tuple(SIZES)}")
    tokenizer = build_tokenizer(corpus, family=family, seed=seed)
    config = _config(family, SIZES[size], tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[family](config).to(torch.float32)
    eos_id, pad_id = _token_id(tokenizer, EOS_TOKEN), _token_id(tokenizer, PAD_TOKEN)
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    model.train()
    return model, _processing_class(family, tokenizer)


def save_tiny_model(model: PreTrainedModel, processing_class, out_dir: str) -> str:
    """`save_pretrained` the model and its processing class into `out_dir`; returns `out_dir`.

    Also points `model.config._name_or_path` at `out_dir`, so that code reloading "the same model"
    from its config (TRL's reference model, its default processor) finds it.
    """
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processing_class.save_pretrained(out_dir)
    model.config._name_or_path = out_dir
    return out_dir


def _model_type(path: str) -> str:
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{path!r} has no config.json: not a saved model directory")
    with open(config_file, encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")
    if model_type not in _MODEL_CLASSES:
        raise ValueError(f"{config_file}: model_type={model_type!r} is not one of {FAMILIES}")
    return model_type


def load_processor(path: str):
    """The processing class saved in `path`: the Qwen subclass, a LLaVA processor, or a tokenizer."""
    processor_file = os.path.join(path, "processor_config.json")
    if not os.path.isfile(processor_file):
        return AutoTokenizer.from_pretrained(path)
    with open(processor_file, encoding="utf-8") as f:
        processor_class = json.load(f).get("processor_class")
    if processor_class == TinyQwen2_5_VLProcessor.__name__:
        return TinyQwen2_5_VLProcessor.from_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def load_tiny_model(path: str) -> tuple[PreTrainedModel, ProcessorMixin | PreTrainedTokenizerFast]:
    """Reload a directory written by `save_tiny_model` (any family); the model is in training mode, like a built one."""
    model = _MODEL_CLASSES[_model_type(path)].from_pretrained(path, dtype=torch.float32)
    model.train()
    return model, load_processor(path)
