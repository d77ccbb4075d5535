"""docs/RESULTS.md and docs/figures/*.png, generated from the run JSON files of `benchmarks.reproduce`.

    python -m benchmarks.report                      # benchmarks/results -> docs/RESULTS.md, docs/figures/
    python -m benchmarks.report --results DIR --out FILE.md --figures DIR

Everything in RESULTS.md is computed here from the JSON files: the tables (mean and 95% t-interval over
seeds; a paired comparison with GRPO, or with the ablated base, on the seeds both have: mean difference, its
95% t-interval, paired t-test p-value), the reading against the paper's claims, the curves (mean over seeds
with a min-max band, `calibrl.plots.plot_seed_bands`), how much of the grid is complete, the commands,
configs and machine. Nothing is typed by hand, and a missing run is reported as missing, never filled in.
Runs whose shared settings differ from the current grid (a stale `settings_hash`) are left out and listed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import yaml

from benchmarks import reproduce
from benchmarks.branches import BRANCHES_FILE

ROOT = reproduce.ROOT
DOC_PATH = ROOT / "docs" / "RESULTS.md"
FIG_DIR = ROOT / "docs" / "figures"
ALPHA = 0.05
POWER = 0.8  # for the minimum detectable effects
REGIME_FILE = "regime/bases.json"  # benchmarks/regime.py
REGIME_STUDIES = {0.2: ("regime/share20", "benchmarks/regime_grid.yaml")}  # share -> (results, grid), RL grid
REGIME_COMPARISONS = (  # (a, b, question), paired by seed; cells of benchmarks/regime_grid.yaml
    ("calibrl_token", "grpo", "CalibRL (token gap) beats GRPO"),
    ("calibrl_sequence", "grpo", "CalibRL (sequence gap) beats GRPO"),
    ("calibrl_token", "calibrl_constant", "the expert's content matters (token gap vs constant baseline)"),
    ("calibrl_token", "calibrl_token_noisy", "a correct expert beats a 31%-wrong one (token gap)"),
    ("calibrl_sequence", "calibrl_sequence_noisy", "a correct expert beats a 31%-wrong one (sequence gap)"),
    ("calibrl_token", "luffy_calibrl_baseline", "CalibRL beats LUFFY (CalibRL's baseline)"),
)
GRID_NAMES_AT_ZERO = {  # the same cells in the main grid (share 0): its noisy experts are ablation cells
    "calibrl_token_noisy": "calibrl_token+noisy_expert", "calibrl_sequence_noisy": "calibrl_sequence+noisy_expert"}
TARGET_SHARE = (0.3, 0.7)  # the regime sought: the expert inside the samples' distribution (token gap > 0 share)

LABELS = {
    "grpo": "GRPO",
    "dapo": "DAPO",
    "grpo_entropy": "GRPO + entropy bonus 0.01",
    "sft_grpo": "SFT → GRPO",
    "luffy_original": "LUFFY (original)",
    "luffy_calibrl_baseline": "LUFFY (CalibRL's baseline)",
    "rlplus": "RL-PLUS",
    "calibrl_token": "CalibRL, token gap (code)",
    "calibrl_sequence": "CalibRL, sequence gap (paper)",
    "calibrl_sequence_mean": "CalibRL, sequence-mean gap",
    "calibrl_constant": "CalibRL, constant baseline (control)",
    "calibrl_token_noisy": "CalibRL, token gap, noisy expert",
    "calibrl_sequence_noisy": "CalibRL, sequence gap, noisy expert",
}
ABLATION_LABELS = {
    "guide_coef=0.01": "λ = 0.01", "guide_coef=0.3": "λ = 0.3", "leaky_slope=0.3": "α = 0.3",
    "leaky_slope=0.8": "α = 0.8", "no_abs_adv": "no |A| weighting", "noisy_expert": "noisy expert (noise_rate 0.3)",
}


ABLATION_CLAIMS = {  # ablation -> (the paper's claim: the cell beats the cell with this ablation, paper's figure)
    "no_abs_adv": ("|A| weighting helps (base beats no |A| weighting)", "−5.3 without"),
    "leaky_slope=0.3": ("α = 0.5 beats α = 0.3", "0.5 best"),
    "leaky_slope=0.8": ("α = 0.5 beats α = 0.8", "0.5 best"),
    "guide_coef=0.01": ("λ = 0.1 beats λ = 0.01", "0.1 best"),
    "guide_coef=0.3": ("λ = 0.1 beats λ = 0.3", "0.1 best"),
    "noisy_expert": ("A weaker (noisy) expert shrinks the gain (correct expert beats noisy expert)",
                     "weaker expert: smaller gain"),
}


def label(cell: str) -> str:
    if "+" in cell:
        base, abl = cell.split("+", 1)
        return f"{LABELS.get(base, base)}: {ABLATION_LABELS.get(abl, abl)}"
    return LABELS.get(cell, cell)


# ----------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------
def mean_ci(values: list[float]) -> dict:
    """Mean, sample std and the 95% t-interval half-width (None below 2 values)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "half": None, "sd": None}
    mean = sum(values) / n
    if n < 2:
        return {"n": 1, "mean": mean, "half": None, "sd": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"n": n, "mean": mean, "sd": sd, "half": float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)}


def paired(a: dict[int, float], b: dict[int, float]) -> dict:
    """a - b on the seeds both have: mean difference, 95% t-interval, paired t-test p-value (two-sided)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {**mean_ci(diffs), "seeds": seeds, "p": None}
    if len(diffs) >= 2:
        if out["sd"] < 1e-9:  # no spread (float noise included): the t-test is undefined
            out["p"] = None if abs(out["mean"]) > 1e-9 else 1.0
        else:
            out["p"] = float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)
    return out


def mde(d: dict, power: float = POWER) -> float | None:
    """Minimum detectable effect of a paired comparison at its own n and spread: the true mean difference a
    two-sided paired t-test at ALPHA would detect with probability `power`, (t_{1-α/2} + t_power) · sd / √n."""
    from scipy import stats

    if d["n"] < 2 or d["sd"] is None or d["sd"] < 1e-9:
        return None
    df = d["n"] - 1
    return float(stats.t.ppf(1 - ALPHA / 2, df) + stats.t.ppf(power, df)) * d["sd"] / math.sqrt(d["n"])


def seeds_for(sd: float, effect: float, power: float = POWER) -> int:
    """The fewest paired seeds whose minimum detectable effect is <= `effect` at paired spread `sd`."""
    n = 2
    while n < 1000 and mde({"n": n, "sd": sd}, power) > effect:
        n += 1
    return n


def verdict(d: dict, expected: int) -> str:
    """`expected` +1 (a > b claimed), -1 (a < b) or 0 (no difference claimed)."""
    if d["n"] < 2:
        return "not testable yet" + (" (1 paired seed)" if d["n"] == 1 else " (no paired seeds)")
    if d["p"] is None:
        return "not testable (the same difference on every seed: no spread to test against)"
    significant = d["p"] < ALPHA
    if expected == 0:
        return "consistent (no significant difference)" if not significant else "does not hold (significant difference)"
    if not significant:
        return "not significant"
    return "holds" if (d["mean"] > 0) == (expected > 0) else "contradicted (significant, opposite direction)"


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------
def load(results_dir: str | os.PathLike, grid_path: str | os.PathLike) -> dict:
    """Base, current and stale runs, the grid (quick or full, as the results say) and the expected runs."""
    results_dir = Path(results_dir)
    base_path = results_dir / reproduce.BASE_FILE
    base = json.loads(base_path.read_text(encoding="utf-8")) if base_path.is_file() else None
    all_runs = reproduce.load_runs(results_dir)
    quick = bool(base["quick"]) if base else any(r.get("quick") for r in all_runs)
    grid = reproduce.load_grid(grid_path, quick=quick)
    h = reproduce.settings_hash(grid)
    runs = [r for r in all_runs if r["settings_hash"] == h]
    stale = [r for r in all_runs if r["settings_hash"] != h]
    if base is not None and base.get("settings_hash") != h:
        base = None
    bases = Counter(r["ablation_of"] for r in runs if r["group"] == "ablation" and r.get("ablation_of")
                    and r["ablation_of"] not in grid["ablations_also_on"])
    abl_base = None
    if grid["ablations"]:
        abl_base = bases.most_common(1)[0][0] if bases else reproduce.ablation_base(grid, results_dir)
    expected = reproduce.grid_runs(grid, abl_base)
    experts, branches, regime = (reproduce.read_current(results_dir / name, h)
                                 for name in (reproduce.EXPERTS_FILE, BRANCHES_FILE, REGIME_FILE))
    return {"grid": grid, "grid_path": str(grid_path), "hash": h, "base": base, "runs": runs, "stale": stale,
            "ablation_base": abl_base, "experts": experts, "branches": branches, "regime": regime,
            "expected": expected, "quick": quick}


def by_cell(runs: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in runs:
        out.setdefault(r["cell"], {})[r["seed"]] = r
    return out


def metric(run: dict, name: str) -> float | None:
    if name in ("test", "ood"):
        return 100 * run["final"][name]["accuracy"] if name in run["final"] else None
    if name == "entropy":
        return run.get("entropy_final")
    if name == "per_step_s":
        return run["time"].get("per_step_s")
    if name == "total_s":
        return run["time"].get("total_s")
    raise KeyError(name)


def values(cells: dict[str, dict[int, dict]], cell: str, name: str) -> dict[int, float]:
    return {s: v for s, r in cells.get(cell, {}).items() if (v := metric(r, name)) is not None}


# ----------------------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------------------
def fmt_ci(c: dict, digits: int = 1) -> str:
    if c["n"] == 0:
        return "—"
    if c["half"] is None:
        return f"{c['mean']:.{digits}f} (n=1)"
    return f"{c['mean']:.{digits}f} ± {c['half']:.{digits}f}"


def fmt_diff(d: dict, digits: int = 1, unit: str = "") -> str:
    if d["n"] == 0:
        return "—"
    if d["half"] is None:
        return f"{d['mean']:+.{digits}f}{unit} (n=1)"
    if d["sd"] < 1e-9:
        return (f"identical on every seed (n = {d['n']})" if d["p"] == 1.0
                else f"{d['mean']:+.{digits}f}{unit} on every seed (n = {d['n']}; no spread, no test)")
    p = "p = " + (f"{d['p']:.3f}" if d["p"] >= 0.001 else f"{d['p']:.1e}")
    lo, hi = d["mean"] - d["half"], d["mean"] + d["half"]
    return f"{d['mean']:+.{digits}f}{unit} [{lo:+.{digits}f}, {hi:+.{digits}f}], {p}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; a `|` inside a cell is escaped."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|"] + [line(r) for r in rows]


# ----------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------
def completeness(data: dict) -> tuple[list[str], dict]:
    have = {(r["cell"], r["seed"]) for r in data["runs"]}
    counts = {}
    for group in reproduce.GROUPS:
        exp = [r for r in data["expected"] if r.group == group]
        counts[group] = (sum((r.cell, r.seed) in have for r in exp), len(exp))
    grid = data["grid"]
    n_abl_planned = (len(grid["ablations"]) + sum(map(len, grid["ablations_also_on"].values()))) * len(
        grid["seeds"].get("ablation", []))
    if data["ablation_base"] is None and n_abl_planned:
        counts["ablation"] = (0, n_abl_planned)
    done = sum(c[0] for c in counts.values())
    total = sum(c[1] for c in counts.values())
    lines = []
    if done < total:
        lines.append(f"> **PARTIAL GRID: {done} of {total} runs complete** (main table {counts['main'][0]}/"
                     f"{counts['main'][1]}, ablations {counts['ablation'][0]}/{counts['ablation'][1]}). Every "
                     "number below comes from the finished runs only; cells with fewer seeds than planned show "
                     "their own `n`, missing cells show —. Nothing is extrapolated.")
    else:
        lines.append(f"> **Grid complete: {done} of {total} runs** (main table {counts['main'][0]}, ablations "
                     f"{counts['ablation'][0]}).")
    if data["quick"]:
        lines.append(">\n> **QUICK MODE** (`--quick`): a nano model with a 4-step warm start and a few RL steps. "
                     "These numbers test the plumbing and say nothing about the methods.")
    return lines, counts


def setting_section(data: dict) -> list[str]:
    grid, base = data["grid"], data["base"]
    t, fe = grid["train"], grid["final_eval"]
    any_run = data["runs"][0] if data["runs"] else None
    cfg = any_run["config"]["train"] if any_run else {}
    prompts = t["per_device_train_batch_size"] // t["num_generations"]
    lines = ["## Setting", ""]
    if base is not None:
        sft = base["sft"]
        b = base["final"]
        lines.append(f"- **Base model** (every run starts here): `{Path(base['base_model']).name}`, an SFT warm start "
                     f"(`calibrl.commands.demo.warm_start`, grid `sft`) on `native` wording, kept at step {sft.get('chosen_step')} "
                     f"(validation accuracy {_pct(sft.get('select_accuracy'))}, train split). Held-out greedy accuracy "
                     f"before RL: in-domain {100 * b['test']['accuracy']:.1f}% (n={b['test']['n']}), out-of-domain "
                     f"{100 * b['ood']['accuracy']:.1f}% (n={b['ood']['n']}).")
    else:
        lines.append("- **Base model**: base.json missing (run `python -m benchmarks.reproduce` first).")
    lines += [
        f"- **Task**: `{t.get('dataset')}` difficulty {t.get('difficulty')}, problem types "
        f"{t.get('task_types') or 'all'}, "
        f"{t.get('n_train')} training rows; expert solutions in the `{t.get('expert_style')}` wording (the expert "
        "writes differently from the policy, as in the paper); in-domain = `test` (unseen digit scans), "
        "out-of-domain = `ood` (multiplication, never trained on).",
        f"- **RL, identical for every method**: {t['max_steps']} optimizer steps, {prompts} prompts × "
        f"{t['num_generations']} rollouts per step, max {t['max_completion_length']} new tokens, temperature "
        f"{cfg.get('temperature', 1.0)}, learning rate {t['learning_rate']} ({cfg.get('lr_scheduler_type', 'constant')}), "
        f"β = {cfg.get('beta', 0.0)}, reward = accuracy + 0.1 · format.",
        f"- **Evaluation, identical for every method**: greedy decoding, {fe['n_eval']} rows per split drawn with "
        f"another seed than the training rows (standard error ≈ {100 * math.sqrt(0.25 / fe['n_eval']):.1f} points "
        f"per run at 50%), after the last step. Curves: {t['n_eval']} rows per split every {t['eval_every']} steps.",
        f"- **SFT → GRPO**: continue SFT from the base on the same training rows' expert solutions "
        f"({grid['sft_grpo'].get('sft_steps')} steps × {grid['sft_grpo'].get('batch_size')} rows, learning rate "
        f"{grid['sft_grpo'].get('learning_rate')}, warm-up {grid['sft_grpo'].get('warmup_steps', 0)}), then GRPO "
        "exactly as the GRPO row. The SFT steps come on top of the RL steps.",
        "- **Seeds**: a seed fixes RL sampling and data order; every method sees the same prompts in the same "
        "order for a given seed, so comparisons are paired by seed. Intervals are 95% Student-t over seeds; Δ "
        "columns are paired differences (mean [95% CI], paired t-test p).",
        "",
    ]
    return lines


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def main_table(data: dict, cells: dict) -> list[str]:
    grid = data["grid"]
    n_seeds = len(grid["seeds"]["main"])
    header = ["method", "seeds", "in-domain %", "Δ in-domain vs GRPO", "out-of-domain %", "Δ ood vs GRPO",
              "final entropy", "s / step", "min / run"]
    rows = []
    g_test, g_ood = values(cells, "grpo", "test"), values(cells, "grpo", "ood")
    for cell in grid["main"]:
        test, ood = values(cells, cell, "test"), values(cells, cell, "ood")
        n = len(cells.get(cell, {}))
        is_grpo = cell == "grpo"
        total = mean_ci([v / 60 for v in values(cells, cell, "total_s").values()])
        rows.append([label(cell), f"{n}/{n_seeds}", fmt_ci(mean_ci(list(test.values()))),
                     "(reference)" if is_grpo else fmt_diff(paired(test, g_test)),
                     fmt_ci(mean_ci(list(ood.values()))), "(reference)" if is_grpo else fmt_diff(paired(ood, g_ood)),
                     fmt_ci(mean_ci(list(values(cells, cell, "entropy").values())), 3),
                     fmt_ci(mean_ci(list(values(cells, cell, "per_step_s").values())), 2),
                     "—" if total["n"] == 0 else f"{total['mean']:.1f}"])
    return table(header, rows)


def ablation_table(data: dict, cells: dict) -> list[str]:
    grid, base = data["grid"], data["ablation_base"]
    if not grid["ablations"]:
        return ["This grid has no ablations."]
    if base is None:
        return ["Not run yet: the ablation base is chosen as the best CalibRL variant of the main table, which "
                "has no finished CalibRL runs yet."]
    n_seeds = len(grid["seeds"].get("ablation", []))
    header = ["variant", "seeds", "in-domain %", "Δ in-domain vs base", "out-of-domain %", "Δ ood vs base",
              "final entropy", "Δ in-domain vs GRPO"]
    b_test, b_ood = values(cells, base, "test"), values(cells, base, "ood")
    g_test = values(cells, "grpo", "test")
    rows = [[f"base: {label(base)} (λ = 0.1, α = 0.5)", f"{len(cells.get(base, {}))}/{len(grid['seeds']['main'])}",
             fmt_ci(mean_ci(list(b_test.values()))), "(reference)", fmt_ci(mean_ci(list(b_ood.values()))),
             "(reference)", fmt_ci(mean_ci(list(values(cells, base, "entropy").values())), 3),
             fmt_diff(paired(b_test, g_test))]]
    for name in grid["ablations"]:
        cell = f"{base}+{name}"
        test, ood = values(cells, cell, "test"), values(cells, cell, "ood")
        rows.append([ABLATION_LABELS.get(name, name), f"{len(cells.get(cell, {}))}/{n_seeds}",
                     fmt_ci(mean_ci(list(test.values()))), fmt_diff(paired(test, b_test)),
                     fmt_ci(mean_ci(list(ood.values()))), fmt_diff(paired(ood, b_ood)),
                     fmt_ci(mean_ci(list(values(cells, cell, "entropy").values())), 3),
                     fmt_diff(paired(test, g_test))])
    return [f"Each ablation changes one key of the base cell **{label(base)}**; the base's own runs stand for "
            "λ = 0.1, α = 0.5 with |A| weighting and the mismatched (correct) expert. Δ vs base is paired on the "
            "seeds both have.", ""] + table(header, rows)


def also_on_table(data: dict, cells: dict) -> list[str]:
    """`ablations_also_on`: an ablation repeated on another CalibRL cell, paired with that cell's own runs."""
    grid = data["grid"]
    pairs = [(c, n) for c, n in reproduce.ablation_pairs(grid, data["ablation_base"]) if c != data["ablation_base"]]
    if not pairs:
        return []
    n_seeds = len(grid["seeds"].get("ablation", []))
    header = ["variant", "seeds", "in-domain %", "Δ in-domain vs its cell", "out-of-domain %", "Δ ood vs its cell",
              "final entropy"]
    rows = []
    for cell, name in pairs:
        abl = f"{cell}+{name}"
        test, ood = values(cells, abl, "test"), values(cells, abl, "ood")
        seeds = set(test)  # the cell's own runs on the same seeds, for the like-for-like line
        c_test = {s: v for s, v in values(cells, cell, "test").items() if s in seeds}
        c_ood = {s: v for s, v in values(cells, cell, "ood").items() if s in seeds}
        c_ent = [v for s, v in values(cells, cell, "entropy").items() if s in seeds]
        rows.append([f"{label(cell)} (its own runs, same seeds)", f"{len(c_test)}/{n_seeds}",
                     fmt_ci(mean_ci(list(c_test.values()))), "(reference)", fmt_ci(mean_ci(list(c_ood.values()))),
                     "(reference)", fmt_ci(mean_ci(c_ent), 3)])
        rows.append([f"{label(cell)}: {ABLATION_LABELS.get(name, name)}", f"{len(test)}/{n_seeds}",
                     fmt_ci(mean_ci(list(test.values()))), fmt_diff(paired(test, c_test)),
                     fmt_ci(mean_ci(list(ood.values()))), fmt_diff(paired(ood, c_ood)),
                     fmt_ci(mean_ci(list(values(cells, abl, "entropy").values())), 3)])
    return ["### The same ablation on another CalibRL cell", "",
            "Repeated where the base's own gap could hide it (grid `ablations_also_on`; see the next section).", ""
            ] + table(header, rows) + [""]


def noisy_expert_reading(data: dict, cells: dict) -> list[str]:
    """Why a noisy expert may not reach the token gap: where its tokens differ (experts.json), how long the
    policy's completions are (run curves), and on how many seeds the ablation left the result unchanged."""
    facts, base = data["experts"], data["ablation_base"]
    noisy = reproduce.noisy_ablations(data["grid"])
    if not facts or not noisy or not facts.get("first_diff_token"):
        return []
    fd, el, nl = facts["first_diff_token"], facts["expert_tokens"], facts["native_tokens"]
    lines = ["### Where the noisy expert differs, and what each gap sees", "",
             f"- Training rows: {facts['noisy_rows']} of {facts['rows']} noisy expert solutions "
             f"({100 * facts['noisy_rows'] / facts['rows']:.1f}%) reach a wrong value. "
             f"In the base model's tokens a noisy solution first differs from the correct one at token {fd['min']}–"
             f"{fd['max']} (median {fd['median']}) of a {el['min']}–{el['max']}-token expert (`{facts['expert_style']}` "
             f"wording); the `native` wording the policy was warm-started on is {nl['min']}–{nl['max']} tokens."]
    mean_len = [v for r in data["runs"] for _, v in r["curves"].get("completion_mean_length", [])]
    max_len = [v for r in data["runs"] for _, v in r["curves"].get("completion_max_length", [])]
    if mean_len:
        reach = sum(v > fd["min"] for v in max_len)
        lines.append(f"- The policy's completions during RL: {sum(mean_len) / len(mean_len):.1f} tokens on average; "
                     f"in {reach} of {len(max_len)} logged steps at least one completion of the batch was longer "
                     f"than {fd['min']} tokens ({len({r['run_id'] for r in data['runs'] if r['curves'].get('completion_max_length')})} "
                     "runs log completion lengths).")
    lines.append("- The token gap (official code) compares token t of a sample with token t of its group's expert, for "
                 "t below the sample's length, and its gradient, −s·|A|·w·∇log π(y_t), depends on the expert only "
                 "through which LeakyReLU slope w ∈ {1, α} a token gets (tests/test_losses.py checks both). A noisy "
                 "expert therefore changes the update only through completions that reach its wrong tokens, and "
                 "only where the changed baseline flips a slope. The sequence gap sums the expert's whole "
                 "log-likelihood, so the wrong answer always moves it, but it too changes the update only where "
                 "it flips a slope (next section).")
    for cell, name in reproduce.ablation_pairs(data["grid"], base):
        if name in noisy:
            abl = f"{cell}+{name}"
            seeds = sorted(set(cells.get(cell, {})) & set(cells.get(abl, {})))
            if not seeds:
                continue
            same = [s for s in seeds if all(metric(cells[cell][s], m) == metric(cells[abl][s], m)
                                            for m in ("test", "ood"))]
            lines.append(f"- Measured, {label(cell)}: with the noisy expert, both final accuracies are identical to "
                         f"the correct expert's on {len(same)} of {len(seeds)} paired seeds"
                         + (f" (seeds {', '.join(map(str, same))})." if same else "."))
    return lines + [""]


def branch_reading(data: dict) -> list[str]:
    """branches.json (benchmarks/branches.py): did the expert ever decide a sample's slope?"""
    b = data["branches"]
    if not b or not b["cells"]:
        return []
    rows = []
    for cell, c in b["cells"].items():
        d = c["full_minus_wrong"]
        e = c["expert_logp_per_token"]
        pos = c.get("gap_positive")
        rows.append([label(cell), f"`{c['gap']}`", str(c["runs"]), f"{c['steps_equal']} of {c['steps']}",
                     f"{d['mean']:+.3f} ({d['min']:+.3f} to {d['max']:+.3f})", f"{c['gap_mean']:.2f}",
                     "—" if e is None else f"{e:.2f}",
                     "—" if pos is None else f"{pos['mean']:.3f} ({pos['min']:.3f} to {pos['max']:.3f}; "
                                             f"{pos['runs']} run{'s' if pos['runs'] > 1 else ''})"])
    seq = [c for c in b["cells"].values() if c["gap"] in ("sequence", "sequence_mean")]
    eq, n = sum(c["steps_equal"] for c in seq), sum(c["steps"] for c in seq)
    logp = [c["expert_logp_per_token"] for c in b["cells"].values() if c["expert_logp_per_token"] is not None]
    lines = ["### Why the expert's content does not show in this setting", "",
             "The guidance gradient is −λ·s·|A|·w·∇log π(sample); the expert only picks the slope w ∈ {1, α}. "
             "If every sample is more likely than the expert (Δℓ > 0), w = 1 for each wrong sample and α for each "
             "correct one, whatever the expert says. Per logged step of every CalibRL run (`python -m "
             "benchmarks.branches`, from the run folders' metrics.jsonl in "
             + ", ".join(f"`{w}`" for w in b["work_dirs"]) + "): the share on the slope-1 branch minus the share "
             "of wrong samples, the mean gap Δℓ, the expert's log-probability per token under the policy, and, "
             "for runs that log it, the share of tokens (or samples) more likely than the expert (Δℓ > 0).", ""]
    lines += table(["cell", "gap", "runs", "steps where slope-1 share = wrong share", "slope-1 − wrong share: mean "
                    "(range)", "mean gap", "expert log-prob / token", "share with Δℓ > 0"], rows) + [""]
    if n:
        lines.append(f"- Sequence gaps (both shares count samples): equal in {eq} of {n} logged steps, i.e. the "
                     "slope was set by the sample's correctness alone"
                     + (" in every step." if eq == n else f" in {100 * eq / n:.1f}% of steps."))
    if logp:
        lines.append(f"- The expert's `{data['grid']['train'].get('expert_style')}` wording costs the policy "
                     f"{-sum(logp) / len(logp):.1f} nats per token on average: the tiny base model was warm-started "
                     "on the `native` wording only, so the expert is far less likely than anything it samples. "
                     "Token gaps count tokens, not samples, so their two shares differ by a few points even when "
                     "every token's slope follows correctness; the last column (`calibrl/frac_gap_positive`, logged "
                     "by runs made after this grid, e.g. a rerun of a seed) gives the share with Δℓ > 0 directly.")
    token = [c["gap_positive"]["mean"] for c in b["cells"].values() if c["gap"] == "token" and c.get("gap_positive")]
    lines.append("- Reading: in this miniature CalibRL acts as GRPO plus an asymmetric REINFORCE term (slope 1 on "
                 "wrong samples, α on correct ones)"
                 + (f": in {100 * eq / n:.1f}% of steps with the sequence gaps" if n else "")
                 + (f", for {100 * sum(token) / len(token):.0f}% of tokens with the token gap" if token else "")
                 + ". That is why the constant control and the noisy expert match the token gap. It cannot test "
                 "the paper's expert-content claims, where a pretrained model reads an expert in natural language "
                 "and the gap is presumably much smaller (not measured here).")
    return lines + [""]


def claims(data: dict, cells: dict) -> list[str]:
    """The paper's claims (METHOD.md §7), each checked against the paired differences measured here."""
    base = data["ablation_base"]
    checks: list[tuple[str, str, str, str, int, str]] = [  # (claim, a, b, metric, expected sign, paper figure)
        ("CalibRL (token gap, official code) beats GRPO in-domain", "calibrl_token", "grpo", "test", 1,
         "44.93 vs 39.48 (+5.45)"),
        ("CalibRL (sequence gap, paper) beats GRPO in-domain", "calibrl_sequence", "grpo", "test", 1, "+5.45"),
        ("CalibRL (token gap) beats GRPO out-of-domain", "calibrl_token", "grpo", "ood", 1, "59.36 vs 57.24 (+2.12)"),
        ("CalibRL beats DAPO in-domain", "calibrl_token", "dapo", "test", 1, "44.93 vs 39.55"),
        ("DAPO and GRPO are on par in-domain", "dapo", "grpo", "test", 0, "39.55 vs 39.48"),
        ("SFT → GRPO is below GRPO in-domain", "sft_grpo", "grpo", "test", -1, "21.87 vs 39.48"),
        ("CalibRL beats LUFFY in-domain", "calibrl_token", "luffy_calibrl_baseline", "test", 1, "44.93 vs ≈38.64"),
        ("CalibRL beats RL-PLUS in-domain", "calibrl_token", "rlplus", "test", 1, "44.93 vs ≈34.68"),
        ("CalibRL beats GRPO + entropy bonus in-domain", "calibrl_token", "grpo_entropy", "test", 1,
         "entropy bonus below CalibRL"),
        ("CalibRL keeps a higher final entropy than LUFFY", "calibrl_token", "luffy_calibrl_baseline", "entropy", 1,
         "1.50 vs 0.09"),
        ("CalibRL keeps a higher final entropy than RL-PLUS", "calibrl_token", "rlplus", "entropy", 1, "1.50 vs 0.35"),
        ("CalibRL keeps a higher final entropy than GRPO", "calibrl_token", "grpo", "entropy", 1,
         "GRPO collapses entropy; CalibRL keeps it"),
        ("The expert's content matters (token gap beats the constant-baseline control)", "calibrl_token",
         "calibrl_constant", "test", 1, "reviewers' question; no figure"),
    ]
    for cell, name in reproduce.ablation_pairs(data["grid"], base):
        if name in ABLATION_CLAIMS:
            text, paper = ABLATION_CLAIMS[name]
            checks.append((text if cell == base else f"{text}, on {label(cell)}", cell, f"{cell}+{name}", "test", 1,
                           paper))
    lines = ["Each line: the claim, the paper's figure, the paired difference measured here (a − b, in points "
             "for accuracy, nats for entropy; mean [95% CI], paired t-test p, number of paired seeds, and the "
             f"minimum detectable effect (MDE: the true difference a paired t-test at p < {ALPHA} would detect "
             f"with {POWER:.0%} power at this n and spread), so that \"not significant\" reads as \"smaller than "
             "the MDE, or not measurable here\") and the "
             f"verdict at p < {ALPHA}: **holds** (significant, in the claimed direction), **not significant**, "
             "**contradicted** (significant, opposite direction), or **not testable yet** (fewer than two "
             "paired seeds).", ""]
    tally: Counter = Counter()
    for text, a, b, name, sign, paper in checks:
        d = paired(values(cells, a, name), values(cells, b, name))
        tally[verdict(d, sign).split(" (")[0]] += 1
        unit = "" if name == "entropy" else " points"
        what = {"test": "in-domain", "ood": "out-of-domain", "entropy": "final entropy"}[name]
        m = mde(d)
        measured = ("no paired runs yet" if d["n"] == 0 else fmt_diff(d, 3 if name == "entropy" else 1, unit)
                    + (f", n = {d['n']}" if d["n"] > 1 else "")
                    + ("" if m is None else f", MDE {m:.{3 if name == 'entropy' else 1}f}{unit}"))
        lines.append(f"- {text} (paper: {paper}). {label(a)} vs {label(b)}, {what}: {measured}: "
                     f"**{verdict(d, sign)}**.")
    d = paired(values(cells, "calibrl_token", "per_step_s"), values(cells, "grpo", "per_step_s"))
    g = mean_ci(list(values(cells, "grpo", "per_step_s").values()))
    if d["n"] and g["mean"]:
        lines.append(f"- Compute overhead (reviewers: never reported). CalibRL (token) minus GRPO, wall time per "
                     f"optimizer step: {fmt_diff(d, 2, ' s')}, n = {d['n']} ({100 * d['mean'] / g['mean']:+.0f}% of GRPO's "
                     f"{g['mean']:.2f} s; paired runs ran side by side, under the same load).")
    lines += ["", "**In short:** of the " + str(sum(tally.values())) + " claims checked, "
              + ", ".join(f"{n} {v}" for v, n in tally.most_common()) + "."]
    return lines


def power_section(data: dict, cells: dict) -> list[str]:
    """How many seeds a comparison needs to see the paper's in-domain effect sizes, from the measured spread."""
    lines = ["## Power", "",
             f"From the seed-to-seed spread of each paired in-domain difference measured above: the seeds a paired "
             f"t-test (p < {ALPHA}, {POWER:.0%} power) needs to detect a difference of 3 points and of the paper's "
             "+5.45 points, at the same evaluation size (n rows per split as in the setting).", ""]
    rows = []
    for a, b in (("calibrl_token", "grpo"), ("calibrl_sequence", "grpo"), ("calibrl_token", "calibrl_constant"),
                 ("luffy_calibrl_baseline", "grpo")):
        d = paired(values(cells, a, "test"), values(cells, b, "test"))
        if d["n"] < 2 or d["sd"] is None or d["sd"] < 1e-9:
            continue
        m = mde(d)
        rows.append([f"{label(a)} − {label(b)}", str(d["n"]), f"{d['sd']:.1f}", f"{m:.1f}",
                     str(seeds_for(d["sd"], 3.0)), str(seeds_for(d["sd"], 5.45))])
    if not rows:
        return []
    lines += table(["comparison", "paired seeds", "sd of the difference (points)", "MDE now (points)",
                    "seeds for 3 points", "seeds for 5.45 points"], rows)
    return lines + [""]


def regime_section(data: dict, studied: bool = False) -> list[str]:
    """The regime knob: bases warm-started with a share of the expert's wording, measured before any RL."""
    regime = data.get("regime")
    if not regime or not regime.get("bases"):
        return []
    bases = sorted(regime["bases"].values(), key=lambda b: b["share"])
    lines = ["## The regime knob: where the expert sits, before RL", "",
             "The grid above starts from a base warm-started on the `native` wording only, under which the expert's "
             "`mismatched` wording is far less likely than the policy's own samples, so CalibRL's slope follows "
             "correctness alone. `python -m benchmarks.regime` warm-starts bases with a share of the SFT targets in "
             "the mismatched wording (SFTArgs `mismatched_share`; otherwise the grid's `sft` settings) and measures "
             "each with `calibrl probe` on the RL training rows (mismatched experts; "
             f"{bases[0]['probe']['prompts']} prompts x {bases[0]['probe']['num_generations']} samples at the RL "
             "completion limit and temperature) and with the final evaluation's held-out rows. Log-probs are "
             "per token, mean ± sd over experts or samples; 'gap > 0' is the share of sample tokens (token gap) or "
             "samples (sequence gap) more likely than the expert.", ""]
    rows = []
    for b in bases:
        pr, h = b["probe"], b["heldout"]
        sh, g = pr["share_gap_positive"], pr["groups"]
        rows.append([f"{100 * b['share']:g}%", str(b["sft"]["chosen_step"]),
                     f"{pr['expert_logp_per_token']['mean']:.2f} ± {pr['expert_logp_per_token']['std']:.2f}",
                     f"{pr['sample_logp_per_token']['mean']:.2f} ± {pr['sample_logp_per_token']['std']:.2f}",
                     f"{sh['token']:.2f}", f"{sh['sequence']:.2f}",
                     f"{100 * g['all_wrong']:.0f} / {100 * g['mixed']:.0f} / {100 * g['all_right']:.0f}",
                     _pct(h["test"]["accuracy"]), _pct(h["ood"]["accuracy"])])
    lines += table(["mismatched share of SFT targets", "SFT step kept", "expert log-prob / token",
                    "own samples' log-prob / token", "gap > 0: token", "gap > 0: sequence",
                    "groups wrong / mixed / right (%)", "held-out test", "held-out ood"], rows)
    flipped = [b for b in bases if "flips" in b]
    if flipped:
        lines += ["", "Where the expert's content reaches the update, on the same samples: the share of guided units "
                  "(tokens, or samples for the sequence gap, of mixed groups, where |Â| > 0) whose LeakyReLU slope "
                  "changes when the expert is replaced by the constant baseline (`gap: constant`), or by the noisy "
                  "expert (the prompts whose noisy solution differs; the others cannot flip). A share near 0 means "
                  "the expert's content cannot change CalibRL's update on that base.", ""]
        rows = []
        for b in flipped:
            f = b["flips"]
            cell = lambda d: f"{d['share']:.3f} ({d['units']})" if d.get("share") is not None else "—"  # noqa: E731
            rows.append([f"{100 * b['share']:g}%", cell(f["token_vs_constant"]), cell(f["token_vs_noisy_where_differs"]),
                         cell(f["sequence_vs_noisy_where_differs"]), f"{f['noisy_rows']} of {b['probe']['prompts']}",
                         f"`{b.get('base_fingerprint', '—')}`"])
        lines += table(["mismatched share of SFT targets", "token gap vs constant", "token gap vs noisy expert",
                        "sequence gap vs noisy expert", "prompts with a wrong expert", "base weights"], rows)
        lines += ["", "Share of guided units whose slope flips (units counted in brackets)."]
    zero, grid_base = next((b for b in bases if b["share"] == 0), None), data.get("base")
    if zero and grid_base and zero["sft"]["chosen_step"] != grid_base["sft"]["chosen_step"]:
        lines += ["", f"The 0% base has the grid's settings but is not the grid's base: trained again on "
                  f"another machine ({zero['machine'].get('cpu_model')}, {zero['machine'].get('torch_threads')} torch "
                  f"thread), it kept step {zero['sft']['chosen_step']} ({_pct(zero['heldout']['test']['accuracy'])} "
                  f"held-out test) where the grid's cached base ({grid_base['machine'].get('cpu_model')}) kept step "
                  f"{grid_base['sft']['chosen_step']} ({_pct(grid_base['final']['test']['accuracy'])}). The warm start "
                  "reproduces only on the same kind of CPU at the same thread count (floating-point summation order), "
                  "so each base entry and each RL run records its base's weights fingerprint, and a study compares "
                  "runs made from one base only."]
    lo, hi = TARGET_SHARE
    inside = [b for b in bases if lo <= b["probe"]["share_gap_positive"]["token"] <= hi]
    lines += ["", "Bases in the target regime (token-gap share between "
              f"{lo} and {hi}, the expert inside the samples' distribution): "
              + (", ".join(f"{100 * b['share']:g}%" for b in inside) if inside else "none yet") + ". "
              + ("The RL grid on a base of the target regime follows." if studied else
                 "The RL grid on these bases (GRPO, CalibRL token and sequence gaps, the constant control, the noisy "
                 "expert on both gaps, LUFFY; at least 10 seeds) has not been run yet: the Power section above says "
                 "how many seeds a 3-point difference needs at the spread measured so far."), ""]
    return lines


def base_consistency(runs: list[dict], base: dict | None, measured: dict | None) -> str:
    """One sentence: whether the study's runs, its base.json and the regime entry describe one base model
    (by weights fingerprint; results from before fingerprints were recorded carry none)."""
    fp = (base or {}).get("base_fingerprint")
    seen = {r.get("base_fingerprint") for r in runs} - {None}
    unmarked = sum(1 for r in runs if r.get("base_fingerprint") is None)
    if fp is None:
        return "Its base carries no weights fingerprint, so which base each run used cannot be checked."
    text = (f"All runs with a fingerprint were made from this base (`{fp}`)" if seen <= {fp}
            else f"**The runs come from {len(seen | {fp})} different base models**: compare them with care")
    text += f"; {unmarked} run(s) predate fingerprints." if unmarked else "."
    if measured is not None:
        text += (" The regime measurement below is of the same base." if measured.get("base_fingerprint") == fp
                 else " **The regime measurement below is of another base** (the warm start trained again elsewhere).")
    return text


def load_regime_studies(results_dir: Path) -> dict[float, dict]:
    """share -> the loaded RL grid on that base (`load`), for each study whose results folder exists."""
    out = {}
    for share, (sub, grid_file) in REGIME_STUDIES.items():
        folder = results_dir / sub
        if folder.is_dir() and any(folder.glob("*__s*.json")):
            out[share] = load(folder, ROOT / grid_file)
    return out


def regime_comparisons(cells_by_share: dict[float, dict]) -> dict[float, dict[tuple[str, str], dict]]:
    """share -> (a, b) -> the paired in-domain difference, for every comparison with paired seeds."""
    out: dict[float, dict] = {}
    for share, cells in cells_by_share.items():
        names = GRID_NAMES_AT_ZERO if share == 0 else {}
        for a, b, _ in REGIME_COMPARISONS:
            d = paired(values(cells, names.get(a, a), "test"), values(cells, names.get(b, b), "test"))
            if d["n"]:
                out.setdefault(share, {})[(a, b)] = d
    return out


def regime_runs_section(studies: dict[float, dict], main_cells: dict, regime: dict | None) -> list[str]:
    """The RL grid on the regime bases: each cell, the key comparisons with their minimum detectable effects,
    and the same comparisons on the main grid's base (share 0) side by side."""
    lines = []
    for share, data in sorted(studies.items()):
        cells = by_cell(data["runs"])
        grid = data["grid"]
        planned = len(data["expected"])
        probe = ((regime or {}).get("bases", {}).get(f"{share:g}") or {}).get("probe")
        lines += [f"## The regime study: RL on the {100 * share:g}% base", "",
                  f"`{reproduce.rel_to_root(ROOT / REGIME_STUDIES[share][1])}` (everything as the main grid except "
                  f"the warm start: {100 * share:g}% of its SFT targets in the expert's wording), run by "
                  f"`python -m benchmarks.reproduce --grid {REGIME_STUDIES[share][1]} --out "
                  f"benchmarks/results/{REGIME_STUDIES[share][0]}`. **{len(data['runs'])} of {planned} planned runs "
                  f"are finished** ({len(grid['main'])} cells x {len(grid['seeds']['main'])} seeds)"
                  + ("; the rest are not run yet, and nothing below stands for them." if len(data["runs"]) < planned
                     else ".")]
        if data["base"]:
            f = data["base"]["final"]
            lines[-1] += f" Base model before RL: {_pct(f['test']['accuracy'])} in-domain, {_pct(f['ood']['accuracy'])} ood."
        lines[-1] += " " + base_consistency(data["runs"], data["base"], (regime or {}).get("bases", {}).get(f"{share:g}"))
        if probe:
            lines[-1] += (f" Where the expert sits before RL: token gap > 0 for {probe['share_gap_positive']['token']:.2f}"
                          f" of sample tokens, sequence gap > 0 for {probe['share_gap_positive']['sequence']:.2f} of "
                          "samples (the regime section above).")
        lines += [""]
        rows = []
        for cell in grid["main"]:
            test = mean_ci(list(values(cells, cell, "test").values()))
            if not test["n"]:
                continue
            d = paired(values(cells, cell, "test"), values(cells, "grpo", "test")) if cell != "grpo" else None
            rows.append([label(cell), str(test["n"]), fmt_ci(test), fmt_ci(mean_ci(list(values(cells, cell, "ood").values()))),
                         fmt_diff(d) if d else "—"])
        lines += table(["method", "seeds", "in-domain", "out-of-domain", "Δ in-domain vs GRPO"], rows) + [""]
        comps = regime_comparisons({share: cells})
        rows = []
        for a, b, question in REGIME_COMPARISONS:
            d = comps.get(share, {}).get((a, b))
            if not d:
                continue
            m = mde(d)
            rows.append([question, str(d["n"]), fmt_diff(d), f"{m:.1f}" if m is not None else "—",
                         str(seeds_for(d["sd"], 3.0)) if d["sd"] and d["sd"] > 1e-9 else "—",
                         verdict(d, +1)])
        if rows:
            lines += ["Each question as a paired in-domain difference (points) with its minimum detectable effect at "
                      f"the seeds run ({POWER:.0%} power, two-sided α = {ALPHA}): 'not significant' reads as "
                      "'smaller than the MDE, or not measurable here'.", ""]
            lines += table(["question", "paired seeds", "a − b", "MDE (points)", "seeds for a 3-point MDE",
                            "verdict"], rows) + [""]
    if studies:
        both = regime_comparisons({0.0: main_cells, **{s: by_cell(d["runs"]) for s, d in studies.items()}})
        rows = []
        for a, b, question in REGIME_COMPARISONS:
            cols = [fmt_diff(both[s][(a, b)]) if (a, b) in both.get(s, {}) else "—" for s in sorted(both)]
            rows.append([question] + cols)
        lines += ["The same questions on each base (share of the SFT targets in the expert's wording; 0% is the main "
                  "grid, whose noisy-expert cells are its ablation cells on fewer seeds):", ""]
        lines += table(["question"] + [f"{100 * s:g}% base" for s in sorted(both)], rows) + [""]
    return lines


def regime_figure(studies: dict[float, dict], main_cells: dict, fig_dir: Path) -> tuple[str, str] | None:
    """Paired in-domain differences against the base's share of expert wording, with 95% intervals."""
    if not studies:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = regime_comparisons({0.0: main_cells, **{s: by_cell(d["runs"]) for s, d in studies.items()}})
    fig, ax = plt.subplots(figsize=(7, 4))
    shares = sorted(both)
    for k, (a, b, question) in enumerate(REGIME_COMPARISONS):
        pts = [(s, both[s][(a, b)]) for s in shares if (a, b) in both[s]]
        if not pts:
            continue
        xs = [100 * s + 0.25 * (k - len(REGIME_COMPARISONS) / 2) for s, _ in pts]  # spread the markers apart
        ys = [d["mean"] for _, d in pts]
        err = [d["half"] or 0.0 for _, d in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=question)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("share of the base's SFT targets in the expert's wording (%)")
    ax.set_ylabel("paired Δ in-domain accuracy (points)")
    ax.set_title("regime study: each question's difference on each base (95% CI)")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / "regime_dose_response.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return "regime study: paired differences against the base's share of expert wording", str(path)


def seeds_table(data: dict, cells: dict) -> list[str]:
    """Every finished run's own numbers (in-domain / out-of-domain %), cell by seed."""
    seeds = sorted({r["seed"] for r in data["runs"]})
    order = list(data["grid"]["main"]) + sorted(c for c in cells if c not in data["grid"]["main"])
    rows = []
    for cell in order:
        if cell not in cells:
            continue
        row = [label(cell)]
        for s in seeds:
            r = cells[cell].get(s)
            row.append("—" if r is None else f"{metric(r, 'test'):.1f} / {metric(r, 'ood'):.1f}")
        rows.append(row)
    return table(["cell"] + [f"seed {s}" for s in seeds], rows) if rows else ["(no finished runs)"]


# ----------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------
def _run_folder(run: dict, root: Path) -> str:
    """A minimal run folder (metrics.jsonl, eval.jsonl, run.json) rebuilt from a run's JSON curves, which is
    what `calibrl.plots.plot_seed_bands` reads."""
    d = root / run["run_id"]
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "metrics.jsonl", "w", encoding="utf-8") as f:
        for step, value in run["curves"]["entropy"]:
            f.write(json.dumps({"step": int(step), "entropy": value}) + "\n")
    with open(d / "eval.jsonl", "w", encoding="utf-8") as f:
        for e in run["curves"]["heldout"]:
            f.write(json.dumps(e) + "\n")
    (d / "run.json").write_text(json.dumps({"name": run["run_id"]}), encoding="utf-8")
    return str(d)


def figures(data: dict, cells: dict, fig_dir: Path) -> list[tuple[str, str]]:
    """(caption, path) of every figure written: held-out accuracy (in-domain, out-of-domain) and on-policy
    entropy over steps, mean over seeds with a min-max band, for three groups of cells."""
    from calibrl.plots import plot_seed_bands

    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        old.unlink()
    main = list(data["grid"]["main"])
    variants = [c for c in main if c.startswith("calibrl_")]
    families = {
        "baselines": [c for c in main if not c.startswith("calibrl_") or c == "calibrl_token"],
        "calibrl_variants": ["grpo"] + variants,
        "ablations": ([data["ablation_base"]] + [f"{data['ablation_base']}+{a}" for a in data["grid"]["ablations"]]
                      if data["ablation_base"] else []),
        "ablations_also_on": [c for cell, n in reproduce.ablation_pairs(data["grid"], data["ablation_base"])
                              if cell != data["ablation_base"] for c in (cell, f"{cell}+{n}")],
    }
    written = []
    with tempfile.TemporaryDirectory(prefix="calibrl-report-") as tmp:
        for family, members in families.items():
            groups = {label(c): [_run_folder(r, Path(tmp)) for r in cells[c].values()] for c in members if c in cells}
            if len(groups) < (2 if family.startswith("ablations") else 1):
                continue
            for metric_name, source, split, what, smooth in (
                    ("accuracy", "eval", "test", "held-out in-domain accuracy", 1),
                    ("accuracy", "eval", "ood", "held-out out-of-domain accuracy", 1),
                    ("entropy", "metrics", None, "on-policy entropy (5-step moving average)", 5)):
                name = f"{family}_{'entropy' if source == 'metrics' else 'heldout_' + split}.png"
                path = plot_seed_bands(groups, metric_name, str(fig_dir / name), source=source, split=split,
                                       smooth=smooth, title=f"{family.replace('_', ' ')}: {what}")
                if path:
                    written.append((f"{family.replace('_', ' ')}: {what}", path))
    return written


# ----------------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------------
def provenance(data: dict, cells: dict) -> list[str]:
    grid = data["grid"]
    runs = data["runs"]
    lines = ["## How each number was produced", ""]
    commands = Counter(r["command"] for r in runs)
    lines.append("Commands that produced the finished runs (each run's JSON records its own):")
    lines.append("")
    for cmd, n in commands.most_common():
        lines.append(f"- `{cmd}` ({n} runs)")
    lines += ["", "Cells (train keys added on top of the shared settings; `sft_first` = the SFT → GRPO pipeline):", ""]
    rows = []
    for cell in list(grid["main"]) + sorted(c for c in cells if c not in grid["main"]):
        spec = next((r for r in data["expected"] if r.cell == cell), None)
        keys = spec.keys if spec else next(iter(cells[cell].values()))["keys"]
        extra = ", sft_first: true" if spec is not None and spec.sft_first else ""
        rows.append([label(cell), f"`{cell}`", "`" + ", ".join(f"{k}: {v}" for k, v in keys.items()) + extra + "`"])
    lines += table(["method", "cell (JSON file prefix)", "keys"], rows)
    lines += ["", f"Shared settings (`sft` = SFTArgs fields, `train` = CalibRLConfig + RunArgs fields; settings hash "
              f"`{data['hash']}`, recorded in every run's JSON):", ""]
    if data["quick"]:  # the quick section merged over the full grid: show the result
        shared = {k: grid.get(k) for k in ("sft", "train", "final_eval", "sft_grpo")}
        return lines + ["```yaml", yaml.safe_dump(shared, sort_keys=False).rstrip(), "```", ""]
    text = Path(data["grid_path"]).read_text(encoding="utf-8").split("\nquick:")[0].rstrip()
    return lines + ["```yaml", f"# {reproduce.rel_to_root(data['grid_path'])} (its quick: section left out)", text, "```", ""]


def machine_section(data: dict, planned: int) -> list[str]:
    runs = data["runs"]
    lines = ["## Machine and cost", ""]
    if not runs:
        return lines + ["No finished runs."]
    m = runs[-1]["machine"]
    threads = Counter(r["time"]["threads"] for r in runs)
    lines.append(f"- {m['nproc']} CPU cores ({m['cpu_model']}), {m['platform']}; torch threads per run: "
                 + ", ".join(f"{t} ({n} runs)" for t, n in sorted(threads.items())) + ".")
    total = [r["time"]["total_s"] for r in runs]
    cpu = [r["time"]["cpu_s"] for r in runs]
    per_step = [r["time"]["per_step_s"] for r in runs if r["time"].get("per_step_s")]
    nproc = m["nproc"]
    lines.append(f"- Per run (training + in-training curve + final evaluation), over {len(runs)} finished runs: "
                 f"wall {_median(total):.0f} s median ({min(total):.0f}–{max(total):.0f}); CPU time {_median(cpu):.0f} s "
                 f"median, i.e. {_median(cpu) / nproc:.0f} s of the whole {nproc}-core machine; "
                 f"{_median(per_step):.2f} s wall per optimizer step median.")
    lines.append(f"- Finished runs in total: {sum(cpu) / 3600:.2f} CPU-hours = {sum(cpu) / nproc / 3600:.2f} h of the "
                 f"whole machine ({sum(total) / 3600:.2f} h of run wall time). At the median CPU time per run, the "
                 f"whole grid ({planned} runs) costs ≈ {planned * _median(cpu) / nproc / 3600:.1f} h of the machine "
                 "(a cost estimate from the runs above; SFT → GRPO runs cost a little more).")
    busy = [r for r in runs if max(r["time"]["loadavg_start"][0], r["time"]["loadavg_end"][0])
            > r["machine"]["nproc"] + 0.5]
    lines.append(f"- The machine was shared with other work: {len(busy)} of {len(runs)} runs started or ended with "
                 f"a 1-minute load average above {m['nproc'] + 0.5:.1f}, so their times (s / step, min / run) "
                 "include waiting for the CPU; compare times only between runs made under the same load. Accuracy "
                 "and entropy do not depend on load.")
    if data["base"]:
        lines.append(f"- Base model evaluation: {data['base']['eval_s']:.0f} s.")
    return lines + [""]


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------
def build_report(results_dir: str | os.PathLike, out_md: str | os.PathLike, fig_dir: str | os.PathLike,
                 grid_path: str | os.PathLike = reproduce.GRID_PATH) -> str:
    """Write the Markdown report and its figures; returns the Markdown text."""
    data = load(results_dir, grid_path)
    cells = by_cell(data["runs"])
    out_md, fig_dir = Path(out_md), Path(fig_dir)
    head, counts = completeness(data)
    lines = ["# Results: the paper's table in miniature", ""] + head + [
        "",
        f"Generated by `python -m benchmarks.report` from `{reproduce.rel_to_root(results_dir)}/*.json` on "
        f"{datetime.date.today().isoformat()}. Do not edit by hand: rerun the report. The grid is "
        "`benchmarks/grid.yaml`, run by `python -m benchmarks.reproduce` (see its docstring).",
        "",
    ]
    lines += setting_section(data)
    lines += ["## Main table", "",
              "Accuracy in % (greedy, held-out), mean ± 95% CI half-width over seeds; Δ = paired difference with GRPO "
              "in points, mean [95% CI], paired t-test p. Final entropy: on-policy per-token entropy, mean of the "
              "last 10 steps. s / step: wall time of one optimizer step (generation, rewards, loss, backward, "
              "update), held-out evaluation excluded. min / run: whole run (SFT phase if any, training, curve, "
              "final evaluation).", ""]
    lines += main_table(data, cells) + [""]
    lines += ["## Against the paper's claims", ""] + claims(data, cells) + [""]
    lines += power_section(data, cells)
    lines += ["## Ablations", ""] + ablation_table(data, cells) + [""]
    lines += also_on_table(data, cells) + noisy_expert_reading(data, cells) + branch_reading(data)
    studies = load_regime_studies(Path(results_dir))
    lines += regime_section(data, studied=bool(studies))
    lines += regime_runs_section(studies, cells, data["regime"])
    figs = figures(data, cells, fig_dir)
    regime_fig = regime_figure(studies, cells, fig_dir)  # after figures(), which clears the folder
    figs += [regime_fig] if regime_fig else []
    lines += ["## Curves", "", "Mean over seeds, shaded from the lowest to the highest seed at each step.", ""]
    for caption, path in figs:
        lines += [f"![{caption}]({os.path.relpath(path, out_md.parent)})", ""]
    if not figs:
        lines += ["(no finished runs to plot)", ""]
    lines += ["## Every run", "", "In-domain / out-of-domain accuracy (%) of each finished run.", ""]
    lines += seeds_table(data, cells) + [""]
    lines += machine_section(data, sum(c[1] for c in counts.values()))
    lines += provenance(data, cells)
    if data["stale"]:
        lines += ["## Left out", "", f"{len(data['stale'])} result files were made with other shared settings "
                  "(a different settings hash) and are not used: " + ", ".join(sorted(r["run_id"] for r in data["stale"]))
                  + ".", ""]
    text = "\n".join(lines).rstrip() + "\n"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text, encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(reproduce.RESULTS_DIR), help="folder of run JSON files")
    p.add_argument("--out", default=str(DOC_PATH), help="Markdown file to write (default docs/RESULTS.md)")
    p.add_argument("--figures", default=str(FIG_DIR), help="folder for the PNGs (default docs/figures)")
    p.add_argument("--grid", default=str(reproduce.GRID_PATH), help="grid file (default benchmarks/grid.yaml)")
    ns = p.parse_args(argv)
    if not Path(ns.results).is_dir():
        raise SystemExit(f"report: results folder not found: {ns.results}")
    text = build_report(ns.results, ns.out, ns.figures, ns.grid)
    print(text.split("\n\n", 2)[1] if "\n\n" in text else text)
    print(f"written: {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
