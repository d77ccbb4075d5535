"""The shared-prefix forward (calibrl.prefix) is exact: the same per-token log-probs, entropies and parameter
gradients as TRL's repeated layout, for each supported family, and the same losses and weights through the
trainer for every method. fp32 throughout; tolerances are float rounding (different summation orders)."""

import contextlib
import logging
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from calibrl import prefix
from calibrl.models import load_tiny_model

from helpers import assert_same_params, digit_rows, losses_of, make_trainer, mixed_length_prompts, params, text_rows

ATOL = 1e-5
G, T = 3, 9  # completions per prompt, completion columns


def _trl_forward(model, batch):
    """TRL's own `_get_per_token_logps_and_entropies` on the repeated layout (it only reads `accelerator`)."""
    fake = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True))
    return GRPOTrainer._get_per_token_logps_and_entropies(fake, model, batch["input_ids"], batch["attention_mask"], T,
                                                          compute_entropy=True, **batch["mm"])[:2]


def _shared_forward(model, batch, **kw):
    assert prefix.unsupported_reason(model) is None
    assert prefix.layout_reason(model, batch["input_ids"], batch["attention_mask"], T, **batch["mm"]) is None
    return prefix.shared_logps_and_entropies(model, batch["input_ids"], batch["attention_mask"], T, **kw,
                                             **batch["mm"])


def _model(model_dir, attn="sdpa"):
    model, proc = load_tiny_model(model_dir)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    return model.train(), proc  # dropout is 0 in the tiny configs: train mode is deterministic


def _batch(proc, family: str, images_per_prompt: int = 1, seed: int = 0):
    """A repeated-layout batch as TRL builds it: each prompt G times, left-padded; random completions of random
    lengths, right-padded; rows shuffled (as TRL shuffles a generation batch before splitting it)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [p for p in mixed_length_prompts(family, images_per_prompt) for _ in range(G)]
    tok = proc if family == "qwen2" else proc.tokenizer
    texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) if family == "qwen2"
             else proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _ in prompts]
    if family == "qwen2":
        enc = tok(texts, padding=True, padding_side="left", return_tensors="pt")
    else:
        enc = proc(text=texts, images=[imgs for _, imgs in prompts], padding=True, padding_side="left",
                   return_tensors="pt")
    B = len(prompts)
    ordinary = torch.tensor([i for i in range(len(tok)) if i not in set(tok.all_special_ids)])
    comp = ordinary[torch.randint(len(ordinary), (B, T), generator=g)]
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T  # one full-length completion
    cmask = (torch.arange(T) < lens[:, None]).long()
    comp = comp.masked_fill(cmask == 0, tok.pad_token_id)
    perm = torch.randperm(B, generator=g)
    mm = {}
    if family != "qwen2":
        num_images = [len(imgs) for _, imgs in prompts]
        if "image_grid_thw" in enc:  # regroup pixel rows by the shuffled row order
            per_img = enc["image_grid_thw"].prod(-1).tolist()
            pix = list(torch.split(enc["pixel_values"], per_img))
            grids = list(enc["image_grid_thw"])
        else:
            pix, grids = list(enc["pixel_values"].split(1)), None
        starts = [sum(num_images[:r]) for r in range(B)]
        order = [starts[r] + j for r in perm.tolist() for j in range(num_images[r])]
        mm["pixel_values"] = torch.cat([pix[i] for i in order])
        if grids is not None:
            mm["image_grid_thw"] = torch.stack([grids[i] for i in order])
        mm["num_images"] = [num_images[r] for r in perm.tolist()]
        if "mm_token_type_ids" in enc:
            mm["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(comp)], 1)[perm]
    return {"input_ids": torch.cat([enc["input_ids"], comp], 1)[perm],
            "attention_mask": torch.cat([enc["attention_mask"], cmask], 1)[perm], "mm": mm}


def _grads(model, logps, ent, seed=1):
    """Gradients of a random linear function of the log-probs and entropies (every position counts)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(logps.shape, generator=g), torch.randn(ent.shape, generator=g)
    model.zero_grad(set_to_none=True)
    ((logps * w1).sum() + (ent * w2).sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_exact(model, batch, **kw):
    ref_lp, ref_ent = _trl_forward(model, batch)
    ref_g = _grads(model, ref_lp, ref_ent)
    lp, ent = _shared_forward(model, batch, **kw)
    got_g = _grads(model, lp, ent)
    assert lp.shape == ref_lp.shape and ent.shape == ref_ent.shape
    torch.testing.assert_close(lp, ref_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=ATOL, rtol=0)
    assert (lp[batch["attention_mask"][:, -T:] == 0] == 0).all()  # padding scores 0, as TRL's head gives
    assert got_g.keys() == ref_g.keys() and len(ref_g) > 0
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


# ------------------------------------------------------------------ the forward, per family
@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "qwen2"])
def test_logps_entropies_and_gradients_equal_the_repeated_layout(family, request):
    model, proc = _model(request.getfixturevalue({"qwen2_5_vl": "tiny_vlm_dir", "llava": "tiny_llava_dir",
                                                  "qwen2": "tiny_text_dir"}[family]))
    batch = _batch(proc, family)
    assert batch["attention_mask"][:, 0].min() == 0  # left padding is exercised
    groups = prefix.prompt_groups(batch["input_ids"], batch["attention_mask"], T, batch["mm"].get("pixel_values"),
                                  batch["mm"].get("image_grid_thw"), batch["mm"].get("num_images"))
    assert sorted(len(g) for g in groups) == [G] * 3  # the shuffled rows are found again by their prompt
    _assert_exact(model, batch)


def test_several_images_per_prompt_qwen2_5_vl(tiny_vlm_dir):
    model, proc = _model(tiny_vlm_dir)
    batch = _batch(proc, "qwen2_5_vl", images_per_prompt=3)
    assert len(batch["mm"]["num_images"]) == 3 * G and set(batch["mm"]["num_images"]) == {3}
    _assert_exact(model, batch)


def test_eager_attention_and_chunks(tiny_text_dir, tiny_vlm_dir):
    """Eager attention reads an additive float mask; `batch_size` chunks by whole groups."""
    model, proc = _model(tiny_text_dir, attn="eager")
    _assert_exact(model, _batch(proc, "qwen2"), batch_size=4)
    model, proc = _model(tiny_vlm_dir)
    _assert_exact(model, _batch(proc, "qwen2_5_vl", seed=3), batch_size=G)


def test_same_tokens_different_images_are_different_prompts(tiny_vlm_dir):
    model, proc = _model(tiny_vlm_dir)
    batch = _batch(proc, "qwen2_5_vl")
    pv = batch["mm"]["pixel_values"].clone()
    pv[:int(batch["mm"]["image_grid_thw"][0].prod())] += 1.0  # row 0's image: same tokens, other pixels
    batch["mm"]["pixel_values"] = pv
    groups = prefix.prompt_groups(batch["input_ids"], batch["attention_mask"], T, pv,
                                  batch["mm"]["image_grid_thw"], batch["mm"]["num_images"])
    assert len(groups) == 4 and [0] in groups
    _assert_exact(model, batch)


def test_the_sdpa_marker_fails_loudly_without_our_entry(tiny_text_dir, monkeypatch):
    """Attention that is not calibrl.prefix's sdpa entry cannot read the marker mask as a mask: it raises."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, proc = _model(tiny_text_dir)
    monkeypatch.setattr(prefix, "install_attention", lambda: None)
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "sdpa", sdpa_attention_forward)
    with pytest.raises(RuntimeError):
        _shared_forward(model, _batch(proc, "qwen2"))


def test_layout_and_model_reasons(tiny_text_dir):
    model, proc = _model(tiny_text_dir)
    b = _batch(proc, "qwen2")
    ids, mask = b["input_ids"], b["attention_mask"]
    assert prefix.layout_reason(model, ids, mask, T, compute_aux_loss=True).startswith("the MoE")
    holes = mask.clone()
    holes[0, -T] = 0
    holes[0, -T + 1] = 1
    assert prefix.layout_reason(model, ids, holes, T) == "completions are not right-padded"
    right = mask.clone()
    right[0, :3] = 1
    right[0, ids.size(1) - T - 1] = 0
    assert prefix.layout_reason(model, ids, right, T) == "prompts are not left-padded"
    plain, _ = load_tiny_model(tiny_text_dir)
    assert "fused LM head" in prefix.unsupported_reason(plain)
    model.config._attn_implementation = "flash_attention_2"
    assert "ignores a 4-D block mask" in prefix.unsupported_reason(model)


# ------------------------------------------------------------------ through the trainer
METHODS = [dict(method="grpo"), dict(method="dapo"), dict(method="luffy"), dict(method="rlplus")] + \
    [dict(method="calibrl", gap=gap) for gap in ("token", "sequence", "sequence_mean", "constant")]
# Two micro-batches per generation batch (partial, shuffled groups), old log-probs (steps_per_generation >
# gradient_accumulation_steps, so TRL computes them) and a reference model (beta > 0): every TRL forward.
ACCUM = dict(steps_per_generation=2, gradient_accumulation_steps=1, beta=0.04, max_completion_length=10)


def _count_shared(monkeypatch):
    calls = []
    real = prefix.shared_logps_and_entropies

    def counted(*a, **k):
        calls.append(a[1].size(0))
        return real(*a, **k)

    monkeypatch.setattr(prefix, "shared_logps_and_entropies", counted)
    return calls


def _micro_batches(tr, rows):
    """The generation batch through TRL's `_prepare_inputs`: generated, scored, shuffled, split."""
    tr.model.train()
    tr.current_gradient_accumulation_steps = tr.args.gradient_accumulation_steps
    torch.manual_seed(0)
    first = tr._prepare_inputs(rows)
    return [first] + [tr._buffered_inputs[i] for i in range(1, tr.args.steps_per_generation)]


def _loss_parts(tr, inputs):
    """The loss, each logged part and every parameter's gradient, for one micro-batch."""
    tr._metrics["train"].clear()
    tr.model.zero_grad(set_to_none=True)
    loss = tr._compute_loss(tr.model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v[-1] for k, v in tr._metrics["train"].items()}, grads


@pytest.mark.slow
@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: "-".join(kw.values()))
def test_each_loss_part_and_the_rollout_logps_equal_the_repeated_layout(tiny_vlm_dir, tmp_path, kw, monkeypatch):
    calls = _count_shared(monkeypatch)
    rows = [r for r in digit_rows(4) for _ in range(4)]  # 4 groups of 4: two micro-batches of 8 rows
    shared = make_trainer(tiny_vlm_dir, tmp_path / "on", **ACCUM, **kw)
    plain = make_trainer(tiny_vlm_dir, tmp_path / "off", shared_prefix=False, **ACCUM, **kw)
    mb_on, mb_off = _micro_batches(shared, rows), _micro_batches(plain, rows)
    assert calls == [16, 16], "the old and reference forwards did not take the shared path"
    for a, b in zip(mb_on, mb_off):  # same rollouts; old / reference / expert log-probs equal
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        for k in ("old_per_token_logps", "ref_per_token_logps", "expert_logps"):
            if k in b:
                torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=0)
    for inputs in mb_off:  # each micro-batch, the same inputs for both
        loss_on, logs_on, g_on = _loss_parts(shared, inputs)
        loss_off, logs_off, g_off = _loss_parts(plain, inputs)
        torch.testing.assert_close(loss_on, loss_off, atol=ATOL, rtol=0)
        assert logs_on.keys() == logs_off.keys()
        for k in logs_off:
            assert logs_on[k] == pytest.approx(logs_off[k], abs=ATOL), k
        assert g_on.keys() == g_off.keys()
        for n in g_off:
            torch.testing.assert_close(g_on[n], g_off[n], atol=ATOL, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    assert calls[2:] == [8, 8], "the policy forward did not take the shared path"


@pytest.mark.slow
@pytest.mark.parametrize("family,kw", [
    ("qwen2_5_vl", dict(method="calibrl")),
    ("qwen2_5_vl", dict(method="luffy", gradient_accumulation_steps=2)),
    ("llava", dict(method="grpo", steps_per_generation=2, gradient_accumulation_steps=1)),
    ("qwen2", dict(method="calibrl", gap="sequence", gradient_accumulation_steps=2)),
])
def test_a_short_run_gives_the_same_weights(family, kw, request, tmp_path, monkeypatch):
    calls = _count_shared(monkeypatch)
    model_dir = request.getfixturevalue({"qwen2_5_vl": "tiny_vlm_dir", "llava": "tiny_llava_dir",
                                         "qwen2": "tiny_text_dir"}[family])
    rows = text_rows(32) if family == "qwen2" else digit_rows(32)
    runs = {}
    for on in (True, False):
        # SGD: the weights differ as the gradients do. Adam divides each gradient by its own running size, so a
        # rounding-level difference in a near-zero gradient (|g| ~ eps) becomes a sizeable share of a step.
        tr = make_trainer(model_dir, tmp_path / str(on), rows=rows, shared_prefix=on, max_steps=3, optim="sgd",
                          learning_rate=0.5, **kw)
        tr.train()
        runs[on] = tr
    assert calls, "the shared path was not taken"
    assert losses_of(runs[True]) == pytest.approx(losses_of(runs[False]), abs=1e-5)
    assert_same_params(params(runs[True]), params(runs[False]), atol=1e-5)
    model0, _ = load_tiny_model(model_dir)  # and the weights moved
    moved = max((p.detach() - params(runs[False])[n]).abs().max().item() for n, p in model0.named_parameters())
    assert moved > 1e-2, moved


@pytest.mark.slow
def test_a_model_that_cannot_share_falls_back_with_one_line(tiny_text_dir, tmp_path, monkeypatch, caplog):
    calls = _count_shared(monkeypatch)
    monkeypatch.delitem(prefix.FAMILIES, "qwen2")
    tr = make_trainer(tiny_text_dir, tmp_path, rows=text_rows(32), max_steps=2, gradient_accumulation_steps=2)
    with caplog.at_level(logging.WARNING, logger="calibrl.trainer"):
        tr.train()
    lines = [r.getMessage() for r in caplog.records if "shared_prefix" in r.getMessage()]
    assert lines == ["shared_prefix: the repeated layout (each rollout runs its prompt) since model_type 'qwen2' "
                     "is not one it knows (llama, llava, qwen2_5_vl)"]
    assert calls == []


def test_core_model_unwraps_a_deepspeed_like_engine_whose_config_is_a_dict():
    """DeepSpeed's engine has `.module` and a `.config` of its own (a dict): the model inside is what counts."""
    from calibrl.models import build_tiny_model
    from calibrl.prefix import core_model

    model, _ = build_tiny_model("qwen2", "nano", seed=0)

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"zero_optimization": {"stage": 3}}

    assert core_model(Engine(model)) is model
