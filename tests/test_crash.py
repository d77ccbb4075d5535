"""Nothing lost when the machine or the disk fails: kill -9 of `calibrl train` at random moments (inside
checkpoint saves too) then `--resume_from_checkpoint latest`; a full disk and a read-only output folder;
storage and input faults as one line.

`calibrl train` runs as forked children of this process, which has already imported torch and TRL: each
child runs `calibrl.cli.main`, exactly what the console script runs, without paying the imports again.
The children are killed with SIGKILL from here at seeded random moments, or as soon as a checkpoint's
staging folder appears (a kill inside a save). A full disk is a small tmpfs where this process may mount
one (root); elsewhere the write call raises the OSError a full disk raises.
"""

import errno
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from calibrl.checkpoints import STAGING_PREFIX, checkpoint_problem, list_checkpoints

TRAIN = {
    "model": "tiny:qwen2_5_vl:nano", "dataset": "task:digits", "n_train": 32, "difficulty": [1],
    "max_steps": 6, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 12,
    "learning_rate": "5e-3", "logging_steps": 1, "save_strategy": "steps", "save_steps": 2,
    "activation_checkpointing": False, "eval_every": 3, "n_eval": 4, "seed": 0, "disable_tqdm": True,
    # rewards that vary within groups, so that every step moves the weights
    "reward_funcs": ["helpers:hash_accuracy", "helpers:hash_format"], "reward_weights": [1.0, 0.1],
}
# wall-clock values, and transformers' end-of-run train_loss, which averages the last session's steps only
SESSION_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}
FORK = multiprocessing.get_context("fork")


# ------------------------------------------------------------------ running `calibrl train` as a child
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    saved = {k: os.environ.get(k) for k in ("CALIBRL_CACHE", "TOKENIZERS_PARALLELISM")}
    os.environ.update(CALIBRL_CACHE=str(root / "cache"), TOKENIZERS_PARALLELISM="false")
    import calibrl.cli  # noqa: F401  (the children start from these imports)
    import calibrl.trainer  # noqa: F401
    from calibrl.recipes import tiny_model_dir

    tiny_model_dir(TRAIN["model"], seed=0)
    (root / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _child(argv: list[str], log: str, env: dict) -> None:
    sys.stdout = sys.stderr = open(log, "a", buffering=1)
    os.environ.update(env)
    from calibrl import cli

    code = cli.main(argv)
    sys.stdout.flush()
    os._exit(code)


def start(argv: list[str], log: Path, **env) -> multiprocessing.Process:
    p = FORK.Process(target=_child, args=(argv, str(log), env))
    p.start()
    return p


def train_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(root / "train.yaml"), "--output_dir", str(out), *extra]


def finish(p: multiprocessing.Process, log: Path, timeout: float = 180) -> str:
    p.join(timeout)
    text = log.read_text() if log.exists() else ""
    assert p.exitcode == 0, f"exit {p.exitcode}:\n{text[-3000:]}"
    return text


def kill(p: multiprocessing.Process) -> None:
    if p.is_alive():
        os.kill(p.pid, 9)
    p.join(30)


def staging_steps(out: Path) -> set[int]:
    try:
        names = os.listdir(out)
    except FileNotFoundError:
        return set()
    prefix = STAGING_PREFIX + "checkpoint-"
    return {int(n[len(prefix):]) for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()}


def run_and_kill(root: Path, out: Path, log: Path, rng: random.Random, plan: str, duration: float,
                 *extra: str) -> str:
    """Start `calibrl train`, kill -9 it as `plan` says; returns what happened (for the failure message)."""
    p = start(train_argv(root, out, *extra), log)
    t0 = time.time()
    if plan == "time":
        at = rng.uniform(0.15, 1.0) * duration
        while p.is_alive() and time.time() - t0 < at:
            time.sleep(0.005)
        what = f"killed at {time.time() - t0:.2f} s"
    else:  # inside the save of a checkpoint (`save:N`) or of the final model (`save:model`)
        target = plan.split(":")[1]
        while p.is_alive():
            if (target == "model" and (out / f"{STAGING_PREFIX}model").exists()) or \
                    (target != "model" and int(target) in staging_steps(out)):
                break
            time.sleep(0.0005)
        what = f"killed inside the save of {target}"
    alive = p.is_alive()
    kill(p)
    if not alive:
        return "finished before the kill"
    # the claim under test: after a kill at any moment, every checkpoint-N folder is whole
    for _, path in list_checkpoints(out):
        assert checkpoint_problem(path) is None, f"{what}: {path} is incomplete ({checkpoint_problem(path)})"
    return what


def lines(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in SESSION_KEYS}
            for line in path.read_text().splitlines() if line.strip()]


def assert_same_run(out: Path, ref: Path, what: str) -> None:
    a, b = load_file(str(out / "model" / "model.safetensors")), load_file(str(ref / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:2]}"
    assert lines(out / "metrics.jsonl") == lines(ref / "metrics.jsonl"), what
    assert lines(out / "eval.jsonl") == lines(ref / "eval.jsonl"), what
    info, ref_info = (json.loads((d / "run.json").read_text()) for d in (out, ref))
    assert info["counts"] == ref_info["counts"], what
    assert info["global_step"] == ref_info["global_step"] == TRAIN["max_steps"]


@pytest.fixture(scope="module")
def reference(root):
    out = root / "reference"
    t0 = time.time()
    finish(start(train_argv(root, out), root / "reference.log"), root / "reference.log")
    duration = time.time() - t0
    losses = [r["loss"] for r in lines(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == TRAIN["max_steps"] and any(v != 0 for v in losses)  # the weights do move
    return out, duration


# ------------------------------------------------------------------ kill -9, then resume from the latest
KILL_PLANS = {
    0: ["save:2"],  # inside the first checkpoint: nothing complete yet, so latest starts from step 0
    1: ["save:4"],  # inside a later one: latest skips it and takes checkpoint-2
    2: ["time"],
    3: ["time", "save:6"],  # killed twice: the second time while resuming
    4: ["save:model"],  # inside the final model's save, after the last checkpoint
}


@pytest.mark.parametrize("trial", sorted(KILL_PLANS))
def test_kill_9_then_resume_latest_gives_the_uninterrupted_run(root, reference, trial):
    ref, duration = reference
    rng = random.Random(trial)
    out = root / f"trial{trial}"
    log = root / f"trial{trial}.log"
    events = []
    for plan in KILL_PLANS[trial]:
        extra = ("--resume_from_checkpoint", "latest") if events else ()
        events.append(run_and_kill(root, out, log, rng, plan, duration, *extra))
    text = finish(start(train_argv(root, out, "--resume_from_checkpoint", "latest"), log), log)
    what = f"trial {trial}: {'; '.join(events)}"
    assert "Traceback" not in text, what
    assert_same_run(out, ref, what)
    assert not [n for n in os.listdir(out) if n.startswith((STAGING_PREFIX, ".old-"))], what
    if KILL_PLANS[trial][0].startswith("save:") and events[0] != "finished before the kill":
        assert "calibrl: resuming from" in text or "no complete checkpoint" in text, what
