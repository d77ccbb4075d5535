"""The regime knob (issue 11): warm starts in which the expert's wording is a minority of the SFT targets, and
where the expert then sits for each, measured before any RL with `calibrl.probe`.

    python -m benchmarks.regime                      # every share in SHARES, resumable (one entry per share)
    python -m benchmarks.regime --shares 0 0.02      # some of them
    python -m benchmarks.regime --quick --out /tmp/r # nano model, 4 SFT steps: plumbing only (the test runs it)

Each base is the benchmark's warm start (grid.yaml `sft`) with `mismatched_share` of its targets in the
`mismatched` wording the RL expert uses (0 is the benchmark's own base, the knob's "far" end). For each base:
the probe on the RL training rows (mismatched experts, `n_probe` prompts x G samples at the RL completion
limit and temperature), and greedy held-out accuracy (the benchmark's final evaluation rows). Results go to
`benchmarks/results/regime/bases.json`, rewritten after each base, so the study can span sittings.

The warm start is cached by its settings, but the same settings can train other weights on another CPU, so
each entry records its base's weights fingerprint: the RL grid on a base (benchmarks/regime_grid.yaml) is
comparable with an entry only where the fingerprints agree (its base.json holds one too).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import reproduce

SHARES = (0.0, 0.01, 0.02, 0.05, 0.2)
OUT = reproduce.RESULTS_DIR / "regime" / "bases.json"


def measure_base(grid: dict, share: float, n_probe: int, threads: int = 1) -> dict:
    """Warm start at `share` (cached), then where the expert sits for it (the probe), how often the expert's
    content sets CalibRL's slope (flips against the constant baseline and against the noisy expert, on the
    same samples), and its held-out accuracy."""
    import torch

    from calibrl import probe
    from calibrl.commands.demo import evaluate_sets, final_eval_rows, warm_start
    from calibrl.files import weights_fingerprint
    from calibrl.models import load_tiny_model

    torch.set_num_threads(threads)
    args = reproduce.sft_args(grid)
    args.mismatched_share = share
    t0 = time.time()
    base_dir, summary, cached = warm_start(args, quiet=True)
    sft_s = time.time() - t0
    _, run = reproduce.train_config(grid, reproduce.RunSpec("regime", "main", 0, {"method": "calibrl"}), base_dir,
                                    "unused")  # nothing is written there
    model, proc = load_tiny_model(base_dir)
    t = time.time()
    rows = run.training_rows()[:n_probe]
    noisy_rows = run.training_rows("noisy")[:n_probe]  # the same prompts; ~noise_rate of them a wrong expert
    G, limit = grid["train"]["num_generations"], grid["train"]["max_completion_length"]
    samples, correct = probe.sample_logps(model, proc, rows, G, limit, grid["train"]["temperature"])
    experts = probe.expert_logps(model, proc, rows, limit)
    noisy = probe.expert_logps(model, proc, noisy_rows, limit)
    stats = probe.regime(samples, experts, correct, G)
    stats["content_flips"] = probe.slope_flips(samples, experts, None, correct, G, "token")
    differs = [a["solution"] != b["solution"] for a, b in zip(rows, noisy_rows)]
    flips = {"noisy_rows": sum(differs),
             "token_vs_constant": stats["content_flips"],
             **{f"{mode}_vs_noisy": probe.slope_flips(samples, experts, noisy, correct, G, mode)
                for mode in ("token", "sequence")},
             # only the prompts whose noisy expert differs can flip anything: the same shares among them
             **{f"{mode}_vs_noisy_where_differs": probe.slope_flips(
                 samples, [e if d else torch.zeros(0) for e, d in zip(experts, differs)], noisy, correct, G, mode)
                for mode in ("token", "sequence")}}
    probe_s = time.time() - t
    fe = reproduce.final_eval_args(grid)
    t = time.time()
    results = evaluate_sets(model, proc, final_eval_rows(run, fe), fe)
    return {"share": share, "base_model": base_dir, "base_fingerprint": weights_fingerprint(base_dir), "sft": summary,
            "sft_cached": cached, "probe": stats, "flips": flips,
            "heldout": {s: {k: v[k] for k in ("accuracy", "stderr", "n", "format_rate")}
                        for s, v in results["by_split"].items()},
            "seconds": {"sft": round(sft_s, 1), "probe": round(probe_s, 1), "eval": round(time.time() - t, 1)},
            "machine": reproduce.machine_info()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shares", type=float, nargs="+", default=list(SHARES))
    p.add_argument("--n_probe", type=int, default=200, help="prompts probed per base (G samples each)")
    p.add_argument("--quick", action="store_true", help="nano model, tiny settings: the code path only")
    p.add_argument("--out", default=None, help=f"results file (default {OUT.relative_to(reproduce.ROOT)})")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    grid = reproduce.load_grid(quick=args.quick)
    out = Path(args.out) if args.out else OUT
    h = reproduce.settings_hash(grid)
    done = reproduce.read_current(out, h) or {"kind": "regime", "settings_hash": h, "quick": args.quick, "bases": {}}
    for share in args.shares:
        key = f"{share:g}"
        if "flips" in done["bases"].get(key, {}):  # an entry from before flips were measured is measured again
            print(f"share {key}: done", flush=True)
            continue
        entry = measure_base(grid, share, 8 if args.quick else args.n_probe, args.threads)
        done["bases"][key] = entry
        reproduce.write_json(out, done)
        sh = entry["probe"]["share_gap_positive"]
        print(f"share {key}: expert {entry['probe']['expert_logp_per_token']['mean']:.2f} vs samples "
              f"{entry['probe']['sample_logp_per_token']['mean']:.2f} nats/token; gap > 0 token {sh['token']:.2f}, "
              f"sequence {sh['sequence']:.2f}; held-out test {entry['heldout']['test']['accuracy']:.3f} "
              f"({entry['seconds']})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
