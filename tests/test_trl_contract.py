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


# ------------------------------------------------------------------ the shared-prefix forward (calibrl.prefix)
def test_shared_prefix_trl_hooks():
    """Every TRL forward of the completions (old and reference log-probs, and ours) goes through
    `_get_per_token_logps_and_entropies`, which we override; it calls the fused-head model with `labels` and
    `fused_lm_head=True`, and the head also takes pre-shifted `shift_labels` (scored at every position), which
    the shared layout needs (the last prompt token is repeated at the head of each block)."""
    from trl.trainer import utils

    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert src.count("self._get_per_token_logps_and_entropies(") == 3  # old, reference, PEFT reference
    assert "model(**model_inputs, labels=labels, fused_lm_head=True)" in \
        inspect.getsource(GRPOTrainer._get_per_token_logps_and_entropies)
    assert list(inspect.signature(utils.add_fused_lm_head).parameters) == [
        "model", "temperature", "cast_lm_head_to_fp32", "outputs"]
    head = inspect.getsource(utils.add_fused_lm_head)
    assert "def _fused_forward(\n        self, *args, fused_lm_head=False, labels=None, shift_labels=None" in head
    assert "hidden_states = backbone_outputs.last_hidden_state\n            labels = shift_labels" in head
    assert "model.forward = types.MethodType(_fused_forward, model)" in head  # what prefix._is_fused looks for
    assert 'backbone_attr = "base_model"' in head
    assert "is zero where the label is `-100`" in utils.FusedCausalLMOutput.__doc__


def test_shared_prefix_transformers_hooks():
    """A 4-D mask reaches the attention as it is; sdpa reads a bool mask, eager adds a float one; text models
    without position ids use the column index; Qwen2.5-VL's 3-D positions come from `compute_3d_position_ids`
    when none are passed, and 3-row position ids are used as they are (no packed-sequence mask from them)."""
    from transformers import masking_utils
    from transformers.integrations import sdpa_attention
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qvl

    assert "if isinstance(attention_mask, (torch.Tensor, BlockMask)) and len(attention_mask.shape) == 4:\n" \
        "        return True, attention_mask" in inspect.getsource(masking_utils._preprocess_mask_arguments)
    assert "elif attention_mask.dtype == torch.bool:" in inspect.getsource(sdpa_attention)
    for mod in (modeling_qwen2, modeling_llama, qvl):
        assert "attn_weights = attn_weights + attention_mask" in inspect.getsource(mod.eager_attention_forward)
    for cls in (modeling_qwen2.Qwen2Model, modeling_llama.LlamaModel):
        src = inspect.getsource(cls.forward)
        arange = "position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens"
        assert arange in src
        assert "create_causal_mask(" in src
    assert list(inspect.signature(qvl.Qwen2_5_VLModel.compute_3d_position_ids).parameters) == [
        "self", "input_ids", "image_grid_thw", "video_grid_thw", "inputs_embeds", "attention_mask", "cache",
        "second_per_grid_ts", "mm_token_type_ids"]
    fwd = inspect.getsource(qvl.Qwen2_5_VLModel.forward)
    assert "if position_ids is None:\n            position_ids = self.compute_3d_position_ids(" in fwd
    text = inspect.getsource(qvl.Qwen2_5_VLTextModel.forward)
    assert "if position_ids.ndim == 3 and position_ids.shape[0] == 4:" in text
    assert qvl.Qwen2_5_VLForConditionalGeneration.base_model_prefix == "model"


def test_shared_prefix_attention_entry_hooks():
    """calibrl.prefix's sdpa entry: the model files look the attention up on the one ALL_ATTENTION_FUNCTIONS
    (an item set there is seen by all), the text attention hands it the layer's `attention_mask` object as it
    is, passed to the layer by keyword, and a checkpointed layer keeps its keywords for the recompute (so the
    marker mask still carries its layout in the backward)."""
    from transformers import modeling_layers, modeling_utils
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qvl
    from transformers.utils.generic import GeneralInterface

    shared = modeling_utils.ALL_ATTENTION_FUNCTIONS
    assert isinstance(shared, GeneralInterface) and "self._local_mapping.update({key: value})" in \
        inspect.getsource(GeneralInterface.__setitem__)
    call = ("attention_interface(\n            self,\n            query_states,\n            key_states,\n"
            "            value_states,\n            attention_mask,\n")
    by_layer_type = "attention_mask=causal_mask_mapping[self.config.layer_types[i]]"
    for mod, attn, model, passed in (
        (modeling_qwen2, "Qwen2Attention", "Qwen2Model", by_layer_type),
        (modeling_llama, "LlamaAttention", "LlamaModel", "attention_mask=causal_mask,"),
        (qvl, "Qwen2_5_VLAttention", "Qwen2_5_VLTextModel", by_layer_type),
    ):
        assert mod.ALL_ATTENTION_FUNCTIONS is shared
        src = inspect.getsource(getattr(mod, attn).forward)
        assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in src and call in src
        assert passed in inspect.getsource(getattr(mod, model).forward)
    assert "self._gradient_checkpointing_func(partial(forward, self, **kwargs), *args)" in \
        inspect.getsource(modeling_layers.GradientCheckpointingLayer)


# ------------------------------------------------------------------ shared prefill in generation (calibrl.prefill)
def test_shared_prefill_trl_hooks():
    """TRL's HF path calls `generate` once on the unwrapped model (whose `_prefill` and pre-encoding we replace
    for that call); vLLM and continuous batching are other branches of the same method."""
    src = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert src.count("unwrapped_model.generate(") == 1 and "if self.use_vllm:" in src
    assert "elif self.use_transformers_continuous_batching:" in src
    assert "**generate_inputs, generation_config=self.generation_config" in src


def test_shared_prefill_generate_hooks():
    """generate: position ids (Qwen2.5-VL: its 3-D rope index and rope_deltas, for every row) are built, then
    `_maybe_prepare_encoder_kwargs_for_generation` may pre-encode the images, then the dynamic cache is made,
    then the decoding method calls `_prefill` once and keeps its `cache`; `reorder_cache` index-selects rows."""
    from transformers import GenerationMixin
    from transformers.cache_utils import Cache, DynamicLayer
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qvl

    assert list(inspect.signature(GenerationMixin._prefill).parameters) == [
        "self", "input_ids", "generation_config", "model_kwargs", "is_first_iteration"]
    assert list(inspect.signature(GenerationMixin._maybe_prepare_encoder_kwargs_for_generation).parameters) == [
        "self", "inputs_tensor", "model_kwargs", "model_input_name", "generation_config"]
    gen = inspect.getsource(GenerationMixin.generate)
    order = ["model_kwargs[\"position_ids\"] = self._prepare_position_ids_for_generation(",
             "model_kwargs = self._maybe_prepare_encoder_kwargs_for_generation(",
             "self._prepare_cache_for_generation("]
    at = [gen.index(s) for s in order]
    assert at == sorted(at)
    sample = inspect.getsource(GenerationMixin._sample)
    assert sample.count("self._prefill(") == 1 and 'model_kwargs["cache"] = outputs["cache"]' in \
        inspect.getsource(GenerationMixin._update_model_kwargs_for_generation)
    assert "outputs.logits[:, -1]" in sample
    assert "self.keys = self.keys.index_select(0, beam_idx" in inspect.getsource(DynamicLayer.reorder_cache)
    assert "self.layers[layer_idx].reorder_cache(beam_idx)" in inspect.getsource(Cache.reorder_cache)
    assert "self.model.rope_deltas = rope_deltas" in \
        inspect.getsource(qvl.Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation)
    assert "pixel_values" in inspect.getsource(qvl.Qwen2_5_VLModel.forward)
