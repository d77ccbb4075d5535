"""A run folder: what a training run leaves behind for a person (or `calibrl.plots`) to inspect.

Files, all UTF-8 JSON:
- `metrics.jsonl`  one object per TRL log event, `{"step": int, **logs}`; numbers are floats (ints stay ints),
                   non-finite numbers are written as null so every line is strict JSON.
- `eval.jsonl`     one object per held-out evaluation of one eval set:
                   `{"step": int, "split": str, "accuracy": float, "format_rate": float, "n": int, "stderr": float}`.
- `run.json`       metadata, merged by every `write_run_info` call: typically `name`, `method`, `config`; the
                   first write adds `start_time` (ISO 8601) and `versions` (`calibrl.files.versions`); `MetricsLogger` adds `wall_time_s`, `global_step` and `final_metrics` at the end,
                   `HeldoutEvalCallback` adds `final_eval` ({split: {...}}).

Resuming keeps every step once: when training starts at step N (a resume), both callbacks move the lines
past step N (and an end-of-training summary at N) into `<file>.cut-at-N` beside the log, with a one-line note,
so the log continues exactly where the checkpoint was taken; `read_run` repairs (with a warning) a log
written before this, where a resume repeated steps. `MetricsLogger` saves its time in the checkpoint, so
`wall_time_s` is the training time of the whole run across resumes.

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
import warnings
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from calibrl.files import versions
from calibrl.storage import atomic_write_json, atomic_write_text

__all__ = ["HeldoutEvalCallback", "MetricsLogger", "read_run", "rewind_log", "write_run_info"]

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


def rewind_log(path: str, step: int, note=print) -> str | None:
    """Move the lines of the jsonl log `path` past `step` (and an end-of-training summary at `step`: the
    session that resumes writes its own) to `<path>.cut-at-<step>`; returns that file, or None if nothing
    was past `step`. Called when training (re)starts at `step`, so every step is logged once."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep, cut = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # left in place for read_run to name
            keep.append(line)
            continue
        s = record.get("step") if isinstance(record, dict) else None
        later = isinstance(s, int) and (s > step or (s == step and "train_runtime" in record))
        (cut if later else keep).append(line if line.endswith("\n") else line + "\n")
    if not cut:
        return None
    aside, n = f"{path}.cut-at-{step}", 1
    while os.path.exists(aside):
        n += 1
        aside = f"{path}.cut-at-{step}.{n}"
    atomic_write_text(aside, "".join(cut))  # first, so a kill in between loses nothing
    atomic_write_text(path, "".join(keep))
    note(f"calibrl: training starts at step {step}: {len(cut)} line{'s' if len(cut) != 1 else ''} of "
         f"{os.path.basename(path)} past it moved to {os.path.basename(aside)}")
    return aside


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
    return _repair_resumed(records, path)


def _repair_resumed(records: list[dict], path: str) -> list[dict]:
    """A log where a resume repeated steps (written before logs were rewound): keep the later lines of
    every repeated step, loudly. A step lower than the one before starts a resumed part; in eval.jsonl a
    (step, split) pair seen again replaces the earlier one."""
    out: list[dict] = []
    dropped = 0
    for record in records:
        if out and record["step"] < out[-1]["step"]:
            kept = [r for r in out if r["step"] < record["step"]]
            dropped += len(out) - len(kept)
            out = kept
        elif "split" in record:
            kept = [r for r in out if (r["step"], r.get("split")) != (record["step"], record["split"])]
            dropped += len(out) - len(kept)
            out = kept
        out.append(record)
    if dropped:
        warnings.warn(f"{path}: {dropped} line{'s' if dropped != 1 else ''} of steps that a resume logged again "
                      "left out (the later lines of each step are kept)", stacklevel=3)
    return out


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
class MetricsLogger(TrainerCallback, ExportableState):
    """Appends every TRL log event to `run_dir/metrics.jsonl`; records wall time and last metrics in run.json.

    Its training time so far is part of every checkpoint (TRL's `ExportableState`), so after a resume
    `wall_time_s` covers the whole run."""

    def __init__(self, run_dir: str | os.PathLike, train_seconds_before: float = 0.0):
        self.run_dir = os.fspath(run_dir)
        self.path = os.path.join(self.run_dir, METRICS_FILE)
        self.train_seconds_before = float(train_seconds_before)  # of the sessions before this one
        self._start: float | None = None
        self._last: dict[str, Any] = {}

    def train_seconds(self) -> float:
        return self.train_seconds_before + (0.0 if self._start is None else time.time() - self._start)

    def state(self) -> dict:
        return {"args": {"run_dir": self.run_dir}, "attributes": {"train_seconds_before": self.train_seconds()}}

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.time()
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        saved = saved.get("attributes", {}) if state.global_step > 0 and isinstance(saved, dict) else {}
        self.train_seconds_before = float(saved.get("train_seconds_before", 0.0))
        if state.is_world_process_zero:
            os.makedirs(self.run_dir, exist_ok=True)
            rewind_log(self.path, int(state.global_step))
            self._last = {}
            for record in _read_jsonl(self.path):
                self._last.update({k: v for k, v in record.items() if k != "step" and v is not None})

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
        wall = None if self._start is None else round(self.train_seconds(), 3)
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
        """Evaluate at the first step unless a resume finds that done: a resumed run evaluates exactly at the
        steps an uninterrupted one does (the start, every `every_n_steps`, the end), each once."""
        step = int(state.global_step)
        if state.is_world_process_zero:
            os.makedirs(self.run_dir, exist_ok=True)
            rewind_log(self.path, step)
            done = {r["split"]: r for r in _read_jsonl(self.path) if r["step"] == step and "split" in r}
            if set(self.eval_sets) <= set(done):
                self.last_step, self.last_results = step, {name: done[name] for name in self.eval_sets}
        if step == 0 or (self.every_n_steps and step % self.every_n_steps == 0):
            self._maybe_evaluate(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._maybe_evaluate(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._maybe_evaluate(state, model)
        if state.is_world_process_zero and self.last_results:
            write_run_info(self.run_dir, final_eval=self.last_results)
