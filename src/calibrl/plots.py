"""Plots of run folders (see `calibrl.run_log`): training curves of several runs overlaid, and seed bands.

`plot_runs` writes, into `out_dir`, whichever of these has data (one colour per run, same colour in every
figure):
- `reward.png`            train `reward` (solid) and `rewards/accuracy_reward/mean` (dashed) over steps;
- `heldout_accuracy.png`  eval.jsonl accuracy over steps, one panel per split, with a ±stderr band;
- `entropy.png`           on-policy `entropy` (solid) and `calibrl/expert_entropy` (dashed) where logged;
- `losses.png`            two panels, `calibrl/pg_loss` and `calibrl/guide_loss`.
A metric a run never logged is skipped for that run (GRPO has no guide loss); a figure with no data at all
is not written, and a warning says so. `plot_seed_bands` draws, per group of seed runs, the mean curve and
a shaded min-max (or ±std) band over the steps all seeds share.

Matplotlib runs on the Agg backend: nothing is ever displayed, so this works on headless machines.
"""

from __future__ import annotations

import logging
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from calibrl.run_log import read_run  # noqa: E402

__all__ = ["curve", "plot_runs", "plot_seed_bands", "smooth_values"]

logger = logging.getLogger(__name__)

REWARD, ACCURACY = "reward", "rewards/accuracy_reward/mean"
ENTROPY, EXPERT_ENTROPY = "entropy", "calibrl/expert_entropy"
PG_LOSS, GUIDE_LOSS = "calibrl/pg_loss", "calibrl/guide_loss"


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def curve(records: list[dict], key: str, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the records that have it as a finite number, sorted by step.

    With `split`, only records whose `split` equals it. A step logged twice keeps its last value.
    """
    points: dict[int, float] = {}
    for record in records:
        if split is not None and record.get("split") != split:
            continue
        value = _number(record.get(key))
        if value is not None:
            points[int(record["step"])] = value
    steps = np.array(sorted(points), dtype=float)
    return steps, np.array([points[int(s)] for s in steps], dtype=float)


def smooth_values(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points (shorter windows at the start); window 1 = unchanged."""
    if window <= 1 or len(values) == 0:
        return values
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _splits(runs: list[dict]) -> list[str]:
    return sorted({str(r["split"]) for run in runs for r in run["eval"] if "split" in r})


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------
def _colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: str, has_data: bool, what: str) -> str | None:
    if not has_data:
        plt.close(fig)
        logger.warning("plots: no data for %s, %s not written", what, os.path.basename(path))
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _line_figure(runs, labels, colors, keys_styles, path, title, ylabel, smooth) -> str | None:
    """One axes: for each run, each (key, linestyle, suffix) that the run logged."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    has_data = False
    for run, label, color in zip(runs, labels, colors):
        for key, style, suffix in keys_styles:
            steps, values = curve(run["metrics"], key)
            if len(steps):
                ax.plot(steps, smooth_values(values, smooth), linestyle=style, color=color, label=f"{label}{suffix}")
                has_data = True
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if has_data:
        ax.legend(fontsize=8)
    return _save(fig, path, has_data, title)


def _heldout_figure(runs, labels, colors, path, smooth) -> str | None:
    splits = _splits(runs)
    if not splits:
        logger.warning("plots: no eval.jsonl data, heldout_accuracy.png not written")
        return None
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.5), squeeze=False)
    for ax, split in zip(axes[0], splits):
        for run, label, color in zip(runs, labels, colors):
            steps, acc = curve(run["eval"], "accuracy", split)
            if not len(steps):
                continue
            err_steps, err = curve(run["eval"], "stderr", split)
            acc = smooth_values(acc, smooth)
            ax.plot(steps, acc, marker="o", markersize=3, color=color, label=label)
            if np.array_equal(err_steps, steps):
                ax.fill_between(steps, acc - err, acc + err, color=color, alpha=0.2, linewidth=0)
        ax.set(title=f"held-out accuracy: {split}", xlabel="step", ylabel="accuracy (greedy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, True, "held-out accuracy")


def _losses_figure(runs, labels, colors, path, smooth) -> str | None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    has_data = False
    for ax, key in zip(axes, (PG_LOSS, GUIDE_LOSS)):
        panel_has_data = False
        for run, label, color in zip(runs, labels, colors):
            steps, values = curve(run["metrics"], key)
            if len(steps):
                ax.plot(steps, smooth_values(values, smooth), color=color, label=label)
                panel_has_data = True
        ax.set(title=key, xlabel="step", ylabel="loss")
        ax.grid(alpha=0.3)
        if panel_has_data:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes)
        has_data |= panel_has_data
    return _save(fig, path, has_data, "losses")


def plot_runs(run_dirs: list[str], out_dir: str, labels: list[str] | None = None, smooth: int = 1) -> list[str]:
    """Overlay the runs in `run_dirs`; write reward / heldout_accuracy / entropy / losses PNGs into `out_dir`.

    `labels` default to each run's run.json `name`, else its folder name. Returns the paths written (figures
    without any data are skipped with a warning). `smooth` > 1 applies a trailing moving average.
    """
    if not run_dirs:
        raise ValueError("run_dirs is empty: nothing to plot")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"labels: {len(labels)} labels for {len(run_dirs)} runs")
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth={smooth!r} must be an int >= 1")
    runs = [read_run(d) for d in run_dirs]
    labels = list(labels) if labels is not None else [run["name"] for run in runs]
    colors = _colors(len(runs))
    os.makedirs(out_dir, exist_ok=True)
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731

    written = [
        _line_figure(runs, labels, colors, [(REWARD, "-", " reward"), (ACCURACY, "--", " accuracy")],
                     path("reward.png"), "training reward", "reward", smooth),
        _heldout_figure(runs, labels, colors, path("heldout_accuracy.png"), smooth),
        _line_figure(runs, labels, colors, [(ENTROPY, "-", ""), (EXPERT_ENTROPY, "--", " (expert)")],
                     path("entropy.png"), "per-token entropy (on-policy; dashed: expert)", "entropy", smooth),
        _losses_figure(runs, labels, colors, path("losses.png"), smooth),
    ]
    return [p for p in written if p is not None]


def plot_seed_bands(
    groups: dict[str, list[str]],
    metric: str,
    out_path: str,
    source: str = "eval",
    split: str | None = None,
    band: str = "minmax",
    smooth: int = 1,
    title: str | None = None,
) -> str | None:
    """Mean over seeds of `metric` for each group of run folders, with a shaded band across seeds.

    `source` "eval" reads eval.jsonl (then `split` picks the eval set; it may be left out when there is only
    one), "metrics" reads metrics.jsonl. `band` is "minmax" or "std" (±1 standard deviation). Only steps
    that every seed of a group logged are used. Returns `out_path`, or None (with a warning) when no group
    has data.
    """
    if source not in ("eval", "metrics"):
        raise ValueError(f"source={source!r} must be 'eval' or 'metrics'")
    if band not in ("minmax", "std"):
        raise ValueError(f"band={band!r} must be 'minmax' or 'std'")
    if not groups:
        raise ValueError("groups is empty: nothing to plot")
    loaded = {name: [read_run(d) for d in dirs] for name, dirs in groups.items()}
    if source == "eval" and split is None:
        splits = _splits([run for runs in loaded.values() for run in runs])
        if len(splits) > 1:
            raise ValueError(f"split=None but the runs hold several eval splits {splits}: pick one")
        split = splits[0] if splits else None

    fig, ax = plt.subplots(figsize=(7, 4.5))
    has_data = False
    for (name, runs), color in zip(loaded.items(), _colors(len(loaded))):
        curves = [curve(run[source], metric, split if source == "eval" else None) for run in runs]
        curves = [(s, v) for s, v in curves if len(s)]
        if not curves:
            logger.warning("plots: group %r has no %r data", name, metric)
            continue
        common = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves)))
        if not common:
            logger.warning("plots: the seeds of group %r share no step with %r", name, metric)
            continue
        values = np.array([[dict(zip(s.tolist(), smooth_values(v, smooth)))[t] for t in common] for s, v in curves])
        mean = values.mean(axis=0)
        if band == "minmax":
            low, high = values.min(axis=0), values.max(axis=0)
        else:
            std = values.std(axis=0)
            low, high = mean - std, mean + std
        ax.plot(common, mean, color=color, label=f"{name} (n={len(curves)})")
        ax.fill_between(common, low, high, color=color, alpha=0.2, linewidth=0)
        has_data = True
    where = f"{source}" + (f", {split}" if source == "eval" and split else "")
    band_name = "min-max" if band == "minmax" else "±std"
    ax.set(title=title or f"{metric} ({where}): mean over seeds, {band_name} band", xlabel="step", ylabel=metric)
    ax.grid(alpha=0.3)
    if has_data:
        ax.legend(fontsize=8)
    parent = os.path.dirname(out_path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return _save(fig, out_path, has_data, f"{metric} seed bands")
