"""Faulty rewards, non-finite losses, resume, and the vLLM path (through a fake backend with vLLM's interface)."""

import math
import time

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from calibrl import CalibRLConfig, CalibRLTrainer
from calibrl.models import load_tiny_model
from calibrl.reward_guard import GuardedReward, RewardFaults

from helpers import COMMON, assert_same_params, digit_rows, hash_accuracy, hash_format, make_trainer, params
from fakes import FakeVLLM


# ------------------------------------------------------------------ the reward guard on its own
def test_guard_passes_good_values_and_isolates_raising_samples():
    faults = RewardFaults()

    def picky(completions, answer=None, **kw):
        if any(c == "boom" for c in completions):
            raise RuntimeError("cannot parse")
        return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

    g = GuardedReward(picky, timeout_s=5, faults=faults)
    assert g.__name__ == "picky"
    assert g(["1", "2"], answer=["1", "3"], trainer_state=None) == [1.0, 0.0]
    # only the raising sample scores 0; the others keep their real scores
    assert g(["1", "boom", "3"], answer=["1", "2", "3"], trainer_state=None) == [1.0, 0.0, 1.0]
    assert faults.take() == {"errors": 1, "nonfinite": 0, "timeouts": 0, "none": 0}


def test_guard_nan_inf_none_and_bad_length():
    faults = RewardFaults()
    g = GuardedReward(lambda completions, **kw: [float("nan"), math.inf, None, 0.5], faults=faults)
    assert g(["a", "b", "c", "d"]) == [0.0, 0.0, None, 0.5]
    assert faults.take() == {"errors": 0, "nonfinite": 2, "timeouts": 0, "none": 1}
    g = GuardedReward(lambda completions, **kw: [1.0], faults=faults)
    assert g(["a", "b"]) == [0.0, 0.0]
    assert faults.take()["errors"] == 2
    assert faults.totals["nonfinite"] == 2  # totals survive take()


def test_guard_cuts_a_hang():
    faults = RewardFaults()

    def hangs(completions, **kw):
        time.sleep(30)

    t = time.time()
    assert GuardedReward(hangs, timeout_s=0.3, faults=faults)(["a", "b"]) == [0.0, 0.0]
    assert time.time() - t < 5
    assert faults.take()["timeouts"] == 2


# ------------------------------------------------------------------ inside training
def faulty_accuracy(completions, answer=None, **kw):
    """Raises on every 4th completion by content hash, returns NaN on another slice: deterministic faults."""
    out = hash_accuracy(completions, answer)
    for i, c in enumerate(completions):
        h = sum(map(ord, c[0]["content"]))
        if h % 4 == 0:
            raise ValueError("injected")
        if h % 4 == 1:
            out[i] = float("nan")
    return out


faulty_accuracy.__name__ = "accuracy_reward"


@pytest.mark.slow
def test_training_goes_on_through_faulty_rewards(tiny_vlm_dir, tmp_path):
    model, proc = load_tiny_model(tiny_vlm_dir)
    cfg = CalibRLConfig(output_dir=str(tmp_path), max_steps=3, **COMMON)
    tr = CalibRLTrainer(model=model, reward_funcs=[faulty_accuracy, hash_format], args=cfg,
                        train_dataset=Dataset.from_list(digit_rows(16)), processing_class=proc)
    tr.train()
    assert tr.state.global_step == 3
    logs = [h for h in tr.state.log_history if "calibrl/reward_errors" in h]
    errors = sum(h["calibrl/reward_errors"] for h in logs)
    nonfinite = sum(h["calibrl/reward_nonfinite"] for h in logs)
    assert errors == tr.reward_faults.totals["errors"] > 0
    assert nonfinite == tr.reward_faults.totals["nonfinite"] > 0
    assert all(math.isfinite(h["loss"]) for h in tr.state.log_history if "loss" in h)


class NaNAtStep(CalibRLTrainer):
    """Makes the loss NaN for every micro-batch of optimizer step `bad_step` (0-based)."""

    bad_step = 1

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        return loss * float("nan") if self.state.global_step == self.bad_step else loss


@pytest.mark.slow
def test_nonfinite_loss_skips_the_optimizer_step(tiny_vlm_dir, tmp_path):
    snaps = []

    def run(cls, steps, out):
        t = make_trainer(tiny_vlm_dir, out, cls=cls, max_steps=steps, method="calibrl")
        t.train()
        snaps.append(params(t))
        return t

    bad = run(NaNAtStep, 2, tmp_path / "bad")
    one = run(CalibRLTrainer, 1, tmp_path / "one")
    assert bad.skipped_steps == 1 and bad.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in snaps[0].values())
    # the NaN step changed nothing: the weights after it are those after step 1 alone
    assert_same_params(snaps[0], snaps[1], atol=0.0)
    assert [h["calibrl/skipped_steps"] for h in bad.state.log_history if "calibrl/skipped_steps" in h] == [0.0, 1.0]


# ------------------------------------------------------------------ resume
class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_resume_continues_exactly(tiny_vlm_dir, tmp_path):
    kw = dict(method="calibrl", grpo_warmup_steps=2, max_steps=4, save_strategy="steps", save_steps=2,
              rows=digit_rows(16))
    full = make_trainer(tiny_vlm_dir, tmp_path / "full", **kw)
    full.train()
    part = make_trainer(tiny_vlm_dir, tmp_path / "part", **kw)
    part.add_callback(StopAt(2))  # interrupted after step 2 (and its checkpoint), same schedule as the full run
    part.train()
    assert part.state.global_step == 2
    resumed = make_trainer(tiny_vlm_dir, tmp_path / "part", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    loss_full = [h["loss"] for h in full.state.log_history if "loss" in h]
    loss_res = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert loss_res[-2:] == pytest.approx(loss_full[-2:], abs=1e-6)
    active = [h["calibrl/guidance_active"] for h in resumed.state.log_history if "calibrl/guidance_active" in h]
    assert active[-2:] == [1.0, 1.0]  # the warm-up state follows global_step across the resume
    assert_same_params(params(resumed), params(full))


@pytest.mark.slow
def test_resume_at_an_epoch_boundary_runs_the_remaining_steps(tiny_vlm_dir, tmp_path):
    rows = digit_rows(4)  # 4 prompts x 4 rollouts = 2 steps per epoch at 8 completions per step
    first = make_trainer(tiny_vlm_dir, tmp_path, num_train_epochs=1, save_strategy="epoch", rows=rows)
    first.train()
    assert first.state.global_step == 2
    second = make_trainer(tiny_vlm_dir, tmp_path, num_train_epochs=2, save_strategy="epoch", rows=rows)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert second.state.global_step == 4
    assert sum(1 for h in second.state.log_history if "loss" in h and h["step"] > 2) == 2


class CtrlCAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread


@pytest.mark.slow
def test_ctrl_c_leaves_a_usable_checkpoint(tiny_vlm_dir, tmp_path):
    tr = make_trainer(tiny_vlm_dir, tmp_path, max_steps=3, save_strategy="no", rows=digit_rows(16))
    tr.add_callback(CtrlCAt(2))
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.json").is_file()
    again = make_trainer(tiny_vlm_dir, tmp_path, max_steps=3, save_strategy="no", rows=digit_rows(16))
    again.train(resume_from_checkpoint=str(ckpt))
    assert again.state.global_step == 3
    # interrupted between steps, the checkpoint is as good as a scheduled one: the resumed run ends on the
    # weights of an uninterrupted run
    full = make_trainer(tiny_vlm_dir, tmp_path / "full", max_steps=3, save_strategy="no", rows=digit_rows(16))
    full.train()
    assert_same_params(params(again), params(full))


# ------------------------------------------------------------------ vLLM
@pytest.mark.slow
def test_use_vllm_without_vllm_is_a_clear_error(tiny_vlm_dir, tmp_path):
    model, proc = load_tiny_model(tiny_vlm_dir)
    cfg = CalibRLConfig(output_dir=str(tmp_path), use_vllm=True, **COMMON)
    with pytest.raises(ImportError, match="vLLM is not installed"):
        CalibRLTrainer(model=model, reward_funcs=[hash_accuracy, hash_format], args=cfg,
                       train_dataset=Dataset.from_list(digit_rows(8)), processing_class=proc)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["calibrl", "luffy"])
def test_expert_path_through_a_vllm_like_backend(tiny_vlm_dir, tmp_path, method):
    tr = make_trainer(tiny_vlm_dir, tmp_path, method=method, max_completion_length=64)
    digits = tr.processing_class.tokenizer.convert_tokens_to_ids(list("0123456789"))  # ordinary tokens
    fake = FakeVLLM(tr.eos_token_ids[0], digits)
    tr.use_vllm, tr.vllm_generation, tr._last_loaded_step = True, fake, -1
    tr.model.train()
    rows = digit_rows(4)
    batch = [r for r in rows[:2] for _ in range(4)]
    out = tr._generate_and_score_completions(batch)
    assert fake.calls == [(8, 2, 4)] and fake.synced == 1  # one request per unique prompt, n = 4
    # every on-policy slot holds the completion the backend made for it: nothing wasted, nothing shifted
    lengths = out["completion_mask"].sum(1).tolist()
    for i in range(8):
        if method == "luffy" and i % 4 == 3:
            ids, _, _ = tr.expert_token_ids(rows[i // 4]["solution"])
            assert out["completion_ids"][i, : lengths[i]].tolist() == ids
            assert torch.isnan(out["sampling_per_token_logps"][i, : lengths[i]]).all()
        else:
            assert out["completion_ids"][i, :3].tolist()[1:] == [digits[5 + i % 4], fake.eos_id]
    if method == "calibrl":
        assert out["has_expert"].tolist() == [1.0] * 8 and out["expert_mask"].sum() > 0
    assert torch.isfinite(out["importance_sampling_ratio"]).all()
    tr.current_gradient_accumulation_steps = 1
    assert torch.isfinite(tr._compute_loss(tr.model, out))
