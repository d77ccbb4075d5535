"""CalibRL and its baselines as pure torch functions (no TRL import).

Read top to bottom next to `docs/METHOD.md` (the specification, with the paper's equation numbers).
Every function takes plain tensors, so a verl or other backend can call it too. Shapes: B rows
(sequences), T completion positions; `mask` is 1 on real completion tokens and 0 on padding.

Notation (METHOD.md §2):
    r_i     verifiable reward of on-policy sample i of a group of G
    Â_i     group advantage, statistics over on-policy rows only
    s_i     pass sign: +1 if the answer is correct, else -1 (from the accuracy reward, not a threshold)
    Δℓ_i    log-likelihood gap of sample i against the expert trajectory τ^E

The CalibRL objective (paper Eq. 8-10):
    L_exp = mean_i |Â_i| · LeakyReLU_α(−s_i · Δℓ_i)         α = 0.5
    J(θ)  = J_GRPO(θ) − λ · L_exp                           λ = 0.1
"""

from __future__ import annotations

import torch

__all__ = [
    "GAP_MODES",
    "AGGREGATIONS",
    "masked_mean",
    "group_advantages",
    "ppo_clip_loss",
    "leaky_relu",
    "token_baseline",
    "calibration_gap",
    "guidance_loss",
    "luffy_expert_loss",
    "rlplus_expert_loss",
    "aggregate",
]

GAP_MODES = ("token", "sequence", "sequence_mean", "constant")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1; 0 when the mask is empty (never NaN)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------------------------------------
# 1. Group advantages (METHOD.md §2)
# ----------------------------------------------------------------------------------------------------------
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    normalize: str = "none",
    in_stats: torch.Tensor | None = None,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Â_i = (r_i − mean_g) [/ (std_g + eps)] over the rows of each group that count for the statistics.

    rewards:   (N,) with N = n_groups · group_size, groups contiguous. NaN means "unscorable": excluded from
               the statistics and given advantage 0.
    normalize: "none" (the official run scripts: mean-centred only), "group" (the paper: z-score within the
               group) or "batch" (std over the whole batch).
    in_stats:  (N,) bool, rows that enter the mean and std. The expert row of LUFFY/RL-PLUS is left out here
               (CalibRL's choice), or kept in (original LUFFY). Rows outside still get r_i − mean_g.
    A group whose counted rewards all agree has Â = 0 exactly (std 0, numerator 0): never NaN.
    The std is Bessel-corrected, as TRL's, so that `method=grpo` reproduces GRPOTrainer.
    """
    if normalize not in ("none", "group", "batch"):
        raise ValueError(f"normalize must be 'none', 'group' or 'batch', got {normalize!r}")
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size={group_size} rows, got {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size)
    counted = ~torch.isnan(r)
    if in_stats is not None:
        counted = counted & in_stats.view(-1, group_size).bool()
    w = counted.to(r.dtype)
    n = w.sum(dim=1, keepdim=True)
    r0 = torch.nan_to_num(r, nan=0.0)
    mean = (r0 * w).sum(dim=1, keepdim=True) / n.clamp(min=1.0)
    adv = r0 - mean
    if normalize == "group":
        var = (((r0 - mean) ** 2) * w).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1.0)
        std = var.sqrt()
    elif normalize == "batch":
        flat = r0[counted]
        std = (flat.std() if flat.numel() > 1 else torch.zeros((), dtype=r.dtype)).expand_as(mean)
    if normalize != "none":
        # A zero std is not divided by: counted rows are 0 already, and a row outside the statistics (the
        # LUFFY expert beside an all-wrong group) keeps r_E - mean instead of exploding by 1/eps.
        adv = adv / torch.where(std > 0, std + eps, torch.ones_like(std))
    # Counted rows of a zero-variance group get exactly 0 (no float residue from the mean); NaN rows get 0.
    lo = torch.where(counted, r0, mean).amin(dim=1, keepdim=True)
    hi = torch.where(counted, r0, mean).amax(dim=1, keepdim=True)
    adv = torch.where((hi == lo) & counted, torch.zeros_like(adv), adv)
    adv = torch.where(torch.isnan(r), torch.zeros_like(adv), adv)
    return adv.reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# 2. J_GRPO: the clipped PPO surrogate (METHOD.md §3; dual clip as in the official code)
# ----------------------------------------------------------------------------------------------------------
def ppo_clip_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A), ρ = exp(logπ_θ − logπ_old).

    advantages: (B,) or (B, 1) or (B, T). With `dual_clip = c` (c > 1, official code c = 3), tokens with A < 0
    have their loss capped at −c·A, so a huge ratio on a bad token cannot blow the update up.
    Returns (per_token_loss (B, T), {"ratio", "low_clipped", "high_clipped"}) for logging.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    info = {
        "ratio": ratio.detach(),
        "low_clipped": ((ratio < 1 - eps_low) & (advantages < 0)).detach(),
        "high_clipped": ((ratio > 1 + eps_high) & (advantages > 0)).detach(),
    }
    return loss, info


# ----------------------------------------------------------------------------------------------------------
# 3. The calibrated guidance term L_exp (paper Eq. 8-9; METHOD.md §3-§5)
# ----------------------------------------------------------------------------------------------------------
def leaky_relu(x: torch.Tensor, slope: float = 0.5) -> torch.Tensor:
    """LeakyReLU_α(x) = x for x > 0, α·x otherwise (α = 0.5 in the paper)."""
    return torch.where(x > 0, x, slope * x)


def token_baseline(expert_logps: torch.Tensor, expert_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The official code's per-position baseline b_t: the expert's old log-prob at position t, 0 past its end.

    expert_logps, expert_mask: (B, T_E), one expert row per sample (its group's expert). Returns (B, length),
    truncated or zero-padded to the sample's completion length. Note the comparison is position-wise across
    two different sequences (token t of the sample vs token t of the expert, in different contexts).
    """
    b = expert_logps * expert_mask.to(expert_logps.dtype)
    if b.size(1) >= length:
        return b[:, :length]
    return torch.nn.functional.pad(b, (0, length - b.size(1)), value=0.0)


def calibration_gap(
    logps: torch.Tensor,
    mask: torch.Tensor,
    expert_logps: torch.Tensor,
    expert_mask: torch.Tensor,
    mode: str = "token",
    constant: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Δℓ: how much more likely the sample is than the expert, under the policy (expert side detached).

    mode "token"          (official code)  Δℓ_{i,t} = logπ_θ(y_{i,t}) − b_t              -> (B, T)
    mode "sequence"       (paper Eq. 8)    Δℓ_i = Σ_t logπ_θ(y_{i,t}) − Σ_t logπ(y^E_t)  -> (B,)
    mode "sequence_mean"  (length-normalised) Δℓ_i = mean_t logπ_θ(y_{i,t}) − mean_t logπ(y^E_t) -> (B,)
    mode "constant"       (control)        Δℓ_{i,t} = logπ_θ(y_{i,t}) − c                 -> (B, T)
        c is `constant` if given, else the batch mean of the expert's per-token log-probs (a scale-matched
        baseline with no per-expert content): if "constant" does as well as "token", the expert's content
        did not matter.
    """
    if mode not in GAP_MODES:
        raise ValueError(f"gap must be one of {GAP_MODES}, got {mode!r}")
    m = mask.to(logps.dtype)
    em = expert_mask.to(expert_logps.dtype)
    e = expert_logps.detach() * em
    if mode == "token":
        return logps - token_baseline(e, em, logps.size(1)).detach()
    if mode == "constant":
        c = masked_mean(e, em) if constant is None else torch.as_tensor(constant, dtype=logps.dtype)
        return logps - c.detach()
    if mode == "sequence":
        return (logps * m).sum(1) - e.sum(1)
    return (logps * m).sum(1) / m.sum(1).clamp(min=1.0) - e.sum(1) / em.sum(1).clamp(min=1.0)


def guidance_loss(
    gap: torch.Tensor,
    advantages: torch.Tensor,
    sign: torch.Tensor,
    slope: float = 0.5,
    weight_by_abs_adv: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """|Â_i| · LeakyReLU_α(−s_i · Δℓ_i), per token (token gaps) or per sequence (sequence gaps).

    The four cases (METHOD.md §3): a correct sample less likely than the expert (Δℓ < 0) is pushed up at
    full slope; an over-confident correct one (Δℓ > 0) at slope α; an over-confident wrong one is pushed
    down at full slope; an already unlikely wrong one at slope α. The direction is always corrective.
    `weight_by_abs_adv=False` is the "no |A|" ablation (weight 1). Rows with s = 0 (no expert, unscorable)
    contribute 0. Returns (loss, on_full_slope) with on_full_slope = (−s·Δℓ > 0) for logging.
    """
    shape = (-1,) + (1,) * (gap.dim() - 1)
    s = sign.reshape(shape).to(gap.dtype)
    a = advantages.reshape(shape).to(gap.dtype)
    weight = a.abs() if weight_by_abs_adv else torch.ones_like(a)
    x = -s * gap
    loss = weight * leaky_relu(x, slope) * (s != 0).to(gap.dtype)
    return loss, (x > 0).detach()


# ----------------------------------------------------------------------------------------------------------
# 4. Baselines' expert-token losses (METHOD.md §6)
# ----------------------------------------------------------------------------------------------------------
def luffy_expert_loss(logps: torch.Tensor, advantages: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """LUFFY (arXiv 2504.14945) on expert tokens: −A_E · f(π_θ(y^E_t)), f(p) = p / (p + γ).

    No ratio to π_old and no clipping: the shaping f boosts the gradient of low-probability expert tokens.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    p = torch.exp(logps)
    return -advantages * p / (p + gamma)


def rlplus_expert_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """RL-PLUS on expert tokens: −A_E · [2π_θ / (π_old + ω)] · (1 − sg(π_θ))^0.5, ω = ½(π_old + 1). No clip."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    p = torch.exp(logps)
    p_old = torch.exp(old_logps.detach())
    omega = 0.5 * (p_old + 1.0)
    return -advantages * (2.0 * p / (p_old + omega)) * (1.0 - p.detach()).clamp(min=0.0).sqrt()


# ----------------------------------------------------------------------------------------------------------
# 5. Loss aggregation (how per-token losses become one number)
# ----------------------------------------------------------------------------------------------------------
def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    normalizer: float | torch.Tensor | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    token-mean               Σ_{i,t} m·l / Σ m            (DAPO; the official CalibRL code). `normalizer`
                             replaces Σ m when the token count spans a larger batch (TRL's global "dapo").
    seq-mean-token-mean      mean_i (Σ_t m·l / Σ_t m)     (original GRPO)
    seq-mean-token-sum       mean_i Σ_t m·l
    seq-mean-token-sum-norm  Σ_{i,t} m·l / (B · max_len) (Dr. GRPO)
    """
    m = mask.to(per_token.dtype)
    if mode == "token-mean":
        denom = m.sum().clamp(min=1.0) if normalizer is None else normalizer
        return (per_token * m).sum() / denom
    if mode == "seq-mean-token-mean":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if mode == "seq-mean-token-sum":
        return (per_token * m).sum(-1).mean()
    if mode == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("seq-mean-token-sum-norm needs max_len")
        return (per_token * m).sum() / (per_token.size(0) * max_len)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")
