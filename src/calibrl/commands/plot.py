"""`calibrl plot`: PNG training curves of one or more run folders, overlaid."""

from __future__ import annotations

import argparse
import os

from calibrl.errors import UsageError



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders (with metrics.jsonl / eval.jsonl)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: RUN_DIR/plots for one run, else plots)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: run names)")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window over steps (default 1: none)")


def plot(run_dirs: list[str], out: str | None = None, labels: list[str] | None = None, smooth: int = 1) -> list[str]:
    """Draw the curves of `run_dirs` into `out`; returns the PNG paths. Bad arguments are a `UsageError`."""
    from calibrl.plots import plot_runs
    from calibrl.storage import check_writable

    for d in run_dirs:
        if not os.path.isdir(d):
            raise UsageError(f"run folder not found: {d}")
    if labels is not None and len(labels) != len(run_dirs):
        raise UsageError(f"--labels has {len(labels)} names for {len(run_dirs)} run folders")
    if smooth < 1:
        raise UsageError(f"--smooth must be >= 1, got {smooth}")
    out = out or (os.path.join(run_dirs[0], "plots") if len(run_dirs) == 1 else "plots")
    check_writable(out, "--out")
    try:
        pngs = plot_runs(list(run_dirs), out, labels=labels, smooth=smooth)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(" ".join(str(e).split())) from None
    if not pngs:
        raise UsageError("nothing to plot: the run folders hold no metrics or evaluations")
    return pngs


def run(ns: argparse.Namespace) -> int:
    for path in plot(ns.run_dirs, ns.out, ns.labels, ns.smooth):
        print(path)
    return 0
