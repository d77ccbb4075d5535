"""The `calibrl` command line end to end (real console script, nano sizes) and its one-line errors.

The three long commands (train, sft, and the demo at test size) start together as subprocesses at one thread each, so
on 2 cores they overlap; eval and plot then run on their outputs. Error cases run `calibrl.cli.main` in
process (the console script is `sys.exit(main())`), which saves a TRL import per case; one error case
also goes through the real script.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from calibrl import cli
from calibrl.commands.demo import DEMO_YAML
from calibrl.config import load_train_config
from calibrl.errors import UsageError
from helpers import digit_rows

REPO = Path(__file__).resolve().parents[1]
CALIBRL = str(Path(sys.executable).with_name("calibrl"))
DEMO_TINY = REPO / "tests" / "configs" / "demo_tiny.yaml"  # the demo config at test size

TINY_TRAIN = {
    "model": "tiny:qwen2_5_vl:nano", "dataset": "task:digits", "n_train": 32, "difficulty": [1],
    "max_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 16,
    "learning_rate": "1e-3", "logging_steps": 1, "save_strategy": "no", "activation_checkpointing": False,
    "eval_every": 1, "n_eval": 4, "seed": 0,
}
TINY_SFT = {
    "model": "tiny:qwen2_5_vl:nano", "dataset": "task:digits", "n_train": 32, "max_steps": 3, "batch_size": 8,
    "warmup_steps": 1, "logging_steps": 1, "disable_tqdm": True,
}


def _env(cache: Path) -> dict:
    return {**os.environ, "CALIBRL_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(args: list[str], cache: Path, log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen([CALIBRL, *args], stdout=f, stderr=subprocess.STDOUT, env=_env(cache), cwd=log.parent)


def _finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> str:
    rc = proc.wait(timeout=timeout)
    out = log.read_text()
    assert rc == 0, f"{proc.args} exited {rc}:\n{out[-3000:]}"
    assert "Traceback" not in out
    return out


def _build_nano_once(cache: Path) -> None:
    from calibrl.models import tiny_model_dir

    old = os.environ.get("CALIBRL_CACHE")
    os.environ["CALIBRL_CACHE"] = str(cache)
    try:
        tiny_model_dir("tiny:qwen2_5_vl:nano", seed=0)
    finally:
        if old is None:
            del os.environ["CALIBRL_CACHE"]
        else:
            os.environ["CALIBRL_CACHE"] = old


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start train, sft and the tiny demo together; yield their folders and (lazily awaited) outputs."""
    root = tmp_path_factory.mktemp("cli")
    cache = root / "cache"
    _build_nano_once(cache)  # so the three processes below do not each build it
    (root / "train.yaml").write_text(yaml.safe_dump(TINY_TRAIN))
    (root / "sft.yaml").write_text(yaml.safe_dump(TINY_SFT))
    procs = {
        "train": _start(["train", "train.yaml", "--output_dir", "run_a"], cache, root / "train.log"),
        "sft": _start(["sft", "sft.yaml", "--output_dir", "sft_model"], cache, root / "sft.log"),
        "demo": _start(["demo", "--config", str(DEMO_TINY), "--out", "demo_run"], cache, root / "demo.log"),
    }
    outputs: dict[str, str] = {}

    def output(name: str) -> str:
        if name not in outputs:
            outputs[name] = _finish(procs[name], root / f"{name}.log")
        return outputs[name]

    yield {"root": root, "cache": cache, "output": output}
    for p in procs.values():
        if p.poll() is None:
            p.kill()


def _not_blank(png: Path) -> None:
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 5 and (pixels < 128).mean() > 0.001, f"{png.name} looks blank"


# ------------------------------------------------------------------ the commands
@pytest.mark.slow
def test_train_writes_a_complete_run_folder(runs):
    out = runs["output"]("train")
    run = runs["root"] / "run_a"
    info = json.loads((run / "run.json").read_text())
    assert info["method"] == "calibrl" and info["config"]["max_steps"] == 2 and "versions" in info
    assert info["config"]["reward_weights"] == [1.0, 0.1]  # the official acc + 0.1 * fmt
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*metrics)
    for key in ("reward", "calibrl/pg_loss", "calibrl/guide_loss", "calibrl/pass_rate", "calibrl/expert_logp_mean"):
        assert key in keys, f"metrics.jsonl lacks {key}"
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert {e["split"] for e in evals} == {"test", "ood"} and {e["step"] for e in evals} == {0, 1, 2}
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "config.json").is_file()
    pngs = sorted((run / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"reward.png", "heldout_accuracy.png", "losses.png"}
    for png in pngs:
        _not_blank(png)
    assert "held-out" in out and "test" in out  # the summary table


@pytest.mark.slow
def test_sft_then_eval(runs):
    out = runs["output"]("sft")
    model_dir = runs["root"] / "sft_model"
    assert "steps run" in out and (model_dir / "model.safetensors").is_file()
    log = [json.loads(line) for line in (model_dir / "sft_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    assert log[-1]["loss"] < log[0]["loss"]  # three steps at lr 1e-3 already lower the loss
    res = subprocess.run([CALIBRL, "eval", str(model_dir), "--data", "task:digits", "--n", "4", "--k", "1", "2",
                          "--max_new_tokens", "8", "--out", "res.json"], capture_output=True, text=True,
                         env=_env(runs["cache"]), cwd=runs["root"], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((runs["root"] / "res.json").read_text())
    assert set(results["by_split"]) == {"test", "ood"} and results["overall"]["n"] == 8
    assert "pass@2" in results["overall"] and "accuracy" in res.stdout and "split=ood" in res.stdout


@pytest.mark.slow
def test_demo_and_plot_of_two_runs(runs):
    out = runs["output"]("demo")
    run = runs["root"] / "demo_run"
    results = json.loads((run / "results.json").read_text())
    assert set(results["comparison"]) == {"test", "ood"}
    for split, c in results["comparison"].items():
        assert c["n"] == 8 and 0 <= c["before"] <= 1 and 0 <= c["after"] <= 1
        assert c["gain"] == pytest.approx(c["after"] - c["before"])
    assert set(results["timings"]) == {"sft_s", "eval_before_s", "rl_s", "eval_after_s", "total_s"}
    assert results["sft"]["cached"] is False and results["before"]["by_task"]
    assert (run / "metrics.jsonl").is_file() and (run / "eval.jsonl").is_file() and (run / "model").is_dir()
    assert (run / "demo_config.yaml").read_text() == DEMO_TINY.read_text()
    assert any(p.name == "heldout_accuracy.png" for p in (run / "plots").glob("*.png"))
    assert "gain" in out and "before" in out
    # the warm start is cached under CALIBRL_CACHE/sft-<hash>
    assert len(list(runs["cache"].glob("sft-*/sft.json"))) == 1

    runs["output"]("train")
    res = subprocess.run([CALIBRL, "plot", "run_a", "demo_run", "--out", "both", "--labels", "a", "demo"],
                         capture_output=True, text=True, env=_env(runs["cache"]), cwd=runs["root"], timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    pngs = [Path(line) for line in res.stdout.split()]
    assert pngs and all(p.suffix == ".png" and (runs["root"] / p).is_file() for p in pngs)
    for p in pngs:
        _not_blank(runs["root"] / p)


@pytest.mark.slow
def test_demo_a_second_time_replaces_its_run_and_reuses_the_warm_start(runs):
    """`calibrl demo` twice into the same folder through the real script: no flag needed, one line says the
    previous run is replaced, the cached warm start is reused, and the table is the same (same seed, 1 thread)."""
    runs["output"]("demo")
    first = json.loads((runs["root"] / "demo_run" / "results.json").read_text())
    (runs["root"] / "demo_run" / "marker").write_text("from the first run")
    res = subprocess.run([CALIBRL, "demo", "--config", str(DEMO_TINY), "--out", "demo_run"], capture_output=True,
                         text=True, env=_env(runs["cache"]), cwd=runs["root"], timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "replacing the previous demo run in demo_run" in res.stdout and "reused from the cache" in res.stdout
    second = json.loads((runs["root"] / "demo_run" / "results.json").read_text())
    assert second["sft"]["cached"] is True and not (runs["root"] / "demo_run" / "marker").exists()
    assert second["comparison"] == first["comparison"]


def test_busy_cores_sees_a_busy_process():
    from calibrl.commands.demo import busy_cores

    idle = busy_cores(0.3)
    assert idle is not None and 0.0 <= idle <= (os.cpu_count() or 1) + 1e-9
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_cores(0.5) >= 0.7  # the spinner alone keeps one core busy
    finally:
        spinner.kill()


@pytest.mark.slow
def test_cached_warm_start_is_reused(runs, monkeypatch):
    """The demo process left its warm start in the cache: the same settings find it and train nothing."""
    from calibrl.commands.demo import warm_start, warm_start_dir
    from calibrl.config import SFTArgs, parse_config

    runs["output"]("demo")
    monkeypatch.setenv("CALIBRL_CACHE", str(runs["cache"]))
    config = runs["root"] / "demo_run" / "demo_config.yaml"
    (args,) = parse_config([SFTArgs], config, ["--disable_tqdm", "true"], section="sft")
    [cached_dir] = runs["cache"].glob("sft-*")
    stamp = os.path.getmtime(cached_dir / "model.safetensors")
    found, summary, cached = warm_start(args, quiet=True)
    assert cached and Path(found) == cached_dir and summary["chosen_step"] == 2
    assert os.path.getmtime(cached_dir / "model.safetensors") == stamp
    (other,) = parse_config([SFTArgs], config, ["--learning_rate", "2e-3"], section="sft")
    assert warm_start_dir(other) != warm_start_dir(args) == cached_dir  # other settings, another cache entry


# ------------------------------------------------------------------ configs
@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_parses(path):
    config, run = load_train_config(str(REPO / path), [])
    assert config.method == "calibrl" and config.reward_weights == [1.0, 0.1]
    if "qwen2_5_vl" in path:  # the paper's settings
        assert (config.num_generations, config.learning_rate, config.max_completion_length) == (10, 1e-6 if
                                                                                                 "lora" not in path else 1e-5, 4096)
        assert (config.beta, config.guide_coef, config.leaky_slope, config.delta) == (0.0, 0.1, 0.5, 3.0)
        assert config.scale_rewards == "none" and config.gap == "token" and config.use_vllm
        assert config.vllm_mode == "colocate" and config.activation_checkpointing
    assert ("lora" in path) == (run.lora_r > 0) and ("frozen_vision" in path) == run.freeze_vision_tower


def test_vllm_recipe_fails_at_trainer_construction_with_a_clear_message():
    from calibrl.commands.train import build_trainer

    config, run = load_train_config(str(REPO / "configs/qwen2_5_vl_7b_calibrl.yaml"), [])
    with pytest.raises(UsageError, match="vLLM is not installed"):
        build_trainer(config, run)


def test_demo_config_is_the_packaged_one_and_parses():
    from calibrl.commands.demo import load_demo_config

    assert (REPO / "configs" / "demo.yaml").read_text() == DEMO_YAML
    sft, config, run, demo = load_demo_config(str(REPO / "configs" / "demo.yaml"))
    assert sft.expert_style == "native" and run.expert_style == "mismatched" and config.method == "calibrl"
    assert config.per_device_train_batch_size // config.num_generations == 16 and demo.n_eval >= 500


@pytest.mark.parametrize("name", ["deepspeed_zero3", "deepspeed_zero2", "fsdp", "multi_gpu"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.num_processes == 8 and cfg.mixed_precision == "bf16"


def test_yaml_and_command_line_types_agree(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-6\nreward_funcs: [calibrl_reward]\ndifficulty: [1, 2]\nbeta: 0\n")
    config, run = load_train_config(str(path), ["--num_generations", "4", "--per_device_train_batch_size", "8"])
    assert config.learning_rate == 1e-6 and isinstance(config.beta, float) and run.difficulty == [1, 2]
    assert config.reward_weights is None and config.num_generations == 4  # no default weights for one function
    config, _ = load_train_config(str(path), ["--learning_rate", "2e-4"])
    assert config.learning_rate == 2e-4  # the command line wins


def test_booleans_read_the_same_from_yaml_a_mapping_and_flags(tmp_path):
    """Every bool field, whatever its default, takes false and true from YAML and from a benchmark's mapping as
    its flag does (a field defaulting to True also has a `--no_<name>` option with the same destination)."""
    import dataclasses

    from calibrl.config import CalibRLConfig, RunArgs, parse_config

    fields = [f.name for t in (CalibRLConfig, RunArgs) for f in dataclasses.fields(t)
              if f.type in ("bool", bool) and f.name in ("shared_prefix", "weight_by_abs_adv", "guard_rewards",
                                                         "onpolicy_clip", "expert_in_group_stats", "overwrite")]
    assert len(fields) == 6
    for value in (False, True):
        path = tmp_path / f"b{value}.yaml"
        path.write_text(yaml.safe_dump({name: value for name in fields}))
        from_yaml = load_train_config(str(path))
        from_flags = load_train_config(None, [t for name in fields for t in (f"--{name}", str(value).lower())])
        from_values = parse_config([CalibRLConfig, RunArgs], values={name: value for name in fields})
        for name in fields:
            got = [getattr(next(o for o in objs if hasattr(o, name)), name)
                   for objs in (from_yaml, from_flags, from_values)]
            assert got == [value] * 3, (name, got)


def test_task_types_filter_train_and_test_but_not_ood():
    from calibrl.tasks import task_rows

    rows = task_rows("task:digits", "test", 12, 0, difficulty=[1], task_types=["digits/sum"])
    assert len(rows) == 12 and {r["task"] for r in rows} == {"digits/sum"}
    assert task_rows("task:digits", "test", 12, 0, difficulty=[1], task_types=["digits/sum"]) == rows  # deterministic
    ood = task_rows("task:digits", "ood", 6, 0, difficulty=[1], task_types=["digits/sum"])
    assert {r["task"] for r in ood} == {"digits/product"}
    with pytest.raises(UsageError, match="too few rows of task_types"):
        task_rows("task:digits", "train", 4, 0, task_types=["digits/nope"])


# ------------------------------------------------------------------ errors: one line, exit 2, no traceback
def _one_line_error(capsys, argv: list[str], *expected: str) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("calibrl: error:") and "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_TRAIN))
    return path


def test_error_missing_config_file_through_the_real_script(tmp_path):
    res = subprocess.run([CALIBRL, "train", str(tmp_path / "nope.yaml")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"calibrl: error: config file not found: {tmp_path / 'nope.yaml'}"]


def test_error_unknown_key_in_yaml_and_on_the_command_line(capsys, tmp_path, tiny_yaml):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: 2\nlerning_rate: 0.1\n")
    _one_line_error(capsys, ["train", str(bad)], "unknown config key 'lerning_rate'", str(bad))
    _one_line_error(capsys, ["train", str(tiny_yaml), "--lerning_rate", "0.1"], "'--lerning_rate'")
    _one_line_error(capsys, ["sft", str(tiny_yaml)], "unknown config key")  # a train key is not an sft key


def test_error_wrong_value_type(capsys, tmp_path, tiny_yaml):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_generations: four\n")
    _one_line_error(capsys, ["train", str(bad)], "num_generations: expected int, got 'four'")
    _one_line_error(capsys, ["train", str(tiny_yaml), "--learning_rate", "fast"], "--learning_rate: expected float")
    _one_line_error(capsys, ["train", str(tiny_yaml), "--overwrite", "maybe"], "--overwrite: expected a bool")
    _one_line_error(capsys, ["train", str(tiny_yaml), "--method", "ppo"], "method must be one of")


def test_error_bad_datasets(capsys, tmp_path, tiny_yaml):
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text("\n".join(json.dumps({"prompt": f"What is {i}+1?", "solution": "x"}) for i in range(3)))
    _one_line_error(capsys, ["train", str(tiny_yaml), "--dataset", str(no_answer), "--output_dir",
                             str(tmp_path / "o1")], "'answer'", "no_answer.jsonl")
    bad_row = tmp_path / "bad_row.jsonl"
    rows = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": "What is 2+2?", "answer": ""},
            {"prompt": "What is 3+3?", "answer": "6"}]
    bad_row.write_text("\n".join(json.dumps(r) for r in rows))
    _one_line_error(capsys, ["train", str(tiny_yaml), "--dataset", str(bad_row), "--output_dir",
                             str(tmp_path / "o2")], "row 1", "'answer'")
    _one_line_error(capsys, ["train", str(tiny_yaml), "--dataset", str(tmp_path / "none.jsonl"), "--output_dir",
                             str(tmp_path / "o3")], "dataset not found")
    _one_line_error(capsys, ["eval", "tiny:qwen2_5_vl:nano", "--data", str(bad_row)], "row 1")


def test_error_output_folder_exists(capsys, tmp_path, tiny_yaml):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something").write_text("x")
    _one_line_error(capsys, ["train", str(tiny_yaml), "--output_dir", str(out)], "--overwrite", str(out))
    _one_line_error(capsys, ["sft", "--output_dir", str(out)], "--overwrite")
    _one_line_error(capsys, ["demo", "--out", str(out)], "--overwrite")
    assert (out / "something").is_file()  # nothing was touched


def test_error_other_commands(capsys, tmp_path):
    _one_line_error(capsys, ["plot", str(tmp_path / "missing")], "run folder not found")
    _one_line_error(capsys, ["eval", "tiny:qwen2_5_vl:nano"], "--data")
    _one_line_error(capsys, ["eval", "tiny:nope:nano", "--data", "task:digits"], "tiny:<family>:<size>")
    _one_line_error(capsys, ["eval", "tiny:qwen2_5_vl:nano", "--data", "task:chess"], "unknown task 'chess'")
    _one_line_error(capsys, ["frobnicate"], "invalid choice")
    adapter = tmp_path / "adapter"  # a LoRA run's model folder whose base model is gone
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/nonexistent/base"}))
    _one_line_error(capsys, ["eval", str(adapter), "--data", "task:digits"], "its base model cannot be loaded",
                    "/nonexistent/base")


@pytest.mark.parametrize("command", [None, "train", "sft", "eval", "plot", "probe", "demo"])
def test_help(capsys, command):
    argv = ([command] if command else []) + ["--help"]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own --help exits 0
        rc = e.code
    out = capsys.readouterr().out
    assert rc == 0 and "usage" in out.lower()
    if command == "train":
        assert "--guide_coef" in out and "--lora_r" in out and "--learning_rate" in out
    if command is None:
        for name in cli.COMMANDS:
            assert name in out


# ------------------------------------------------------------------ bad data through `calibrl train`
def test_error_bad_rows_of_every_kind_through_train(capsys, tmp_path, tiny_yaml):
    """Unreadable/truncated image bytes, mismatched placeholders, non-UTF-8 text, an empty file: one line each."""
    from calibrl.data import save_rows

    def train(path, *expected):
        capsys.readouterr()  # drop the progress bars of writing the file
        _one_line_error(capsys, ["train", str(tiny_yaml), "--dataset", str(path), "--output_dir",
                                 str(tmp_path / f"out_{path.stem}")], *expected)

    rows = digit_rows(3)
    save_rows(rows, tmp_path / "truncated.jsonl")  # images become PNG files next to the jsonl
    png = sorted((tmp_path / "truncated_images").glob("*.png"))[1]
    png.write_bytes(png.read_bytes()[:-30])  # the second row's image loses its end
    train(tmp_path / "truncated.jsonl", "row 1, column 'images'", "not a readable image", "truncated.jsonl")

    verl = [{"prompt": "<image><image>What is the sum?", "images": [r["images"][0]], "answer": r["answer"]}
            for r in rows]
    save_rows(verl, tmp_path / "placeholders.parquet")
    train(tmp_path / "placeholders.parquet", "3 bad rows", "row 0, column 'images'", "1 images but the prompt has 2")

    lines = [json.dumps({"prompt": "What is 1+1?", "answer": "2"}).encode(), b'{"prompt": "caf\xe9?", "answer": "2"}']
    (tmp_path / "latin1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    train(tmp_path / "latin1.jsonl", "row 1, column 'prompt'", "not valid UTF-8")

    (tmp_path / "empty.jsonl").write_text("")
    train(tmp_path / "empty.jsonl", "has no rows")


@pytest.mark.slow
def test_messy_data_trains_and_the_run_summary_counts_it(capsys, tmp_path, tiny_yaml):
    """A missing expert, an expert with an image placeholder and one longer than the completion limit train
    (the first as plain GRPO, the others cleaned / truncated), and the run's summary and run.json count each."""
    from calibrl.data import save_rows

    rows = digit_rows(4)  # 4 prompts, 2 per step, 2 steps: one epoch, every row seen once
    rows[0]["solution"] = None
    rows[1]["solution"] = "<image><answer>7</answer>"  # short, as row 3
    rows[2]["solution"] = "<think>" + "1 + " * 40 + "</think><answer>41</answer>"  # far over 24 tokens
    rows[3]["solution"] = "<answer>7</answer>"
    save_rows(rows, tmp_path / "messy.jsonl")
    capsys.readouterr()
    out = tmp_path / "messy_run"
    rc = cli.main(["train", str(tiny_yaml), "--dataset", str(tmp_path / "messy.jsonl"), "--output_dir", str(out),
                   "--max_completion_length", "24", "--eval_every", "0", "--n_eval", "0", "--disable_tqdm", "true"])
    printed = capsys.readouterr().out
    assert rc == 0
    info = json.loads((out / "run.json").read_text())
    assert "1 without expert solution" in info["data"] and "1 with image placeholders stripped" in info["data"]
    counts = info["counts"]
    assert counts["expert_groups"] == 4 and counts["expert_missing"] == 1
    assert counts["expert_truncated"] == 1 and counts["expert_stripped"] == 0  # stripped at load, as counted above
    assert counts["reward_errors"] == 0 and counts["skipped_steps"] == 0
    assert "1 without expert solution" in printed
    assert "experts missing 1, truncated 1" in printed and "(of 4 groups)" in printed
