"""The paper's table in miniature: every method of METHOD.md §6 and CalibRL's variants and ablations, trained
from the same base model on the same data with the same budget, evaluated the same way, over several seeds.

    python -m benchmarks.reproduce                       # the whole grid (benchmarks/grid.yaml), resumable
    python -m benchmarks.reproduce --jobs 2              # two runs at a time, one torch thread each
    python -m benchmarks.reproduce --only method=grpo,calibrl_token --seeds 0 1
    python -m benchmarks.reproduce --only group=main --shard 0/2     # half of the main table
    python -m benchmarks.reproduce --list                # what the grid holds and what is done
    python -m benchmarks.reproduce --quick --out /tmp/q  # 2 methods x 2 seeds on a nano model, ~1 minute
    python -m benchmarks.branches                        # which slope CalibRL's guidance took, from the run logs
    python -m benchmarks.report                          # docs/RESULTS.md + docs/figures/ from the JSON

One JSON file per run lands in `--out` (default benchmarks/results/, `<cell>__s<seed>.json`), written
atomically when the run is complete, so an interrupted grid resumes where it stopped (runs whose JSON exists
with the current shared settings are skipped; one made with other settings is run again and replaced) and a
grid can be split across sittings (`--only`, `--seeds`, `--shard`). `base.json` holds the
base model's own held-out accuracy. Run folders (metrics.jsonl, eval.jsonl, run.json) go to `--work-dir`
(default .cache/calibrl/bench/); the JSON keeps what the report needs, curves included.

What is shared by every run (grid.yaml `sft`, `train`, `final_eval`): the base model (an SFT warm start on
`native` wording made and cached by calibrl.commands.demo.warm_start), the training rows (task:digits with `mismatched` expert
solutions), prompts and rollouts per step, optimizer steps, learning rate, and the final greedy evaluation
(`final_eval.n_eval` rows per split, drawn like the demo's, never trained on). A seed fixes the RL sampling
and the data order, so the same seed gives every method the same prompts in the same order: comparisons with
GRPO are paired by seed.

SFT -> GRPO (`sft_first: true`) is defined as: continue SFT from the warm start on the SAME training rows'
expert solutions (the mismatched wording the other expert-using methods see), `sft_grpo.sft_steps` steps
of `sft_grpo.batch_size` rows (by default as many steps as RL takes, one expert solution per prompt that RL
sees per step), then GRPO exactly as the `grpo` cell. It therefore takes extra optimizer steps, all SFT.

Quick mode (`--quick`, grid.yaml `quick:`) runs the same code on a nano model with a 4-step warm start (not a
meaningful base: plumbing only), 2 methods x 2 seeds x 3 steps, one torch thread, into a folder of its own.

Threads: on this 2-core machine the models are tiny, and a process with 2 OpenMP threads that shares the cores
with anything else waits at every barrier for a descheduled thread (measured: a 1000-row evaluation took
300 s at 2 threads under load, against ~15 s normally). Use `--jobs 2` (one thread per run) on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from calibrl.files import weights_fingerprint

ROOT = Path(__file__).resolve().parent.parent
GRID_PATH = ROOT / "benchmarks" / "grid.yaml"
RESULTS_DIR = ROOT / "benchmarks" / "results"
GROUPS = ("main", "ablation")
SETTING_SECTIONS = ("sft", "train", "final_eval", "sft_grpo")  # what every run of a grid shares (settings_hash)
BASE_FILE = "base.json"
EXPERTS_FILE = "experts.json"


# ----------------------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a cell (a method with its keys) and a seed."""

    cell: str
    group: str  # "main" or "ablation"
    seed: int
    keys: dict = field(default_factory=dict, hash=False, compare=False)  # train keys of the cell
    sft_first: bool = False
    ablation_of: str | None = None  # the main-table cell an ablation modifies

    @property
    def run_id(self) -> str:
        return f"{self.cell}__s{self.seed}"


def load_grid(path: str | os.PathLike = GRID_PATH, quick: bool = False) -> dict:
    """grid.yaml as a dict; with `quick`, its `quick:` section merged over the full grid."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"reproduce: grid file not found: {p}")
    grid = yaml.safe_load(p.read_text(encoding="utf-8"))
    if "extends" in grid:  # another grid file's settings, with these sections' keys on top
        parent_path = p.parent / grid.pop("extends")
        parent = yaml.safe_load(parent_path.read_text(encoding="utf-8")) if parent_path.is_file() else None
        if parent is None:
            raise SystemExit(f"reproduce: {p}: extends: grid file not found: {parent_path}")
        parent.pop("quick", None)
        for key in SETTING_SECTIONS:
            if key in grid:
                grid[key] = {**(parent.get(key) or {}), **(grid[key] or {})}
        grid = {**parent, **grid}
    for key in ("train", "final_eval", "seeds", "main"):
        if key not in grid:
            raise SystemExit(f"reproduce: {p}: missing key {key!r}")
    grid.setdefault("sft", {})
    grid.setdefault("sft_grpo", {})
    grid.setdefault("ablations", {})
    grid["ablations_also_on"] = grid.get("ablations_also_on") or {}
    for cell, names in grid["ablations_also_on"].items():
        bad = [n for n in names if n not in grid["ablations"]]
        if cell not in grid["main"] or bad:
            raise SystemExit(f"reproduce: {p}: ablations_also_on: {cell!r}: "
                             + (f"unknown ablation {bad[0]!r}" if bad else "not a cell of the main table"))
    grid["quick_mode"] = bool(quick)
    if quick:
        q = grid.get("quick") or {}
        for key in ("sft", "train", "final_eval", "sft_grpo"):
            grid[key] = {**(grid.get(key) or {}), **(q.get(key) or {})}
        grid["seeds"] = {**grid["seeds"], **(q.get("seeds") or {})}
        unknown = [c for c in q.get("cells", []) if c not in grid["main"]]
        if unknown:
            raise SystemExit(f"reproduce: {p}: quick.cells names unknown cell {unknown[0]!r}")
        grid["main"] = {c: grid["main"][c] for c in q.get("cells", grid["main"])}
        grid["ablations"] = {}
        grid["ablations_also_on"] = {}
    grid.pop("quick", None)
    return grid


def settings_hash(grid: dict) -> str:
    """Hash of everything every run shares (warm start, training, final eval, SFT->GRPO): results made
    with other shared settings are stale."""
    from calibrl.files import settings_hash as _hash

    return _hash({k: grid.get(k) for k in SETTING_SECTIONS})


def _cell_keys(cell: str, keys: dict | None) -> tuple[dict, bool]:
    keys = dict(keys or {})
    sft_first = bool(keys.pop("sft_first", False))
    if "method" not in keys:
        raise SystemExit(f"reproduce: grid cell {cell!r} has no method")
    return keys, sft_first


def ablation_base(grid: dict, results_dir: str | os.PathLike, override: str | None = None) -> str | None:
    """The CalibRL cell the ablations modify: `override`, grid `ablation_base`, or (auto) the calibrl_* cell of
    the main table with the best mean in-domain accuracy over its finished runs. None when auto has no data."""
    name = override or grid.get("ablation_base", "auto")
    candidates = [c for c, k in grid["main"].items() if (k or {}).get("method") == "calibrl"
                  and (k or {}).get("gap") != "constant"]
    if name != "auto":
        if name not in candidates:
            raise SystemExit(f"reproduce: ablation base {name!r} is not a CalibRL cell of the main table {candidates}")
        return name
    means = {}
    for cell in candidates:
        accs = [r["final"]["test"]["accuracy"] for r in load_runs(results_dir) if r["cell"] == cell]
        if accs:
            means[cell] = sum(accs) / len(accs)
    return max(means, key=means.get) if means else None


def ablation_pairs(grid: dict, base: str | None) -> list[tuple[str, str]]:
    """(cell, ablation) of every ablation cell: each ablation on `base`, then `ablations_also_on` (skipped where
    that cell is `base` itself). None before the base is known."""
    if base is None:
        return []
    return [(base, name) for name in grid["ablations"]] + [
        (cell, name) for cell, names in grid.get("ablations_also_on", {}).items() if cell != base for name in names]


def grid_runs(grid: dict, base: str | None) -> list[RunSpec]:
    """Every run of the grid, seed-major (all cells of seed 0, then seed 1, ...): an interrupted grid leaves
    complete seed pairs. Ablation cells are named `<base>+<ablation>`; they are left out while `base` is None.
    `ablations_also_on` adds named ablations on other cells (skipped where that cell is `base` itself)."""
    runs = []
    for seed in grid["seeds"]["main"]:
        for cell, keys in grid["main"].items():
            k, sft_first = _cell_keys(cell, keys)
            runs.append(RunSpec(cell, "main", int(seed), k, sft_first))
    for seed in grid["seeds"].get("ablation", []):
        for cell, name in ablation_pairs(grid, base):
            cell_keys, _ = _cell_keys(cell, grid["main"][cell])
            runs.append(RunSpec(f"{cell}+{name}", "ablation", int(seed),
                                {**cell_keys, **(grid["ablations"][name] or {})}, ablation_of=cell))
    return runs


def parse_only(items: list[str]) -> dict[str, set[str]]:
    """['method=grpo,calibrl_token', 'group=main'] -> {'cell': {...}, 'group': {...}} (`method` = `cell`)."""
    out: dict[str, set[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = {"method": "cell"}.get(key, key)
        if not sep or key not in ("cell", "group") or not values:
            raise SystemExit(f"reproduce: --only {item!r}: expected method=A,B (or cell=..., group=main|ablation)")
        out.setdefault(key, set()).update(v for v in values.split(",") if v)
    return out


def select_runs(runs: list[RunSpec], only: dict[str, set[str]] | None = None, seeds: list[int] | None = None,
                shard: tuple[int, int] | None = None) -> list[RunSpec]:
    """Filter the grid: cells/groups named by `only`, `seeds`, then every n-th run from the i-th (`shard`)."""
    only = only or {}
    out = [r for r in runs if ("cell" not in only or r.cell in only["cell"])
           and ("group" not in only or r.group in only["group"]) and (seeds is None or r.seed in seeds)]
    if shard is not None:
        i, n = shard
        out = out[i::n]
    return out


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"reproduce: --shard {text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise SystemExit(f"reproduce: --shard {text!r}: need 0 <= I < N")
    return i, n


# ----------------------------------------------------------------------------------------------------------
# Results on disk
# ----------------------------------------------------------------------------------------------------------
def result_path(results_dir: str | os.PathLike, spec: RunSpec) -> Path:
    return Path(results_dir) / f"{spec.run_id}.json"


def read_current(path: str | os.PathLike, settings: str) -> dict | None:
    """A results file (a run, base.json, experts.json, ...) if it exists, parses and was made with the current
    shared settings; else None (it is then made again)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("settings_hash") == settings else None


def on_base(data: dict | None, fingerprint: str) -> dict | None:
    """`data` (a run or base.json) if it was made from the base model with this weights fingerprint; results
    from before fingerprints were recorded carry none and are taken as they are."""
    if data is None:
        return None
    return data if data.get("base_fingerprint", fingerprint) == fingerprint else None


def load_runs(results_dir: str | os.PathLike) -> list[dict]:
    """Every finished run's JSON in `results_dir` (base.json excluded)."""
    out = []
    for p in sorted(Path(results_dir).glob("*.json")):
        if p.name == BASE_FILE:
            continue
        data = json.loads(p.read_text(encoding="utf-8"))
        if data.get("kind") == "run":
            out.append(data)
    return out


def rel_to_root(path) -> str:
    """A path inside the checkout as written relative to its root (for reports), others as given."""
    try:
        return os.path.relpath(path, ROOT) if str(Path(path).resolve()).startswith(str(ROOT)) else str(path)
    except ValueError:
        return str(path)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write atomically: a half-written file never looks like a finished run."""
    from calibrl.storage import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=1)


def machine_info() -> dict:
    """nproc, CPU model (from /proc/cpuinfo), torch threads, load average: what the timings were taken on."""
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "loadavg": [round(x, 2) for x in os.getloadavg()]}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------------
def sft_args(grid: dict):
    """The warm start's SFTArgs: grid `sft` (what `calibrl sft` would read from a config file)."""
    from calibrl.config import SFTArgs, parse_config

    (args,) = parse_config([SFTArgs], values=grid["sft"], overrides=["--disable_tqdm", "true"])
    return args


def final_eval_args(grid: dict):
    from calibrl.config import DemoArgs

    return DemoArgs(**grid["final_eval"])


def train_config(grid: dict, spec: RunSpec, base_dir: str, run_dir: str):
    """(CalibRLConfig, RunArgs) of one run: grid `train` < the cell's keys (what `calibrl train` would read)."""
    from calibrl.config import load_train_config

    overrides = ["--seed", str(spec.seed), "--output_dir", run_dir, "--run_name", spec.run_id, "--disable_tqdm", "true",
                 "--model", base_dir]
    return load_train_config(values={**grid["train"], **spec.keys}, overrides=overrides)


def continue_sft(base_dir: str, run, grid: dict, seed: int, out_dir: str) -> dict:
    """The SFT phase of SFT -> GRPO: from `base_dir`, SFT on the run's own training rows and expert
    solutions; saves the model to `out_dir`. Returns the SFT summary."""
    from calibrl.models import load_tiny_model, save_tiny_model
    from calibrl.sft import train_sft

    import torch

    cfg = grid["sft_grpo"]
    args = sft_args(grid)
    args.max_steps = int(cfg.get("sft_steps", grid["train"]["max_steps"]))
    args.batch_size = int(cfg.get("batch_size", 16))
    args.learning_rate = float(cfg.get("learning_rate", args.learning_rate))
    args.warmup_steps = int(cfg.get("warmup_steps", 0))
    args.select_window, args.seed = None, seed
    rows = run.training_rows()
    torch.manual_seed(seed)
    model, proc = load_tiny_model(base_dir)
    summary = train_sft(model, proc, rows, [], args)
    save_tiny_model(model, proc, out_dir)
    return {**summary, "sft_steps": args.max_steps, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps, "expert_style": run.expert_style}


def step_timer():
    """A TrainerCallback timing each optimizer step (generation, loss, backward, optimizer), nothing else:
    put first in the callback list, its on_step_end runs before the held-out evaluation does."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self._t: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self._t is not None:
                self.times.append(time.perf_counter() - self._t)
                self._t = None

    return StepTimer()


def _curve(records: list[dict], key: str) -> list[list[float]]:
    return [[r["step"], r[key]] for r in records if isinstance(r.get(key), (int, float))]


def _split_result(results: dict, split: str) -> dict:
    s = results["by_split"][split]
    return {k: s[k] for k in ("accuracy", "stderr", "n", "format_rate")}


def run_one(spec: RunSpec, grid: dict, base_dir: str, results_dir: str, work_dir: str, threads: int = 0,
            command: str = "") -> dict:
    """Train and evaluate one run; write `<results_dir>/<run_id>.json` and return what it holds."""
    import torch

    from calibrl.commands.demo import final_eval_rows
    from calibrl.commands.train import build_trainer
    from calibrl.evaluate import evaluate
    from calibrl.files import versions
    from calibrl.run_log import read_run

    if threads:
        torch.set_num_threads(threads)
    t0, cpu0, load_start = time.time(), time.process_time(), os.getloadavg()
    run_dir = Path(work_dir) / spec.run_id
    shutil.rmtree(run_dir, ignore_errors=True)
    config, run = train_config(grid, spec, base_dir, str(run_dir))
    timings: dict[str, float] = {}
    sft_summary = None
    if spec.sft_first:
        t = time.time()
        sft_dir = str(run_dir / "sft_model")
        sft_summary = continue_sft(base_dir, run, grid, spec.seed, sft_dir)
        run.model = sft_dir
        timings["sft_s"] = round(time.time() - t, 2)

    trainer, _ = build_trainer(config, run, quiet=True)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # disable_tqdm would print every log dict; metrics.jsonl has them
    timer = step_timer()
    trainer.callback_handler.callbacks.insert(0, timer)
    t = time.time()
    trainer.train()
    timings["train_s"] = round(time.time() - t, 2)  # includes the in-training held-out curve

    t = time.time()
    fe = final_eval_args(grid)
    rows = [r for split_rows in final_eval_rows(run, fe).values() for r in split_rows]
    results = evaluate(trainer.model, trainer.processing_class, rows, max_new_tokens=fe.eval_max_new_tokens,
                       batch_size=fe.eval_batch_size)
    timings["final_eval_s"] = round(time.time() - t, 2)
    timings["total_s"] = round(time.time() - t0, 2)
    timings["cpu_s"] = round(time.process_time() - cpu0, 2)  # CPU time of this process, all threads
    steps = timer.times
    timings["per_step_s"] = round(sum(steps) / len(steps), 4) if steps else None
    timings["per_step_median_s"] = round(sorted(steps)[len(steps) // 2], 4) if steps else None
    timings["steps_timed"] = len(steps)

    logged = read_run(run_dir)
    metrics = logged["metrics"]
    entropy = _curve(metrics, "entropy")
    tail = [v for _, v in entropy[-10:]]
    out = {
        "kind": "run", "run_id": spec.run_id, "cell": spec.cell, "group": spec.group, "seed": spec.seed,
        "ablation_of": spec.ablation_of, "keys": spec.keys, "sft_first": spec.sft_first, "method": config.method,
        "settings_hash": settings_hash(grid), "quick": grid.get("quick_mode", False),
        "final": {split: _split_result(results, split) for split in fe.eval_splits},
        "entropy_final": sum(tail) / len(tail) if tail else None,
        "entropy_start": entropy[0][1] if entropy else None,
        "time": {**timings, "threads": torch.get_num_threads(), "loadavg_start": [round(x, 2) for x in load_start],
                 "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "curves": {"entropy": entropy, "reward": _curve(metrics, "reward"),
                   "train_accuracy": _curve(metrics, "rewards/accuracy_reward/mean"),
                   "completion_mean_length": _curve(metrics, "completions/mean_length"),
                   "completion_max_length": _curve(metrics, "completions/max_length"),
                   "step_time": [[i + 1, round(s, 4)] for i, s in enumerate(steps)],
                   "heldout": [{k: e[k] for k in ("step", "split", "accuracy", "n")} for e in logged["eval"]]},
        "sft_phase": sft_summary,
        "global_step": trainer.state.global_step,
        "config": {"train": {k: v for k, v in config.to_dict().items() if not k.startswith(("hub_", "push_"))},
                   "run": asdict(run), "grid": {k: grid.get(k) for k in ("sft", "train", "final_eval", "sft_grpo")}},
        "base_model": base_dir, "base_fingerprint": weights_fingerprint(base_dir), "command": command, "machine": machine_info(), "versions": versions(),
        "git_commit": git_commit(), "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    write_json(result_path(results_dir, spec), out)
    if spec.sft_first:
        shutil.rmtree(run_dir / "sft_model", ignore_errors=True)
    return out


def _run_in_worker(spec: RunSpec, grid: dict, base_dir: str, results_dir: str, work_dir: str, threads: int,
                   command: str, child: bool = False) -> tuple[str, dict | None, str | None]:
    """Run one spec and never raise, so one failed run does not stop the grid. `child`: a fresh worker
    process (before torch is imported there, its OpenMP threads are set to `threads`)."""
    if child:
        os.environ["OMP_NUM_THREADS"] = str(threads or 1)
    _quiet()
    try:
        out = run_one(spec, grid, base_dir, results_dir, work_dir, threads, command)
        return spec.run_id, _short(out), None
    except Exception as e:  # noqa: BLE001 - reported and counted by the parent
        import traceback

        return spec.run_id, None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"


def _short(out: dict) -> dict:
    return {"test": out["final"]["test"]["accuracy"] if "test" in out["final"] else None,
            "ood": out["final"]["ood"]["accuracy"] if "ood" in out["final"] else None,
            "entropy": out["entropy_final"], "per_step_s": out["time"]["per_step_s"], "total_s": out["time"]["total_s"]}


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------------------------
# Base model
# ----------------------------------------------------------------------------------------------------------
def ensure_base(grid: dict, results_dir: str, work_dir: str) -> str:
    """The warm start (trained once, then cached), and base.json: its held-out accuracy with the final eval."""
    from calibrl.commands.demo import final_eval_rows, warm_start
    from calibrl.evaluate import evaluate
    from calibrl.models import load_tiny_model

    t = time.time()
    base_dir, summary, cached = warm_start(sft_args(grid), quiet=True)
    sft_s = round(time.time() - t, 1)
    print(f"base model: {base_dir} ({'cached' if cached else f'trained in {sft_s:.0f} s'}, warm-start step "
          f"{summary.get('chosen_step')}, validation accuracy {summary.get('select_accuracy')})", flush=True)
    path = Path(results_dir) / BASE_FILE
    h = settings_hash(grid)
    fingerprint = weights_fingerprint(base_dir)  # the same settings on another CPU can train other weights
    if on_base(read_current(path, h), fingerprint) is not None:
        return base_dir
    _, run = train_config(grid, RunSpec("base", "main", 0, {"method": "grpo"}), base_dir, str(Path(work_dir) / "base"))
    fe = final_eval_args(grid)
    rows = [r for split_rows in final_eval_rows(run, fe).values() for r in split_rows]
    model, proc = load_tiny_model(base_dir)
    t = time.time()
    results = evaluate(model, proc, rows, max_new_tokens=fe.eval_max_new_tokens, batch_size=fe.eval_batch_size)
    write_json(path, {"kind": "base", "settings_hash": h, "base_model": base_dir, "base_fingerprint": fingerprint,
                      "sft": summary,
                      "sft_cached": cached, "final": {s: _split_result(results, s) for s in fe.eval_splits},
                      "eval_s": round(time.time() - t, 2), "machine": machine_info(), "quick": grid["quick_mode"]})
    return base_dir


def _spread(xs: list[int]) -> dict:
    s = sorted(xs)
    return {"min": s[0], "median": s[len(s) // 2], "max": s[-1]} if s else {}


def noisy_ablations(grid: dict) -> list[str]:
    """The ablations that train on the `noisy` expert."""
    return [n for n, k in grid["ablations"].items() if (k or {}).get("expert_style") == "noisy"]


def ensure_expert_facts(grid: dict, base_dir: str, results_dir: str) -> dict | None:
    """experts.json: where, in the base model's tokens, a noisy expert solution first differs from the correct
    one, against the lengths of the correct expert and of the native wording the policy was warm-started on.
    The token gap compares sample token t with expert token t only, so this says whether a noisy expert can
    reach its loss at all. Written once per settings hash when the grid has a noisy ablation; cheap (tokenising)."""
    if not noisy_ablations(grid):
        return None
    path, h = Path(results_dir) / EXPERTS_FILE, settings_hash(grid)
    old = read_current(path, h)
    if old is not None:
        return old
    from transformers import AutoTokenizer

    from calibrl.tasks import native_solution

    tok = AutoTokenizer.from_pretrained(base_dir)
    _, run = train_config(grid, RunSpec("experts", "main", 0, {"method": "calibrl"}), base_dir,
                          str(Path(results_dir) / "unused"))  # nothing is written there

    def rows(style: str) -> list[dict]:
        return run.training_rows(expert_style=style)

    def ids(text: str) -> list[int]:  # as CalibRLTrainer tokenises an expert (its EOS not counted)
        return tok(text, add_special_tokens=False)["input_ids"]

    right, wrong = rows(run.expert_style), rows("noisy")
    first, lengths, native = [], [], []
    for a, b in zip(right, wrong):
        ta, tb = ids(a["solution"]), ids(b["solution"])
        lengths.append(len(ta))
        native.append(len(ids(native_solution(a))))
        if ta != tb:
            first.append(next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb))))
    facts = {"kind": "experts", "settings_hash": h, "base_model": base_dir, "rows": len(right),
             "expert_style": run.expert_style, "noise_rate": run.noise_rate, "noisy_rows": len(first),
             "first_diff_token": _spread(first), "expert_tokens": _spread(lengths), "native_tokens": _spread(native)}
    write_json(path, facts)
    return facts


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--grid", default=str(GRID_PATH), help="grid file (default benchmarks/grid.yaml)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results; quick: "
                   ".cache/calibrl/bench-quick/results)")
    p.add_argument("--work-dir", default=None, help="run folders (default .cache/calibrl/bench[-quick])")
    p.add_argument("--quick", action="store_true", help="2 methods x 2 seeds, nano model, a few steps")
    p.add_argument("--only", action="append", default=[], metavar="KEY=A,B",
                   help="method=CELL,CELL (alias cell=) or group=main|ablation; repeat to combine")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="only these seeds (of the grid's)")
    p.add_argument("--shard", default=None, help="I/N: every N-th run of the selection, from the I-th")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time; > 1: one process per run, "
                   "--threads each (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: 1 with --jobs > 1, "
                   "else torch's default)")
    p.add_argument("--ablation-base", default=None, help="CalibRL cell the ablations modify (default: grid's "
                   "ablation_base; auto = the best CalibRL variant so far)")
    p.add_argument("--list", action="store_true", help="list the selected runs and whether each is done; run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    if ns.jobs < 1:
        raise SystemExit("reproduce: --jobs must be >= 1")
    grid = load_grid(ns.grid, quick=ns.quick)
    sub = "bench-quick" if ns.quick else "bench"
    cache = Path(os.environ.get("CALIBRL_CACHE", ROOT / ".cache" / "calibrl"))
    results_dir = str(Path(ns.out) if ns.out else (cache / sub / "results" if ns.quick else RESULTS_DIR))
    work_dir = str(Path(ns.work_dir) if ns.work_dir else cache / sub)
    threads = ns.threads or (1 if ns.jobs > 1 or ns.quick else 0)  # tiny matrices: 1 thread, no oversubscription
    only = parse_only(ns.only)
    shard = parse_shard(ns.shard) if ns.shard else None

    wants_ablations = ("group" not in only or "ablation" in only["group"]) and (
        "cell" not in only or any("+" in c for c in only["cell"]))
    base_cell = ablation_base(grid, results_dir, ns.ablation_base) if grid["ablations"] and wants_ablations else None
    runs = select_runs(grid_runs(grid, base_cell), only, ns.seeds, shard)
    h = settings_hash(grid)
    done = [r for r in runs if read_current(result_path(results_dir, r), h) is not None]  # finished, same settings
    todo = [r for r in runs if r not in done]
    stale = [r for r in todo if result_path(results_dir, r).is_file()]
    if stale:
        print(f"{len(stale)} result files were made with other shared settings and will be replaced: "
              + ", ".join(r.run_id for r in stale))
    if grid["ablations"] and wants_ablations and base_cell is None:
        print("ablations: not scheduled yet (ablation_base auto needs finished CalibRL runs of the main table; "
              "or pass --ablation-base CELL)")
    if ns.list:
        for r in runs:
            print(f"{'done' if r in done else 'todo'}  {r.group:<8} {r.run_id}")
        print(f"{len(done)} done, {len(todo)} to run (results in {results_dir})")
        return 0

    _quiet()
    command = "python -m benchmarks.reproduce " + " ".join(argv)
    if threads:  # also for the base evaluation in this process
        import torch

        torch.set_num_threads(threads)
    base_dir = ensure_base(grid, results_dir, work_dir)
    fingerprint = weights_fingerprint(base_dir)
    other_base = [r for r in done if on_base(read_current(result_path(results_dir, r), h), fingerprint) is None]
    if other_base:  # made from another base model (the warm start came out otherwise on this machine)
        print(f"{len(other_base)} result files were made from another base model and will be replaced: "
              + ", ".join(r.run_id for r in other_base), flush=True)
        done = [r for r in done if r not in other_base]
        todo = [r for r in runs if r not in done]
    print(f"{len(runs)} runs selected: {len(done)} already done, {len(todo)} to run; results -> {results_dir}",
          flush=True)
    ensure_expert_facts(grid, base_dir, results_dir)
    failed: list[str] = []
    t0 = time.time()

    def report(i: int, run_id: str, short: dict | None, error: str | None) -> None:
        if error is not None:
            failed.append(run_id)
            print(f"[{i}/{len(todo)}] {run_id}: FAILED {error}", flush=True)
            return
        print(f"[{i}/{len(todo)}] {run_id}: test {100 * short['test']:.1f}%  ood {100 * short['ood']:.1f}%  "
              f"entropy {short['entropy']:.3f}  {short['per_step_s']:.2f} s/step  {short['total_s']:.0f} s  "
              f"(elapsed {time.time() - t0:.0f} s)", flush=True)

    if ns.jobs == 1:
        for i, spec in enumerate(todo, 1):
            report(i, *_run_in_worker(spec, grid, base_dir, results_dir, work_dir, threads, command))
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(ns.jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
            futures = [pool.submit(_run_in_worker, spec, grid, base_dir, results_dir, work_dir, threads, command, True)
                       for spec in todo]
            for i, fut in enumerate(as_completed(futures), 1):
                report(i, *fut.result())
    print(f"{len(todo) - len(failed)} runs finished, {len(failed)} failed in {time.time() - t0:.0f} s"
          + (f": {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
