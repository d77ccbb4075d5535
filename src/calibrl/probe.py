"""Where the expert sits for a policy, before any training: the regime CalibRL's guidance will work in.

For each prompt, G completions are sampled from the policy and scored; then the per-token log-probabilities
of every sample and of the prompt's expert solution are computed under the same policy (each in its own
context: prompt + images + tokens + EOS, as `CalibRLTrainer` builds the expert row). From them, with the
trainer's own `losses.calibration_gap`:

    Δℓ (token gap)      logπ(y_{i,t}) − logπ(y^E_t), position by position  -> share of sample tokens with Δℓ > 0
    Δℓ (sequence gap)   Σ_t logπ(y_{i,t}) − Σ_t logπ(y^E_t)                 -> share of samples with Δℓ > 0
    Δℓ (sequence_mean)  the same with per-token means                       -> share of samples with Δℓ > 0

A share near 1 means the expert is far less likely than the policy's own samples: the LeakyReLU's branch, and
so the slope, is set by each sample's correctness alone and the expert's content barely reaches the update
(what docs/RESULTS.md measured in the miniature). A share near 0 is the mirror case. In between, the expert
sits inside the samples' distribution and its content decides which samples are pushed at full slope.
Group composition (all wrong / all right / mixed) says how many groups carry any advantage at all.

Whether the expert's *content* reaches the update is measured directly as slope flips: the LeakyReLU takes
the full slope or α by the sign of −s_i·Δℓ, and s_i does not depend on the expert, so a unit (a sample token
for the token gap, a sample for the sequence gaps) changes slope between two baselines exactly where the two
Δℓ have different signs. `slope_flips` counts those units among the ones that carry guidance (samples of
mixed groups, where |Â| > 0): against the constant baseline c (the token gap with the expert's content taken
out, the trainer's `gap: constant` control) in `probe`, and against another expert (a noisy one) in the
regime study (benchmarks/regime.py).
"""

from __future__ import annotations

import math

import torch

from calibrl import losses
from calibrl.evaluate import generate_completions
from calibrl.multimodal import tokenizer_of
from calibrl.rewards import extract_answer, is_correct
from calibrl.sft import collate

INSIDE = (0.1, 0.9)  # token-gap shares between these read as "the expert is inside the policy's distribution"


@torch.no_grad()
def target_logps(model, processing_class, rows: list[dict], targets: list[list[int]],
                 batch_size: int = 32) -> list[torch.Tensor]:
    """Per-token log-probs of each target under `model`, each after its row's prompt (and images): one 1-D
    float tensor per target. The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate(processing_class, rows[start:start + batch_size], targets[start:start + batch_size])
            labels = batch.pop("labels")
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = model(**batch).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nxt = batch["input_ids"][:, 1:]
            tok = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).cpu()
            keep = labels[:, 1:] != -100
            out += [tok[i][keep[i]] for i in range(tok.size(0))]
    finally:
        model.train(was_training)
    return out


def _ids(processing_class, text: str, max_tokens: int, append_eos: bool) -> list[int]:
    tok = tokenizer_of(processing_class)
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return ids + [tok.eos_token_id] if append_eos else ids


def _padded(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(s) for s in seqs))
    values, mask = torch.zeros(len(seqs), width), torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        values[i, : len(s)], mask[i, : len(s)] = s, 1
    return values, mask


def _spread(x: torch.Tensor) -> dict:
    x = x.float()
    return {"mean": x.mean().item(), "std": x.std().item() if x.numel() > 1 else 0.0,
            "min": x.min().item(), "max": x.max().item()}


def regime(sample_logps: list[torch.Tensor], expert_logps: list[torch.Tensor], correct: list[bool],
           num_generations: int) -> dict:
    """The regime statistics from per-token log-probs: `sample_logps` has G consecutive entries per prompt,
    `expert_logps` one entry per prompt (empty where a prompt has no expert: its samples are left out of the
    gap statistics), `correct` one flag per sample."""
    G = num_generations
    n_prompts = len(expert_logps)
    if len(sample_logps) != n_prompts * G or len(correct) != n_prompts * G:
        raise ValueError(f"expected {n_prompts} x {G} samples, got {len(sample_logps)} log-prob rows and "
                         f"{len(correct)} correctness flags")
    groups = torch.tensor(correct, dtype=torch.bool).view(n_prompts, G)
    with_expert = [g for g in range(n_prompts) if len(expert_logps[g]) > 0]
    out: dict = {
        "prompts": n_prompts, "num_generations": G, "prompts_with_expert": len(with_expert),
        "sample_accuracy": groups.float().mean().item(),
        "groups": {"all_wrong": (~groups.any(1)).float().mean().item(),
                   "all_right": groups.all(1).float().mean().item(),
                   "mixed": (groups.any(1) & ~groups.all(1)).float().mean().item()},
    }
    if not with_expert:
        return out
    rows = [g * G + j for g in with_expert for j in range(G)]
    s_logp, s_mask = _padded([sample_logps[r] for r in rows])
    e_logp, e_mask = _padded([expert_logps[r // G] for r in rows])
    token_gap = losses.calibration_gap(s_logp, s_mask, e_logp, e_mask, "token")
    seq_gap = losses.calibration_gap(s_logp, s_mask, e_logp, e_mask, "sequence")
    mean_gap = losses.calibration_gap(s_logp, s_mask, e_logp, e_mask, "sequence_mean")
    per_tok = lambda v, m: (v * m).sum(1) / m.sum(1).clamp(min=1)  # noqa: E731
    experts = [expert_logps[g] for g in with_expert]
    out.update({
        "expert_logp_per_token": _spread(torch.stack([e.mean() for e in experts])),
        "sample_logp_per_token": _spread(per_tok(s_logp, s_mask)),
        "expert_tokens": _spread(torch.tensor([float(len(e)) for e in experts])),
        "sample_tokens": _spread(s_mask.sum(1).float()),
        "share_gap_positive": {
            "token": losses.masked_mean((token_gap > 0).float(), s_mask).item(),
            "sequence": (seq_gap > 0).float().mean().item(),
            "sequence_mean": (mean_gap > 0).float().mean().item(),
        },
        "token_gap_mean": losses.masked_mean(token_gap, s_mask).item(),
    })
    out["reading"] = reading(out)
    return out


def slope_flips(sample_logps: list[torch.Tensor], expert_a: list[torch.Tensor], expert_b: list[torch.Tensor] | None,
                correct: list[bool], num_generations: int, mode: str = "token") -> dict:
    """Share of the guided units whose LeakyReLU slope differs between baseline A (`expert_a`) and baseline B
    (`expert_b`, or with `expert_b=None` the constant c = mean per-token log-prob of the A experts, as
    `gap: constant` uses). Units: tokens (mode "token") or samples ("sequence", "sequence_mean") of mixed
    groups whose prompt has both baselines. Shapes as `regime`'s inputs: G consecutive samples per prompt."""
    if mode not in ("token", "sequence", "sequence_mean"):
        raise ValueError(f"mode must be token, sequence or sequence_mean, got {mode!r}")
    if expert_b is None and mode != "token":
        raise ValueError("the constant baseline is a per-token one: compare it with mode='token'")
    G = num_generations
    n_prompts = len(expert_a)
    if len(sample_logps) != n_prompts * G or len(correct) != n_prompts * G or (
            expert_b is not None and len(expert_b) != n_prompts):
        raise ValueError(f"expected {n_prompts} prompts x {G} samples and one expert per prompt on each side")
    groups = torch.tensor(correct, dtype=torch.bool).view(n_prompts, G)
    mixed = groups.any(1) & ~groups.all(1)
    keep = [g for g in range(n_prompts) if mixed[g] and len(expert_a[g]) > 0
            and (expert_b is None or len(expert_b[g]) > 0)]
    out = {"mode": mode, "baseline_b": "constant" if expert_b is None else "expert", "guided_prompts": len(keep)}
    if not keep:
        return {**out, "units": 0, "share": None}
    rows = [g * G + j for g in keep for j in range(G)]
    s_logp, s_mask = _padded([sample_logps[r] for r in rows])
    a_logp, a_mask = _padded([expert_a[r // G] for r in rows])
    gap_a = losses.calibration_gap(s_logp, s_mask, a_logp, a_mask, mode)
    if expert_b is None:
        c = torch.cat([expert_a[g] for g in range(n_prompts) if len(expert_a[g]) > 0]).mean()
        gap_b = losses.calibration_gap(s_logp, s_mask, a_logp, a_mask, "constant", constant=c)
    else:
        b_logp, b_mask = _padded([expert_b[r // G] for r in rows])
        gap_b = losses.calibration_gap(s_logp, s_mask, b_logp, b_mask, mode)
    differ = ((gap_a > 0) != (gap_b > 0)).float()
    unit_mask = s_mask.float() if mode == "token" else torch.ones_like(differ)
    return {**out, "units": int(unit_mask.sum().item()), "share": losses.masked_mean(differ, unit_mask).item()}


def reading(stats: dict) -> str:
    """One line saying what the shares mean for CalibRL's update."""
    share = stats["share_gap_positive"]["token"]
    seq = stats["share_gap_positive"]["sequence"]
    lo, hi = INSIDE
    if share >= hi:
        line = (f"the expert is far outside your policy (token gap > 0 for {100 * share:.0f}% of tokens, sequence "
                f"gap for {100 * seq:.0f}% of samples): CalibRL's slope will follow correctness alone")
    elif share <= lo:
        line = (f"the expert is far more likely than your policy's samples (token gap > 0 for only {100 * share:.0f}% "
                f"of tokens): CalibRL's slope will follow correctness alone")
    else:
        line = (f"the expert is inside your policy's distribution (token gap > 0 for {100 * share:.0f}% of tokens, "
                f"sequence gap for {100 * seq:.0f}% of samples): the expert's content will shape the update")
    mixed = stats["groups"]["mixed"]
    if mixed < 0.1:  # all-right and all-wrong groups have zero advantage, so |Â| weighs their guidance to 0
        line += f"; but only {100 * mixed:.0f}% of groups are mixed, so few samples carry any guidance"
    return line


def sample_logps(model, processing_class, rows: list[dict], num_generations: int = 8, max_new_tokens: int = 64,
                 temperature: float = 1.0, batch_size: int = 32, seed: int = 0) -> tuple[list[torch.Tensor], list[bool]]:
    """G sampled completions per row, scored: their per-token log-probs (G consecutive entries per row) and
    correctness flags. A sample that stopped by itself ends with EOS, as in TRL; one cut at the limit has none."""
    G = num_generations
    texts = generate_completions(model, processing_class, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 num_samples=G, temperature=temperature, seed=seed)
    correct = [is_correct(extract_answer(t), row.get("answer")) for row, ts in zip(rows, texts) for t in ts]
    eos = tokenizer_of(processing_class).eos_token_id
    targets = []
    for ts in texts:
        for t in ts:
            ids = _ids(processing_class, t, max_new_tokens, append_eos=False)
            targets.append(ids + ([eos] if len(ids) < max_new_tokens else []))
    logps = target_logps(model, processing_class, [row for row in rows for _ in range(G)], targets, batch_size)
    return logps, correct


def expert_logps(model, processing_class, rows: list[dict], max_new_tokens: int = 64, batch_size: int = 32,
                 expert_column: str = "solution") -> list[torch.Tensor]:
    """Per-token log-probs of each row's expert (an empty tensor where a row has none), truncated to leave room
    for EOS inside the completion limit, as the trainer does."""
    experts = [row.get(expert_column) for row in rows]
    has = [i for i, e in enumerate(experts) if isinstance(e, str) and e.strip()]
    logps = target_logps(model, processing_class, [rows[i] for i in has],
                         [_ids(processing_class, experts[i], max_new_tokens - 1, append_eos=True) for i in has],
                         batch_size)
    out = [torch.zeros(0)] * len(rows)
    for i, lp in zip(has, logps):
        out[i] = lp
    return out


def probe(model, processing_class, rows: list[dict], num_generations: int = 8, max_new_tokens: int = 64,
          temperature: float = 1.0, batch_size: int = 32, expert_column: str = "solution", seed: int = 0) -> dict:
    """Sample `num_generations` completions per row, score them, and measure where each row's expert sits
    (see the module docstring). Rows need a prompt (and images), an `answer`, and the expert in `expert_column`."""
    G = num_generations
    samples, correct = sample_logps(model, processing_class, rows, G, max_new_tokens, temperature, batch_size, seed)
    experts = expert_logps(model, processing_class, rows, max_new_tokens, batch_size, expert_column)
    if any(not math.isfinite(float(x.sum())) for x in samples + experts):
        raise ValueError("non-finite log-probabilities: the model's outputs are not usable")
    stats = regime(samples, experts, correct, G)
    if stats.get("share_gap_positive"):
        stats["content_flips"] = slope_flips(samples, experts, None, correct, G, "token")
    stats["settings"] = {"num_generations": G, "max_new_tokens": max_new_tokens, "temperature": temperature,
                         "seed": seed, "expert_column": expert_column}
    return stats


def format_report(stats: dict) -> str:
    """The probe's numbers as a few aligned lines, ending with the one-line reading."""
    g = stats["groups"]
    lines = [f"prompts {stats['prompts']} x {stats['num_generations']} samples; sample accuracy "
             f"{100 * stats['sample_accuracy']:.1f}%; groups all-wrong {100 * g['all_wrong']:.0f}%, "
             f"all-right {100 * g['all_right']:.0f}%, mixed {100 * g['mixed']:.0f}%"]
    if "share_gap_positive" in stats:
        e, s, sh = stats["expert_logp_per_token"], stats["sample_logp_per_token"], stats["share_gap_positive"]
        lines += [f"log-prob per token: expert {e['mean']:.2f} ± {e['std']:.2f}, own samples {s['mean']:.2f} ± "
                  f"{s['std']:.2f} (over {stats['prompts_with_expert']} experts)",
                  f"share with gap > 0: token {100 * sh['token']:.1f}% of tokens, sequence {100 * sh['sequence']:.1f}%"
                  f" of samples, sequence_mean {100 * sh['sequence_mean']:.1f}%"]
        flips = stats.get("content_flips") or {}
        if flips.get("share") is not None:
            lines.append(f"expert content: it sets the slope of {100 * flips['share']:.1f}% of the guided tokens "
                         f"(token gap vs a constant baseline, {flips['units']} tokens of mixed groups)")
        lines.append(f"reading: {stats['reading']}")
    else:
        lines.append("reading: no row has an expert solution: nothing to calibrate against")
    return "\n".join(lines)
