"""Shared prefill in generation (calibrl.prefill) is exact: the same first-step logits (float tolerance), the
same greedy ids and the same sampled ids (fixed seed) as plain `generate`, for each supported family, with
left padding and shuffled rows; through the trainer, the same completions; fallbacks said once. fp32."""

import logging

import pytest
import torch

from calibrl import prefill
from calibrl.models import load_tiny_model

from helpers import digit_rows, make_trainer, mixed_length_prompts, text_rows

ATOL = 1e-5
G = 3
DIRS = {"qwen2_5_vl": "tiny_vlm_dir", "llava": "tiny_llava_dir", "qwen2": "tiny_text_dir"}


def _inputs(proc, family: str, images_per_prompt: int = 1, seed: int = 0, repeat: int = G):
    """Three prompts of different lengths (left padding), each `repeat` times, rows shuffled (grouping is by
    content, not position); VLM prompts with their images (several per prompt for Qwen2.5-VL if asked)."""
    prompts = mixed_length_prompts(family, images_per_prompt)
    rows = [p for p in prompts for _ in range(repeat)]
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [rows[i] for i in perm]
    if family == "qwen2":
        texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in rows]
        return proc(texts, padding=True, padding_side="left", return_tensors="pt"), proc
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in rows]
    enc = proc(text=texts, images=[imgs for _, imgs in rows], padding=True, padding_side="left", return_tensors="pt")
    return enc, proc.tokenizer


def _generate(model, enc, tok, shared: bool, seed: int = 0, **kw):
    """`generate` plain or inside `shared_prefill`; the returned dict has the ids, per-step logits and how many
    prefills were shared / which reasons fell back."""
    kw = {"max_new_tokens": 10, "pad_token_id": tok.pad_token_id, "return_dict_in_generate": True,
          "output_logits": True, **kw}
    torch.manual_seed(seed)
    if not shared:
        out = model.generate(**enc, **kw)
        return {"ids": out.sequences, "logits": out.logits, "shared": 0, "reasons": []}
    reasons, stats = [], {}
    with prefill.shared_prefill(model, reasons.append, stats):
        out = model.generate(**enc, **kw)
    return {"ids": out.sequences, "logits": out.logits, "shared": stats["shared"], "reasons": reasons}


def _model(request, family):
    model, proc = load_tiny_model(request.getfixturevalue(DIRS[family]))
    return model.eval(), proc


CASES = [("qwen2_5_vl", 1), ("qwen2_5_vl", 3), ("llava", 1), ("qwen2", 1)]


@pytest.mark.parametrize("family,n_img", CASES)
def test_first_step_logits_equal_the_repeated_prefill(family, n_img, request):
    model, proc = _model(request, family)
    enc, tok = _inputs(proc, family, n_img)
    assert enc["attention_mask"][:, 0].min() == 0  # left padding is exercised
    plain = _generate(model, enc, tok, False, do_sample=False, max_new_tokens=1)
    shared = _generate(model, enc, tok, True, do_sample=False, max_new_tokens=1)
    assert shared["shared"] == 1 and shared["reasons"] == []
    torch.testing.assert_close(shared["logits"][0], plain["logits"][0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,n_img", CASES)
def test_greedy_ids_equal_plain_generate(family, n_img, request):
    model, proc = _model(request, family)
    enc, tok = _inputs(proc, family, n_img, seed=1)
    plain = _generate(model, enc, tok, False, do_sample=False, max_new_tokens=16)
    shared = _generate(model, enc, tok, True, do_sample=False, max_new_tokens=16)
    assert shared["shared"] == 1
    assert torch.equal(shared["ids"], plain["ids"])
    for a, b in zip(shared["logits"], plain["logits"]):  # every step, not only the prefill
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,n_img", CASES)
def test_sampled_ids_equal_plain_generate_with_a_fixed_seed(family, n_img, request):
    """Sampling as TRL sets it up (temperature, top-p, top-k, repetition penalty): the same logits processors
    see the same logits, and multinomial draws the same numbers, so the sampled ids are identical."""
    model, proc = _model(request, family)
    enc, tok = _inputs(proc, family, n_img, seed=2)
    kw = dict(do_sample=True, temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.1, max_new_tokens=16)
    for seed in (0, 1):
        plain = _generate(model, enc, tok, False, seed=seed, **kw)
        shared = _generate(model, enc, tok, True, seed=seed, **kw)
        assert shared["shared"] == 1
        assert torch.equal(shared["ids"], plain["ids"])


def test_conflicting_options_and_unique_prompts_fall_back(request):
    """Each reason reaches `on_fallback`, and generate then runs as it is (the same ids)."""
    model, proc = _model(request, "qwen2_5_vl")
    enc, tok = _inputs(proc, "qwen2_5_vl")
    plain = _generate(model, enc, tok, False, do_sample=False, max_new_tokens=4, prefill_chunk_size=64)
    shared = _generate(model, enc, tok, True, do_sample=False, max_new_tokens=4, prefill_chunk_size=64)
    assert shared["reasons"] == ["prefill_chunk_size splits the prefill into chunks"] and shared["shared"] == 0
    assert torch.equal(shared["ids"], plain["ids"])
    enc1, _ = _inputs(proc, "qwen2_5_vl", repeat=1)
    shared = _generate(model, enc1, tok, True, do_sample=False, max_new_tokens=4)
    assert shared["reasons"] == ["no two rows of a batch share a prompt"]
    assert torch.equal(shared["ids"], _generate(model, enc1, tok, False, do_sample=False, max_new_tokens=4)["ids"])


def test_unknown_model_falls_back_and_hooks_are_removed(request, monkeypatch):
    model, proc = _model(request, "qwen2")
    enc, tok = _inputs(proc, "qwen2")
    monkeypatch.delitem(prefill.FAMILIES, "qwen2")
    shared = _generate(model, enc, tok, True, do_sample=False, max_new_tokens=2)
    assert shared["reasons"] == ["model_type 'qwen2' is not one it knows (llama, llava, qwen2_5_vl)"]
    monkeypatch.undo()
    _generate(model, enc, tok, True, do_sample=False, max_new_tokens=2)
    assert "_prefill" not in model.__dict__ and "_maybe_prepare_encoder_kwargs_for_generation" not in model.__dict__


def test_same_tokens_different_images_are_different_prompts(request):
    model, proc = _model(request, "qwen2_5_vl")
    enc, tok = _inputs(proc, "qwen2_5_vl")
    enc["pixel_values"] = enc["pixel_values"].clone()
    enc["pixel_values"][:int(enc["image_grid_thw"][0].prod())] += 1.0  # row 0: same tokens, other pixels
    plan = prefill._plan(model, enc["input_ids"], {k: v for k, v in enc.items() if k != "input_ids"})
    assert len(plan.first) == 4 and 0 in plan.first
    plain = _generate(model, enc, tok, False, do_sample=False, max_new_tokens=8)
    shared = _generate(model, enc, tok, True, do_sample=False, max_new_tokens=8)
    assert torch.equal(shared["ids"], plain["ids"])
    torch.testing.assert_close(shared["logits"][0], plain["logits"][0], atol=ATOL, rtol=0)


# ------------------------------------------------------------------ through the trainer
def _record_generations(tr):
    seen = []
    inner = tr._generate_single_turn

    def recorded(*a, **k):
        out = inner(*a, **k)
        seen.append([list(c) for c in out[0]])
        return out

    tr._generate_single_turn = recorded
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("family,kw", [("qwen2_5_vl", dict(method="calibrl")), ("qwen2_5_vl", dict(method="luffy")),
                                       ("llava", dict(method="grpo")), ("qwen2", dict(method="grpo"))])
def test_a_short_run_generates_the_same_completions(family, kw, request, tmp_path):
    model_dir = request.getfixturevalue(DIRS[family])
    rows = text_rows(32) if family == "qwen2" else digit_rows(32)
    runs = {}
    for on in (True, False):
        tr = make_trainer(model_dir, tmp_path / str(on), rows=rows, shared_prefix=on, max_steps=3, optim="sgd",
                          learning_rate=0.5, **kw)
        seen = _record_generations(tr)
        tr.train()
        runs[on] = (seen, tr._prefill_stats["shared"])
    assert runs[True][1] == len(runs[True][0]) == 3 and runs[False][1] == 0  # every generate shared (on only)
    assert runs[True][0] == runs[False][0]


@pytest.mark.slow
def test_the_trainer_logs_a_generation_fallback_once(tiny_text_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.delitem(prefill.FAMILIES, "qwen2")
    tr = make_trainer(tiny_text_dir, tmp_path, rows=text_rows(32), max_steps=2)
    with caplog.at_level(logging.WARNING, logger="calibrl.trainer"):
        tr.train()
    lines = [r.getMessage() for r in caplog.records if "shared_prefix" in r.getMessage()]
    assert lines == ["shared_prefix: generation prefills each rollout's prompt since model_type 'qwen2' is not one "
                     "it knows (llama, llava, qwen2_5_vl)"]
    assert tr._prefill_stats["shared"] == 0
