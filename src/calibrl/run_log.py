"""A run folder: what a training run leaves behind for a person (or `calibrl.plots`) to inspect.

Files, all UTF-8 JSON:
- `metrics.jsonl`  one object per TRL log event, `{"step": int, **logs}`; numbers are floats (ints stay ints),
                   non-finite numbers are written as null so every line is strict JSON.
- `eval.jsonl`     one object per held-out evaluation of one eval set:
                   `{"step": int, "split": str, "accuracy": float, "format_rate": float, "n": int, "stderr": float}`.
- `run.json`       metadata, merged by every `write_run_info` call: typically `name`, `method`, `config`; the
                   first write adds `start_time` (ISO 8601) and `versions` (`calibrl.files.versions`); `MetricsLogger` adds `wall_time_s`, `global_step` and `final_metrics` at the end,
                   `HeldoutEvalCallback` adds `final_eval` ({split: {...}}).

Both callbacks write on the main process only (`state.is_world_process_zero`) and never call collective
operations, so a multi-process run cannot deadlock on them: the other processes simply wait at their next
collective while process 0 evaluates.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from typing import Any

from transformers import TrainerCallback

from calibrl.files import atomic_write_json, versions

__all__ = ["HeldoutEvalCallback", "MetricsLogger", "read_run", "write_run_info"]

METRICS_FILE, EVAL_FILE, INFO_FILE = "metrics.jsonl", "eval.jsonl", "run.json"


# ----------------------------------------------------------------------------------------------------------
# JSON helpers
# ----------------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of `value`: tensors and numpy scalars become numbers, NaN/inf null, configs dicts."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and tuple(getattr(value, "shape", (None,))) == ():  # numpy scalar, 0-d tensor
        return _jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return _jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _append_line(path: str, record: dict) -> None:
    """Append one JSON line in a single write, flushed, so a reader never sees half a record."""
    line = json.dumps(_jsonable(record), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def write_run_info(run_dir: str | os.PathLike, **info: Any) -> None:
    """Create or update `run_dir/run.json` with `info` (top-level keys are replaced, others kept).

    The first write also records `start_time` and `versions`. The file is replaced atomically.
    """
    run_dir = os.fspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, INFO_FILE)
    current: dict[str, Any] = {}
    if os.path.exists(path):
        current = _read_json(path)
    else:
        current["start_time"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        current["versions"] = versions()
    current.update(_jsonable(info))
    atomic_write_json(path, current)


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: corrupt line ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with an integer 'step'")
            records.append(record)
    return records


def read_run(run_dir: str | os.PathLike) -> dict:
    """Load a run folder: `{"name", "info" (run.json), "metrics" (list of dicts), "eval" (list of dicts)}`.

    `name` is run.json's `name`, else the folder name. Raises FileNotFoundError if the folder is missing or
    holds none of run.json / metrics.jsonl / eval.jsonl, ValueError (with file and line) on a corrupt line.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir!r} does not exist")
    paths = {name: os.path.join(run_dir, name) for name in (INFO_FILE, METRICS_FILE, EVAL_FILE)}
    if not any(os.path.exists(p) for p in paths.values()):
        raise FileNotFoundError(f"{run_dir!r} is not a run folder: it has no {INFO_FILE}, {METRICS_FILE} or {EVAL_FILE}")
    info = _read_json(paths[INFO_FILE]) if os.path.exists(paths[INFO_FILE]) else {}
    name = info.get("name") or os.path.basename(os.path.normpath(run_dir))
    return {"name": str(name), "info": info, "metrics": _read_jsonl(paths[METRICS_FILE]),
            "eval": _read_jsonl(paths[EVAL_FILE])}


# ----------------------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------------------
class MetricsLogger(TrainerCallback):
    """Appends every TRL log event to `run_dir/metrics.jsonl`; records wall time and last metrics in run.json."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, METRICS_FILE)
        self._start: float | None = None
        self._last: dict[str, Any] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.time()
        if state.is_world_process_zero:
            os.makedirs(self.run_dir, exist_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        record = {"step": int(state.global_step), **_jsonable(dict(logs))}
        _append_line(self.path, record)
        self._last.update({k: v for k, v in record.items() if k != "step" and v is not None})

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        wall = None if self._start is None else round(time.time() - self._start, 3)
        write_run_info(self.run_dir, wall_time_s=wall, global_step=int(state.global_step), final_metrics=self._last)


def _is_sharded(model) -> bool:
    """Whether parameters live sharded across processes (DeepSpeed ZeRO-3, FSDP 1 or 2): then generating on
    one process would wait forever for the others to gather the weights."""
    if any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" for p in model.parameters()):
        return True
    modules = model.modules() if hasattr(model, "modules") else []
    return any("FullyShardedDataParallel" in type(m).__name__ for m in modules)


class HeldoutEvalCallback(TrainerCallback):
    """Greedy held-out evaluation at the start, every `every_n_steps` optimizer steps and at the end.

    Each evaluation appends one line per eval set to `run_dir/eval.jsonl` (the set's name is the `split`
    field). It runs on process 0 only, on the `model` the Trainer passes to callbacks, and calls no
    collective ops. A model whose parameters are sharded across processes (DeepSpeed ZeRO-3, FSDP) cannot
    generate on one process alone: evaluation is then skipped with a warning rather than hanging the run.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        processing_class,
        eval_sets: dict[str, list[dict]],
        every_n_steps: int,
        max_new_tokens: int = 64,
        batch_size: int = 32,
    ):
        if not isinstance(eval_sets, dict) or not eval_sets:
            raise ValueError("eval_sets must be a non-empty dict {name: rows}")
        for name, rows in eval_sets.items():
            if not rows:
                raise ValueError(f"eval_sets[{name!r}] is empty")
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be an int >= 0 (0: only at start and end)")
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, EVAL_FILE)
        self.processing_class = processing_class
        self.eval_sets = eval_sets
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.last_step: int | None = None
        self.last_results: dict[str, dict] = {}
        self._warned = False

    def evaluate_now(self, model, step: int) -> dict[str, dict]:
        """Evaluate every set at `step`, append to eval.jsonl, and return {split: record}."""
        from calibrl.evaluate import evaluate

        os.makedirs(self.run_dir, exist_ok=True)
        records = {}
        for name, rows in self.eval_sets.items():
            results = evaluate(model, self.processing_class, rows, max_new_tokens=self.max_new_tokens,
                               batch_size=self.batch_size)
            overall = results["overall"]
            record = {"step": int(step), "split": name, "accuracy": overall["accuracy"],
                      "format_rate": overall["format_rate"], "n": overall["n"], "stderr": overall["stderr"]}
            _append_line(self.path, record)
            records[name] = record
        self.last_step, self.last_results = int(step), records
        return records

    def _maybe_evaluate(self, state, model) -> None:
        if not state.is_world_process_zero or self.last_step == state.global_step:
            return
        if model is None:
            raise ValueError("HeldoutEvalCallback: the Trainer passed no `model` to the callback")
        if _is_sharded(model):
            if not self._warned:
                import warnings

                warnings.warn("HeldoutEvalCallback: the model's parameters are sharded across processes (ZeRO-3 "
                              "or FSDP), so process 0 cannot generate alone: held-out evaluation skipped",
                              stacklevel=2)
                self._warned = True
            return
        self.evaluate_now(model, state.global_step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._maybe_evaluate(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._maybe_evaluate(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._maybe_evaluate(state, model)
        if state.is_world_process_zero and self.last_results:
            write_run_info(self.run_dir, final_eval=self.last_results)
