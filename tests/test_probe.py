"""`calibrl probe`: the regime statistics by hand, the expert's log-probs equal the trainer's, and the command."""

import json

import pytest
import torch

from calibrl import cli
from calibrl.probe import reading, regime, slope_flips, target_logps
from helpers import digit_rows, make_trainer


def test_regime_shares_by_hand():
    # 2 prompts x G=2. Prompt 0's expert: [-1, -1]; prompt 1 has no expert (left out of the gap statistics).
    samples = [torch.tensor([-0.5, -2.0]), torch.tensor([-3.0]), torch.tensor([-0.1]), torch.tensor([-9.0])]
    experts = [torch.tensor([-1.0, -1.0]), torch.zeros(0)]
    stats = regime(samples, experts, correct=[True, False, False, False], num_generations=2)
    share = stats["share_gap_positive"]
    assert share["token"] == pytest.approx(1 / 3)  # token gaps: +0.5, -1.0 | -2.0
    assert share["sequence"] == 0.0  # -2.5 vs -2 and -3 vs -2: both below the expert
    assert share["sequence_mean"] == pytest.approx(0.0)  # -1.25 vs -1 and -3 vs -1
    assert stats["prompts_with_expert"] == 1 and stats["sample_accuracy"] == 0.25
    assert stats["groups"] == {"all_wrong": 0.5, "all_right": 0.0, "mixed": 0.5}
    assert stats["expert_logp_per_token"]["mean"] == pytest.approx(-1.0)
    assert "inside your policy's distribution" in stats["reading"]
    with pytest.raises(ValueError, match="expected 2 x 2 samples"):
        regime(samples[:3], experts, [True] * 3, 2)


def test_slope_flips_by_hand():
    # 2 prompts x G=2; prompt 0 is mixed (guided), prompt 1 all wrong (|Â| = 0: left out).
    samples = [torch.tensor([-0.5, -2.0]), torch.tensor([-3.0]), torch.tensor([-0.1]), torch.tensor([-9.0])]
    correct = [True, False, False, False]
    expert_a = [torch.tensor([-1.0, -1.0]), torch.tensor([-1.0])]
    expert_b = [torch.tensor([-0.2, -3.0]), torch.tensor([-5.0])]
    # token gaps vs A: +0.5, -1.0 | -2.0; vs B: -0.3, +1.0 | -2.8: the first two tokens flip, the third does not
    tok = slope_flips(samples, expert_a, expert_b, correct, 2, "token")
    assert tok["share"] == pytest.approx(2 / 3) and tok["units"] == 3 and tok["guided_prompts"] == 1
    # sequence gaps vs A: -2.5 - (-2) < 0, -3 - (-2) < 0; vs B: -2.5 - (-3.2) > 0, -3 - (-3.2) > 0: both flip
    assert slope_flips(samples, expert_a, expert_b, correct, 2, "sequence")["share"] == 1.0
    # the same expert on both sides flips nothing
    assert slope_flips(samples, expert_a, expert_a, correct, 2, "token")["share"] == 0.0
    # constant c = mean of all A experts' tokens = -1: the same as A's per-token baseline here, so no flips;
    # move prompt 1's expert and c moves with it while A's own baseline does not
    assert slope_flips(samples, expert_a, None, correct, 2)["share"] == 0.0
    shifted = [expert_a[0], torch.tensor([-7.0])]  # c = (-1 - 1 - 7) / 3 = -3: token 2's gap -1.0 becomes +1.0
    assert slope_flips(samples, shifted, None, correct, 2)["share"] == pytest.approx(1 / 3)
    assert slope_flips(samples, expert_a, expert_b, [False] * 4, 2)["share"] is None  # nothing guided
    with pytest.raises(ValueError, match="per-token"):
        slope_flips(samples, expert_a, None, correct, 2, "sequence")


def test_reading_names_the_regime():
    base = {"groups": {"mixed": 0.5}, "share_gap_positive": {"sequence": 1.0}}
    far = reading({**base, "share_gap_positive": {"token": 0.95, "sequence": 1.0}})
    assert "far outside" in far and "correctness alone" in far
    assert "more likely than your policy" in reading({**base, "share_gap_positive": {"token": 0.02, "sequence": 0.0}})
    dead = reading({"groups": {"mixed": 0.0}, "share_gap_positive": {"token": 0.5, "sequence": 0.5}})
    assert "inside" in dead and "only 0% of groups are mixed" in dead


@pytest.mark.slow
def test_expert_logps_equal_the_trainers_expert_forward(tiny_vlm_dir, tmp_path):
    """The probe computes the expert's per-token log-probs exactly as CalibRLTrainer does (same prompt
    rendering, images and EOS), so its shares describe the trainer's own Δℓ."""
    rows = digit_rows(4)
    trainer = make_trainer(tiny_vlm_dir, tmp_path, rows=rows, max_completion_length=24)
    ids = [trainer.expert_token_ids(r["solution"])[0] for r in rows[:3]]
    inputs = [dict(r) for r in rows[:3]]
    trainer_logps, _, mask = trainer._expert_forward(inputs, [0, 1, 2], ids)
    ours = target_logps(trainer.model, trainer.processing_class, inputs, ids, batch_size=2)
    for k in range(3):
        n = int(mask[k].sum())
        assert n == len(ids[k]) == len(ours[k])
        torch.testing.assert_close(ours[k], trainer_logps[k, :n].cpu(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_probe_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "probe.json"
    rc = cli.main(["probe", "tiny:qwen2_5_vl:nano", "--data", "task:digits", "--n", "4", "--num_generations", "2",
                   "--max_new_tokens", "12", "--difficulty", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and "reading:" in printed and "share with gap > 0" in printed
    stats = json.loads(out.read_text())
    assert stats["prompts"] == 4 and stats["num_generations"] == 2 and stats["prompts_with_expert"] == 4
    assert all(0.0 <= v <= 1.0 for v in stats["share_gap_positive"].values())
    assert stats["sample_tokens"]["max"] <= 13  # the completion limit, plus EOS
    assert sum(stats["groups"].values()) == pytest.approx(1.0)
    flips = stats["content_flips"]  # None where the nano model's samples formed no mixed group
    assert flips["mode"] == "token" and flips["baseline_b"] == "constant"
    assert flips["share"] is None or 0.0 <= flips["share"] <= 1.0


def test_probe_errors_are_one_line(capsys):
    assert cli.main(["probe", "tiny:qwen2_5_vl:nano", "--data", "task:digits", "--n", "0"]) == 2
    assert capsys.readouterr().err.strip() == "calibrl: error: --n must be >= 1, got 0"
