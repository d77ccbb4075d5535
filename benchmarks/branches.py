"""Which LeakyReLU slope CalibRL's guidance gave the samples, audited from the benchmark's run logs.

    python -m benchmarks.branches     # <work dir>/<run>/metrics.jsonl -> benchmarks/results/branches.json
    python -m benchmarks.branches --work-dir .cache/calibrl/bench --work-dir /tmp/rerun/work

(with several --work-dir, a run's folder is taken from the last one that holds it: a rerun of a run with the
same seed and settings, made after `calibrl/frac_gap_positive` was logged, adds that share to the audit.)

The guidance gradient is −λ·s·|A|·w·∇log π(sample), with w ∈ {1, α} set by the sign of −s·Δℓ (METHOD.md §4),
and the expert enters it only through that choice. If the expert is less likely than every sample (Δℓ > 0
everywhere), w is 1 for every wrong sample and α for every correct one, whatever the expert says. This
script measures how close each CalibRL run came to that: per logged step, the share on the slope-1 branch
(`calibrl/frac_full_slope`) against the share of wrong samples (1 − mean accuracy reward), the mean gap,
and the expert's log-probability per token (and, where logged, the share with Δℓ > 0). For the sequence gaps both shares count samples, so they are
equal exactly when the branch is set by correctness alone; for the token gaps the first counts tokens, so
they differ a little even then. Only runs whose result JSON has the current settings hash are read.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks import reproduce

BRANCHES_FILE = "branches.json"
EXACT = 1e-6


def _steps(run_dir: Path) -> list[dict]:
    """The training logs of a run folder that carry the guidance diagnostics ([] without a metrics.jsonl)."""
    from calibrl.run_log import read_run

    if not (run_dir / "metrics.jsonl").is_file():
        return []
    return [r for r in read_run(run_dir)["metrics"]
            if "calibrl/frac_full_slope" in r and "rewards/accuracy_reward/mean" in r]


def audit(results_dir: str | os.PathLike, work_dirs: list[str | os.PathLike], grid: dict) -> dict:
    """Per CalibRL cell: runs and steps read, steps where the slope-1 share equals the wrong share, their
    mean / min / max difference, the mean gap, the expert's mean log-prob per token."""
    h = reproduce.settings_hash(grid)
    cells: dict[str, dict] = {}
    for run in reproduce.load_runs(results_dir):
        if run["settings_hash"] != h or run["method"] != "calibrl":
            continue
        found = [s for s in (_steps(Path(w) / run["run_id"]) for w in work_dirs)
                 if len(s) == run["global_step"]]  # a folder of another length belongs to another run
        if not found:
            continue
        steps = found[-1]
        c = cells.setdefault(run["cell"], {"gap": run["config"]["train"]["gap"], "runs": 0, "diff": [],
                                           "gap_mean": [], "expert_logp": [], "positive": [], "runs_positive": 0})
        c["runs_positive"] += any("calibrl/frac_gap_positive" in r for r in steps)
        c["runs"] += 1
        for r in steps:
            c["diff"].append(r["calibrl/frac_full_slope"] - (1.0 - r["rewards/accuracy_reward/mean"]))
            c["gap_mean"].append(r["calibrl/gap_mean"])
            if "calibrl/expert_logp_mean" in r:
                c["expert_logp"].append(r["calibrl/expert_logp_mean"])
            if "calibrl/frac_gap_positive" in r:
                c["positive"].append(r["calibrl/frac_gap_positive"])
    out = {}
    for cell, c in sorted(cells.items()):
        d = c["diff"]
        out[cell] = {"gap": c["gap"], "runs": c["runs"], "steps": len(d),
                     "steps_equal": sum(abs(x) < EXACT for x in d),
                     "full_minus_wrong": {"mean": sum(d) / len(d), "min": min(d), "max": max(d)},
                     "gap_mean": sum(c["gap_mean"]) / len(c["gap_mean"]),
                     "expert_logp_per_token": (sum(c["expert_logp"]) / len(c["expert_logp"])
                                               if c["expert_logp"] else None),
                     "gap_positive": ({"runs": c["runs_positive"], "mean": sum(c["positive"]) / len(c["positive"]),
                                       "min": min(c["positive"]), "max": max(c["positive"])} if c["positive"] else None)}
    return {"kind": "branches", "settings_hash": h, "work_dirs": [reproduce.rel_to_root(w) for w in work_dirs], "cells": out}



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.branches", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(reproduce.RESULTS_DIR), help="folder of run JSON files")
    p.add_argument("--work-dir", action="append", default=None,
                   help="run folders with metrics.jsonl (reproduce's --work-dir; default .cache/calibrl/bench); "
                        "repeat: the last one holding a run wins")
    p.add_argument("--grid", default=str(reproduce.GRID_PATH))
    ns = p.parse_args(argv)
    grid = reproduce.load_grid(ns.grid)
    work_dirs = ns.work_dir or [str(reproduce.ROOT / ".cache" / "calibrl" / "bench")]
    data = audit(ns.results, work_dirs, grid)
    if not data["cells"]:
        raise SystemExit(f"branches: no CalibRL run folders with metrics.jsonl under {', '.join(work_dirs)}")
    reproduce.write_json(Path(ns.results) / BRANCHES_FILE, data)
    for cell, c in data["cells"].items():
        print(f"{cell:40s} runs {c['runs']:2d}  steps {c['steps']:4d}  slope-1 share = wrong share in "
              f"{c['steps_equal']:4d}  mean diff {c['full_minus_wrong']['mean']:+.4f}  gap {c['gap_mean']:8.2f}  "
              f"expert log-prob/token {c['expert_logp_per_token']:.2f}"
              + (f"  Δℓ > 0: {c['gap_positive']['mean']:.3f} ({c['gap_positive']['runs']} runs)"
                 if c["gap_positive"] else ""))
    print(f"written: {Path(ns.results) / BRANCHES_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
