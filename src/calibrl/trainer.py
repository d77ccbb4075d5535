"""`CalibRLTrainer`: CalibRL and its baselines as a drop-in for TRL's GRPO trainer (settings: `calibrl.config`).

Where we hook into TRL 1.16.0 (pinned; every hook below has a contract test in tests/test_trl_contract.py):
  _calculate_rewards              capture the (N, n_funcs) reward matrix: the pass sign comes from the accuracy
                                  component, not from a threshold on the total reward (METHOD.md §5.4).
  _generate_single_turn           methods with `expert_in_slot` (LUFFY, RL-PLUS): put the expert's tokens into
                                  the last slot of its group. With args.shared_prefix and HF generation (no
                                  vLLM), TRL's `generate` runs inside `calibrl.prefill.shared_prefill`: each
                                  distinct prompt and its images are prefilled once, the cache expanded.
  _generate_and_score_completions add per-row tensors: pass sign, expert flag, the method's advantages, and
                                  (methods that `needs_expert_forward`: CalibRL with λ > 0) the expert's
                                  per-token log-probs under the pre-update policy, from one no-grad forward per
                                  group in the expert's own context (prompt + images + expert tokens + EOS).
  _compute_loss                   the loss from the method's terms: policy term on on-policy rows, expert-row
                                  term on expert rows (LUFFY, RL-PLUS), guidance term (CalibRL's λ·L_exp),
                                  with each part logged separately.
  _get_per_token_logps_and_entropies   every forward of the completions (policy, old, reference): in the
                                  shared-prefix layout (`calibrl.prefix`: each prompt and its images run once
                                  for its group) when args.shared_prefix and the model allow it, else TRL's own.
  _tokenize_prompts               reused as it is.

Which method does what is `calibrl.methods` (a registry); the pure math lives in `calibrl.losses`. This file
asks the method, moves tensors to it, aggregates and logs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import os
from typing import Any

import torch
from trl import GRPOTrainer
from trl.data_utils import is_conversational, prepare_multimodal_messages
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad

from calibrl import checkpoints, losses, prefill, prefix
from calibrl.config import CalibRLConfig  # noqa: F401 (re-exported: calibrl.trainer.CalibRLConfig)
from calibrl.data import IMAGE_PLACEHOLDERS  # never in expert ids: they break Qwen's rope index
from calibrl.methods import Guidance, LossBatch, get_method
from calibrl.multimodal import row_images
from calibrl.reward_guard import FAULT_KINDS, GuardedReward, RewardFaults

logger = logging.getLogger(__name__)


class CalibRLTrainer(GRPOTrainer):
    """`GRPOTrainer` with an expert trajectory per prompt, used as a calibration baseline (CalibRL) or as an
    off-policy sample (LUFFY, RL-PLUS). Takes exactly GRPOTrainer's arguments; `args` is a `CalibRLConfig`.

    The dataset needs the usual `prompt` (and `image`/`images`) plus an expert column (`solution` by
    default; a row without one trains as plain GRPO and is counted). Every method takes the same number of
    optimizer steps for the same data and batch settings: the expert never adds rows to the batch.
    """

    def __init__(self, model, reward_funcs=None, args=None, *rest, **kwargs):
        if not isinstance(args, CalibRLConfig):
            raise TypeError(f"CalibRLTrainer needs args=CalibRLConfig(...), got {type(args).__name__}")
        if isinstance(model, str) and model.startswith("tiny:"):  # a tiny model spec, as the CLI takes it
            from calibrl.models import load_model

            model, tiny_processor = load_model(model, seed=args.seed)
            kwargs.setdefault("processing_class", tiny_processor)
        if args.use_vllm and importlib.util.find_spec("vllm") is None:
            raise ImportError("use_vllm=True but vLLM is not installed: install it on a CUDA machine "
                              "(pip install 'calibrl[vllm]') or set use_vllm=False")
        self.method = get_method(args.method)  # what the method needs, and the loss terms it supplies
        self.reward_faults = RewardFaults()
        if args.guard_rewards and reward_funcs is not None:
            funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
            reward_funcs = [
                GuardedReward(f, args.reward_timeout, self.reward_faults)
                if callable(f) and not isinstance(f, torch.nn.Module) and not inspect.iscoroutinefunction(f) else f
                for f in funcs
            ]
        self.skipped_steps = 0  # optimizer steps skipped for non-finite gradients
        # Run totals of what went wrong, summed over processes, since this process started (the run summary
        # reports them): reward faults per kind, and experts missing / truncated / stripped per group.
        self.run_counts: dict[str, float] = {}
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        a = self.args
        if a.use_liger_kernel:
            raise ValueError("use_liger_kernel bypasses CalibRLTrainer's loss; set use_liger_kernel=False")
        if self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None or self.use_adaptive_entropy:
            raise ValueError("top_entropy_quantile, off_policy_mask_threshold and use_adaptive_entropy are not "
                             "supported by CalibRLTrainer")
        if self.method.uses_expert and (self.tools or self.rollout_func is not None or self.environment_factories is not None):
            raise ValueError(f"method={a.method!r} does not support tools, rollout_func or environment_factory")
        self._accuracy_index = self._resolve_accuracy_index()
        self._last_rewards_per_func: torch.Tensor | None = None
        self._expert_slots: list[list[int] | None] | None = None  # per local row: expert ids to put in the slot
        self._vision_token_ids = {
            tid for tid in (self._tokenizer.convert_tokens_to_ids(t) for t in IMAGE_PLACEHOLDERS)
            if isinstance(tid, int) and tid != self._tokenizer.unk_token_id and tid is not None
        }
        self._prefix_fallbacks: set[tuple[str, str]] = set()  # reasons already logged (one line each, not per step)
        self._prefill_stats: dict[str, int] = {"shared": 0}  # generate calls whose prefill was shared

    # ------------------------------------------------------------------------------------------------------
    # Setup helpers
    # ------------------------------------------------------------------------------------------------------
    def _resolve_accuracy_index(self) -> int | None:
        a = self.args
        names = list(self.reward_func_names)
        if a.accuracy_reward_name is not None:
            if a.accuracy_reward_name not in names:
                raise ValueError(f"accuracy_reward_name={a.accuracy_reward_name!r} is not among the reward "
                                 f"functions {names}")
            return names.index(a.accuracy_reward_name)
        for i, n in enumerate(names):
            if "accuracy" in n:
                return i
        if self.method.uses_pass_sign and a.pass_sign == "accuracy":
            raise ValueError(
                f"pass_sign='accuracy' needs an accuracy reward function (names {names} contain no 'accuracy'): "
                "pass accuracy_reward_name=..., or pass_sign='reward_threshold'"
            )
        return None

    def guidance_active(self) -> bool:
        """True when the expert takes part in this step (after the GRPO warm-up, in training)."""
        return self.method.uses_expert and self.model.training and self.state.global_step >= self.args.grpo_warmup_steps

    def create_optimizer(self, *args, **kwargs):
        """TRL's optimizer, with a step that refuses non-finite gradients: a NaN or infinite loss (or gradient)
        skips the whole optimizer step, so it never reaches the weights or Adam's moments; the skip is counted.
        Gradients are checked after they are reduced across processes, so every process skips together."""
        opt = super().create_optimizer(*args, **kwargs)
        if not getattr(opt, "_calibrl_guarded", False):
            step = opt.step

            def guarded_step(*a, **k):
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                if grads and not torch.stack([torch.isfinite(g).all() for g in grads]).all():
                    self.skipped_steps += 1
                    opt.zero_grad(set_to_none=True)
                    return None
                return step(*a, **k)

            opt.step = guarded_step
            opt._calibrl_guarded = True
        return opt

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints: written whole or not at all, resumed from the newest complete one (calibrl.checkpoints)
    # ------------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """TRL's train loop, crash-consistent: `resume_from_checkpoint="latest"` (or True) resumes from the
        newest complete checkpoint of output_dir, with the run counters it saved; the output folder is checked
        writable, with room for a checkpoint, before any work; on Ctrl-C a checkpoint of the last finished
        step is written (the interrupted step is redone); a full or read-only disk is one `StorageError` line."""
        return checkpoints.train(self, super().train, resume_from_checkpoint, args, kwargs)

    def _save_checkpoint(self, model, trial):
        checkpoints.save_checkpoint(self, lambda: super(CalibRLTrainer, self)._save_checkpoint(model, trial), trial)

    def _get_output_dir(self, trial):
        staging = getattr(self, "_calibrl_staging", None)  # set only while a checkpoint is being written
        return staging if staging is not None else super()._get_output_dir(trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """TRL's save_model; a model saved to its own folder is written whole or not at all."""
        if _internal_call or output_dir is None or os.path.abspath(output_dir) == os.path.abspath(self.args.output_dir):
            return super().save_model(output_dir, _internal_call)
        checkpoints.save_model(self, lambda folder: super(CalibRLTrainer, self).save_model(folder, _internal_call),
                               output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume the weights through `from_pretrained`, strictly.

        transformers 5.x saves some models (Qwen2.5-VL among them) under their original checkpoint key names,
        while `Trainer._load_from_checkpoint` feeds the file to `load_state_dict(strict=False)`: no key
        matches, nothing is loaded, and the run silently "resumes" from the initial weights. For a plain model
        we reload through the class's own key conversion and load strictly; PEFT, DeepSpeed and FSDP keep
        their own paths.
        """
        model = self.model if model is None else model
        plain = (not self.is_deepspeed_enabled and not self.is_fsdp_enabled and not hasattr(model, "peft_config")
                 and hasattr(type(model), "from_pretrained"))
        if not plain or not os.path.isfile(os.path.join(resume_from_checkpoint, "model.safetensors")):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(model.parameters()).dtype
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype)
        result = model.load_state_dict(saved.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise RuntimeError(f"checkpoint {resume_from_checkpoint} does not match the model: missing "
                               f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")

    @property
    def all_skipped_steps(self) -> int:
        """Optimizer steps skipped so far for non-finite gradients: ours, and DeepSpeed's own (it skips a
        non-finite step itself, before our guarded step runs)."""
        engine = getattr(self, "deepspeed", None) if self.is_deepspeed_enabled else None
        return self.skipped_steps + getattr(engine, "skipped_steps", 0)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log
            logs["calibrl/skipped_steps"] = float(self.all_skipped_steps)
        super().log(logs, start_time)

    @property
    def _step_metrics(self) -> dict:
        """TRL's metric lists for the current step: train or eval, as the model's mode says."""
        return self._metrics["train" if self.model.training else "eval"]

    def _log_sum(self, name: str, value: float) -> None:
        """Log a count summed over processes (and add it to the run totals)."""
        key = name.removeprefix("calibrl/")
        self._step_metrics[name].append(self._count({key: value})[key])

    def _count(self, counts: dict[str, float]) -> dict[str, float]:
        """Sum `counts` over processes (one collective) into `run_counts`; return this batch's sums."""
        local = torch.tensor([float(v) for v in counts.values()], device=self.accelerator.device)
        totals = dict(zip(counts, self.accelerator.reduce(local, reduction="sum").tolist()))
        for name, total in totals.items():
            self.run_counts[name] = self.run_counts.get(name, 0.0) + total
        return totals

    def _log(self, name: str, value: float | torch.Tensor, count: float = 1.0) -> None:
        """Log a metric averaged over processes, weighted by `count` (e.g. the number of tokens it covers)."""
        dev = self.accelerator.device
        v = torch.as_tensor(value, dtype=torch.float32, device=dev).detach()
        stats = torch.stack([v * count, torch.tensor(float(count), device=dev)])
        total = self.accelerator.reduce(stats, reduction="sum")
        if total[1] > 0:
            self._step_metrics[name].append((total[0] / total[1]).item())

    # ------------------------------------------------------------------------------------------------------
    # Expert tokens
    # ------------------------------------------------------------------------------------------------------
    def expert_token_ids(self, text: Any) -> tuple[list[int] | None, bool, bool]:
        """The expert's completion ids: placeholders stripped, truncated to leave room for EOS, EOS appended.

        Returns (ids or None when there is no expert, truncated, placeholders_stripped). A list takes its first
        item and a dict its `content`, as the official data does.
        """
        if isinstance(text, (list, tuple)):
            text = text[0] if text else None
        if isinstance(text, dict):
            text = text.get("content")
        if not isinstance(text, str) or not text.strip():
            return None, False, False
        stripped = False
        for ph in IMAGE_PLACEHOLDERS:
            if ph in text:
                text, stripped = text.replace(ph, ""), True
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        kept = [t for t in ids if t not in self._vision_token_ids]
        stripped = stripped or len(kept) != len(ids)
        limit = self.max_completion_length - 1  # room for EOS inside the limit (fixes METHOD.md §5.8)
        truncated = len(kept) > limit
        return kept[:limit] + [self.eos_token_ids[0]], truncated, stripped

    def _expert_plan(self, inputs: list[dict]) -> tuple[list[list[int] | None], dict[str, float]]:
        """Expert ids for the first row of each local group (None where missing) and their counts."""
        G = self.num_generations
        if len(inputs) % G:
            raise RuntimeError(f"local batch of {len(inputs)} rows is not a whole number of groups of {G}")
        plan, counts = [], {"missing": 0.0, "truncated": 0.0, "stripped": 0.0}
        for g in range(len(inputs) // G):
            first = inputs[g * G]
            for j in range(1, G):  # groups must be contiguous copies of one prompt
                if inputs[g * G + j].get("prompt") != first.get("prompt"):
                    raise RuntimeError(f"group {g} mixes prompts: rows are not contiguous groups of {G}")
            ids, truncated, stripped = self.expert_token_ids(first.get(self.args.expert_column))
            plan.append(ids)
            counts["missing"] += ids is None
            counts["truncated"] += truncated
            counts["stripped"] += stripped
        return plan, counts

    # ------------------------------------------------------------------------------------------------------
    # Hooks into GRPOTrainer
    # ------------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs):
        with self._generation_prefill():
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, *args, **kwargs
            )
        if self._expert_slots is not None:  # LUFFY / RL-PLUS: the expert takes the last slot of its group
            completion_ids = list(completion_ids)
            if logprobs is not None:
                logprobs = list(logprobs)
            for i, ids in enumerate(self._expert_slots):
                if ids is not None:
                    completion_ids[i] = list(ids)
                    if logprobs is not None:  # no sampling log-probs: NaN makes vLLM's IS ratio exactly 1
                        logprobs[i] = [float("nan")] * len(ids)
        return completion_ids, logprobs

    def _generation_prefill(self):
        """Around TRL's generate: with args.shared_prefix and the HF path, each distinct prompt is prefilled
        once (`calibrl.prefill`); vLLM caches prefixes itself. Fallbacks are logged once per reason."""
        a = self.args
        if not a.shared_prefix or self.use_vllm:
            return contextlib.nullcontext()
        if self.use_transformers_continuous_batching:
            self._log_prefix_fallback("continuous batching (generate_batch) manages its own cache",
                                      "generation prefills each rollout's prompt")
            return contextlib.nullcontext()
        return prefill.shared_prefill(
            self.model, lambda why: self._log_prefix_fallback(why, "generation prefills each rollout's prompt"),
            stats=self._prefill_stats)

    def _log_prefix_fallback(self, reason: str, what: str = "the repeated layout (each rollout runs its prompt)"):
        """One warning line per (what, reason) for the whole run."""
        if (what, reason) not in self._prefix_fallbacks:
            self._prefix_fallbacks.add((what, reason))
            logger.warning("shared_prefix: %s since %s", what, reason)

    def _generate_and_score_completions(self, inputs):
        active = self.guidance_active()
        plan, counts = self._expert_plan(inputs) if active else (None, None)
        self._expert_slots = self._slot_plan(plan, len(inputs)) if active and self.method.expert_in_slot else None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._expert_slots_used, self._expert_slots = self._expert_slots, None
        device = self.accelerator.device
        B = len(inputs)
        n_proc = self.accelerator.process_index
        local = slice(n_proc * B, (n_proc + 1) * B)

        total, sign_all = self._pass_signs()
        is_expert = torch.zeros(B, dtype=torch.bool, device=device)
        if self._expert_slots_used is not None:
            is_expert = torch.tensor([ids is not None for ids in self._expert_slots_used], device=device)
        is_expert_all = self.accelerator.gather(is_expert)
        if self.model.training:
            self._log_group_stats(total, sign_all, is_expert_all, active)

        faults = self.reward_faults.take()  # guarded reward functions: faults in this batch, per kind
        for kind in FAULT_KINDS:
            self._log_sum(f"calibrl/reward_{kind}", faults[kind])

        if active:  # e.g. LUFFY / RL-PLUS: advantages with the expert in or out of the group statistics
            adv_all = self.method.advantages(total, is_expert_all, self.num_generations, self.args)
            if adv_all is not None:
                output["advantages"] = adv_all[local]
        output["pass_sign"] = sign_all[local].to(torch.float32)
        output["is_expert"] = is_expert.long()

        if active:
            self._log_expert_counts(plan, counts)
            if self.method.needs_expert_forward(self.args):
                self._add_expert_logps(inputs, plan, output)
        return output

    def _slot_plan(self, plan: list[list[int] | None], n_rows: int) -> list[list[int] | None]:
        """Per local row, the expert ids that replace its rollout: the last slot of each group with an expert."""
        G = self.num_generations
        slots: list[list[int] | None] = [None] * n_rows
        for g, ids in enumerate(plan):
            if ids is not None:
                slots[g * G + G - 1] = ids
        return slots

    def _pass_signs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Total reward and pass sign s_i (METHOD.md §2) of every row of the gathered batch, (N,) each: s from
        the accuracy component, else from the total-reward threshold; an unscorable row (NaN) gets s = 0."""
        a = self.args
        rpf = self._last_rewards_per_func  # (N_global, n_funcs), gathered across processes
        total = (rpf * self.reward_weights.to(self.accelerator.device).unsqueeze(0)).nansum(dim=1)
        total[torch.isnan(rpf).all(dim=1)] = torch.nan
        if a.pass_sign == "accuracy" and self._accuracy_index is not None:
            acc = rpf[:, self._accuracy_index]
            sign_all = torch.where(acc > 0.5, 1.0, -1.0)
            sign_all[torch.isnan(acc)] = 0.0
        else:
            sign_all = torch.where(total > a.pass_threshold, 1.0, -1.0)
            sign_all[torch.isnan(total)] = 0.0
        return total, sign_all

    def _log_group_stats(self, total, sign_all, is_expert_all, active: bool) -> None:
        """Group statistics of the gathered batch, over on-policy rows only (an expert row is not a rollout)."""
        G = self.num_generations
        metrics = self._metrics["train"]
        onp = ~is_expert_all.view(-1, G)
        acc_groups = sign_all.view(-1, G) > 0
        r = total.view(-1, G)
        counted = onp & ~torch.isnan(r)
        hi = torch.where(counted, r, -torch.inf).amax(1)
        lo = torch.where(counted, r, torch.inf).amin(1)
        metrics["calibrl/frac_zero_var_groups"].append(((hi - lo) <= 0).float().mean().item())
        metrics["calibrl/frac_all_wrong_groups"].append((~(acc_groups & onp).any(1)).float().mean().item())
        metrics["calibrl/frac_all_right_groups"].append(((acc_groups | ~onp).all(1)).float().mean().item())
        metrics["calibrl/pass_rate"].append(
            ((sign_all > 0) & ~is_expert_all).float().sum().item() / max(1, int((~is_expert_all).sum())))
        metrics["calibrl/guidance_active"].append(float(active))

    def _log_expert_counts(self, plan, counts: dict[str, float]) -> None:
        """Experts missing / truncated / stripped: one collective gives both the run totals and this batch's
        shares over all groups."""
        sums = self._count({f"expert_{k}": v for k, v in counts.items()} | {"expert_groups": len(plan)})
        for k in counts:
            self._step_metrics[f"calibrl/expert_{k}"].append(sums[f"expert_{k}"] / max(1.0, sums["expert_groups"]))

    @torch.no_grad()
    def _expert_forward(self, inputs: list[dict], rows: list[int], expert_ids: list[list[int]]):
        """Per-token log-probs and entropies of each expert under the current (pre-update) policy, in the
        expert's own context: the row's prompt and images, then the expert tokens. One no-grad forward."""
        device = self.accelerator.device
        prompts = []
        for r in rows:
            x = inputs[r]
            images = row_images(x)
            p = x["prompt"]
            if images and is_conversational(x):
                p = prepare_multimodal_messages(p, images=images)
            prompts.append(p)
        prompt_ids, _, mm = self._tokenize_prompts(prompts)
        p_ids = pad([torch.tensor(i) for i in prompt_ids], padding_value=self._tokenizer.pad_token_id,
                    padding_side="left").to(device)
        p_mask = pad([torch.ones(len(i), dtype=torch.long) for i in prompt_ids], padding_value=0,
                     padding_side="left").to(device)
        e_ids = pad([torch.tensor(i) for i in expert_ids], padding_value=self._tokenizer.pad_token_id,
                    padding_side="right").to(device)
        e_mask = pad([torch.ones(len(i), dtype=torch.long) for i in expert_ids], padding_value=0,
                     padding_side="right").to(device)
        fwd = {}
        for k, v in mm.items():
            if isinstance(v, torch.Tensor):
                fwd[k] = v.to(device)
            elif isinstance(v, list) and v and isinstance(v[0], (list, torch.Tensor)):  # per-token field
                t = pad([torch.as_tensor(x) for x in v], padding_value=0, padding_side="left").to(device)
                fwd[k] = t
            else:
                fwd[k] = torch.as_tensor(v).to(device)
        for k in ("token_type_ids", "mm_token_type_ids"):  # extend per-token fields over the expert part
            if k in fwd:
                fwd[k] = torch.cat([fwd[k], fwd[k].new_zeros(e_ids.shape)], dim=1)
        num_images = [len(row_images(inputs[r])) for r in rows] if "pixel_values" in fwd else None
        allowed = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")
        fwd = {k: v for k, v in fwd.items() if k in allowed}
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            # GRPOTrainer's own: one row per group, so nothing to share (and no fallback line to log)
            logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                self.model, torch.cat([p_ids, e_ids], 1), torch.cat([p_mask, e_mask], 1), e_ids.size(1),
                batch_size=len(rows), compute_entropy=True, num_images=num_images, **fwd,
            )
        return logps.float(), entropies.float(), e_mask

    def _add_expert_logps(self, inputs, plan, output) -> None:
        G = self.num_generations
        device = self.accelerator.device
        groups = [g for g, ids in enumerate(plan) if ids is not None]
        B = len(inputs)
        has_expert = torch.zeros(B, device=device)
        # Every process runs exactly one expert forward per generation batch, even one whose groups all lack
        # an expert (a dummy one-token expert then): under ZeRO-3/FSDP a forward is a collective, and a
        # process that skipped it would leave the others waiting forever.
        rows = [g * G for g in groups] or [0]
        ids = [plan[g] for g in groups] or [[self.eos_token_ids[0]]]
        logps, ent, e_mask = self._expert_forward(inputs, rows, ids)
        if groups:
            T_e = logps.size(1)
            e_logps = torch.zeros(B, T_e, device=device)
            e_m = torch.zeros(B, T_e, dtype=torch.long, device=device)
            for k, g in enumerate(groups):
                e_logps[g * G:(g + 1) * G] = logps[k]
                e_m[g * G:(g + 1) * G] = e_mask[k]
                has_expert[g * G:(g + 1) * G] = 1.0
            n_tok = float(e_mask.sum())
            ent_mean, const = losses.masked_mean(ent, e_mask), losses.masked_mean(logps, e_mask)
        else:
            e_logps = torch.zeros(B, 1, device=device)
            e_m = torch.zeros(B, 1, dtype=torch.long, device=device)
            n_tok, ent_mean, const = 0.0, torch.zeros((), device=device), torch.zeros((), device=device)
        # Logged on every process, even one with no expert, since _log reduces across processes.
        self._log("calibrl/expert_entropy", ent_mean, count=n_tok)
        self._log("calibrl/expert_logp_mean", const, count=n_tok)
        output["expert_logps"] = e_logps
        output["expert_mask"] = e_m
        output["has_expert"] = has_expert
        c = const if self.args.constant_logp is None else torch.tensor(float(self.args.constant_logp))
        output["expert_constant"] = torch.full((B,), float(c), device=device)

    # ------------------------------------------------------------------------------------------------------
    # The policy forward: shared prefix (calibrl.prefix) or TRL's repeated layout
    # ------------------------------------------------------------------------------------------------------
    def _shared_prefix_reason(self, model, input_ids, attention_mask, logits_to_keep, compute_aux_loss, mm):
        """Why this forward takes the repeated layout (None: it shares the prefix)."""
        if not self.args.shared_prefix:
            return "off"
        if self.tools or self.rollout_func is not None or self.environment_factories is not None:
            return "tools, rollout_func or environment_factory can put images or other context in completions"
        return (prefix.unsupported_reason(model)
                or prefix.layout_reason(model, input_ids, attention_mask, logits_to_keep, compute_aux_loss, **mm))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **mm):
        """TRL's per-token log-probs and entropies (every policy, old and reference forward goes through here),
        from the shared-prefix layout when `args.shared_prefix` and the model and batch allow it: equal to the
        repeated layout's to float rounding, forward and backward. Otherwise TRL's own, said once per reason."""
        reason = self._shared_prefix_reason(model, input_ids, attention_mask, logits_to_keep, compute_aux_loss, mm)
        groups = None
        if reason is None:
            groups = prefix.prompt_groups(input_ids, attention_mask, logits_to_keep, mm.get("pixel_values"),
                                          mm.get("image_grid_thw"), mm.get("num_images"))
            if len(groups) == input_ids.size(0):
                reason = "no two rows of a batch share a prompt"
        if reason is not None:
            if reason != "off":
                self._log_prefix_fallback(reason)
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **mm)
        with self.accelerator.autocast():
            logps, entropies = prefix.shared_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, groups=groups, batch_size=batch_size, **mm)
        return logps, (entropies if compute_entropy else None), None

    # ------------------------------------------------------------------------------------------------------
    # The loss
    # ------------------------------------------------------------------------------------------------------
    @property
    def _ga_steps(self) -> float:
        """What a micro-batch's loss is divided by, as in TRL: the gradient-accumulation steps in training,
        1 in evaluation."""
        return self.current_gradient_accumulation_steps if self.model.training else 1.0

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, inputs) -> torch.Tensor:
        """TRL's loss_type normalisation, through `losses.aggregate` (so method=grpo reproduces GRPOTrainer)."""
        if self.loss_type == "grpo":
            return losses.aggregate(per_token, mask, "seq-mean-token-mean") / self._ga_steps
        if self.loss_type == "bnpo":
            return losses.aggregate(per_token, mask, "token-mean") / self._ga_steps
        if self.loss_type == "dr_grpo":
            return losses.aggregate(per_token, mask, "seq-mean-token-sum-norm",
                                    max_len=self.max_completion_length) / self._ga_steps
        # dapo: token-mean over the whole accumulated generation batch
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if self.model.training:
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return losses.aggregate(per_token, mask, "token-mean", normalizer=normalizer)

    def _compute_loss(self, model, inputs):
        logps, entropies, aux_loss = self._policy_logps(model, inputs)
        b = self._loss_batch(logps, inputs)
        mask = b.mask
        onp_mask = mask * (~b.is_expert).unsqueeze(1).to(mask.dtype)

        per_token, clip_info = self._row_terms(b)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            per_token = per_token * inputs["importance_sampling_ratio"]
        kl = None
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            if self.args.use_bias_correction_kl:
                kl = kl * torch.exp(logps - b.old_logps)
            per_token = per_token + self.beta * kl
        loss = self._aggregate(per_token, mask, inputs)
        pg_loss = loss.detach()

        guide = torch.zeros((), device=logps.device)
        guidance = self.method.guidance_term(b, self.args)
        if guidance is not None:  # e.g. CalibRL's λ·L_exp, after the warm-up
            guide = self._aggregate_guidance(guidance, onp_mask, inputs)
            loss = loss + guidance.coef * guide

        if self._entropy_bonus_enabled:  # TRL's static entropy bonus, on on-policy tokens
            loss = loss - self.entropy_coef * losses.masked_mean(entropies, onp_mask) / self._ga_steps
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / self._ga_steps
        self._log_loss_parts(pg_loss, guide, entropies, b, onp_mask, clip_info, kl)
        return loss

    def _policy_logps(self, model, inputs):
        """Per-token log-probs and entropies of the completions under the current policy, and the router aux
        loss (MoE), from one forward with gradient."""
        completion_ids = inputs["completion_ids"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                          "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                          "mm_token_type_ids", "image_position_ids")},
        )

    def _loss_batch(self, logps: torch.Tensor, inputs) -> LossBatch:
        """What the method's loss terms see: the policy's log-probs next to the batch's rollout tensors."""
        completion_mask = inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        adv = inputs["advantages"]
        adv = adv.squeeze(-1) if adv.dim() == 2 and adv.size(1) == 1 else adv
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old  # the batch is used once: π_old is the current policy
        is_expert = inputs.get("is_expert", torch.zeros(logps.size(0), device=logps.device)).bool()
        return LossBatch(logps=logps, old_logps=old, advantages=adv, mask=mask, is_expert=is_expert,
                         rollout=inputs, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
                         sequence_ratio=self.importance_sampling_level == "sequence")

    def _row_terms(self, b: LossBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-token loss (B, T): the method's policy term, and its expert-row term on the rows that hold the
        expert (no ratio to π_old, no clip); the policy term's clip info for the logs."""
        pg, info = self.method.policy_term(b, self.args)
        if b.is_expert.any():
            return torch.where(b.is_expert.unsqueeze(1), self.method.expert_row_term(b, self.args), pg), info
        return pg, info

    def _aggregate_guidance(self, g: Guidance, onp_mask: torch.Tensor, inputs) -> torch.Tensor:
        """The guidance term as one number, by its level (the gap mode: `methods.TOKEN_GAPS` per token, else per
        sequence), and its logs over the rows or tokens that have a sign."""
        if g.per_token:  # token-level gaps: the same aggregation as the policy-gradient term
            guide = self._aggregate(g.loss, onp_mask, inputs)
            live = onp_mask * (g.sign != 0).unsqueeze(1).to(onp_mask.dtype)  # tokens with a sign
        else:  # sequence-level gaps: a mean over sequences
            guide = g.loss.sum() / (g.loss.size(0) * self._ga_steps)
            live = (g.sign != 0).float()  # sequences with a sign
        n, d = float(live.sum()), g.gap.detach()
        self._log("calibrl/frac_full_slope", losses.masked_mean(g.full_slope.float(), live), count=n)
        self._log("calibrl/gap_mean", losses.masked_mean(d, live), count=n)
        self._log("calibrl/frac_gap_positive", losses.masked_mean((d > 0).float(), live), count=n)
        return guide

    def _log_loss_parts(self, pg_loss, guide, entropies, b: LossBatch, onp_mask, info, kl) -> None:
        """Each part of the loss, entropy on on-policy tokens only (expert tokens are off-policy text), clipping."""
        mask = b.mask
        self._log("calibrl/pg_loss", pg_loss * self._ga_steps)
        self._log("calibrl/guide_loss", guide.detach() * self._ga_steps)
        n_on = float(onp_mask.sum())
        self._log("entropy", losses.masked_mean(entropies.detach(), onp_mask), count=n_on)
        if self.method.expert_in_slot:  # same calls on every process: _log reduces across them
            exp_mask = mask * b.is_expert.unsqueeze(1).to(mask.dtype)
            self._log("calibrl/expert_entropy", losses.masked_mean(entropies.detach(), exp_mask),
                      count=float(exp_mask.sum()))
        low, high = info["low_clipped"].expand_as(b.logps).float(), info["high_clipped"].expand_as(b.logps).float()
        self._log("clip_ratio/low_mean", losses.masked_mean(low, onp_mask), count=n_on)
        self._log("clip_ratio/high_mean", losses.masked_mean(high, onp_mask), count=n_on)
        self._log("clip_ratio/region_mean", losses.masked_mean(torch.maximum(low, high), onp_mask), count=n_on)
        if kl is not None:
            self._log("kl", losses.masked_mean(kl.detach(), mask), count=float(mask.sum()))
