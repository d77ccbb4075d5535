"""CalibRLTrainer end to end on a nano Qwen2.5-VL (CPU): equivalence with TRL, the expert path, each method."""

import math

import pytest
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from calibrl import CalibRLConfig, CalibRLTrainer
from calibrl.models import load_tiny_model

from helpers import (COMMON, assert_same_params, digit_rows, hash_accuracy, hash_format, losses_of, make_trainer,
                     params, text_rows)

pytestmark = pytest.mark.slow  # every test here trains a model or starts processes


# ------------------------------------------------------------------ equivalence with TRL
@pytest.mark.parametrize("extra", [
    dict(loss_type="dapo", scale_rewards="group"),
    dict(loss_type="grpo", scale_rewards="none", gradient_accumulation_steps=2, epsilon_high=0.28),
    dict(loss_type="dr_grpo", scale_rewards="group", delta=3.0),
    dict(loss_type="bnpo", scale_rewards="none", entropy_coef=0.01),
])
def test_method_grpo_reproduces_trl_grpo_trainer(tiny_vlm_dir, tmp_path, extra):
    ref = make_trainer(tiny_vlm_dir, tmp_path / "trl", cls=GRPOTrainer, cfg_cls=GRPOConfig, max_steps=2, **extra)
    ref.train()
    # shared_prefix=False: TRL runs the repeated layout, and weight-for-weight equality at 1e-6 after Adam needs
    # the same summation order (the shared prefix is equal to float rounding, which Adam's per-parameter
    # normalisation magnifies on near-zero gradients; tests/test_prefix.py compares the two layouts).
    ours = make_trainer(tiny_vlm_dir, tmp_path / "ours", method="grpo", max_steps=2, shared_prefix=False, **extra)
    ours.train()
    assert len(losses_of(ref)) == 2
    assert losses_of(ours) == pytest.approx(losses_of(ref), abs=1e-6)
    assert_same_params(params(ours), params(ref))
    # and the training really moved the weights (the comparison is not between two untouched models)
    model0, _ = load_tiny_model(tiny_vlm_dir)
    moved = max((p.detach() - params(ref)[n]).abs().max().item() for n, p in model0.named_parameters())
    assert moved > 1e-4


def test_calibrl_with_zero_guidance_reproduces_grpo(tiny_vlm_dir, tmp_path):
    grpo = make_trainer(tiny_vlm_dir, tmp_path / "g", method="grpo", max_steps=2)
    grpo.train()
    cal0 = make_trainer(tiny_vlm_dir, tmp_path / "c0", method="calibrl", guide_coef=0.0, max_steps=2)
    cal0.train()
    assert_same_params(params(cal0), params(grpo))
    cal = make_trainer(tiny_vlm_dir, tmp_path / "c", method="calibrl", guide_coef=0.5, max_steps=2)
    cal.train()
    diff = max((params(cal)[k] - params(grpo)[k]).abs().max().item() for k in params(grpo))
    assert diff > 1e-5, "the guidance term changed nothing"
    guide = [h["calibrl/guide_loss"] for h in cal.state.log_history if "calibrl/guide_loss" in h]
    assert any(abs(g) > 0 for g in guide)


# ------------------------------------------------------------------ the expert path
def test_expert_logps_are_the_policy_in_the_experts_own_context(tiny_vlm_dir, tmp_path):
    tr = make_trainer(tiny_vlm_dir, tmp_path, method="calibrl", max_completion_length=64)
    tr.model.train()
    rows = digit_rows(8)
    batch = [r for r in rows[:2] for _ in range(4)]  # two groups of 4, as the sampler lays them out
    torch.manual_seed(0)
    out = tr._generate_and_score_completions(batch)
    assert out["has_expert"].tolist() == [1.0] * 8
    # Independent computation: processor on prompt+image, then the expert's tokens and EOS, one forward.
    proc = tr.processing_class
    tok = proc.tokenizer
    for g in range(2):
        r = rows[g]
        text = proc.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        enc = proc(text=[text], images=[r["images"]], return_tensors="pt")
        e_ids = tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        ids = torch.cat([enc["input_ids"], torch.tensor([e_ids])], 1)
        with torch.no_grad():
            kw = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            if "mm_token_type_ids" in kw:
                kw["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], torch.zeros(1, len(e_ids), dtype=torch.long)], 1)
            logits = tr.model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits
        lp = torch.log_softmax(logits[0, -len(e_ids) - 1:-1].float(), -1).gather(-1, torch.tensor(e_ids)[:, None])[:, 0]
        n = int(out["expert_mask"][g * 4].sum())
        assert n == len(e_ids)
        for j in range(4):  # every row of the group carries its group's expert
            assert torch.allclose(out["expert_logps"][g * 4 + j, :n], lp, atol=1e-4)
    # pass sign comes from the accuracy component
    acc = tr._last_rewards_per_func[:, 0]
    assert out["pass_sign"].tolist() == [1.0 if a > 0.5 else -1.0 for a in acc.tolist()]


def test_missing_truncated_and_placeholder_experts(tiny_vlm_dir, tmp_path):
    rows = digit_rows(8)
    rows[0]["solution"] = None
    rows[1]["solution"] = "<think>look <|image_pad|> here</think><answer>3</answer>"
    tr = make_trainer(tiny_vlm_dir, tmp_path, method="calibrl", max_completion_length=10, rows=rows)
    tr.model.train()
    batch = [r for r in rows[:3] for _ in range(4)]
    out = tr._generate_and_score_completions(batch)
    assert out["has_expert"].tolist() == [0.0] * 4 + [1.0] * 8  # the missing group trains as plain GRPO
    pad_id = tr.processing_class.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids, truncated, stripped = tr.expert_token_ids(rows[1]["solution"])
    assert pad_id not in ids and stripped
    ids, truncated, _ = tr.expert_token_ids(rows[2]["solution"])
    assert truncated and len(ids) == 10 and ids[-1] == tr.eos_token_ids[0]
    m = tr._metrics["train"]
    assert m["calibrl/expert_missing"][-1] == pytest.approx(1 / 3)
    assert m["calibrl/expert_truncated"][-1] == pytest.approx(2 / 3)
    assert m["calibrl/expert_stripped"][-1] == pytest.approx(1 / 3)
    # list and dict solutions, as in the official data
    assert tr.expert_token_ids(["<answer>1</answer>", "x"])[0] == tr.expert_token_ids("<answer>1</answer>")[0]
    assert tr.expert_token_ids({"content": "<answer>1</answer>"})[0] == tr.expert_token_ids("<answer>1</answer>")[0]
    assert tr.expert_token_ids("   ")[0] is None


def test_grpo_warmup_really_switches_guidance_off(tiny_vlm_dir, tmp_path):
    tr = make_trainer(tiny_vlm_dir, tmp_path, method="calibrl", grpo_warmup_steps=2, max_steps=3)
    tr.train()
    logs = [h for h in tr.state.log_history if "calibrl/guidance_active" in h]
    assert [h["calibrl/guidance_active"] for h in logs] == [0.0, 0.0, 1.0]
    assert [h["calibrl/guide_loss"] for h in logs][:2] == [0.0, 0.0]
    assert "calibrl/expert_entropy" in logs[2] and "calibrl/expert_entropy" not in logs[0]


@pytest.mark.parametrize("method", ["luffy", "rlplus"])
def test_expert_slot_methods(tiny_vlm_dir, tmp_path, method):
    tr = make_trainer(tiny_vlm_dir, tmp_path, method=method, max_completion_length=64)
    tr.model.train()
    rows = digit_rows(8)
    rows[1]["solution"] = None
    batch = [r for r in rows[:2] for _ in range(4)]
    out = tr._generate_and_score_completions(batch)
    assert out["is_expert"].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]  # group 2 has no expert: all on-policy
    ids, _, _ = tr.expert_token_ids(rows[0]["solution"])
    n = int(out["completion_mask"][3].sum())
    assert out["completion_ids"][3, :n].tolist() == ids
    # advantages over on-policy rows only (expert excluded from the statistics), scale_rewards="none"
    rpf = tr._last_rewards_per_func
    total = rpf[:, 0] + 0.1 * rpf[:, 1]
    mean_on = total[:3].mean()
    assert torch.allclose(out["advantages"][:4], total[:4] - mean_on, atol=1e-6)
    tr.current_gradient_accumulation_steps = 1  # set by the training loop; we call the loss directly
    loss = tr._compute_loss(tr.model, out)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("method,extra", [
    ("calibrl", dict(gap="sequence")), ("calibrl", dict(gap="sequence_mean")), ("calibrl", dict(gap="constant")),
    ("luffy", dict(onpolicy_clip=False, expert_in_group_stats=True)), ("rlplus", {}), ("dapo", {}),
])
def test_every_method_trains_and_logs(tiny_vlm_dir, tmp_path, method, extra):
    tr = make_trainer(tiny_vlm_dir, tmp_path, method=method, max_steps=2, max_completion_length=40, **extra)
    tr.train()
    last = [h for h in tr.state.log_history if "loss" in h][-1]
    for key in ("calibrl/pg_loss", "calibrl/guide_loss", "entropy", "rewards/accuracy_reward/mean",
                "rewards/format_reward/mean", "calibrl/frac_zero_var_groups", "calibrl/frac_all_wrong_groups"):
        assert key in last and math.isfinite(last[key]), key
    assert 0 < last["entropy"] < math.log(tr.processing_class.tokenizer.vocab_size + 100)
    if method in ("luffy", "rlplus", "calibrl"):
        assert "calibrl/expert_entropy" in last
    if method == "calibrl":
        assert 0 <= last["calibrl/frac_full_slope"] <= 1 and 0 <= last["calibrl/frac_gap_positive"] <= 1
    if method == "dapo":
        assert tr.args.epsilon_high == 0.28 and tr.args.scale_rewards == "group"


def test_all_methods_take_the_same_number_of_optimizer_steps(tiny_vlm_dir, tmp_path):
    steps = {}
    for m in ("grpo", "calibrl", "luffy"):
        tr = make_trainer(tiny_vlm_dir, tmp_path / m, method=m, num_train_epochs=1, rows=digit_rows(8))
        tr.train()
        steps[m] = tr.state.global_step
    assert len(set(steps.values())) == 1 and steps["grpo"] == 4, steps


@pytest.mark.parametrize("kw,msg", [
    (dict(method="ppo"), "method"),
    (dict(gap="tokens"), "gap"),
    (dict(pass_sign="total"), "pass_sign"),
    (dict(loss_type="sapo"), "loss_type"),
    (dict(per_device_train_batch_size=6), "num_generations"),
    (dict(guide_coef=-1.0), "guide_coef"),
    (dict(delta=0.9), "delta"),
])
def test_config_errors_name_the_field(tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg):
        CalibRLConfig(output_dir=str(tmp_path), **{**COMMON, **kw})


def test_accuracy_reward_is_required_for_the_pass_sign(tiny_vlm_dir, tmp_path):
    model, proc = load_tiny_model(tiny_vlm_dir)
    cfg = CalibRLConfig(output_dir=str(tmp_path), **{**COMMON, "reward_weights": None})
    with pytest.raises(ValueError, match="accuracy"):
        CalibRLTrainer(model=model, reward_funcs=[hash_format], args=cfg,
                       train_dataset=Dataset.from_list(digit_rows(8)), processing_class=proc)
    with pytest.raises(TypeError, match="CalibRLConfig"):
        CalibRLTrainer(model=model, reward_funcs=[hash_format], args=GRPOConfig(output_dir=str(tmp_path), **COMMON),
                       train_dataset=Dataset.from_list(digit_rows(8)), processing_class=proc)


# ------------------------------------------------------------------ other model families, PEFT
@pytest.mark.parametrize("family", ["llava", "qwen2"])
def test_calibrl_trains_llava_and_text_only_models(request, tmp_path, family):
    model_dir = request.getfixturevalue("tiny_llava_dir" if family == "llava" else "tiny_text_dir")
    rows = digit_rows(16) if family == "llava" else text_rows(16)
    tr = make_trainer(model_dir, tmp_path, method="calibrl", max_steps=2, max_completion_length=48, rows=rows)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(h["calibrl/expert_missing"] == 0 for h in logs)
    assert all(h["calibrl/expert_entropy"] > 0 for h in logs)
    assert any(h["calibrl/guide_loss"] != 0 for h in logs)


def test_calibrl_with_a_lora_adapter(tiny_vlm_dir, tmp_path):
    from peft import LoraConfig

    model, proc = load_tiny_model(tiny_vlm_dir)
    cfg = CalibRLConfig(output_dir=str(tmp_path), max_steps=2, **COMMON)
    tr = CalibRLTrainer(model=model, reward_funcs=[hash_accuracy, hash_format], args=cfg,
                        train_dataset=Dataset.from_list(digit_rows(16)), processing_class=proc,
                        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train()
    changed = [n for n, p in tr.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed and all("lora_" in n for n in changed)  # only the adapter moved
    assert any(h.get("calibrl/guide_loss", 0) != 0 for h in tr.state.log_history)

    # the run saves only the adapter; `calibrl eval` / load_model reload it merged into its base model
    from calibrl.models import load_model

    tr.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    merged, merged_proc = load_model(str(tmp_path / "adapter"))
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    batch = proc(text=["What is 2 + 3?"], return_tensors="pt")
    tr.model.eval()
    with torch.no_grad():
        want, got = tr.model(**batch).logits, merged.eval()(**merged_proc(text=["What is 2 + 3?"], return_tensors="pt")).logits
    base_logits = load_tiny_model(tiny_vlm_dir)[0].eval()(**batch).logits.detach()
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base_logits, atol=1e-5)
