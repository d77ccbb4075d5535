"""Contract tests: every private TRL hook and attribute CalibRLTrainer relies on, pinned.

TRL's private methods churn between minor releases. If an upgrade changes a signature, a return arity or a
dict key below, these tests fail loudly instead of the trainer silently computing something else.
"""

import inspect

import pytest
import torch
import trl
from datasets import Dataset
from trl import GRPOTrainer

from calibrl import CalibRLConfig, CalibRLTrainer
from calibrl.models import load_tiny_model

from helpers import digit_rows, hash_accuracy, hash_format


def test_pinned_trl_version():
    assert trl.__version__ == "1.16.0", "calibrl subclasses TRL private hooks: re-run the contract tests and bump"


@pytest.mark.parametrize("name,params", [
    ("_calculate_rewards", ["self", "inputs", "prompts", "completions", "completion_ids_list"]),
    ("_generate_single_turn", ["self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"]),
    ("_generate_and_score_completions", ["self", "inputs"]),
    ("_compute_loss", ["self", "model", "inputs"]),
    ("_tokenize_prompts", ["self", "prompts"]),
    ("_get_per_token_logps_and_entropies", [
        "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
        "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
        "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"]),
    ("_prepare_inputs", ["self", "generation_batch"]),
    ("compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]),
])
def test_hook_signatures(name, params):
    assert list(inspect.signature(getattr(GRPOTrainer, name)).parameters) == params


def test_transformers_trainer_hooks():
    """We override Trainer._load_from_checkpoint (strict resume) and create_optimizer (non-finite step guard)."""
    from transformers import Trainer

    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == ["self", "resume_from_checkpoint", "model"]
    assert list(inspect.signature(Trainer.create_optimizer).parameters) == ["self", "model"]
    assert "self._load_from_checkpoint(resume_from_checkpoint" in inspect.getsource(Trainer.train)


def test_checkpoint_hooks():
    """calibrl.checkpoints: TRL writes a checkpoint under `_get_output_dir(trial)` and rotates there; a resume
    at the last step ends through `_finalize_training`; callbacks stop nothing before `on_step_begin` runs."""
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    assert "run_dir = self._get_output_dir(trial=trial)" in inspect.getsource(Trainer._save_checkpoint)
    assert "self._get_output_dir(trial=trial)" in inspect.getsource(GRPOTrainer._save_checkpoint)
    assert list(inspect.signature(Trainer.save_model).parameters) == ["self", "output_dir", "_internal_call"]
    assert list(inspect.signature(Trainer._finalize_training).parameters) == [
        "self", "trial", "num_train_samples", "start_time"]
    assert list(inspect.signature(rotate_checkpoints).parameters)[:4] == [
        "output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"]


def test_helper_imports_exist():
    from trl.data_utils import is_conversational, prepare_multimodal_messages  # noqa: F401
    from trl.models.utils import disable_gradient_checkpointing  # noqa: F401
    from trl.trainer.utils import pad

    assert pad([torch.tensor([1]), torch.tensor([1, 2])], padding_value=0, padding_side="left").tolist() == [[0, 1], [1, 2]]


def test_grpo_compute_loss_dispatches_through_private_hook():
    """We override `_compute_loss`; TRL must still route `compute_loss` through it (and no liger bypass by default)."""
    src = inspect.getsource(GRPOTrainer.compute_loss)
    assert "self._compute_loss(model, inputs)" in src
    assert "_generate_and_score_completions(generation_batch)" in inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "self._calculate_rewards(" in inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "self._generate_single_turn(" in inspect.getsource(GRPOTrainer._generate)


def test_gradient_accumulation_divisor_convention():
    """CalibRLTrainer._ga_steps divides each micro-batch's loss as TRL's own loss does, by the accumulation
    steps that transformers' loop sets on the trainer (1 in evaluation)."""
    from transformers import Trainer

    assert "self.current_gradient_accumulation_steps = len(batch_samples)" in inspect.getsource(Trainer._run_epoch)
    src = inspect.getsource(GRPOTrainer._compute_loss)
    assert 'normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0' in src
    assert "normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation" in src  # dapo


@pytest.fixture(scope="module")
def trainer(tiny_vlm_dir, tmp_path_factory):
    model, proc = load_tiny_model(tiny_vlm_dir)
    cfg = CalibRLConfig(output_dir=str(tmp_path_factory.mktemp("contract")), use_cpu=True, bf16=False,
                        report_to="none", per_device_train_batch_size=8, num_generations=4,
                        max_completion_length=8, reward_weights=[1.0, 0.1], disable_tqdm=True)
    tr = CalibRLTrainer(model=model, reward_funcs=[hash_accuracy, hash_format], args=cfg,
                        train_dataset=Dataset.from_list(digit_rows(8)), processing_class=proc)
    tr.model.train()
    return tr


@pytest.mark.slow
def test_attributes_we_read_exist(trainer):
    for name in ("reward_func_names", "reward_weights", "eos_token_ids", "_tokenizer", "_metrics", "num_generations",
                 "max_completion_length", "epsilon_low", "epsilon_high", "importance_sampling_level", "loss_type",
                 "beta", "use_vllm", "vllm_importance_sampling_correction", "_entropy_bonus_enabled", "entropy_coef",
                 "aux_loss_enabled", "router_aux_loss_coef", "top_entropy_quantile", "off_policy_mask_threshold", "use_adaptive_entropy",
                 "tools", "rollout_func", "environment_factories", "processing_class", "accelerator"):
        assert hasattr(trainer, name), name
    assert trainer.reward_func_names == ["accuracy_reward", "format_reward"]
    assert isinstance(trainer.eos_token_ids, list) and isinstance(trainer.eos_token_ids[0], int)


@pytest.mark.slow
def test_hook_return_shapes(trainer):
    rows = [r for r in digit_rows(2) for _ in range(4)]
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(rows)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch",
                "pixel_values", "image_grid_thw", "num_images"):
        assert key in out, key
    assert out["advantages"].shape == (8,)
    assert out["num_items_in_batch"].ndim == 0
    rpf = trainer._last_rewards_per_func  # captured from _calculate_rewards
    assert rpf.shape == (8, 2)

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    res = trainer._get_per_token_logps_and_entropies(
        trainer.model, ids, mask, out["completion_ids"].size(1), compute_entropy=True,
        pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"], num_images=out["num_images"])
    assert len(res) == 3
    logps, ent, aux = res
    assert logps.shape == out["completion_ids"].shape == ent.shape and aux is None

    from trl.data_utils import prepare_multimodal_messages

    prompts = [prepare_multimodal_messages(r["prompt"], images=r["images"]) for r in rows[:2]]
    prompt_ids, images, mm = trainer._tokenize_prompts(prompts)
    assert len(prompt_ids) == 2 and len(images) == 2 and "pixel_values" in mm
    completions, logprobs = trainer._generate_single_turn(prompt_ids, images, mm, 2)
    assert len(completions) == 2 and all(isinstance(t, int) for t in completions[0]) and logprobs is None
