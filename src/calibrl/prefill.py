"""Shared prefill in generation (HF `generate`, no vLLM): each distinct prompt and its images run once.

GRPO asks `generate` for G rollouts of each prompt, so TRL's batch holds every prompt G times and the
prefill — prompt tokens, image tokens, the vision tower — runs G times per prompt. Here, for the duration of
one `generate` call, two of the model's generation steps are replaced (on the instance, nothing global):

  `_maybe_prepare_encoder_kwargs_for_generation`  decides, for the whole batch, whether it can share (rows
      grouped by content: the same prompt tokens and the same images pixel for pixel, wherever they sit in the
      batch); if so it leaves the raw images in place instead of encoding them for every row (they are
      encoded inside the shared prefill, once per distinct prompt); if not, the original runs, unchanged.
  `_prefill`   runs the original prefill on one row per distinct prompt (its tokens, mask, position ids — for
      Qwen2.5-VL the 3-D rope positions `generate` already built for every row — and its images), then expands
      what it produced to the B rows: the KV cache (`Cache.reorder_cache` with repeated indices), the
      next-token logits, and per-sequence model state (Qwen2.5-VL's `rope_deltas`).

Everything else is `generate`'s own: the same logits processors, warpers, sampling, stopping criteria and EOS
handling, on the same (B, V) logits. Each row gets the cache and logits its prompt's representative computed,
which are the repeated layout's up to float rounding (the rows are independent in every layer).

Shapes: input_ids, attention_mask (B, P), left-padded; position_ids (B, P), or (4, B, P) for Qwen2.5-VL (text
positions, then the 3-D rope index); cache layers (B, H_kv, P, d); prefill logits (B, 1, V). Distinct prompts:
n ≤ B, `inv` (B,) maps each row to its prompt's representative.

Where it cannot share (a model it does not know, an option that changes the prefill, a cache it cannot
expand, a batch with no repeated prompt), `generate` runs as it is and `on_fallback(reason)` is called; the
caller logs each reason once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from calibrl.prefix import _image_spans, core_model, prompt_groups

__all__ = ["FAMILIES", "unsupported_reason", "config_reason", "image_rows", "shared_prefill"]

# model_type -> the per-sequence state the model keeps between forwards (attributes of the model or of its
# `.model`), expanded with the cache. Its own table, not calibrl.prefix's: generation runs the model's forward
# unchanged, so what matters here is only what a prefill leaves behind per row.
FAMILIES: dict[str, tuple[str, ...]] = {"qwen2": (), "llama": (), "llava": (), "qwen2_5_vl": ("rope_deltas",)}

# Generate inputs it knows how to take a row subset of: per-row (B, ...) fields, per-image fields, and
# per-image-patch pixel rows. Anything else that is a tensor stops it (a reason, not a guess).
ROW_FIELDS = ("attention_mask", "token_type_ids", "mm_token_type_ids")
IMAGE_FIELDS = ("pixel_values", "image_grid_thw")


def unsupported_reason(model) -> str | None:
    """Why this model cannot share its prefill, or None. Static: the model alone (attention implementation
    and TRL's fused head do not matter here: the prefill itself is the model's unchanged forward)."""
    m = core_model(model)
    cfg = getattr(m, "config", None)
    if cfg is None or not hasattr(m, "_prefill") or not hasattr(m, "_maybe_prepare_encoder_kwargs_for_generation"):
        return f"{type(m).__name__} is not a transformers generation model with a separate prefill"
    if cfg.model_type not in FAMILIES:
        return f"model_type {cfg.model_type!r} is not one it knows ({', '.join(FAMILIES)})"
    if cfg.model_type == "llava" and cfg.get_text_config().model_type not in FAMILIES:
        return f"LLaVA's language model {cfg.get_text_config().model_type!r} is not one it knows"
    if cfg.is_encoder_decoder:
        return "an encoder-decoder model"
    return None


def config_reason(generation_config) -> str | None:
    """Why this generation config cannot share the prefill, or None: options that change what the prefill is
    (chunks, a preallocated or quantized cache, beams or several sequences per row, an assistant) or that
    return per-row prefill outputs this does not expand (attentions, hidden states)."""
    g = generation_config
    if getattr(g, "prefill_chunk_size", None) is not None:
        return "prefill_chunk_size splits the prefill into chunks"
    if getattr(g, "cache_implementation", None) is not None:
        return f"cache_implementation={g.cache_implementation!r} (only the dynamic cache is expanded)"
    if (g.num_beams or 1) > 1 or (g.num_return_sequences or 1) > 1:
        return "num_beams or num_return_sequences > 1 expands the batch inside generate"
    if getattr(g, "is_assistant", False) or getattr(g, "prompt_lookup_num_tokens", None) is not None:
        return "assisted decoding"
    if g.output_attentions or g.output_hidden_states:
        return "output_attentions / output_hidden_states return per-row prefill outputs"
    if g.use_cache is False:
        return "use_cache=False: there is no cache to share"
    return None


def image_rows(model, input_ids, image_grid_thw=None, pixel_values=None) -> list[int] | None:
    """Images per row (num_images), read off the image tokens: each image fills a known number of them
    (Qwen2.5-VL: its patch grid over merge², LLaVA: all images alike). None when they do not add up."""
    cfg = core_model(model).config
    tok = getattr(cfg, "image_token_id", None)
    tok = getattr(cfg, "image_token_index", None) if tok is None else tok
    per_row = (input_ids == tok).sum(1).tolist()
    if image_grid_thw is not None:
        merge = cfg.vision_config.spatial_merge_size
        sizes = (image_grid_thw.prod(-1) // merge ** 2).tolist()
    else:
        n = pixel_values.size(0)
        if n == 0 or sum(per_row) % n:
            return None
        sizes = [sum(per_row) // n] * n
    out, i = [], 0
    for c in per_row:
        k = 0
        while c > 0 and i < len(sizes):
            c -= sizes[i]
            i, k = i + 1, k + 1
        if c != 0:
            return None
        out.append(k)
    return out if i == len(sizes) else None


@dataclass
class Plan:
    """One generate call's sharing: rows grouped by prompt, and which images belong to the representatives."""

    batch: int
    first: list[int]  # (n,) one representative row per distinct prompt
    inv: torch.Tensor  # (B,) each row's index into `first`
    images: list[int] | None  # indices of the representatives' images, in row order (VLMs)
    spans: list[tuple[int, int]] | None  # per image, its rows of pixel_values [lo, hi)


def _plan(model, input_ids, model_kwargs) -> Plan | str:
    """The batch's groups, or why it cannot share (a reason)."""
    for k, v in model_kwargs.items():
        if isinstance(v, torch.Tensor) and k not in ROW_FIELDS + IMAGE_FIELDS + ("position_ids",):
            return f"generate input {k!r} is not one it knows"
    B, P = input_ids.shape
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    if mask.shape != input_ids.shape or (mask.long().diff(dim=1) < 0).any():
        return "prompts are not left-padded"
    pv, grid = model_kwargs.get("pixel_values"), model_kwargs.get("image_grid_thw")
    num_images = spans = None
    if pv is not None:
        num_images = image_rows(model, input_ids, grid, pv)
        if num_images is None:
            return "the image tokens do not match the images"
    groups = prompt_groups(input_ids, mask, 0, pv, grid, num_images)
    if len(groups) == B:
        return "no two rows of a batch share a prompt"
    first = [g[0] for g in groups]
    inv = torch.empty(B, dtype=torch.long)
    for gi, g in enumerate(groups):
        inv[g] = gi
    images = None
    if pv is not None:
        rows_of_image, spans = _image_spans(pv, grid, num_images)
        images = [i for r in first for i in rows_of_image[r]]
    return Plan(B, first, inv.to(input_ids.device), images, spans)


def _rows(plan: Plan, model_kwargs: dict) -> dict:
    """The generate inputs of the representatives only: rows, their images, their pixel rows."""
    first = torch.tensor(plan.first, device=plan.inv.device)
    kw = dict(model_kwargs)
    for k in ROW_FIELDS:
        if isinstance(kw.get(k), torch.Tensor):
            kw[k] = kw[k][first]
    pos = kw.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() >= 2 and pos.size(-2) == plan.batch:  # (..., B, P)
        kw["position_ids"] = pos.index_select(pos.dim() - 2, first)
    if plan.images is not None:
        pv = kw["pixel_values"]
        kw["pixel_values"] = torch.cat([pv[plan.spans[i][0]:plan.spans[i][1]] for i in plan.images]) \
            if plan.images else pv[:0]
        if kw.get("image_grid_thw") is not None:
            kw["image_grid_thw"] = kw["image_grid_thw"][plan.images]
        if not plan.images:  # no representative has an image: a text prefill
            kw.pop("pixel_values"), kw.pop("image_grid_thw", None)
    return kw


def _expand_state(m, inv: torch.Tensor, n: int) -> None:
    """Per-sequence state the model keeps (Qwen2.5-VL's rope_deltas, (n, 1) if the prefill set it) to B rows."""
    for owner in (m, getattr(m, "model", None)):
        for name in FAMILIES[m.config.model_type]:
            v = getattr(owner, name, None) if owner is not None else None
            if isinstance(v, torch.Tensor) and v.size(0) == n and n != inv.numel():
                setattr(owner, name, v[inv.to(v.device)])


def _cache_reason(cache) -> str | None:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache:
        return f"cache {type(cache).__name__} is not a DynamicCache"
    if getattr(cache, "offloading", False):
        return "an offloaded cache"
    if cache.get_seq_length() != 0:
        return "generate continues from a filled cache"
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return "cache layers other than DynamicLayer (sliding, linear, quantized)"
    return None


@contextlib.contextmanager
def shared_prefill(model, on_fallback=None, stats: dict | None = None):
    """While active, `generate` on `model` prefills each distinct prompt once (see the module docstring).
    `on_fallback(reason)` is called whenever a generate call runs unshared; `stats["shared"]` counts the
    prefills that were shared (tests and the benchmark read it)."""
    on_fallback = on_fallback or (lambda reason: None)
    stats = {} if stats is None else stats
    stats.setdefault("shared", 0)
    m = core_model(model)
    reason = unsupported_reason(m)
    if reason is not None:
        on_fallback(reason)
        yield stats
        return
    encode, prefill = m._maybe_prepare_encoder_kwargs_for_generation, m._prefill
    state: dict = {}

    def maybe_encode(inputs_tensor, model_kwargs, model_input_name, generation_config):
        # Decide here, before the images would be encoded for every row.
        state.clear()
        why = config_reason(generation_config)
        if why is None and model_input_name != "input_ids":
            why = f"generate from {model_input_name}, not input_ids"
        plan = _plan(m, inputs_tensor, model_kwargs) if why is None else why
        if isinstance(plan, str):
            on_fallback(plan)
            return encode(inputs_tensor, model_kwargs, model_input_name, generation_config)
        state["plan"] = plan
        return model_kwargs  # raw images stay: the shared prefill encodes each distinct prompt's once

    def shared(input_ids, generation_config, model_kwargs, is_first_iteration=True):
        plan = state.pop("plan", None)
        why = None
        if plan is not None:
            why = (_cache_reason(model_kwargs.get("cache")) or config_reason(generation_config)
                   or (None if input_ids.size(0) == plan.batch and is_first_iteration else "the batch changed"))
        if plan is None or why is not None:
            if why is not None:  # the images were left raw: the unchanged prefill encodes them in its forward
                on_fallback(why)
            return prefill(input_ids, generation_config, model_kwargs, is_first_iteration)
        n = len(plan.first)
        out = prefill(input_ids[plan.first], generation_config, _rows(plan, model_kwargs), is_first_iteration)
        cache = out.get("cache")
        if cache is not model_kwargs.get("cache"):
            raise RuntimeError("shared prefill: the prefill returned a cache other than generate's")
        cache.reorder_cache(plan.inv)  # (n, H, P, d) -> (B, H, P, d): each row its prompt's keys and values
        out["logits"] = out["logits"][plan.inv.to(out["logits"].device)]
        _expand_state(m, plan.inv, n)
        for k in IMAGE_FIELDS:  # as generate's own image encoding does: the images are in the cache now
            model_kwargs.pop(k, None)
        stats["shared"] += 1
        return out

    names = ("_maybe_prepare_encoder_kwargs_for_generation", "_prefill")
    before = {k: m.__dict__[k] for k in names if k in m.__dict__}  # instance-level ones (rare) come back after
    m._maybe_prepare_encoder_kwargs_for_generation, m._prefill = maybe_encode, shared
    try:
        yield stats
    finally:
        for k in names:
            if k in before:
                setattr(m, k, before[k])
            else:
                delattr(m, k)
