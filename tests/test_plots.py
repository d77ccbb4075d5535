"""Run folders (calibrl.run_log) and their plots (calibrl.plots), on hand-written runs and fake Trainer state."""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from calibrl.plots import curve, plot_runs, plot_seed_bands, smooth_values
from calibrl.run_log import HeldoutEvalCallback, MetricsLogger, read_run, write_run_info

STEPS = list(range(0, 21, 2))


def write_fake_run(run_dir, name, method, seed, with_guide=True, splits=("test", "ood"), skew=0.0):
    """A plausible run folder written by hand: rising reward, falling entropy, evaluations every 10 steps."""
    os.makedirs(run_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for s in STEPS:
            rec = {"step": s, "reward": 0.3 + 0.02 * s + skew + 0.02 * rng.standard_normal(),
                   "rewards/accuracy_reward/mean": 0.25 + 0.02 * s + skew, "entropy": 0.3 - 0.005 * s,
                   "calibrl/pg_loss": 0.01 * rng.standard_normal()}
            if with_guide:
                rec.update({"calibrl/guide_loss": 0.05 - 0.001 * s, "calibrl/expert_entropy": 0.5 - 0.01 * s})
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"step": 20, "train_runtime": 12.5}) + "\n")  # TRL's last log has no curves
    with open(os.path.join(run_dir, "eval.jsonl"), "w") as f:
        for s in (0, 10, 20):
            for i, split in enumerate(splits):
                acc = 0.3 + 0.01 * s - 0.1 * i + skew
                f.write(json.dumps({"step": s, "split": split, "accuracy": acc, "format_rate": 0.9, "n": 100,
                                    "stderr": math.sqrt(acc * (1 - acc) / 100)}) + "\n")
    write_run_info(run_dir, name=name, method=method, config={"seed": seed})


def assert_png(path, min_side=200):
    assert os.path.isfile(path), path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert min(img.size) >= min_side
        assert np.asarray(img.convert("L"), dtype=float).var() > 0  # not blank


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a, b = str(root / "calibrl_s0"), str(root / "grpo_s0")
    write_fake_run(a, "calibrl", "calibrl", 0)
    write_fake_run(b, "grpo", "grpo", 1, with_guide=False, skew=-0.05)
    return a, b


def test_plot_runs_writes_four_nonblank_pngs(two_runs, tmp_path):
    paths = plot_runs(list(two_runs), str(tmp_path / "plots"), smooth=3)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["entropy.png", "heldout_accuracy.png", "losses.png", "reward.png"]
    for p in paths:
        assert_png(p)


def test_plot_runs_skips_figures_without_data(tmp_path, caplog):
    run = tmp_path / "only_eval"
    run.mkdir()
    (run / "eval.jsonl").write_text(json.dumps({"step": 0, "split": "test", "accuracy": 0.5, "format_rate": 1.0,
                                                "n": 10, "stderr": 0.16}) + "\n")
    with caplog.at_level("WARNING", logger="calibrl.plots"):
        paths = plot_runs([str(run)], str(tmp_path / "plots"), labels=["mine"])
    assert [os.path.basename(p) for p in paths] == ["heldout_accuracy.png"]
    assert not (tmp_path / "plots" / "reward.png").exists()
    assert "reward.png not written" in caplog.text


def test_plot_runs_argument_errors(two_runs, tmp_path):
    with pytest.raises(ValueError, match="labels"):
        plot_runs(list(two_runs), str(tmp_path), labels=["only one"])
    with pytest.raises(ValueError, match="smooth"):
        plot_runs(list(two_runs), str(tmp_path), smooth=0)


def test_plot_seed_bands(tmp_path):
    groups = {}
    for method, skew in (("calibrl", 0.05), ("grpo", 0.0)):
        groups[method] = []
        for seed in range(3):
            d = str(tmp_path / f"{method}_s{seed}")
            write_fake_run(d, f"{method}-s{seed}", method, seed, splits=("test",), skew=skew + 0.01 * seed)
            groups[method].append(d)
    out = plot_seed_bands(groups, "accuracy", str(tmp_path / "bands" / "acc.png"), source="eval")
    assert_png(out)
    out = plot_seed_bands(groups, "reward", str(tmp_path / "reward_std.png"), source="metrics", band="std", smooth=2)
    assert_png(out)
    assert plot_seed_bands(groups, "no/such_metric", str(tmp_path / "none.png"), source="metrics") is None
    assert not (tmp_path / "none.png").exists()


def test_seed_bands_needs_split_when_ambiguous(two_runs, tmp_path):
    with pytest.raises(ValueError, match="split"):
        plot_seed_bands({"x": list(two_runs)}, "accuracy", str(tmp_path / "a.png"))
    assert_png(plot_seed_bands({"x": list(two_runs)}, "accuracy", str(tmp_path / "a.png"), split="ood"))


def test_curve_and_smoothing():
    records = [{"step": 2, "x": 1.0}, {"step": 0, "x": 3.0}, {"step": 1, "y": 5.0}, {"step": 3, "x": None},
               {"step": 2, "x": 2.0}]
    steps, values = curve(records, "x")
    assert steps.tolist() == [0, 2] and values.tolist() == [3.0, 2.0]  # sorted, last value of a step wins
    np.testing.assert_allclose(smooth_values(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(smooth_values(np.array([1.0, 3.0]), 1), [1.0, 3.0])


# ----------------------------------------------------------------------------------------------------------
# run_log
# ----------------------------------------------------------------------------------------------------------
def test_read_run_round_trip_and_errors(two_runs, tmp_path):
    run = read_run(two_runs[0])
    assert run["name"] == "calibrl"
    assert run["info"]["method"] == "calibrl" and "torch" in run["info"]["versions"]
    assert len(run["metrics"]) == len(STEPS) + 1 and len(run["eval"]) == 6

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_run(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        read_run(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 0, "reward": 0.1}\n{"step": 1, "rew\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: corrupt line"):
        read_run(str(bad))
    (bad / "metrics.jsonl").write_text('{"reward": 0.1}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: .*integer 'step'"):
        read_run(str(bad))


def test_write_run_info_merges(tmp_path):
    write_run_info(tmp_path, name="r", method="grpo", config={"lr": 1e-4, "path": tmp_path})
    first = json.loads((tmp_path / "run.json").read_text())
    write_run_info(tmp_path, wall_time_s=3.5, config={"lr": 2e-4})
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["name"] == "r" and info["method"] == "grpo" and info["wall_time_s"] == 3.5
    assert info["config"] == {"lr": 2e-4}  # top-level keys are replaced
    assert info["start_time"] == first["start_time"] and set(info["versions"]) >= {"torch", "trl", "transformers"}
    assert first["config"]["path"] == str(tmp_path)


def fake_state(step, main=True):
    return SimpleNamespace(global_step=step, is_world_process_zero=main)


def test_metrics_logger_writes_lines_on_main_process_only(tmp_path):
    import torch

    logger = MetricsLogger(str(tmp_path))
    args, control = SimpleNamespace(), SimpleNamespace()
    logger.on_train_begin(args, fake_state(0), control)
    logger.on_log(args, fake_state(1), control, logs={"reward": torch.tensor(0.5), "loss": 0.25, "lr": np.float32(1e-4)})
    logger.on_log(args, fake_state(2), control, logs={"reward": float("nan"), "entropy": 0.2})
    logger.on_log(args, fake_state(3, main=False), control, logs={"reward": 9.0})  # other process: nothing
    logger.on_train_end(args, fake_state(2), control)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["step"] == 1 and first["reward"] == 0.5 and first["loss"] == 0.25
    assert abs(first["lr"] - 1e-4) < 1e-9
    assert second == {"step": 2, "reward": None, "entropy": 0.2}  # NaN written as null: strict JSON
    info = read_run(str(tmp_path))["info"]
    assert info["global_step"] == 2 and info["wall_time_s"] >= 0
    assert info["final_metrics"] == {"reward": 0.5, "loss": 0.25, "lr": first["lr"], "entropy": 0.2}


def test_heldout_callback_schedule(tmp_path, monkeypatch):
    """Evaluates at start, every N steps and at the end (not twice at the same step); only on process 0."""
    import calibrl.evaluate

    calls = []

    def fake_evaluate(model, processing_class, rows, max_new_tokens, batch_size):
        calls.append((model.tag, len(rows), max_new_tokens))
        acc = 0.25 * len(rows) / 4
        return {"overall": {"n": len(rows), "accuracy": acc, "format_rate": 1.0, "stderr": 0.1}}

    monkeypatch.setattr(calibrl.evaluate, "evaluate", fake_evaluate)

    class FakeModel:
        tag = "m"

        def parameters(self):
            return iter([np.zeros(1)])

    eval_sets = {"test": [{}] * 4, "ood": [{}] * 2}
    cb = HeldoutEvalCallback(str(tmp_path), processing_class=None, eval_sets=eval_sets, every_n_steps=2,
                             max_new_tokens=8)
    args, control, model = SimpleNamespace(), SimpleNamespace(), FakeModel()
    cb.on_train_begin(args, fake_state(0), control, model=model)
    for step in range(1, 5):
        cb.on_step_end(args, fake_state(step), control, model=model)
        cb.on_step_end(args, fake_state(step, main=False), control, model=model)
    cb.on_train_end(args, fake_state(4), control, model=model)  # step 4 was just evaluated: no repeat
    cb.on_step_end(args, fake_state(5), control, model=model)
    cb.on_train_end(args, fake_state(5), control, model=model)  # not a multiple of 2: evaluated at the end

    records = read_run(str(tmp_path))["eval"]
    assert [(r["step"], r["split"]) for r in records] == [
        (s, split) for s in (0, 2, 4, 5) for split in ("test", "ood")
    ]
    assert records[0] == {"step": 0, "split": "test", "accuracy": 0.25, "format_rate": 1.0, "n": 4, "stderr": 0.1}
    assert calls[:2] == [("m", 4, 8), ("m", 2, 8)] and len(calls) == 8
    assert read_run(str(tmp_path))["info"]["final_eval"]["ood"]["step"] == 5
    with pytest.raises(ValueError, match="eval_sets"):
        HeldoutEvalCallback(str(tmp_path), None, {"test": []}, every_n_steps=2)
