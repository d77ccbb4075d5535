"""Crash-consistent checkpoints for `CalibRLTrainer`: each is written whole or not at all, and found again.

A checkpoint is written into `OUTPUT/.tmp-checkpoint-N/checkpoint-N` (weights, optimizer, scheduler, RNG
states, trainer state, and last our `calibrl_state.json`: the run counters and a manifest of every file with
its size), flushed to disk, and renamed to `OUTPUT/checkpoint-N` in one step. A kill at any moment therefore
leaves every `checkpoint-N` folder whole; the partial `.tmp-*` folder is removed when training starts again.
The final model (`trainer.save_model(path)`) is written the same way.

`resume_from_checkpoint="latest"` (or `True` / `"true"`) resumes from the newest complete checkpoint of
`output_dir`, skipping incomplete ones (written by another tool, or copied half) with a one-line note, and
starts from step 0 when there is none. The run counters (reward faults, expert counts, skipped optimizer
steps) are restored from the checkpoint, so run totals cover the whole run, not the last resumed part.

A write that fails for lack of space or permission raises `StorageError` with one line naming the path, the
cause and the last complete checkpoint; partial files are removed, complete checkpoints are never touched.
The trainer's methods delegate here (`CalibRLTrainer.train`, `_save_checkpoint`, `save_model`, ...).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from calibrl.storage import (
    StorageError,
    check_free_space,
    check_writable,
    human_bytes,
    publish_dir,
    storage_cause,
)

STATE_FILE = "calibrl_state.json"
STAGING_PREFIX = ".tmp-"  # hidden, and outside TRL's `checkpoint-*` glob: rotation never counts a partial one
ASIDE_PREFIX = ".old-"  # storage.publish_dir moves a replaced folder aside under this name
LATEST = ("latest", "true")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


class CheckpointError(ValueError):
    """`resume_from_checkpoint` names a folder that is not a complete checkpoint (one line)."""


# ----------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------------------
def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is.

    Ours carry a manifest (every file and its size) written last, so a checkpoint is complete exactly when
    the manifest is there and every file it lists has its size. A checkpoint without one (another tool's)
    must at least hold a trainer state and model weights, and no empty file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return "not a folder"
    state = os.path.join(path, STATE_FILE)
    if os.path.isfile(state):
        try:
            with open(state, encoding="utf-8") as f:
                data = json.load(f)
            if data.get("complete") is False:
                return "its save did not finish"
            files = data["files"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{STATE_FILE} is unreadable"
        for rel, size in files.items():
            p = os.path.join(path, rel)
            if not os.path.isfile(p):
                return f"{rel} is missing"
            if os.path.getsize(p) != size:
                return f"{rel} has {os.path.getsize(p)} bytes, {size} were written"
        return None
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return "no trainer_state.json"
    names = os.listdir(path)
    if not any(n in _WEIGHT_FILES for n in names) and not any(n.startswith("global_step") for n in names):
        return "no model weights"
    for root, _, files in os.walk(path):
        for name in files:
            if os.path.getsize(os.path.join(root, name)) == 0:
                return f"{os.path.relpath(os.path.join(root, name), path)} is empty"
    return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of every `checkpoint-N` folder in `output_dir`, oldest step first (complete or not)."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike, note: Callable[[str], None] = print) -> str | None:
    """The newest complete checkpoint in `output_dir`, or None; each incomplete newer one is noted in a line."""
    for _, path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        note(f"calibrl: skipping incomplete checkpoint {path} ({problem})")
    return None


def resolve_resume(value: Any, output_dir: str | os.PathLike, note: Callable[[str], None] = print) -> str | None:
    """The checkpoint folder to resume from, for a `resume_from_checkpoint` value: None / False (start
    fresh), "latest" / "true" / True (the newest complete one in `output_dir`, None if there is none), or a
    path, which must be a complete checkpoint (CheckpointError otherwise)."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "false")):
        return None
    if value is True or (isinstance(value, str) and value.strip().lower() in LATEST):
        found = latest_checkpoint(output_dir, note)
        note(f"calibrl: resuming from {found}" if found else
             f"calibrl: no complete checkpoint in {output_dir}: starting from step 0")
        return found
    path = os.fspath(value)
    if not os.path.exists(path):
        raise CheckpointError(f"resume_from_checkpoint: {path} does not exist (--resume_from_checkpoint latest "
                              "takes the newest complete checkpoint of output_dir)")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"resume_from_checkpoint: {path} is not a complete checkpoint ({problem}); "
                              "--resume_from_checkpoint latest takes the newest complete one")
    return path


def remove_partial_writes(output_dir: str | os.PathLike) -> None:
    """Clean up after a kill: delete partial `.tmp-*` files and folders, and put back a folder that was
    moved aside to be replaced if its replacement never arrived."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(ASIDE_PREFIX):
            original = os.path.join(output_dir, name[len(ASIDE_PREFIX):].rsplit("-", 1)[0])
            if not os.path.exists(original):
                os.rename(path, original)
                continue
        elif not name.startswith((STAGING_PREFIX, ".calibrl-probe-")):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


# ----------------------------------------------------------------------------------------------------------
# Counters kept across resumes
# ----------------------------------------------------------------------------------------------------------
def run_counters(trainer) -> dict:
    """What the run summary totals and a resume must not reset (already summed over processes)."""
    return {"run_counts": dict(getattr(trainer, "run_counts", {})),
            "skipped_steps": int(getattr(trainer, "skipped_steps", 0))}


def restore_run_counters(trainer, checkpoint: str) -> None:
    """Set the trainer's run counters to those saved in `checkpoint` (a checkpoint without them: unchanged)."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        counters = json.load(f).get("counters", {})
    if "run_counts" in counters and hasattr(trainer, "run_counts"):
        trainer.run_counts = {k: float(v) for k, v in counters["run_counts"].items()}
    if "skipped_steps" in counters and hasattr(trainer, "skipped_steps"):
        trainer.skipped_steps = int(counters["skipped_steps"])


def _write_state_file(folder: str, counters: dict) -> None:
    """The manifest (every file under `folder` with its size) and the counters; written last."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(root, name)
            files[os.path.relpath(p, folder)] = os.path.getsize(p)
    files.pop(STATE_FILE, None)
    with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
        json.dump({"format": 1, "counters": counters, "files": files}, f, indent=1, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------
def expected_checkpoint_bytes(model) -> tuple[int, int]:
    """(weights, optimizer) bytes a checkpoint of `model` takes, estimated for an Adam-type optimizer (two
    moments per trainable parameter, in the parameter's dtype)."""
    weights = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()  # DeepSpeed ZeRO-3 keeps the full size aside
        weights += n * p.element_size()
        trainable += n * p.element_size() if p.requires_grad else 0
    return weights, 2 * trainable


def _kept(output_dir: str, say_none: bool = True) -> str:
    last = latest_checkpoint(output_dir, note=lambda _: None)
    if last:
        return f"; the last complete checkpoint is {last} (resume with --resume_from_checkpoint latest)"
    return "; no complete checkpoint had been written" if say_none else ""


def _storage_failure(e: BaseException, what: str, folder: str, output_dir: str,
                     say_none: bool = True) -> StorageError | None:
    """A StorageError for exception `e` raised while writing `what` into `folder`, or None if `e` is not a
    storage fault. Call it before deleting the partial files (a full disk is diagnosed by a probe write)."""
    if isinstance(e, StorageError):
        return e
    found = storage_cause(e, folder if os.path.isdir(folder) else None)
    if found is None:
        return None
    return StorageError(f"could not write {what}: {found[1]}{_kept(output_dir, say_none)}", found[0])


def _sync(trainer) -> None:
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None:
        accelerator.wait_for_everyone()


def save_checkpoint(trainer, parent_save: Callable[[], None], trial=None) -> None:
    """Run TRL's `_save_checkpoint` (`parent_save`) into a staging folder, then publish it whole.

    The trainer's `_get_output_dir` must return `trainer._calibrl_staging` while it is set: TRL then writes
    `<staging>/checkpoint-N` (and rotates old checkpoints in the staging folder, where there are none).
    Rotation of the real ones runs after the new checkpoint is in place."""
    from transformers.trainer_callback import ExportableState
    from transformers.trainer_utils import rotate_checkpoints

    step = trainer.state.global_step
    run_dir = trainer._get_output_dir(trial)
    name = f"checkpoint-{step}"
    final = os.path.join(run_dir, name)
    staging = os.path.join(run_dir, STAGING_PREFIX + name)
    staged = os.path.join(staging, name)
    writer = trainer.args.should_save
    # transformers updates stateful callbacks by name and fails on one the resumed state does not know
    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, ExportableState):
            trainer.state.stateful_callbacks.setdefault(type(cb).__name__, cb.state())
    if trainer.args.push_to_hub:
        return _save_in_place(trainer, parent_save, final)
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
    _sync(trainer)  # no process writes into the staging folder before it is fresh
    trainer._calibrl_staging = staging
    try:
        parent_save()
        trainer._calibrl_staging = None
        _sync(trainer)  # every process has written its part (RNG state, shards)
        if writer:
            _fix_best_checkpoint(trainer, staging, run_dir, staged)
            _write_state_file(staged, run_counters(trainer))
            _fsync_logs(run_dir)  # the log lines up to this step reach the disk before the checkpoint does
            publish_dir(staged, final)
            with contextlib.suppress(OSError):
                os.rmdir(staging)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                               best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
        _sync(trainer)
    except BaseException as e:
        trainer._calibrl_staging = None
        failure = None
        if writer and not isinstance(e, KeyboardInterrupt):
            failure = _storage_failure(e, final, staging, run_dir)
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        if failure is None or failure is e:
            raise
        raise failure from e


def _save_in_place(trainer, parent_save: Callable[[], None], final: str) -> None:
    """With push_to_hub, TRL uploads from the checkpoint's own folder in the background, so the checkpoint is
    written in place: a manifest saying "not finished" comes first and the real one last, so that a kill in
    between still leaves a checkpoint `latest` skips."""
    writer = trainer.args.should_save
    if writer:
        os.makedirs(final, exist_ok=True)
        with open(os.path.join(final, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({"format": 1, "complete": False}, f)
    _sync(trainer)
    parent_save()
    _sync(trainer)
    if writer:
        _write_state_file(final, run_counters(trainer))


def _fsync_logs(run_dir: str) -> None:
    for name in os.listdir(run_dir):
        if name.endswith(".jsonl"):
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(run_dir, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _fix_best_checkpoint(trainer, staging: str, run_dir: str, staged: str) -> None:
    """TRL records the best checkpoint by the folder it wrote to: point it at the published one."""
    best = trainer.state.best_model_checkpoint
    if best and os.path.abspath(best).startswith(os.path.abspath(staging) + os.sep):
        trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        trainer.state.save_to_json(os.path.join(staged, "trainer_state.json"))


def save_model(trainer, parent_save_model: Callable[[str], None], output_dir: str) -> None:
    """Run TRL's `save_model` (`parent_save_model(folder)`) into a staging folder next to `output_dir`, then
    publish it whole; a storage fault raises StorageError (one line) and leaves no partial folder."""
    final = os.path.abspath(output_dir)
    staging = os.path.join(os.path.dirname(final), STAGING_PREFIX + os.path.basename(final))
    writer = trainer.args.should_save
    try:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        parent_save_model(staging)
        _sync(trainer)
        if writer:
            publish_dir(staging, final)
        _sync(trainer)
    except BaseException as e:
        failure = None
        if writer and not isinstance(e, KeyboardInterrupt):
            failure = _storage_failure(e, f"the model to {output_dir}", staging, trainer.args.output_dir,
                                       say_none=False)
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        if failure is None or failure is e:
            raise
        raise failure from e


def save_final_model(trainer, path: str, interactive: bool | None = None) -> str:
    """Save the trained model to `path`; returns the path. The weights are the result of the run, so a
    storage fault does not lose them: they are written to a rescue folder instead (the temp folder, then
    the home folder, each on another file system when the disk is full), and when none takes them and a
    person is at the terminal, the weights stay in memory until a retry succeeds. The StorageError raised
    then says where the weights went (one line)."""
    try:
        trainer.save_model(path)
        return path
    except StorageError as e:
        failure = e
    if not trainer.args.should_save:
        raise failure
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run = os.path.basename(os.path.dirname(os.path.abspath(path))) or "run"
    for folder in rescue_folders(path, failure.errno):
        target = os.path.join(folder, f"calibrl-rescue-{run}-{stamp}", os.path.basename(os.path.abspath(path)))
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            trainer.save_model(target)
        except OSError:  # StorageError included: try the next folder
            continue
        raise StorageError(f"{failure}; the trained model was saved to {target} instead", failure.errno)
    interactive = sys.stdin is not None and sys.stdin.isatty() if interactive is None else interactive
    while interactive:
        print(f"calibrl: {failure}\ncalibrl: the trained weights are still in memory: free some space, then press "
              "Enter to retry (Ctrl-C gives up)", file=sys.stderr, flush=True)
        try:
            input()
        except (EOFError, KeyboardInterrupt):
            break
        try:
            trainer.save_model(path)
            return path
        except StorageError as e:
            failure = e
    raise StorageError(f"{failure}; no rescue folder could take the trained model either", failure.errno)


def rescue_folders(path: str, code: int | None) -> list[str]:
    """Where the final model goes when `path` cannot take it: the temp folder and the home folder, skipping
    those on the same file system as `path` when that one is full or read-only."""
    from calibrl.storage import _existing_ancestor

    try:
        failed_dev = os.stat(_existing_ancestor(path)).st_dev
    except OSError:
        failed_dev = None
    out = []
    for folder in (tempfile.gettempdir(), os.path.expanduser("~")):
        try:
            dev = os.stat(folder).st_dev
        except OSError:
            continue
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and dev == failed_dev:
            continue
        if folder not in out:
            out.append(folder)
    return out


# ----------------------------------------------------------------------------------------------------------
# Training: resume, checks before the first step, Ctrl-C
# ----------------------------------------------------------------------------------------------------------
def train(trainer, parent_train: Callable[..., Any], resume_from_checkpoint, args: tuple, kwargs: dict):
    """`Trainer.train` with `resume_from_checkpoint="latest"`, writability and free-space checks before any
    work, run counters restored on resume, a whole checkpoint on Ctrl-C, and storage faults as one line."""
    output_dir = trainer.args.output_dir
    main = trainer.is_world_process_zero()
    note = (lambda m: print(m, flush=True)) if main else (lambda _: None)
    resume = resolve_resume(resume_from_checkpoint, output_dir, note)
    if trainer.args.should_save:
        check_writable(output_dir)
        remove_partial_writes(output_dir)
        weights, optimizer = expected_checkpoint_bytes(trainer.model)
        check_free_space(output_dir, 2 * weights + optimizer, f"a checkpoint ({human_bytes(weights)} of weights, "
                         f"{human_bytes(optimizer)} of optimizer state) and the final model")
    if resume is not None:
        restore_run_counters(trainer, resume)
    if not any(type(cb).__name__ == "_NoStepPastTheLast" for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(_no_step_past_the_last())
    start = time.time()
    try:
        return parent_train(resume, *args, **kwargs)
    except _AllStepsDone:
        # Resumed from the checkpoint of the last step (a kill after it, before the end): transformers would
        # train one step more; end the run as an uninterrupted one ends instead (summary log, callbacks).
        return trainer._finalize_training(None, 0, start)
    except KeyboardInterrupt:
        save_interrupt_checkpoint(trainer)
        raise
    except Exception as e:
        if isinstance(e, StorageError):
            raise
        found = storage_cause(e)  # a log file or anything else TRL writes: its errno names the cause
        if found is None:
            raise
        where = getattr(e, "filename", None) or output_dir
        raise StorageError(f"could not write {where}: {found[1]}{_kept(output_dir)}", found[0]) from e


class _AllStepsDone(Exception):
    """Raised before a step past `max_steps` would begin."""


def _no_step_past_the_last():
    from transformers import TrainerCallback

    class _NoStepPastTheLast(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if 0 < state.max_steps <= state.global_step:
                raise _AllStepsDone

    return _NoStepPastTheLast()


def save_interrupt_checkpoint(trainer) -> None:
    """On Ctrl-C: a checkpoint of the last finished step (the interrupted step is redone on resume), unless
    one is already complete, or the interrupt came inside a weight update (then the state is between two
    steps and no checkpoint of it is exact). Further Ctrl-C wait until it is written."""
    step = trainer.state.global_step
    main = trainer.is_world_process_zero()
    say = (lambda m: print(m, flush=True)) if main else (lambda _: None)
    if step == 0:
        return
    output_dir = trainer.args.output_dir
    final = os.path.join(output_dir, f"checkpoint-{step}")
    if _inside_weight_update(trainer):
        say(f"\ninterrupted inside the weight update of step {step + 1}: no checkpoint can be exact there"
            f"{_kept(output_dir)}")
        return
    if checkpoint_problem(final) is None:
        say(f"\ninterrupted: the checkpoint of step {step} is complete in {final}; resume with "
            "--resume_from_checkpoint latest")
        return
    with _deferred_sigint(lambda: say(f"\ncalibrl: still writing the checkpoint of step {step}; it is written "
                                      "whole or not at all, so a kill now keeps the previous one")):
        trainer._save_checkpoint(trainer.model, trial=None)
    say(f"\ninterrupted: checkpoint of step {step} written to {final}; resume with --resume_from_checkpoint latest")


def _inside_weight_update(trainer) -> bool:
    """Whether the optimizer or the LR schedule already counted a step that `global_step` has not: an
    interrupt between `optimizer.step()` and the end of the step."""
    step = trainer.state.global_step
    try:
        schedule = getattr(trainer, "lr_scheduler", None)
        if schedule is not None and getattr(schedule, "last_epoch", -1) > step:
            return True
        optimizer = getattr(trainer, "optimizer", None)
        states = getattr(optimizer, "state", None) or {}
        counts = [int(s["step"]) for s in states.values() if isinstance(s, dict) and "step" in s]
        skipped = int(getattr(trainer, "all_skipped_steps", 0))
        return bool(counts) and max(counts) > step - skipped
    except Exception:  # an optimizer or schedule of another kind: no evidence either way
        return False


@contextlib.contextmanager
def _deferred_sigint(on_signal: Callable[[], None]):
    """Ignore SIGINT (calling `on_signal` instead) for the duration, in the main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: on_signal())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
