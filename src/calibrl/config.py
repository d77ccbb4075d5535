"""Configuration: `CalibRLConfig`, the trainer's settings (TRL's `GRPOConfig` plus the CalibRL fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig

from calibrl import losses

METHODS = ("calibrl", "grpo", "dapo", "luffy", "rlplus")
EXPERT_SLOT_METHODS = ("luffy", "rlplus")  # the expert occupies one slot of its group
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
PASS_SIGNS = ("accuracy", "reward_threshold")


def _bf16_device() -> bool:
    """Whether an accelerator that trains in bf16 is present (TRL defaults bf16=True, which fails on a CPU)."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


@dataclass
class CalibRLConfig(GRPOConfig):
    """`GRPOConfig` plus the CalibRL fields. Every GRPOConfig field works as in TRL.

    Defaults follow the official code (METHOD.md §4): token-level gap, mean-centred advantages
    (`scale_rewards="none"`), λ = 0.1, α = 0.5. TRL's `delta` is the dual clip c (official: 3.0); TRL's
    `loss_type="dapo"` (its default) is the official token-mean aggregation.
    """

    method: str = field(default="calibrl", metadata={"help": f"One of {METHODS}. 'dapo' = GRPO with clip-higher "
                        "(epsilon_high 0.28 unless set), token-mean and z-scored advantages."})
    expert_column: str = field(default="solution", metadata={"help": "Dataset column holding the expert solution."})
    guide_coef: float = field(default=0.1, metadata={"help": "λ: weight of the calibrated guidance term L_exp."})
    leaky_slope: float = field(default=0.5, metadata={"help": "α: LeakyReLU slope for negative inputs."})
    gap: str = field(default="token", metadata={"help": f"Log-likelihood gap: one of {losses.GAP_MODES}. 'token' is "
                     "the official code, 'sequence' the paper, 'constant' a control without expert content."})
    constant_logp: float | None = field(default=None, metadata={"help": "Per-token baseline for gap='constant'; "
                                        "None = the batch mean of the expert's per-token log-probs."})
    weight_by_abs_adv: bool = field(default=True, metadata={"help": "Weight L_exp by |A| (group rareness)."})
    pass_sign: str = field(default="accuracy", metadata={"help": "How s_i is derived: 'accuracy' (the accuracy "
                           "reward component > 0.5) or 'reward_threshold' (total reward > pass_threshold, the "
                           "official code)."})
    accuracy_reward_name: str | None = field(default=None, metadata={"help": "Name of the accuracy reward function;"
                                             " None = the first whose name contains 'accuracy'."})
    pass_threshold: float = field(default=0.1, metadata={"help": "Threshold for pass_sign='reward_threshold'."})
    grpo_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of plain GRPO before any expert "
                                   "guidance (the expert is then neither forwarded nor in the loss)."})
    luffy_gamma: float = field(default=0.1, metadata={"help": "γ of LUFFY's policy shaping f(p) = p/(p+γ)."})
    expert_in_group_stats: bool = field(default=False, metadata={"help": "LUFFY/RL-PLUS: include the expert row in "
                                        "the group mean/std (original LUFFY) instead of on-policy rows only."})
    onpolicy_clip: bool = field(default=True, metadata={"help": "LUFFY/RL-PLUS: PPO-clip the on-policy rows "
                                "(CalibRL's baseline) or not (original LUFFY)."})
    guard_rewards: bool = field(default=True, metadata={"help": "Wrap plain reward functions so that one that "
                                "raises, returns NaN/inf or hangs costs that sample (scored 0, counted), not the run."})
    reward_timeout: float | None = field(default=60.0, metadata={"help": "Seconds before a reward call is cut "
                                         "(guard_rewards); None = no limit."})
    scale_rewards: str = field(default="none", metadata={"help": "Advantage normalisation: 'none' (official "
                               "scripts, mean-centred), 'group' (paper, z-score) or 'batch'. 'dapo' forces 'group'."})

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "dapo":
            self.epsilon_high = 0.28 if self.epsilon_high is None else self.epsilon_high
            self.loss_type = "dapo"
            self.scale_rewards = "group"
        if self.bf16 is None and (self.use_cpu or not _bf16_device()):  # TRL's bf16 default needs a GPU
            self.bf16 = False
        super().__post_init__()
        if self.gap not in losses.GAP_MODES:
            raise ValueError(f"gap must be one of {losses.GAP_MODES}, got {self.gap!r}")
        if self.pass_sign not in PASS_SIGNS:
            raise ValueError(f"pass_sign must be one of {PASS_SIGNS}, got {self.pass_sign!r}")
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {SUPPORTED_LOSS_TYPES} for CalibRLTrainer, got {self.loss_type!r}")
        if self.guide_coef < 0:
            raise ValueError(f"guide_coef must be >= 0, got {self.guide_coef}")
        if not 0.0 <= self.leaky_slope <= 1.0:
            raise ValueError(f"leaky_slope must be in [0, 1], got {self.leaky_slope}")
        if self.grpo_warmup_steps < 0:
            raise ValueError(f"grpo_warmup_steps must be >= 0, got {self.grpo_warmup_steps}")
        if self.luffy_gamma <= 0:
            raise ValueError(f"luffy_gamma must be > 0, got {self.luffy_gamma}")
        if self.delta is not None and self.delta <= 1.0:
            raise ValueError(f"delta (the dual clip c) must be > 1, got {self.delta}")
        if self.method in EXPERT_SLOT_METHODS and self.num_generations < 2:
            raise ValueError(f"method={self.method!r} needs num_generations >= 2 (one slot holds the expert)")
        if self.uses_expert and (self.per_device_train_batch_size * self.steps_per_generation) % self.num_generations:
            # Groups must not span processes: the expert of a group is looked up on the process that holds it.
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation ({self.per_device_train_batch_size} * "
                f"{self.steps_per_generation}) must be a multiple of num_generations ({self.num_generations}) "
                f"for method={self.method!r}, so that every group stays within one process"
            )

    @property
    def uses_expert(self) -> bool:
        return self.method in ("calibrl",) + EXPERT_SLOT_METHODS
