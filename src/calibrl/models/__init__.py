"""Models: tiny ones built offline from configs (Qwen2.5-VL, LLaVA, Qwen2, locally trained tokenizers), and
loading of any model spec the commands take (`load_model`).

Importing this package registers `TinyQwen2_5_VLProcessor` with `AutoProcessor`, so saved tiny
Qwen2.5-VL directories reload with `AutoProcessor.from_pretrained`; `load_processor` works always.
"""

from calibrl.models.loading import (
    TINY_PREFIX,
    freeze_vision_tower,
    load_model,
    lora_config,
    parse_tiny_spec,
    resolve_model_path,
    tiny_model_dir,
)
from calibrl.models.processor import TinyQwen2_5_VLProcessor
from calibrl.models.tiny import (
    FAMILIES,
    SIZES,
    build_tiny_model,
    build_tokenizer,
    chat_template,
    load_processor,
    load_tiny_model,
    save_tiny_model,
)

__all__ = [
    "FAMILIES",
    "SIZES",
    "TINY_PREFIX",
    "TinyQwen2_5_VLProcessor",
    "build_tiny_model",
    "build_tokenizer",
    "chat_template",
    "freeze_vision_tower",
    "load_processor",
    "load_model",
    "load_tiny_model",
    "lora_config",
    "parse_tiny_spec",
    "resolve_model_path",
    "save_tiny_model",
    "tiny_model_dir",
]
