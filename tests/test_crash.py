"""Nothing lost when the machine or the disk fails: kill -9 of `calibrl train` at random moments (inside
checkpoint saves too) then `--resume_from_checkpoint latest`; a full disk and a read-only output folder;
storage and input faults as one line.

`calibrl train` runs as forked children of this process, which has already imported torch and TRL: each
child runs `calibrl.cli.main`, exactly what the console script runs, without paying the imports again.
The children are killed with SIGKILL from here at seeded random moments, or as soon as a checkpoint's
staging folder appears (a kill inside a save). A full disk is a small tmpfs where this process may mount
one (root); elsewhere the write call raises the OSError a full disk raises.
"""

import contextlib
import errno
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import signal
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from calibrl.checkpoints import STAGING_PREFIX, checkpoint_problem, list_checkpoints
from helpers import digit_rows, make_trainer

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
    import calibrl.commands.train  # noqa: F401
    import calibrl.trainer  # noqa: F401
    from calibrl.models import tiny_model_dir

    tiny_model_dir(TRAIN["model"], seed=0)
    _warm_up()
    (root / "train.yaml").write_text(yaml.safe_dump(TRAIN))
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _warm_up() -> None:
    """What every child would otherwise redo: the digit images, matplotlib's fonts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from calibrl.tasks.digits import digit_bank

    digit_bank()
    fig = plt.figure()
    fig.text(0.5, 0.5, "warm-up")
    fig.savefig(os.devnull, format="png")
    plt.close(fig)


def _child(argv: list[str], log: str, env: dict, setup) -> None:
    sys.stdout = sys.stderr = open(log, "a", buffering=1)
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR is read again
    if setup is not None:
        setup()
    from calibrl import cli

    code = cli.main(argv)
    sys.stdout.flush()
    os._exit(code)


def start(argv: list[str], log: Path, setup=None, **env) -> multiprocessing.Process:
    p = FORK.Process(target=_child, args=(argv, str(log), env, setup))
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
    left = sorted(n for n in os.listdir(out) if n.startswith(STAGING_PREFIX)) if out.exists() else []
    what += f" (partial: {', '.join(left) or 'none'})"
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


# ------------------------------------------------------------------ a full disk, a read-only folder
@contextlib.contextmanager
def small_disk(path: Path, size: str, read_only: bool = False):
    """A tmpfs of `size` mounted at `path`, read-only if asked; yields None where this process may not mount
    one (the tests then inject the OSError such a disk raises at the write call)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        yield None
        return
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def error_lines(text: str) -> list[str]:
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith("calibrl: error:")]


def _no_space_at_checkpoint_4():  # (in the child) what a full disk does to torch.save of the optimizer
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    torch.save = save


def test_disk_full_in_a_checkpoint_is_one_line_and_the_last_one_resumes_exactly(root, reference, tmp_path):
    ref, _ = reference
    with small_disk(tmp_path / "disk", "4m") as disk:  # room for checkpoint-2, not for checkpoint-4
        out = (disk or tmp_path) / "run"
        log = tmp_path / "full.log"
        p = start(train_argv(root, out), log, setup=None if disk else _no_space_at_checkpoint_4)
        p.join(180)
        text = log.read_text()
        assert p.exitcode == 1, text[-3000:]
        (line,) = error_lines(text)
        assert f"could not write {out / 'checkpoint-4'}: no space left on device" in line, line
        assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in line, line
        assert [step for step, _ in list_checkpoints(out)] == [2] and checkpoint_problem(out / "checkpoint-2") is None
        assert not [n for n in os.listdir(out) if n.startswith(STAGING_PREFIX)]
        moved = tmp_path / "moved"  # nothing lost: the run goes on elsewhere from the last checkpoint
        shutil.copytree(out, moved)
    log = tmp_path / "resume.log"
    finish(start(train_argv(root, moved, "--resume_from_checkpoint", "latest"), log), log)
    assert_same_run(moved, ref, "resumed after a full disk")
    # the training time is the whole run's: the time up to checkpoint-2, saved in it, plus the resumed part
    saved = json.loads((moved / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"]
    before = saved["MetricsLogger"]["attributes"]["train_seconds_before"]
    assert 0 < before < json.loads((moved / "run.json").read_text())["wall_time_s"]


def _no_permission_for_the_model():  # (in the child) a model folder that cannot be written
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def save(tensors, filename, *args, **kwargs):
        if f"{STAGING_PREFIX}model" in str(filename) and "calibrl-rescue" not in str(filename):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(filename))
        return real(tensors, filename, *args, **kwargs)

    mu.safe_save_file = save


def test_disk_full_at_the_final_save_keeps_the_trained_weights(root, reference, tmp_path):
    ref, _ = reference
    rescue = tmp_path / "tmp"
    rescue.mkdir()
    with small_disk(tmp_path / "disk", "4m") as disk:
        out = (disk or tmp_path) / "run"
        log = tmp_path / "final.log"
        p = start(train_argv(root, out, "--save_strategy", "no"), log, TMPDIR=str(rescue),
                  setup=None if disk else _no_permission_for_the_model)
        if disk:  # once training runs, fill the disk but for a few log lines: the model will not fit
            while p.is_alive() and not (out / "metrics.jsonl").exists():
                time.sleep(0.01)
            with open(disk / "ballast", "wb") as f:
                f.write(b"\0" * (shutil.disk_usage(disk).free - 256 * 1024))
        p.join(180)
        text = log.read_text()
        assert p.exitcode == 1, text[-3000:]
        (line,) = error_lines(text)
        cause = "no space left on device" if disk else "permission denied"
        assert f"could not write the model to {out / 'model'}: {cause}" in line, line
        assert not (out / "model").exists() and not (out / f"{STAGING_PREFIX}model").exists()
    saved = Path(line.split("the trained model was saved to ")[1].split(" instead")[0])
    assert saved.parent.parent == rescue
    a, b = load_file(str(saved / "model.safetensors")), load_file(str(ref / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)  # the trained weights, not lost


@contextlib.contextmanager
def read_only_folder(path: Path, monkeypatch):
    with small_disk(path, "1m", read_only=True) as disk:
        if disk is None and os.geteuid() != 0:
            path.chmod(0o555)
        elif disk is None:  # root may write anywhere: refuse the writes as a read-only mount would
            import calibrl.storage as storage

            real = storage.tempfile.mkstemp

            def mkstemp(*args, dir=None, **kwargs):
                if dir is not None and str(path) in os.path.abspath(dir):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)
                return real(*args, dir=dir, **kwargs)

            monkeypatch.setattr(storage.tempfile, "mkstemp", mkstemp)
        yield path


def test_read_only_output_is_one_line_before_any_work(root, reference, tmp_path, monkeypatch, capsys):
    from calibrl import cli

    with read_only_folder(tmp_path / "ro", monkeypatch) as ro:
        t = time.time()
        assert cli.main(train_argv(root, ro / "run")) == 1
        (line,) = error_lines(capsys.readouterr().err)
        assert f"output folder {ro / 'run'} is not writable (in {ro})" in line, line
        assert cli.main(["eval", str(reference[0] / "model"), "--data", "task:digits", "--n", "2",
                         "--out", str(ro / "results.json")]) == 1
        captured = capsys.readouterr()
        (line,) = error_lines(captured.err)
        assert f"--out {ro / 'results.json'}: folder {ro} is not writable" in line, line
        assert "accuracy" not in captured.out  # nothing was evaluated
        assert time.time() - t < 30


def test_too_little_free_space_is_one_line_at_the_start(root, tmp_path, monkeypatch, capsys):
    from calibrl import cli

    with small_disk(tmp_path / "tiny", "1m") as disk:
        if disk is None:
            real = shutil.disk_usage
            monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
        out = (disk or tmp_path) / "run"
        assert cli.main(train_argv(root, out)) == 1
        (line,) = error_lines(capsys.readouterr().err)
        assert "free, but a checkpoint" in line and "needs about" in line, line
        assert not list_checkpoints(out) and not (out / "metrics.jsonl").exists()  # no step was trained


# ------------------------------------------------------------------ which checkpoint `latest` takes
def test_latest_skips_incomplete_checkpoints_and_a_named_one_must_be_whole(root, reference, tmp_path, capsys):
    from calibrl import cli
    from calibrl.checkpoints import CheckpointError, STATE_FILE, resolve_resume

    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")  # killed inside a save, the old way
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    (out / "checkpoint-4" / STATE_FILE).unlink()
    (out / "checkpoint-2" / STATE_FILE).unlink()  # another tool's checkpoint: whole, without our manifest
    notes = []
    for value in ("latest", "true", True):
        assert resolve_resume(value, out, notes.append) == str(out / "checkpoint-2")
    assert notes[:3] == [f"calibrl: skipping incomplete checkpoint {out / 'checkpoint-6'} (optimizer.pt has 0 "
                         f"bytes, {os.path.getsize(reference[0] / 'checkpoint-6' / 'optimizer.pt')} were written)",
                         f"calibrl: skipping incomplete checkpoint {out / 'checkpoint-4'} (no trainer_state.json)",
                         f"calibrl: resuming from {out / 'checkpoint-2'}"]
    assert resolve_resume("latest", tmp_path / "empty", notes.append) is None
    assert notes[-1] == f"calibrl: no complete checkpoint in {tmp_path / 'empty'}: starting from step 0"
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(out / "checkpoint-6"), out)
    assert cli.main(train_argv(root, out, "--resume_from_checkpoint", str(out / "checkpoint-6"))) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"{out / 'checkpoint-6'} is not a complete checkpoint (optimizer.pt has 0 bytes" in line


# ------------------------------------------------------------------ Ctrl-C
class CtrlC(TrainerCallback):
    """Raises what Ctrl-C raises in the main thread: after step `at` ends, or inside its weight update."""

    def __init__(self, at: int, inside_update: bool = False):
        self.at, self.inside_update = at, inside_update

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.inside_update and state.global_step + 1 == self.at:
            raise KeyboardInterrupt

    def on_step_end(self, args, state, control, **kwargs):
        if not self.inside_update and state.global_step == self.at:
            raise KeyboardInterrupt


def test_a_second_ctrl_c_cannot_break_the_interrupt_checkpoint(tiny_vlm_dir, tmp_path, monkeypatch, capsys):
    tr = make_trainer(tiny_vlm_dir, tmp_path, max_steps=3, rows=digit_rows(16))
    tr.add_callback(CtrlC(2))
    real = torch.save

    def save_after_a_second_ctrl_c(obj, f, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # pressed again while the checkpoint is being written
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_after_a_second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    out = capsys.readouterr().out
    assert "still writing the checkpoint of step 2" in out and "checkpoint of step 2 written" in out
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2] and checkpoint_problem(tmp_path / "checkpoint-2") is None


def test_ctrl_c_inside_a_weight_update_writes_no_checkpoint(tiny_vlm_dir, tmp_path, capsys):
    tr = make_trainer(tiny_vlm_dir, tmp_path, max_steps=3, rows=digit_rows(16))
    tr.add_callback(CtrlC(2, inside_update=True))  # step 1 done, step 2's update applied, not counted
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert "interrupted inside the weight update of step 2: no checkpoint can be exact" in capsys.readouterr().out
    assert not list_checkpoints(tmp_path)


# ------------------------------------------------------------------ logs written before logs were rewound
def test_read_run_repairs_steps_a_resume_logged_twice(tmp_path):
    from calibrl.run_log import read_run

    steps = list(range(1, 9)) + list(range(5, 9)) + list(range(9, 11))  # killed at 8, resumed from 4
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in steps))
    evals = [(0, "test"), (4, "test"), (8, "test"), (4, "test"), (8, "test"), (10, "test")]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"step": s, "split": n, "accuracy": i})
                                                 + "\n" for i, (s, n) in enumerate(evals)))
    with pytest.warns(UserWarning, match="4 lines of steps that a resume logged again left out"):
        run = read_run(tmp_path)
    assert [r["step"] for r in run["metrics"]] == list(range(1, 11))
    assert [(r["step"], r["accuracy"]) for r in run["eval"]] == [(0, 0), (4, 3), (8, 4), (10, 5)]


# ------------------------------------------------------------------ input faults: one line each
def test_bad_data_files_models_and_reward_functions_are_one_line(root, tmp_path, capsys):
    from calibrl import cli

    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    cases = [
        (["--dataset", str(tmp_path / "empty.parquet")], "empty.parquet is empty (0 bytes)"),
        (["--dataset", str(tmp_path / "corrupt.parquet")], "corrupt.parquet is not a readable parquet file"),
        (["--reward_funcs", "no_such_module:f", "format_reward"], "cannot import no_such_module (ModuleNotFound"),
        (["--reward_funcs", "helpers:nothing", "format_reward"], "helpers has no function 'nothing'"),
        (["--model", "mymodel"], "model 'mymodel' is"),  # a typo for a local folder: no minute of retries
    ]
    for extra, expected in cases:
        t = time.time()
        assert cli.main(train_argv(root, tmp_path / "run", "--overwrite", "true", *extra)) == 2, extra
        (line,) = error_lines(capsys.readouterr().err)
        assert expected in line, line
        assert time.time() - t < 20, extra
    assert "local folder" in line


# ------------------------------------------------------------------ ergonomics
def test_train_help_shows_our_options_first(capsys):
    from calibrl import cli

    assert cli.main(["train", "--help"]) == 0
    short = capsys.readouterr().out
    groups = [line for line in short.splitlines() if line.endswith("options:") or line.endswith("(calibrl):")]
    assert groups == ["CalibRLConfig options (calibrl):", "RunArgs options (calibrl):",
                      "common TRL / transformers options:"]
    assert short.index("--guide_coef") < short.index("--learning_rate") and "--adam_beta1" not in short
    assert "calibrl train --help-all lists them all" in short
    assert cli.main(["train", "--help-all"]) == 0
    full = capsys.readouterr().out
    groups = [line for line in full.splitlines() if line.endswith("options:") or line.endswith("(calibrl):")]
    assert groups == ["CalibRLConfig options (calibrl):", "RunArgs options (calibrl):", "TRL GRPOConfig options:",
                      "transformers TrainingArguments options:"]
    assert full.index("--top_entropy_quantile") < full.index("--adam_beta1")
    assert len(short.splitlines()) < len(full.splitlines()) / 3


def test_the_readme_python_example_runs_as_written(root, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use it from Python")[1]
    block = section.split("```python\n")[1].split("```")[0]
    assert "CalibRLTrainer(" in block and "trainer.train()" in block
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == trainer.args.max_steps and not trainer.args.bf16
    assert checkpoint_problem(tmp_path / "runs" / "my-run" / f"checkpoint-{trainer.args.max_steps}") is None
