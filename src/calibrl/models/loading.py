"""Loading any model the commands take: a local folder, a LoRA adapter folder, a `tiny:<family>:<size>` spec
(built offline and cached), or a hub id; plus the model-side options of a run (frozen vision tower, LoRA)."""

from __future__ import annotations

import json
import os
import shutil

from calibrl.errors import UsageError
from calibrl.files import cache_dir
from calibrl.models.tiny import FAMILIES, SIZES, build_tiny_model, load_processor, load_tiny_model, save_tiny_model

TINY_PREFIX = "tiny:"


def parse_tiny_spec(spec: str) -> tuple[str, str]:
    """'tiny:qwen2_5_vl:small' -> ('qwen2_5_vl', 'small'), checked against the known families and sizes."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[1] not in FAMILIES or parts[2] not in SIZES:
        raise UsageError(f"model {spec!r}: expected tiny:<family>:<size> with family in {list(FAMILIES)} "
                         f"and size in {list(SIZES)}")
    return parts[1], parts[2]


def tiny_model_dir(spec: str, seed: int = 0) -> str:
    """Build `tiny:<family>:<size>` once (tokenizer trained on the task corpus) and cache it; returns the dir."""
    family, size = parse_tiny_spec(spec)
    out = cache_dir() / f"tiny-{family}-{size}-seed{seed}"
    if not (out / "config.json").is_file():
        model, processing_class = build_tiny_model(family, size, seed=seed)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        save_tiny_model(model, processing_class, str(tmp))
        try:
            tmp.rename(out)  # whole or not at all
        except OSError:  # another process finished the same build first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_model_path(spec: str, seed: int = 0) -> str:
    """A model directory (or hub id) for `spec`: tiny specs are built into the cache first."""
    if spec.startswith(TINY_PREFIX):
        return tiny_model_dir(spec, seed)
    if os.path.isdir(spec):
        if not any(os.path.isfile(os.path.join(spec, f)) for f in ("config.json", "adapter_config.json")):
            raise UsageError(f"model folder {spec} has no config.json")
        return spec
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UsageError(f"model not found: {spec}")
    from calibrl.hub import hub_model_path

    try:  # a hub id: one short request, instead of transformers' half minute of retries when offline
        return hub_model_path(spec)
    except LookupError as e:
        raise UsageError(str(e)) from None


def _is_tiny_dir(path: str) -> bool:
    """A saved model of a family `calibrl.models` builds, with its processor (tokenizer) files."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config) or not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") in FAMILIES


def load_model(spec: str, seed: int = 0, model_init_kwargs: dict | str | None = None):
    """(model, processing_class) for a model spec; tiny specs build offline, others use `from_pretrained`."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars: noise next to the training bar
    path = resolve_model_path(spec, seed)
    kwargs = dict(json.loads(model_init_kwargs) if isinstance(model_init_kwargs, str) else model_init_kwargs or {})
    if os.path.isfile(os.path.join(path, "adapter_config.json")):  # a LoRA run saves only its adapter
        return _load_adapter(path, seed, kwargs)
    if not kwargs and _is_tiny_dir(path):  # our own tiny models load without importing TRL (~5 s)
        return load_tiny_model(path)
    try:
        from trl.trainer.utils import create_model_from_path

        model = create_model_from_path(path, **kwargs)
        if os.path.isdir(path):
            processing_class = load_processor(path)
        else:
            from transformers import AutoProcessor

            processing_class = AutoProcessor.from_pretrained(path)
    except OSError as e:
        raise UsageError(f"could not load model {spec!r}: {' '.join(str(e).split())[:300]}") from None
    return model, processing_class


def _load_adapter(path: str, seed: int, kwargs: dict):
    """A peft adapter folder: its base model (named in adapter_config.json) with the adapter merged in."""
    from peft import PeftModel

    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"adapter {path} does not name its base model (base_model_name_or_path)")
    try:
        model, processing_class = load_model(base, seed, kwargs or None)
    except UsageError as e:
        raise UsageError(f"adapter {path}: its base model cannot be loaded ({e})") from None
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model, processing_class


def freeze_vision_tower(model) -> int:
    """Stop gradients into the vision encoder; the projector into the language model (Qwen's `merger`,
    LLaVA's `multi_modal_projector`) keeps training. Returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        in_encoder = any(p in parts for p in ("visual", "vision_tower", "vision_model"))
        if in_encoder and "merger" not in parts and "multi_modal_projector" not in parts:
            param.requires_grad_(False)
            frozen += 1
    if frozen == 0:
        raise UsageError("freeze_vision_tower=true but the model has no vision encoder")
    return frozen


def lora_config(run):
    """A peft `LoraConfig` from a config's `lora_*` fields (`RunArgs`), or None when `lora_r` is 0."""
    if run.lora_r <= 0:
        return None
    from peft import LoraConfig

    return LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout,
                      target_modules=list(run.lora_target_modules), task_type="CAUSAL_LM")
