"""Tiny models built offline from configs (Qwen2.5-VL, LLaVA, Qwen2) with locally trained tokenizers.

Importing this package registers `TinyQwen2_5_VLProcessor` with `AutoProcessor`, so saved tiny
Qwen2.5-VL directories reload with `AutoProcessor.from_pretrained`; `load_processor` works always.
"""

from calibrl.models.processor import TinyQwen2_5_VLProcessor
from calibrl.models.tiny import (
    FAMILIES,
    SIZES,
    build_tiny_model,
    build_tokenizer,
    chat_template,
    count_parameters,
    load_processor,
    load_tiny_model,
    save_tiny_model,
)

__all__ = [
    "FAMILIES",
    "SIZES",
    "TinyQwen2_5_VLProcessor",
    "build_tiny_model",
    "build_tokenizer",
    "chat_template",
    "count_parameters",
    "load_processor",
    "load_tiny_model",
    "save_tiny_model",
]
