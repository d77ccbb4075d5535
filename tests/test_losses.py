"""The pure math of calibrl.losses against hand-computed values and closed-form gradients."""

import math

import pytest
import torch

from calibrl import losses as L


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- group advantages
def test_group_advantages_mean_centred_and_zscore():
    r = t([1.0, 0.0, 0.0, 1.0, 1.1, 0.1, 0.1, 0.1])
    a = L.group_advantages(r, 4, "none")
    assert torch.allclose(a, t([0.5, -0.5, -0.5, 0.5, 0.75, -0.25, -0.25, -0.25]))
    z = L.group_advantages(r, 4, "group")
    std1 = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected, as TRL
    assert torch.allclose(z[:4], t([0.5, -0.5, -0.5, 0.5]) / (std1 + 1e-4))
    std2 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)
    assert torch.allclose(z[4:], t([0.75, -0.25, -0.25, -0.25]) / (std2 + 1e-4))


@pytest.mark.parametrize("norm", ["none", "group", "batch"])
def test_zero_variance_groups_are_exactly_zero_never_nan(norm):
    r = t([0.3, 0.3, 0.3, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    a = L.group_advantages(r, 3, norm)
    assert not torch.isnan(a).any()
    assert torch.equal(a[:6], torch.zeros(6, dtype=a.dtype))
    assert (a[6:] != 0).all()


def test_nan_rewards_are_excluded_and_get_zero():
    a = L.group_advantages(t([1.0, float("nan"), 0.0, 0.0]), 4, "none")
    assert torch.allclose(a, t([2 / 3, 0.0, -1 / 3, -1 / 3]))


def test_expert_row_outside_statistics():
    # LUFFY slot 3 is the expert; on-policy rows all wrong: they get 0, the expert keeps r_E - mean (no 1/eps blow-up).
    r = t([0.0, 0.0, 0.0, 1.1])
    out = L.group_advantages(r, 4, "group", in_stats=torch.tensor([1, 1, 1, 0]).bool())
    assert torch.allclose(out, t([0.0, 0.0, 0.0, 1.1]))
    inside = L.group_advantages(r, 4, "none")  # original LUFFY: expert inside the mean
    assert torch.allclose(inside, t([-0.275, -0.275, -0.275, 0.825]))


def test_group_advantages_bad_args():
    with pytest.raises(ValueError, match="normalize"):
        L.group_advantages(t([1.0, 0.0]), 2, "zscore")
    with pytest.raises(ValueError, match="multiple of group_size"):
        L.group_advantages(t([1.0, 0.0, 1.0]), 2)


# ---------------------------------------------------------------- PPO clip
def test_ppo_clip_values_by_hand():
    logp = torch.log(t([[1.5, 0.5, 1.1, 0.7]]))
    old = torch.zeros(1, 4, dtype=torch.float64)
    pos, _ = L.ppo_clip_loss(logp, old, t([1.0]), 0.2, 0.28)
    # ratio 1.5 -> clipped 1.28; 0.5 -> min(0.5, 0.8) = 0.5; 1.1 -> 1.1; 0.7 -> 0.7
    assert torch.allclose(pos, -t([[1.28, 0.5, 1.1, 0.7]]))
    neg, info = L.ppo_clip_loss(logp, old, t([-1.0]), 0.2, 0.28)
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)): 1.5, 0.8, 1.1, 0.8
    assert torch.allclose(neg, t([[1.5, 0.8, 1.1, 0.8]]))
    assert info["low_clipped"].tolist() == [[False, True, False, True]]


def test_dual_clip_caps_negative_advantage_loss():
    logp = torch.log(t([[5.0, 2.0]]))
    loss, _ = L.ppo_clip_loss(logp, torch.zeros(1, 2, dtype=torch.float64), t([-2.0]), 0.2, 0.2, dual_clip=3.0)
    assert torch.allclose(loss, t([[6.0, 4.0]]))  # min(5*2, 3*2), min(2*2, 3*2)
    with pytest.raises(ValueError):
        L.ppo_clip_loss(logp, logp, t([1.0]), dual_clip=0.5)


# ---------------------------------------------------------------- guidance term
def test_leaky_relu():
    assert torch.allclose(L.leaky_relu(t([2.0, -2.0, 0.0]), 0.5), t([2.0, -1.0, 0.0]))


def test_four_cases_of_the_asymmetric_activation():
    # Each row: (sign, gap) -> |A| * LeakyReLU(-s * gap); |A| = 2.
    gap = t([-1.0, 1.0, 1.0, -1.0])  # sequence-level gaps, one per sample
    sign = t([1.0, 1.0, -1.0, -1.0])
    adv = t([2.0, 2.0, -2.0, -2.0])
    loss, full = L.guidance_loss(gap, adv, sign, slope=0.5)
    # correct & less likely: full (2*1); correct & over-confident: damped (2*-0.5);
    # wrong & over-confident: full (2*1); wrong & unlikely: damped (2*-0.5)
    assert torch.allclose(loss, t([2.0, -1.0, 2.0, -1.0]))
    assert full.tolist() == [True, False, True, False]
    flat, _ = L.guidance_loss(gap, adv, sign, slope=0.5, weight_by_abs_adv=False)
    assert torch.allclose(flat, t([1.0, -0.5, 1.0, -0.5]))
    zero, _ = L.guidance_loss(gap, adv, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(zero, torch.zeros(4, dtype=torch.float64))


def test_token_baseline_pads_with_zero_past_the_expert():
    e = t([[-1.0, -2.0, -3.0]])
    m = torch.tensor([[1, 1, 0]])
    assert torch.allclose(L.token_baseline(e, m, 5), t([[-1.0, -2.0, 0.0, 0.0, 0.0]]))
    assert torch.allclose(L.token_baseline(e, m, 1), t([[-1.0]]))


def test_gap_modes_by_hand():
    logp = t([[-1.0, -2.0, -4.0]])
    mask = torch.tensor([[1, 1, 0]])
    e = t([[-0.5, -0.5, -0.5, -0.5]])
    em = torch.tensor([[1, 1, 1, 0]])
    assert torch.allclose(L.calibration_gap(logp, mask, e, em, "token"), t([[-0.5, -1.5, -3.5]]))
    assert torch.allclose(L.calibration_gap(logp, mask, e, em, "sequence"), t([-3.0 + 1.5]))
    assert torch.allclose(L.calibration_gap(logp, mask, e, em, "sequence_mean"), t([-1.5 + 0.5]))
    assert torch.allclose(L.calibration_gap(logp, mask, e, em, "constant"), t([[-0.5, -1.5, -3.5]]))
    assert torch.allclose(L.calibration_gap(logp, mask, e, em, "constant", constant=-1.0), t([[0.0, -1.0, -3.0]]))
    with pytest.raises(ValueError, match="gap"):
        L.calibration_gap(logp, mask, e, em, "bogus")


def test_guidance_gradient_matches_closed_form_for_token_gap():
    """d(λ·L_guide)/d logπ(y_{i,t}) = −λ·s_i·|A_i|·w_{i,t}/N with w ∈ {1, α} (METHOD.md §4)."""
    torch.manual_seed(0)
    B, T, lam, alpha = 4, 6, 0.1, 0.5
    logp = (-torch.rand(B, T, dtype=torch.float64) * 3).requires_grad_()
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    e = -torch.rand(B, 5, dtype=torch.float64) * 3
    em = torch.ones(B, 5)
    em[:, 4] = 0
    adv = t([0.7, -0.3, 0.5, -1.2])
    sign = t([1.0, -1.0, 1.0, -1.0])
    gap = L.calibration_gap(logp, mask, e, em, "token")
    g, full = L.guidance_loss(gap, adv, sign, alpha)
    (lam * L.aggregate(g, mask, "token-mean")).backward()
    N = mask.sum()
    w = torch.where(full, 1.0, alpha).double()
    expected = -lam * sign[:, None] * adv.abs()[:, None] * w / N * mask
    assert torch.allclose(logp.grad, expected, atol=1e-12)
    # The expert side carries no gradient.
    e2 = e.clone().requires_grad_()
    g2, _ = L.guidance_loss(L.calibration_gap(logp.detach(), mask, e2, em, "token"), adv, sign)
    assert not g2.requires_grad


def test_sequence_gap_gradient_is_per_sequence():
    logp = t([[-1.0, -1.0], [-3.0, -3.0]]).requires_grad_()
    mask = torch.ones(2, 2)
    e = t([[-1.5, -1.5], [-1.5, -1.5]])
    em = torch.ones(2, 2)
    gap = L.calibration_gap(logp, mask, e, em, "sequence")  # [1, -3]
    g, full = L.guidance_loss(gap, t([1.0, 1.0]), t([1.0, 1.0]), 0.5)
    g.mean().backward()
    # row 0: -s*gap = -1 < 0 (over-confident correct): slope 0.5; row 1: +3 > 0: slope 1
    assert full.tolist() == [False, True]
    assert torch.allclose(logp.grad, t([[-0.25, -0.25], [-0.5, -0.5]]))



def test_token_gap_never_sees_expert_tokens_past_the_sample_and_sequence_gap_does():
    """Why the benchmark's noisy-expert ablation equals its token-gap base (docs/RESULTS.md): the token gap
    compares sample token t with expert token t, so an expert that differs only past the samples' length
    (the wrong answer at the end of a long expert, short policy completions) gives the same loss and the same
    gradient; the sequence gap sums the whole expert and sees the change."""
    B, T, TE = 3, 4, 9
    logp0 = torch.full((B, T), -1.0, dtype=torch.float64) - 0.1 * torch.arange(B, dtype=torch.float64)[:, None]
    mask = torch.ones(B, T)
    e_right = torch.full((B, TE), -0.3, dtype=torch.float64)  # Σ = −2.7 > Σ logπ(sample) ≈ −4: gap < 0
    e_wrong = e_right.clone()
    e_wrong[:, 6:8] = -2.0  # the expert's answer tokens (past every sample's end) unlikely: Σ = −6.1, gap > 0
    em = torch.ones(B, TE)
    adv, sign = t([0.6, -0.4, 0.9]), t([1.0, -1.0, 1.0])

    def grad(e, gap):
        logp = logp0.clone().requires_grad_()
        g, _ = L.guidance_loss(L.calibration_gap(logp, mask, e, em, gap), adv, sign)
        loss = L.aggregate(g, mask, "token-mean") if g.dim() == 2 else g.mean()
        loss.backward()
        return loss.detach(), logp.grad

    for gap in ("token", "sequence"):
        (l_right, g_right), (l_wrong, g_wrong) = grad(e_right, gap), grad(e_wrong, gap)
        if gap == "token":
            assert torch.equal(l_right, l_wrong) and torch.equal(g_right, g_wrong)
        else:
            assert not torch.equal(l_right, l_wrong)
            assert not torch.equal(g_right, g_wrong)  # the gap changes sign: each row's slope swaps 1 <-> α
# ---------------------------------------------------------------- LUFFY and RL-PLUS
def test_luffy_shaping_value_and_gradient():
    p = t([[0.05, 0.5, 0.9]])
    logp = torch.log(p).requires_grad_()
    loss = L.luffy_expert_loss(logp, t([2.0]), gamma=0.1)
    assert torch.allclose(loss, -2.0 * p / (p + 0.1))
    loss.sum().backward()
    # d/dlogp of -A p/(p+γ) = -A γ p / (p+γ)^2
    assert torch.allclose(logp.grad, -2.0 * 0.1 * p / (p + 0.1) ** 2)


def test_rlplus_value_and_stop_gradient():
    p, p_old = t([[0.2, 0.6]]), t([[0.3, 0.5]])
    logp = torch.log(p).requires_grad_()
    loss = L.rlplus_expert_loss(logp, torch.log(p_old), t([1.5]))
    omega = 0.5 * (p_old + 1)
    assert torch.allclose(loss, -1.5 * 2 * p / (p_old + omega) * (1 - p).sqrt())
    loss.sum().backward()
    # (1 - sg(p))^0.5 is a constant: gradient is -A * 2p/(p_old+ω) * sqrt(1-p)
    assert torch.allclose(logp.grad, -1.5 * 2 * p / (p_old + omega) * (1 - p).sqrt())


# ---------------------------------------------------------------- aggregation
def test_aggregation_modes_by_hand():
    x = t([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert L.aggregate(x, m, "token-mean").item() == pytest.approx(10 / 4)
    assert L.aggregate(x, m, "token-mean", normalizer=20.0).item() == pytest.approx(0.5)
    assert L.aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert L.aggregate(x, m, "seq-mean-token-sum").item() == pytest.approx((6.0 + 4.0) / 2)
    assert L.aggregate(x, m, "seq-mean-token-sum-norm", max_len=5).item() == pytest.approx(10 / (2 * 5))
    with pytest.raises(ValueError):
        L.aggregate(x, m, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError):
        L.aggregate(x, m, "sum")


def test_masked_mean_empty_is_zero():
    assert L.masked_mean(t([1.0, 2.0]), torch.zeros(2)).item() == 0.0
