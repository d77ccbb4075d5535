"""Training methods as registered classes: what each needs from the trainer, and the loss terms it supplies.

A method is one class and one decorator:

    @register_method("calibrl_hinge")
    class CalibRLHinge(CalibRL):                     # inherit what stays, override what changes
        def guidance_term(self, b, cfg):
            ...                                      # return a Guidance, or None for no term

after which `CalibRLConfig(method="calibrl_hinge")` validates and `CalibRLTrainer` trains it. The trainer asks
the method (flags and hooks below), never its name. The pure math stays in `calibrl.losses`; a method only
chooses which of its functions apply to which rows. Shapes: B rows, T completion positions.

The loss the trainer assembles, per micro-batch (METHOD.md §3, §6):
    per_token = policy_term             on on-policy rows (PPO-clip; original LUFFY: the plain ratio)
              | expert_row_term         on rows that hold the expert (LUFFY, RL-PLUS)
    loss      = aggregate(per_token) [+ TRL's KL, entropy bonus, aux loss] + coef · aggregate(guidance_term)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from calibrl import losses

__all__ = [
    "TOKEN_GAPS",
    "SEQUENCE_GAPS",
    "LossBatch",
    "Guidance",
    "Method",
    "ExpertSlotMethod",
    "register_method",
    "unregister_method",
    "get_method",
    "method_names",
]

# The gap modes of losses.GAP_MODES by shape: a Δℓ per token (B, T) or per sequence (B,). The guidance term
# is aggregated by this split: token gaps like the policy term, sequence gaps as a mean over sequences.
TOKEN_GAPS = ("token", "constant")
SEQUENCE_GAPS = ("sequence", "sequence_mean")
if set(TOKEN_GAPS + SEQUENCE_GAPS) != set(losses.GAP_MODES):  # a new gap mode must be placed in one of the two
    raise ImportError(f"calibrl.methods: gap modes {losses.GAP_MODES} are not split into token and sequence modes")


@dataclass
class LossBatch:
    """What a method's loss terms see of one micro-batch."""

    logps: torch.Tensor  # (B, T) log π_θ of the completion tokens, with gradient
    old_logps: torch.Tensor  # (B, T) log π_old (the detached logps when a batch is used once)
    advantages: torch.Tensor  # (B,) Â
    mask: torch.Tensor  # (B, T) 1 on completion tokens
    is_expert: torch.Tensor  # (B,) bool: the row holds the expert (slot methods), else on-policy
    rollout: dict[str, Any]  # per-row tensors from the rollout: pass_sign, has_expert, expert_logps, ...
    eps_low: float  # PPO clip range [1 - eps_low, 1 + eps_high]
    eps_high: float
    sequence_ratio: bool  # one importance ratio per sequence (GSPO) instead of per token


@dataclass
class Guidance:
    """A guidance term before its coefficient: per token (B, T) or per sequence (B,), with what is logged."""

    loss: torch.Tensor  # (B, T) or (B,)
    per_token: bool  # aggregated like the policy term (True) or as a mean over the B sequences (False)
    coef: float  # λ: the loss gains coef · aggregate(loss)
    gap: torch.Tensor  # Δℓ, the shape of `loss` (logged: gap_mean, frac_gap_positive)
    sign: torch.Tensor  # (B,) s_i; rows with s = 0 are left out of the logged shares
    full_slope: torch.Tensor  # bool, the shape of `loss`: on the slope-1 branch (logged: frac_full_slope)


class Method:
    """A training method: GRPO's PPO-clip on every row, no expert. Subclass and override what differs.

    Flags (class attributes) tell the trainer what to prepare; hooks take the `CalibRLConfig` as `cfg`.
    """

    name: str = ""  # set by @register_method
    uses_expert: bool = False  # reads the expert column: expert plan and counts, the GRPO warm-up applies
    expert_in_slot: bool = False  # the expert's tokens replace the last rollout of its group
    uses_pass_sign: bool = False  # the loss reads s_i, so pass_sign='accuracy' needs an accuracy reward

    def configure(self, cfg) -> None:
        """Impose the method's settings on the config, before TRL's own checks. Default: none."""

    def validate(self, cfg) -> None:
        """Raise ValueError naming the field for settings the method cannot run with. Default: none."""

    def needs_expert_forward(self, cfg) -> bool:
        """Whether to run one no-grad forward of each group's expert, in its own context, per generation
        batch (its per-token log-probs reach `rollout` as expert_logps / expert_mask / expert_constant)."""
        return False

    def advantages(self, rewards: torch.Tensor, is_expert: torch.Tensor, group_size: int, cfg) -> torch.Tensor | None:
        """Advantages (N,) from total rewards (N,) of the gathered batch while the expert takes part, or None
        to keep TRL's."""
        return None

    def policy_term(self, b: LossBatch, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """J_GRPO per token (B, T) on every row, and `losses.ppo_clip_loss`'s info for the clip logs."""
        if b.sequence_ratio:
            lw = ((b.logps - b.old_logps) * b.mask).sum(-1, keepdim=True) / b.mask.sum(-1, keepdim=True).clamp(min=1.0)
            pg, info = losses.ppo_clip_loss(lw, torch.zeros_like(lw), b.advantages, b.eps_low, b.eps_high, cfg.delta)
            return pg.expand_as(b.logps), info
        return losses.ppo_clip_loss(b.logps, b.old_logps, b.advantages, b.eps_low, b.eps_high, cfg.delta)

    def expert_row_term(self, b: LossBatch, cfg) -> torch.Tensor:
        """Per-token loss (B, T) used on the expert rows instead of `policy_term` (expert_in_slot methods)."""
        raise NotImplementedError(f"method {self.name!r} puts no expert in a slot")

    def guidance_term(self, b: LossBatch, cfg) -> Guidance | None:
        """An extra term on on-policy rows, or None. Default: none."""
        return None


_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: register a `Method` subclass under `name` (what `CalibRLConfig(method=...)` takes)."""

    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) decorates a Method subclass, got {cls!r}")
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered (by {_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def unregister_method(name: str) -> None:
    """Remove a registered method (for tests and notebooks that register a variant temporarily)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The method registered as `name`; ValueError naming the field otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _REGISTRY[name]()


def __getattr__(attr):
    # METHODS / EXPERT_SLOT_METHODS are read from the registry when asked, so they include later registrations.
    if attr == "METHODS":
        return method_names()
    if attr == "EXPERT_SLOT_METHODS":
        return tuple(n for n, c in _REGISTRY.items() if c.expert_in_slot)
    raise AttributeError(f"module 'calibrl.methods' has no attribute {attr!r}")


# ----------------------------------------------------------------------------------------------------------
# The five methods (METHOD.md §3, §6)
# ----------------------------------------------------------------------------------------------------------
@register_method("calibrl")
class CalibRL(Method):
    """GRPO + λ·L_exp: the expert's log-likelihood under the policy is the calibration baseline (Eq. 8-10)."""

    uses_expert = True
    uses_pass_sign = True

    def needs_expert_forward(self, cfg) -> bool:
        return cfg.guide_coef > 0  # λ = 0: the expert cannot change the loss, so it is not forwarded

    def guidance_term(self, b: LossBatch, cfg) -> Guidance | None:
        r = b.rollout
        if "expert_logps" not in r or cfg.guide_coef <= 0:  # GRPO warm-up, evaluation, or λ = 0
            return None
        sign = r["pass_sign"] * r["has_expert"]  # a group without an expert trains as plain GRPO
        gap = losses.calibration_gap(b.logps, b.mask, r["expert_logps"], r["expert_mask"], cfg.gap,
                                     constant=r["expert_constant"][0])
        g, full = losses.guidance_loss(gap, b.advantages, sign, cfg.leaky_slope, cfg.weight_by_abs_adv)
        return Guidance(g, cfg.gap in TOKEN_GAPS, cfg.guide_coef, gap, sign, full)


@register_method("grpo")
class GRPO(Method):
    """PPO-clip on group advantages; the expert is not used."""


@register_method("dapo")
class DAPO(GRPO):
    """GRPO with clip-higher (epsilon_high 0.28 unless set), token-mean aggregation and z-scored advantages."""

    def configure(self, cfg) -> None:
        cfg.epsilon_high = 0.28 if cfg.epsilon_high is None else cfg.epsilon_high
        cfg.loss_type = "dapo"
        cfg.scale_rewards = "group"


class ExpertSlotMethod(Method):
    """The expert's tokens take the last slot of their group and get their own loss (LUFFY, RL-PLUS).

    Advantages are recomputed with the expert row out of the group mean/std (CalibRL's baseline) or in it
    (original LUFFY: `expert_in_group_stats`); on-policy rows are PPO-clipped, or not (original LUFFY:
    `onpolicy_clip=False`).
    """

    uses_expert = True
    expert_in_slot = True

    def validate(self, cfg) -> None:
        if cfg.num_generations < 2:
            raise ValueError(f"method={cfg.method!r} needs num_generations >= 2 (one slot holds the expert)")

    def advantages(self, rewards, is_expert, group_size, cfg):
        return losses.group_advantages(rewards, group_size, normalize=cfg.scale_rewards,
                                       in_stats=None if cfg.expert_in_group_stats else ~is_expert)

    def policy_term(self, b: LossBatch, cfg):
        pg, info = super().policy_term(b, cfg)  # its clip info is still what the clip logs report
        if not cfg.onpolicy_clip:
            pg = -torch.exp(b.logps - b.old_logps) * b.advantages.unsqueeze(1)
        return pg, info


@register_method("luffy")
class LUFFY(ExpertSlotMethod):
    """Expert rows: −Â_E·f(π_θ), f(p) = p/(p+γ), no ratio to π_old, no clip (arXiv 2504.14945)."""

    def expert_row_term(self, b: LossBatch, cfg) -> torch.Tensor:
        return losses.luffy_expert_loss(b.logps, b.advantages, cfg.luffy_gamma)


@register_method("rlplus")
class RLPlus(ExpertSlotMethod):
    """Expert rows: −Â_E·[2π_θ/(π_old+ω)]·(1−sg(π_θ))^½, ω = (π_old+1)/2, no clip."""

    def expert_row_term(self, b: LossBatch, cfg) -> torch.Tensor:
        return losses.rlplus_expert_loss(b.logps, b.old_logps, b.advantages)
