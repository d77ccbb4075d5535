"""The method registry (calibrl.methods): what each method declares, a new method as one class + decorator,
and the expert forward skipped where it cannot matter (CalibRL with λ = 0)."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from calibrl import CalibRLConfig, losses, methods
from calibrl.methods import (SEQUENCE_GAPS, TOKEN_GAPS, CalibRL, Guidance, LossBatch, Method, get_method,
                             register_method, unregister_method)

from helpers import COMMON, make_trainer, params


# ------------------------------------------------------------------ the registry
def test_the_five_methods_and_what_they_declare():
    assert methods.METHODS == ("calibrl", "grpo", "dapo", "luffy", "rlplus")
    assert methods.EXPERT_SLOT_METHODS == ("luffy", "rlplus")
    flags = {n: (m.uses_expert, m.expert_in_slot, m.uses_pass_sign)
             for n, m in ((n, get_method(n)) for n in methods.METHODS)}
    assert flags == {"calibrl": (True, False, True), "grpo": (False, False, False), "dapo": (False, False, False),
                     "luffy": (True, True, False), "rlplus": (True, True, False)}
    cal = get_method("calibrl")
    assert cal.needs_expert_forward(SimpleNamespace(guide_coef=0.1))
    assert not cal.needs_expert_forward(SimpleNamespace(guide_coef=0.0))
    assert not any(get_method(n).needs_expert_forward(SimpleNamespace(guide_coef=0.1))
                   for n in ("grpo", "dapo", "luffy", "rlplus"))


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_method("grpo")(type("Again", (Method,), {}))
    with pytest.raises(TypeError, match="Method subclass"):
        register_method("not_a_method")(object)
    assert "not_a_method" not in methods.METHODS


def test_method_defaults_and_validation(tmp_path):
    base = {**COMMON, "output_dir": str(tmp_path)}
    dapo = CalibRLConfig(**{**base, "method": "dapo", "loss_type": "grpo", "scale_rewards": "none"})
    assert (dapo.epsilon_high, dapo.loss_type, dapo.scale_rewards) == (0.28, "dapo", "group")
    assert CalibRLConfig(**{**base, "method": "dapo", "epsilon_high": 0.3}).epsilon_high == 0.3  # set: kept
    grpo = CalibRLConfig(**{**base, "method": "grpo"})
    assert (grpo.epsilon_high, grpo.loss_type, grpo.scale_rewards) == (None, "dapo", "none")  # nothing imposed
    for name in ("luffy", "rlplus"):  # one slot holds the expert (TRL refuses num_generations < 2 first anyway)
        with pytest.raises(ValueError, match="num_generations >= 2"):
            get_method(name).validate(SimpleNamespace(method=name, num_generations=1))
        get_method(name).validate(SimpleNamespace(method=name, num_generations=2))


def test_slot_methods_group_statistics_rule():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # two groups of 4, expert last
    is_expert = torch.tensor([False, False, False, True] * 2)
    for name in ("luffy", "rlplus"):
        m = get_method(name)
        out_ = m.advantages(rewards, is_expert, 4, SimpleNamespace(scale_rewards="none", expert_in_group_stats=False))
        in_ = m.advantages(rewards, is_expert, 4, SimpleNamespace(scale_rewards="none", expert_in_group_stats=True))
        assert torch.allclose(out_[:4], rewards[:4] - rewards[:3].mean())  # mean of the on-policy rows only
        assert torch.allclose(in_[:4], rewards[:4] - rewards[:4].mean())
    assert get_method("calibrl").advantages(rewards, is_expert, 4, None) is None  # TRL's advantages stand


def _batch(B=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    rollout = {"pass_sign": torch.tensor([1.0, -1.0, 1.0, -1.0]), "has_expert": torch.ones(B),
               "expert_logps": -torch.rand(B, 7, generator=g) * 3, "expert_mask": torch.ones(B, 7, dtype=torch.long),
               "expert_constant": torch.full((B,), -1.5)}
    return LossBatch(logps=logps, old_logps=logps.detach(), advantages=torch.tensor([0.5, -0.5, 1.0, -1.0]),
                     mask=mask, is_expert=torch.zeros(B, dtype=torch.bool), rollout=rollout, eps_low=0.2,
                     eps_high=0.2, sequence_ratio=False)


@pytest.mark.parametrize("gap", losses.GAP_MODES)
def test_calibrl_guidance_term_level_follows_the_gap_mode(gap):
    assert set(TOKEN_GAPS) | set(SEQUENCE_GAPS) == set(losses.GAP_MODES) and not set(TOKEN_GAPS) & set(SEQUENCE_GAPS)
    b = _batch()
    cfg = SimpleNamespace(gap=gap, guide_coef=0.1, leaky_slope=0.5, weight_by_abs_adv=True)
    g = CalibRL().guidance_term(b, cfg)
    assert g.per_token == (gap in TOKEN_GAPS) and g.coef == 0.1
    assert g.loss.shape == ((4, 5) if gap in TOKEN_GAPS else (4,))
    gap_t = losses.calibration_gap(b.logps, b.mask, b.rollout["expert_logps"], b.rollout["expert_mask"], gap,
                                   constant=torch.tensor(-1.5))
    want, _ = losses.guidance_loss(gap_t, b.advantages, b.rollout["pass_sign"], 0.5, True)
    assert torch.equal(g.loss, want)
    assert CalibRL().guidance_term(b, SimpleNamespace(**{**vars(cfg), "guide_coef": 0.0})) is None  # λ = 0
    del b.rollout["expert_logps"]  # warm-up / evaluation: no expert forward, no term
    assert CalibRL().guidance_term(b, cfg) is None


# ------------------------------------------------------------------ a new method: one class + decorator
def test_a_method_registered_here_trains_through_the_config(tiny_vlm_dir, tmp_path):
    calls = []

    @register_method("calibrl_correct_only")
    class CorrectOnly(CalibRL):
        """A guidance variant: the calibration term on correct samples only (s_i > 0)."""

        def guidance_term(self, b, cfg):
            g = super().guidance_term(b, cfg)
            if g is None:
                return None
            calls.append(int((g.sign > 0).sum()))
            keep = (g.sign > 0).to(g.loss.dtype).reshape((-1,) + (1,) * (g.loss.dim() - 1))
            return dataclasses.replace(g, loss=g.loss * keep, sign=g.sign * (g.sign > 0))

    try:
        assert "calibrl_correct_only" in methods.METHODS
        tr = make_trainer(tiny_vlm_dir, tmp_path / "toy", method="calibrl_correct_only", max_steps=2)
        assert isinstance(tr.method, CorrectOnly) and tr.method.uses_expert  # inherited from CalibRL
        tr.train()
    finally:
        unregister_method("calibrl_correct_only")
    with pytest.raises(ValueError, match="method must be one of"):  # validated against the registry as it is now
        CalibRLConfig(output_dir=str(tmp_path), method="calibrl_correct_only", **COMMON)

    assert len(calls) == tr.state.global_step == 2 and sum(calls) > 0  # its term was asked, with correct samples
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert any(h["calibrl/guide_loss"] != 0 for h in logs) and "calibrl/expert_entropy" in logs[-1]
    cal = make_trainer(tiny_vlm_dir, tmp_path / "cal", method="calibrl", max_steps=2)
    cal.train()
    diff = max((params(tr)[k] - params(cal)[k]).abs().max().item() for k in params(cal))
    assert diff > 1e-6, "the registered variant trained exactly as calibrl: its guidance term was not used"


# ------------------------------------------------------------------ the expert forward, only where it matters
def _count_expert_forwards(tr):
    calls = []
    forward = tr._expert_forward

    def counted(*a, **k):
        calls.append(len(a[1]))
        return forward(*a, **k)

    tr._expert_forward = counted
    return calls


def test_zero_guidance_skips_the_expert_forward_and_trains_exactly_as_grpo(tiny_vlm_dir, tmp_path):
    grpo = make_trainer(tiny_vlm_dir, tmp_path / "g", method="grpo", max_steps=2)
    grpo.train()
    cal0 = make_trainer(tiny_vlm_dir, tmp_path / "c0", method="calibrl", guide_coef=0.0, max_steps=2)
    calls0 = _count_expert_forwards(cal0)
    cal0.train()
    assert calls0 == []
    a, b = params(cal0), params(grpo)
    assert all(torch.equal(a[k], b[k]) for k in b), "λ=0 CalibRL is not GRPO bit for bit"
    assert [h["loss"] for h in cal0.state.log_history if "loss" in h] == \
        [h["loss"] for h in grpo.state.log_history if "loss" in h]

    cal = make_trainer(tiny_vlm_dir, tmp_path / "c", method="calibrl", guide_coef=0.1, max_steps=2)
    calls = _count_expert_forwards(cal)
    cal.train()
    assert calls == [2, 2]  # one forward per generation batch, one row per group (8 rows / 4 generations)


def test_gradient_accumulation_divisor(tiny_vlm_dir, tmp_path):
    tr = make_trainer(tiny_vlm_dir, tmp_path, method="calibrl", gradient_accumulation_steps=2)
    tr.current_gradient_accumulation_steps = 2  # set by the training loop
    tr.model.train()
    assert tr._ga_steps == 2
    tr.model.eval()
    assert tr._ga_steps == 1.0


def test_guidance_is_aggregated_by_level(tiny_vlm_dir, tmp_path):
    tr = make_trainer(tiny_vlm_dir, tmp_path, method="calibrl", loss_type="grpo")
    tr.current_gradient_accumulation_steps = 2
    tr.model.train()
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    sign = torch.tensor([1.0, -1.0])
    tok = Guidance(loss, True, 0.1, loss, sign, loss > 2)
    assert tr._aggregate_guidance(tok, mask, {}).item() == pytest.approx((1.5 + 5.0) / 2 / 2)  # TRL's "grpo"
    seq = Guidance(loss[:, 0], False, 0.1, loss[:, 0], sign, loss[:, 0] > 2)
    assert tr._aggregate_guidance(seq, mask, {}).item() == pytest.approx((1.0 + 4.0) / (2 * 2))  # mean / GA
