"""Shared building blocks of the `calibrl` commands: config files, models, datasets, rewards, run folders.

One config loader serves `calibrl train`, `calibrl sft` and the demo. A config is a YAML mapping of
dataclass fields (for `train`: every `CalibRLConfig` field plus the `RunArgs` fields); command-line
`--key value` pairs override it. A YAML file may instead hold one section per command
(`sft: {...}`, `train: {...}`, `demo: {...}`); each command then reads its own section, so one file
describes a whole SFT -> RL pipeline (configs/demo.yaml does).

Every value goes through the same argparse types as the command line (built by transformers'
`HfArgumentParser`), so `learning_rate: 1e-6` (a string to YAML 1.1) and `--learning_rate 1e-6` give the
same float, and a wrong type is reported the same way from both places. Every user mistake raises
`UsageError` with a one-line message; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

# Sections a config file may be split into, one per command that reads configs.
SECTIONS = ("sft", "train", "demo")
REWARD_FUNCS = ("accuracy_reward", "format_reward", "calibrl_reward")
TASK_PREFIX, TINY_PREFIX = "task:", "tiny:"
CACHE_ENV = "CALIBRL_CACHE"


class UsageError(Exception):
    """A mistake in the user's input (config, arguments, paths): reported as one line, no traceback."""


def cache_dir() -> Path:
    """Where built tiny models and SFT warm starts are cached: `$CALIBRL_CACHE`, else `.cache/calibrl`."""
    return Path(os.environ.get(CACHE_ENV, os.path.join(".cache", "calibrl")))


def settings_hash(settings: dict) -> str:
    """A short stable hash of JSON-able settings (the cache key of a built artefact)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------
# Run fields of `calibrl train` (everything that is not a CalibRLConfig field)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class RunArgs:
    """What to train and how to evaluate it; the optimisation itself is configured by `CalibRLConfig`."""

    model: str = field(default="tiny:qwen2_5_vl:small", metadata={"help": "A local model directory, "
                       "'tiny:<family>:<size>' (built offline, families qwen2_5_vl/llava/qwen2, sizes nano/small/"
                       "base/large), or a hub id (needs a network)."})
    dataset: str = field(default="task:digits", metadata={"help": "'task:digits', 'task:shapes' or 'task:mixed' "
                         "(generated offline), or a .parquet/.jsonl/.json file or saved dataset directory."})
    n_train: int = field(default=4096, metadata={"help": "Rows generated for a task: dataset."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the generated task rows."})
    expert_style: str = field(default="mismatched", metadata={"help": "Expert solutions of a task: dataset: "
                              "native, mismatched or noisy."})
    noise_rate: float = field(default=0.3, metadata={"help": "Share of wrong experts with expert_style=noisy "
                                                      "(exact over the generated rows; after a task_types filter, "
                                                      "about this share)."})
    difficulty: list[int] | None = field(default=None, metadata={"help": "Difficulty levels (1-3) of a task: "
                                         "dataset; default all."})
    task_types: list[str] | None = field(default=None, metadata={"help": "Keep only these problem types (e.g. "
                                         "digits/sum) in the train and test splits of a task: dataset."})
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy_reward", "format_reward"],
                                    metadata={"help": f"Reward functions from calibrl.rewards: {REWARD_FUNCS}, or your own as "
                                    "module:function (or path/to/file.py:function). "
                                    "With the default pair and no reward_weights, weights are [1.0, 0.1]."})
    eval_every: int = field(default=0, metadata={"help": "Held-out greedy evaluation every N steps (0: only at "
                            "the start and the end)."})
    n_eval: int = field(default=200, metadata={"help": "Rows per held-out evaluation set."})
    eval_splits: list[str] = field(default_factory=lambda: ["test", "ood"], metadata={"help": "Held-out splits "
                                   "of a task: dataset (test = in-domain, ood = held-out operations)."})
    eval_data: list[str] | None = field(default=None, metadata={"help": "Held-out data files (any dataset); "
                                        "each is one evaluation set named by its file stem."})
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the held-out evaluation."})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "Tokens generated per held-out "
                                            "answer; default max_completion_length."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "Train the language model only."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names LoRA adapts (language model projections by default)."},
    )


# ----------------------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------------------
def _make_parser(dataclass_types: list[type]):
    """`HfArgumentParser` over the dataclasses, whose errors raise `UsageError` (argparse would exit)."""
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        def error(self, message):  # argparse calls this on a bad value
            raise UsageError(_argparse_message(message))

    return Parser(dataclass_types, allow_abbrev=False, add_help=False)


_BAD_VALUE = re.compile(r"^argument (--[\w.]+)(?:/--[\w.-]+)?: (.*)$", re.DOTALL)
_BAD_TYPE = re.compile(r"^invalid (\w+) value: (.*)$")


def _argparse_message(message: str) -> str:
    """'argument --lr/--l-r: invalid float value: 'x'' -> '--lr: expected float, got 'x''."""
    m = _BAD_VALUE.match(message)
    if not m:
        return " ".join(message.split())
    key, what = m.group(1), " ".join(m.group(2).split())
    t = _BAD_TYPE.match(what)
    if t:
        what = f"expected {t.group(1)}, got {t.group(2)}"
    elif what.startswith("Truthy value expected"):
        got = re.search(r"got (\S+)", what)
        what = f"expected a bool (true/false), got {got.group(1) if got else '?'}"
    return f"{key}: {what}"


def read_config_file(path: str | os.PathLike, section: str | None) -> dict:
    """The mapping in a YAML config (the `section` mapping if the file is split into command sections)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UsageError(f"{p}: not valid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{p}: expected a mapping of config keys, got a {type(data).__name__}")
    if section is not None and any(k in SECTIONS for k in data):
        strays = [k for k in data if k not in SECTIONS]
        if strays:
            raise UsageError(f"{p}: unknown top-level key {strays[0]!r} in a file of sections {list(SECTIONS)}")
        data = data.get(section) or {}
        if not isinstance(data, dict):
            raise UsageError(f"{p}: section {section!r} must be a mapping")
    return data


def _yaml_tokens(values: dict, actions: dict[str, argparse.Action], source: str) -> tuple[list[str], dict]:
    """YAML values -> argv tokens (so they get the command line's types); None and dicts are kept aside."""
    tokens, direct = [], {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in actions:
            raise UsageError(f"{source}: unknown config key {key!r}")
        action = actions[key]
        many = action.nargs in ("+", "*")
        if value is None or isinstance(value, dict):
            if isinstance(value, dict) and action.type not in (None, str):
                raise UsageError(f"{source}: {key}: expected {_type_name(action)}, got a mapping")
            direct[key] = value
            continue
        if isinstance(value, (list, tuple)):
            if not many:
                raise UsageError(f"{source}: {key}: expected a single {_type_name(action)}, got a list")
            if not value:
                direct[key] = []
                continue
            items = value
        else:
            items = [value]
        for item in items:
            if isinstance(item, (dict, list)):
                raise UsageError(f"{source}: {key}: expected {_type_name(action)}, got a nested {type(item).__name__}")
        if many:
            tokens += [f"--{key}"] + [_yaml_scalar(v) for v in items]
        else:  # --key=value, so that a value starting with '-' is not read as an option
            tokens.append(f"--{key}={_yaml_scalar(value)}")
    return tokens, direct


def _type_name(action: argparse.Action) -> str:
    t = action.type
    if action.choices:
        return f"one of {list(action.choices)}"
    if t is None or t is str:
        return "str"
    return getattr(t, "__name__", str(t)).replace("string_to_bool", "bool")


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_config(
    dataclass_types: list[type],
    config_path: str | os.PathLike | None,
    overrides: list[str],
    section: str | None = None,
    preset: dict | None = None,
    finalize: Callable[[dict], None] | None = None,
) -> list[Any]:
    """Build one instance of each dataclass from `preset` < the YAML file < `--key value` overrides.

    `finalize(values)` may fill in derived defaults (all fields by name) before the dataclasses are built.

    Raises `UsageError` naming the offending key on an unknown key, a badly typed value, or a value the
    dataclass itself rejects (its `__post_init__` check).
    """
    parser = _make_parser(dataclass_types)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    tokens, direct = _yaml_tokens(preset or {}, actions, "defaults")
    if config_path is not None:
        file_tokens, file_direct = _yaml_tokens(read_config_file(config_path, section), actions, str(config_path))
        tokens += file_tokens
        direct.update(file_direct)
        try:
            parser.parse_known_args(tokens)  # file errors reported with the file's name
        except UsageError as e:
            raise UsageError(f"{config_path}: {str(e).removeprefix('--')}") from None
    namespace, rest = parser.parse_known_args(tokens + list(overrides))
    if rest:
        bad = next((t for t in rest if t.startswith("-")), rest[0])
        if bad.startswith("-"):
            raise UsageError(f"unknown option {bad.split('=')[0]!r} (not a field of {_names(dataclass_types)})")
        raise UsageError(f"unexpected argument {bad!r}: options take the form --key value")
    values = vars(namespace)
    option_dest = {opt: a.dest for a in parser._actions for opt in a.option_strings}

    def dests(argv: list[str]) -> set[str]:
        return {option_dest[t.split("=")[0]] for t in argv if t.startswith("--") and t.split("=")[0] in option_dest}

    cli_given = dests(list(overrides))
    given = cli_given | dests(tokens)
    for key, value in direct.items():  # None / mappings from the file, unless the command line set the key
        if key not in cli_given:
            values[key] = value
            given.add(key)
    if finalize is not None:
        before = dict(values)
        finalize(values)
        given |= {k for k, v in values.items() if k not in before or v is not before[k]}

    # Only the keys that were set reach the dataclasses: the others keep their own defaults (argparse
    # renders a few defaults differently, and some configs warn about fields passed explicitly).
    out = []
    for dtype in dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            out.append(dtype(**{k: values[k] for k in given if k in keys}))
        except (ValueError, TypeError) as e:
            raise UsageError(f"invalid {dtype.__name__}: {' '.join(str(e).split())}") from None
    return out


def _names(types: list[type]) -> str:
    return " / ".join(t.__name__ for t in types)


# TRL / transformers options most runs set, shown by the short --help beside ours
COMMON_TRL_OPTIONS = (
    "output_dir", "max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_generations", "max_completion_length", "temperature", "beta",
    "loss_type", "epsilon", "delta", "logging_steps", "save_strategy", "save_steps", "save_total_limit",
    "resume_from_checkpoint", "seed", "bf16", "use_vllm", "report_to",
)


def config_help(dataclass_types: list[type], prog: str, description: str, full: bool = False) -> str:
    """The `--help` text of a config command: ours first (the run fields, CalibRL's own), then TRL's
    options, then transformers' `TrainingArguments`, each group titled. The short form (`full=False`) keeps
    only the TRL / transformers options in `COMMON_TRL_OPTIONS` and says how to see the others."""
    parser = _make_parser(dataclass_types)
    display = argparse.ArgumentParser(prog=prog, usage=f"{prog} CONFIG.yaml [--key value ...]",
                                      description=description, add_help=False, formatter_class=parser.formatter_class)
    owners = {}  # field name -> the most derived class declaring it
    for dtype in dataclass_types:
        for cls in reversed(dtype.__mro__):
            for name in vars(cls).get("__annotations__", {}):
                owners[name] = cls
    titles = {f"{t.__name__} options (calibrl)": display.add_argument_group(f"{t.__name__} options (calibrl)")
              for t in dataclass_types}  # ours first, in the order given, then TRL's, then transformers'
    for title in ("TRL GRPOConfig options", "transformers TrainingArguments options"):
        titles[title] = display.add_argument_group(title)
    hidden = 0
    for action in parser._actions:
        if not action.option_strings:
            continue
        module = owners.get(action.dest, object).__module__
        ours = module.startswith("calibrl")
        if not (ours or full or action.dest in COMMON_TRL_OPTIONS):
            hidden += 1
            continue
        title = (f"{owners[action.dest].__name__} options (calibrl)" if ours else
                 "TRL GRPOConfig options" if module.startswith("trl") else "transformers TrainingArguments options")
        if not full and not ours:
            title = "common TRL / transformers options"
        if title not in titles:
            titles[title] = display.add_argument_group(title)
        titles[title]._group_actions.append(action)  # shown only: parsing is the other parser's job
    if hidden:
        display.epilog = (f"{hidden} more options of TRL's GRPOConfig and transformers' TrainingArguments work "
                          f"as in TRL: {prog} --help-all lists them all")
    return display.format_help()


# ----------------------------------------------------------------------------------------------------------
# Run folders
# ----------------------------------------------------------------------------------------------------------
def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Raise unless `path` is absent, an empty folder, or `overwrite` is set. Reads only."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"output folder {p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise UsageError(f"output folder {p} exists and is not empty (pass --overwrite to replace it)")
    return p


def prepare_output_dir(path: str | os.PathLike, overwrite: bool, is_main: bool = True) -> Path:
    """`check_output_dir`, then (on the main process) empty and create the folder."""
    p = check_output_dir(path, overwrite)
    if is_main:
        if p.is_dir() and any(p.iterdir()):
            shutil.rmtree(p)
        p.mkdir(parents=True, exist_ok=True)
    return p


def is_main_process() -> bool:
    """True on the process that prints and writes run files (rank 0; always true without a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on (written to run.json)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("calibrl", "torch", "transformers", "trl", "accelerate", "peft", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
def parse_tiny_spec(spec: str) -> tuple[str, str]:
    """'tiny:qwen2_5_vl:small' -> ('qwen2_5_vl', 'small'), checked against the known families and sizes."""
    from calibrl.models import FAMILIES, SIZES

    parts = spec.split(":")
    if len(parts) != 3 or parts[1] not in FAMILIES or parts[2] not in SIZES:
        raise UsageError(f"model {spec!r}: expected tiny:<family>:<size> with family in {list(FAMILIES)} "
                         f"and size in {list(SIZES)}")
    return parts[1], parts[2]


def tiny_model_dir(spec: str, seed: int = 0) -> str:
    """Build `tiny:<family>:<size>` once (tokenizer trained on the task corpus) and cache it; returns the dir."""
    from calibrl.models import build_tiny_model, save_tiny_model

    family, size = parse_tiny_spec(spec)
    out = cache_dir() / f"tiny-{family}-{size}-seed{seed}"
    if not (out / "config.json").is_file():
        model, processing_class = build_tiny_model(family, size, seed=seed)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        save_tiny_model(model, processing_class, str(tmp))
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_model_path(spec: str, seed: int = 0) -> str:
    """A model directory (or hub id) for `spec`: tiny specs are built into the cache first."""
    if spec.startswith(TINY_PREFIX):
        return tiny_model_dir(spec, seed)
    if os.path.isdir(spec):
        if not any(os.path.isfile(os.path.join(spec, f)) for f in ("config.json", "adapter_config.json")):
            raise UsageError(f"model folder {spec} has no config.json")
        return spec
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UsageError(f"model not found: {spec}")
    from calibrl.hub import hub_model_path

    try:  # a hub id: one short request, instead of transformers' half minute of retries when offline
        return hub_model_path(spec)
    except LookupError as e:
        raise UsageError(str(e)) from None


def _is_tiny_dir(path: str) -> bool:
    """A saved model of a family `calibrl.models` builds, with its processor (tokenizer) files."""
    from calibrl.models import FAMILIES

    config = os.path.join(path, "config.json")
    if not os.path.isfile(config) or not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") in FAMILIES


def load_model(spec: str, seed: int = 0, model_init_kwargs: dict | str | None = None):
    """(model, processing_class) for a model spec; tiny specs build offline, others use `from_pretrained`."""
    from transformers.utils import logging as hf_logging

    from calibrl.models import load_processor

    hf_logging.disable_progress_bar()  # per-tensor loading bars: noise next to the training bar
    path = resolve_model_path(spec, seed)
    kwargs = dict(json.loads(model_init_kwargs) if isinstance(model_init_kwargs, str) else model_init_kwargs or {})
    if os.path.isfile(os.path.join(path, "adapter_config.json")):  # a LoRA run saves only its adapter
        return _load_adapter(path, seed, kwargs)
    if not kwargs and _is_tiny_dir(path):  # our own tiny models load without importing TRL (~5 s)
        from calibrl.models import load_tiny_model

        return load_tiny_model(path)
    try:
        from trl.trainer.utils import create_model_from_path

        model = create_model_from_path(path, **kwargs)
        if os.path.isdir(path):
            processing_class = load_processor(path)
        else:
            from transformers import AutoProcessor

            processing_class = AutoProcessor.from_pretrained(path)
    except OSError as e:
        raise UsageError(f"could not load model {spec!r}: {' '.join(str(e).split())[:300]}") from None
    return model, processing_class


def _load_adapter(path: str, seed: int, kwargs: dict):
    """A peft adapter folder: its base model (named in adapter_config.json) with the adapter merged in."""
    from peft import PeftModel

    with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"adapter {path} does not name its base model (base_model_name_or_path)")
    try:
        model, processing_class = load_model(base, seed, kwargs or None)
    except UsageError as e:
        raise UsageError(f"adapter {path}: its base model cannot be loaded ({e})") from None
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
    return model, processing_class


def freeze_vision_tower(model) -> int:
    """Stop gradients into the vision encoder; the projector into the language model (Qwen's `merger`,
    LLaVA's `multi_modal_projector`) keeps training. Returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        in_encoder = any(p in parts for p in ("visual", "vision_tower", "vision_model"))
        if in_encoder and "merger" not in parts and "multi_modal_projector" not in parts:
            param.requires_grad_(False)
            frozen += 1
    if frozen == 0:
        raise UsageError("freeze_vision_tower=true but the model has no vision encoder")
    return frozen


def lora_config(run: RunArgs):
    """A peft `LoraConfig` from the run fields, or None when `lora_r` is 0."""
    if run.lora_r <= 0:
        return None
    from peft import LoraConfig

    return LoraConfig(r=run.lora_r, lora_alpha=run.lora_alpha, lora_dropout=run.lora_dropout,
                      target_modules=list(run.lora_target_modules), task_type="CAUSAL_LM")


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def task_name(spec: str) -> str | None:
    """'task:digits' -> 'digits'; None for a file source. Unknown task names are an error."""
    if not spec.startswith(TASK_PREFIX):
        return None
    from calibrl.tasks import TASKS

    name = spec[len(TASK_PREFIX):]
    if name not in TASKS:
        raise UsageError(f"dataset {spec!r}: unknown task {name!r}, expected one of {list(TASKS)}")
    return name


def task_rows(spec: str, split: str, n: int, seed: int, expert_style: str = "native", noise_rate: float = 0.3,
              difficulty: list[int] | None = None, task_types: list[str] | None = None) -> list[dict]:
    """`n` rows of a `task:` dataset (dicts with PIL images).

    `task_types` (e.g. `["digits/sum"]`) keeps only those problem types in the `train` and `test` splits:
    rows are generated in growing batches (deterministic in `seed`) until `n` match. The `ood` split is
    never filtered, since its problem types are held out by design. The noisy experts are drawn over the
    generated rows, before the filter, so the kept rows hold about `noise_rate` of them, not exactly.
    """
    from calibrl.tasks import make_dataset

    def make(size: int) -> list[dict]:
        try:
            return make_dataset(task_name(spec), split, n=size, seed=seed, expert_style=expert_style,
                                noise_rate=noise_rate, difficulty=difficulty)
        except ValueError as e:
            raise UsageError(f"dataset {spec!r}: {e}") from None

    if not task_types or split == "ood":
        return make(n)
    wanted, size = set(task_types), 2 * n
    while True:
        rows = make(size)
        kept = [r for r in rows if r["task"] in wanted]
        if len(kept) >= n:
            return kept[:n]
        if not kept or size >= 64 * n:
            found = sorted({r["task"] for r in rows})
            raise UsageError(f"dataset {spec!r}: too few rows of task_types {sorted(wanted)} in split {split!r} "
                             f"(types there: {found})")
        size *= 2


def load_data_file(path: str) -> tuple[Any, Any]:
    """A data file or folder through the adapters: (Dataset, DataSummary); a bad file is a `UsageError`."""
    from calibrl.data import DataError, load_dataset_for_training

    if not os.path.exists(path):
        raise UsageError(f"dataset not found: {path}")
    try:
        return load_dataset_for_training(path)
    except DataError as e:
        raise UsageError(" ".join(str(e).split())) from None


def train_dataset(run: RunArgs):
    """The training `datasets.Dataset` and a one-line description of it."""
    task = task_name(run.dataset)
    if task is None:
        dataset, summary = load_data_file(run.dataset)
        return dataset, str(summary)
    from calibrl.tasks import to_hf_dataset

    rows = task_rows(run.dataset, "train", run.n_train, run.task_seed, run.expert_style, run.noise_rate,
                     run.difficulty, run.task_types)
    return to_hf_dataset(rows), f"{run.dataset}: {len(rows)} train rows, {run.expert_style} experts"


def dataset_rows(dataset) -> list[dict]:
    """A `datasets.Dataset` as a list of dicts (images decoded to PIL), the form evaluation takes."""
    return [dataset[i] for i in range(len(dataset))]


def eval_sets(run: RunArgs, n: int | None = None, seed_offset: int = 1000) -> dict[str, list[dict]]:
    """Held-out sets by name: the task's `eval_splits`, plus every `eval_data` file (named by its stem)."""
    n = run.n_eval if n is None else n
    sets: dict[str, list[dict]] = {}
    if n > 0 and task_name(run.dataset) is not None:
        for split in run.eval_splits:
            sets[split] = task_rows(run.dataset, split, n, run.task_seed + seed_offset, "native", 0.0,
                                    run.difficulty, run.task_types)
    for path in run.eval_data or []:
        dataset, _ = load_data_file(path)
        rows = dataset_rows(dataset)
        sets[Path(path).stem] = rows[:n] if n > 0 else rows
    return sets


# ----------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------
def reward_functions(names: list[str]) -> list:
    """The reward callables named in `names`: ours (from `calibrl.rewards`) by name, a user's as
    `module:function` (an importable module, or a `path/to/file.py`)."""
    from calibrl import rewards

    if not names:
        raise UsageError("reward_funcs is empty: give at least one reward function")
    for name in names:
        if name not in REWARD_FUNCS and ":" not in name:
            raise UsageError(f"unknown reward function {name!r}, expected one of {list(REWARD_FUNCS)} or "
                             "module:function")
    return [getattr(rewards, name) if name in REWARD_FUNCS else import_function(name) for name in names]


def import_function(spec: str) -> Callable:
    """`module:function` or `path/to/file.py:function` -> the function; any failure is one UsageError line."""
    import importlib
    import importlib.util

    source, _, attr = spec.rpartition(":")
    if not source or not attr:
        raise UsageError(f"reward function {spec!r}: expected module:function")
    try:
        if source.endswith(".py"):
            if not os.path.isfile(source):
                raise UsageError(f"reward function {spec!r}: file {source} not found")
            name = "calibrl_user_" + re.sub(r"\W", "_", os.path.splitext(os.path.abspath(source))[0])
            module_spec = importlib.util.spec_from_file_location(name, source)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            import sys

            if os.getcwd() not in sys.path:  # a module next to the config, as `python -m` would find it
                sys.path.append(os.getcwd())
            module = importlib.import_module(source)
    except UsageError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise UsageError(f"reward function {spec!r}: cannot import {source} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise UsageError(f"reward function {spec!r}: {source} has no function {attr!r}")
    return func


def default_reward_weights(names: list[str], weights: list[float] | None) -> list[float] | None:
    """The official acc + 0.1 * fmt when the default pair is used without explicit weights."""
    if weights is None and list(names) == ["accuracy_reward", "format_reward"]:
        from calibrl.rewards import FORMAT_WEIGHT

        return [1.0, FORMAT_WEIGHT]
    if weights is not None and len(weights) != len(names):
        raise UsageError(f"reward_weights has {len(weights)} values for {len(names)} reward_funcs")
    return weights
