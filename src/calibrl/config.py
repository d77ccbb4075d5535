"""Configuration in one place: the settings dataclasses of every command, and the one loader that fills them.

Dataclasses (each field carries its `--help` text):
  DataSource     where rows come from: a generated task (`task:digits`) or a data file; shared by all below
  CalibRLConfig  the trainer: TRL's `GRPOConfig` plus the CalibRL fields (`calibrl train`)
  RunArgs        what `calibrl train` trains and how it evaluates it (model, data, rewards, LoRA, held-out sets)
  SFTArgs        the supervised warm start (`calibrl sft`)
  DemoArgs       the demo's before/after evaluation (`calibrl demo`)

Loading (`parse_config`): values come from `preset` < a YAML file (flat, or the command's section of a file
split into `sft:` / `train:` / `demo:`) < `--key value` flags. YAML values are converted with the same
field types the command line uses (from transformers' `HfArgumentParser`), so `learning_rate: 1e-6` (a
string to YAML 1.1) and `--learning_rate 1e-6` give the same float; every mistake is one-line `UsageError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from trl import GRPOConfig

from calibrl import losses
from calibrl.errors import UsageError
from calibrl.methods import get_method, method_names
from calibrl.rewards import REWARD_FUNCS, default_reward_weights
from calibrl.tasks import SEED_STREAMS, task_rows

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
PASS_SIGNS = ("accuracy", "reward_threshold")


def _bf16_device() -> bool:
    """Whether an accelerator that trains in bf16 is present (TRL defaults bf16=True, which fails on a CPU)."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


@dataclass
class CalibRLConfig(GRPOConfig):
    """`GRPOConfig` plus the CalibRL fields. Every GRPOConfig field works as in TRL.

    Defaults follow the official code (METHOD.md §4): token-level gap, mean-centred advantages
    (`scale_rewards="none"`), λ = 0.1, α = 0.5. TRL's `delta` is the dual clip c (official: 3.0); TRL's
    `loss_type="dapo"` (its default) is the official token-mean aggregation.
    """

    method: str = field(default="calibrl", metadata={"help": f"One of {method_names()} (calibrl.methods; "
                        "more can be registered). 'dapo' = GRPO with clip-higher "
                        "(epsilon_high 0.28 unless set), token-mean and z-scored advantages."})
    expert_column: str = field(default="solution", metadata={"help": "Dataset column holding the expert solution."})
    guide_coef: float = field(default=0.1, metadata={"help": "λ: weight of the calibrated guidance term L_exp."})
    leaky_slope: float = field(default=0.5, metadata={"help": "α: LeakyReLU slope for negative inputs."})
    gap: str = field(default="token", metadata={"help": f"Log-likelihood gap: one of {losses.GAP_MODES}. 'token' is "
                     "the official code, 'sequence' the paper, 'constant' a control without expert content."})
    constant_logp: float | None = field(default=None, metadata={"help": "Per-token baseline for gap='constant'; "
                                        "None = the batch mean of the expert's per-token log-probs."})
    weight_by_abs_adv: bool = field(default=True, metadata={"help": "Weight L_exp by |A| (group rareness)."})
    pass_sign: str = field(default="accuracy", metadata={"help": "How s_i is derived: 'accuracy' (the accuracy "
                           "reward component > 0.5) or 'reward_threshold' (total reward > pass_threshold, the "
                           "official code)."})
    accuracy_reward_name: str | None = field(default=None, metadata={"help": "Name of the accuracy reward function;"
                                             " None = the first whose name contains 'accuracy'."})
    pass_threshold: float = field(default=0.1, metadata={"help": "Threshold for pass_sign='reward_threshold'."})
    grpo_warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps of plain GRPO before any expert "
                                   "guidance (the expert is then neither forwarded nor in the loss)."})
    luffy_gamma: float = field(default=0.1, metadata={"help": "γ of LUFFY's policy shaping f(p) = p/(p+γ)."})
    expert_in_group_stats: bool = field(default=False, metadata={"help": "LUFFY/RL-PLUS: include the expert row in "
                                        "the group mean/std (original LUFFY) instead of on-policy rows only."})
    onpolicy_clip: bool = field(default=True, metadata={"help": "LUFFY/RL-PLUS: PPO-clip the on-policy rows "
                                "(CalibRL's baseline) or not (original LUFFY)."})
    guard_rewards: bool = field(default=True, metadata={"help": "Wrap plain reward functions so that one that "
                                "raises, returns NaN/inf or hangs costs that sample (scored 0, counted), not the run."})
    reward_timeout: float | None = field(default=60.0, metadata={"help": "Seconds before a reward call is cut "
                                         "(guard_rewards); None = no limit."})
    shared_prefix: bool = field(default=True, metadata={"help": "Run each group's prompt and images once, not "
                                "once per rollout: in the policy forward/backward (calibrl.prefix) and in the prefill "
                                "of HF generation without vLLM (calibrl.prefill). Exact; where a model or option "
                                "cannot use it, the repeated layout, said in one log line."})
    scale_rewards: str = field(default="none", metadata={"help": "Advantage normalisation: 'none' (official "
                               "scripts, mean-centred), 'group' (paper, z-score) or 'batch'. 'dapo' forces 'group'."})

    def __post_init__(self):
        method = get_method(self.method)  # the registry as it is now, so a method registered later is valid
        method.configure(self)  # e.g. dapo's clip-higher, before TRL's own checks see the values
        if self.bf16 is None and (self.use_cpu or not _bf16_device()):  # TRL's bf16 default needs a GPU
            self.bf16 = False
        super().__post_init__()
        if self.gap not in losses.GAP_MODES:
            raise ValueError(f"gap must be one of {losses.GAP_MODES}, got {self.gap!r}")
        if self.pass_sign not in PASS_SIGNS:
            raise ValueError(f"pass_sign must be one of {PASS_SIGNS}, got {self.pass_sign!r}")
        if self.loss_type not in SUPPORTED_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {SUPPORTED_LOSS_TYPES} for CalibRLTrainer, got {self.loss_type!r}")
        if self.guide_coef < 0:
            raise ValueError(f"guide_coef must be >= 0, got {self.guide_coef}")
        if not 0.0 <= self.leaky_slope <= 1.0:
            raise ValueError(f"leaky_slope must be in [0, 1], got {self.leaky_slope}")
        if self.grpo_warmup_steps < 0:
            raise ValueError(f"grpo_warmup_steps must be >= 0, got {self.grpo_warmup_steps}")
        if self.luffy_gamma <= 0:
            raise ValueError(f"luffy_gamma must be > 0, got {self.luffy_gamma}")
        if self.delta is not None and self.delta <= 1.0:
            raise ValueError(f"delta (the dual clip c) must be > 1, got {self.delta}")
        method.validate(self)
        if method.uses_expert and (self.per_device_train_batch_size * self.steps_per_generation) % self.num_generations:
            # Groups must not span processes: the expert of a group is looked up on the process that holds it.
            raise ValueError(
                f"per_device_train_batch_size * steps_per_generation ({self.per_device_train_batch_size} * "
                f"{self.steps_per_generation}) must be a multiple of num_generations ({self.num_generations}) "
                f"for method={self.method!r}, so that every group stays within one process"
            )

    @property
    def uses_expert(self) -> bool:
        return get_method(self.method).uses_expert


# ----------------------------------------------------------------------------------------------------------
# Data source, run, SFT and demo fields
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DataSource:
    """Where rows come from: a generated task (`task:digits`, offline) or a data file, and how task rows are drawn.

    Rows of a task are drawn from named seed streams of `task_seed` (`calibrl.tasks.SEED_STREAMS`), so that
    training rows, validation rows and held-out rows never share a draw.
    """

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

    def training_rows(self, expert_style: str | None = None) -> list[dict]:
        """The `n_train` training rows of a task: dataset, with this source's experts (or `expert_style`'s)."""
        return task_rows(self.dataset, "train", self.n_train, self.task_seed + SEED_STREAMS["train"],
                         expert_style or self.expert_style, self.noise_rate, self.difficulty, self.task_types)

    def heldout_rows(self, split: str, n: int, stream: str = "heldout") -> list[dict]:
        """`n` evaluation rows of `split` from the seed stream `stream`, with native, correct experts."""
        return task_rows(self.dataset, split, n, self.task_seed + SEED_STREAMS[stream], "native", 0.0,
                         self.difficulty, self.task_types)


@dataclass
class RunArgs(DataSource):
    """What `calibrl train` trains and how it evaluates it; the optimisation itself is `CalibRLConfig`."""

    model: str = field(default="tiny:qwen2_5_vl:small", metadata={"help": "A local model directory, "
                       "'tiny:<family>:<size>' (built offline, families qwen2_5_vl/llava/qwen2, sizes nano/small/"
                       "base/large), or a hub id (needs a network)."})
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy_reward", "format_reward"],
                                    metadata={"help": f"Reward functions from calibrl.rewards: {tuple(REWARD_FUNCS)}, or your own "
                                    "as module:function (or path/to/file.py:function). "
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


@dataclass
class SFTArgs(DataSource):
    """Fields of `calibrl sft` (YAML keys or `--key value`)."""

    expert_style: str = field(default="native", metadata={"help": "Expert style of a task: dataset (the SFT "
                              "targets): native, mismatched or noisy."})
    mismatched_share: float = field(default=0.0, metadata={"help": "Share of a task's SFT targets written in the "
                                    "`mismatched` wording (the rest in expert_style): the regime knob, a warm start "
                                    "under which the RL expert's wording is plausible but not the policy's own."})
    model: str = field(default="tiny:qwen2_5_vl:small", metadata={"help": "Model directory or tiny:<family>:<size>."})
    output_dir: str | None = field(default=None, metadata={"help": "Where the model is saved (default runs/sft)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    expert_column: str = field(default="solution", metadata={"help": "Column holding the target solution."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps (upper bound with select_window)."})
    batch_size: int = field(default=32, metadata={"help": "Rows per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (constant after warm-up)."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    max_length: int = field(default=128, metadata={"help": "Target tokens kept per row, EOS included."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order and the model build."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    select_window: list[float] | None = field(default=None, metadata={"help": "[lo, hi]: stop at the first "
                                              "checkpoint whose validation accuracy is in the window."})
    select_every: int = field(default=10, metadata={"help": "Steps between validation checks."})
    select_after: int = field(default=0, metadata={"help": "First step at which to check."})
    n_select: int = field(default=128, metadata={"help": "Validation rows (train split, another seed; for a "
                          "file, the last rows are held out of training)."})
    select_max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per validation answer."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})

    def __post_init__(self):
        if not 0.0 <= self.mismatched_share <= 1.0:
            raise ValueError(f"mismatched_share must be in [0, 1], got {self.mismatched_share}")
        if self.max_steps < 1 or self.batch_size < 1 or self.select_every < 1 or self.max_length < 2:
            raise ValueError("max_steps, batch_size and select_every must be >= 1 and max_length >= 2")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.select_window is not None:
            lo_hi = list(self.select_window)
            if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
                raise ValueError(f"select_window must be [lo, hi] with 0 <= lo <= hi <= 1, got {lo_hi}")


@dataclass
class DemoArgs:
    """The `demo:` section: the before/after evaluation."""

    n_eval: int = field(default=500, metadata={"help": "Held-out rows per split, before and after RL."})
    eval_splits: list[str] = field(default_factory=lambda: ["test", "ood"], metadata={"help": "Splits to compare."})
    eval_batch_size: int = field(default=64, metadata={"help": "Generation batch size."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Tokens generated per answer."})


# ----------------------------------------------------------------------------------------------------------
# Loading: preset < YAML file < --key value flags
# ----------------------------------------------------------------------------------------------------------
SECTIONS = ("sft", "train", "demo")  # sections a config file may be split into, one per command


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


def _type_name(action: argparse.Action) -> str:
    t = action.type
    if action.choices:
        return f"one of {list(action.choices)}"
    if t is None or t is str:
        return "str"
    return getattr(t, "__name__", str(t)).replace("string_to_bool", "bool")


def _scalar_text(value: Any) -> str:
    """A YAML scalar as the command line would spell it (booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """One YAML scalar through the field's command-line type (and choices), exactly as a flag would be."""
    text = _scalar_text(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"{where}: {_argparse_message(f'argument --x: {e}').removeprefix('--x: ')}") from None
    except (TypeError, ValueError):
        name = getattr(action.type, "__name__", repr(action.type))
        raise UsageError(f"{where}: expected {name}, got {text!r}") from None
    if action.choices is not None and converted not in action.choices:
        raise UsageError(f"{where}: invalid choice: {text!r} (choose from {', '.join(map(repr, action.choices))})")
    return converted


def _coerce_mapping(values: dict, actions: dict[str, argparse.Action], source: str) -> dict:
    """Typed field values from a mapping of YAML values (None and mappings pass as they are)."""
    out = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in actions:
            raise UsageError(f"{source}: unknown config key {key!r}")
        action, where = actions[key], f"{source}: {key}"
        many = action.nargs in ("+", "*")
        if value is None:
            out[key] = None
        elif isinstance(value, dict):
            if action.type not in (None, str):
                raise UsageError(f"{where}: expected {_type_name(action)}, got a mapping")
            out[key] = value
        elif isinstance(value, (list, tuple)):
            if not many:
                raise UsageError(f"{where}: expected a single {_type_name(action)}, got a list")
            for item in value:
                if isinstance(item, (dict, list)):
                    raise UsageError(f"{where}: expected {_type_name(action)}, got a nested {type(item).__name__}")
            out[key] = [_convert(action, item, where) for item in value]
        else:
            converted = _convert(action, value, where)
            out[key] = [converted] if many else converted
    return out


def _parse_flags(parser, overrides: list[str], types: list[type]) -> dict:
    """Typed values of the `--key value` flags that were given (and only those)."""
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    namespace, rest = parser.parse_known_args(list(overrides), namespace=argparse.Namespace())
    if rest:
        bad = next((t for t in rest if t.startswith("-")), rest[0])
        if bad.startswith("-"):
            raise UsageError(f"unknown option {bad.split('=')[0]!r} (not a field of {_names(types)})")
        raise UsageError(f"unexpected argument {bad!r}: options take the form --key value")
    return vars(namespace)


def _defaults(types: list[type]) -> dict:
    """Every field's own default, by name (what a field not given keeps)."""
    out = {}
    for dtype in types:
        for f in dataclasses.fields(dtype):
            if f.default is not dataclasses.MISSING:
                out.setdefault(f.name, f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out.setdefault(f.name, f.default_factory())
    return out


def parse_config(
    dataclass_types: list[type],
    config_path: str | os.PathLike | None = None,
    overrides: list[str] = (),
    section: str | None = None,
    preset: dict | None = None,
    values: dict | None = None,
    finalize: Callable[[dict], None] | None = None,
) -> list[Any]:
    """One instance of each dataclass from `preset` < `values` (a mapping, e.g. a benchmark's) < the YAML file
    < `--key value` overrides.

    `finalize(values)` may fill in derived defaults (it sees every field by name, given or default) before the
    dataclasses are built. Raises `UsageError` naming the offending key on an unknown key, a badly typed value,
    or a value the dataclass itself rejects (its `__post_init__` check).
    """
    parser = _make_parser(dataclass_types)
    actions: dict[str, argparse.Action] = {}
    for a in parser._actions:  # a bool field that defaults to True also gets a `--no_<name>` (store_false,
        if a.option_strings:  # same dest, added after it): a value is read by the field's own option
            actions.setdefault(a.dest, a)
    given = _coerce_mapping(preset or {}, actions, "defaults")
    given.update(_coerce_mapping(values or {}, actions, "values"))
    if config_path is not None:
        given.update(_coerce_mapping(read_config_file(config_path, section), actions, str(config_path)))
    given.update(_parse_flags(parser, overrides, dataclass_types))
    if finalize is not None:
        full = {**_defaults(dataclass_types), **given}
        before = dict(full)
        finalize(full)
        given.update({k: v for k, v in full.items() if k not in before or v is not before[k]})

    # Only the keys that were set reach the dataclasses: the others keep their own defaults (some configs
    # warn about fields passed explicitly).
    out = []
    for dtype in dataclass_types:
        keys = {f.name for f in dataclasses.fields(dtype) if f.init}
        try:
            out.append(dtype(**{k: v for k, v in given.items() if k in keys}))
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
        given = next((t for t in dataclass_types if action.dest in {f.name for f in dataclasses.fields(t)}), None)
        title = (f"{given.__name__} options (calibrl)" if ours else
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


def cpu_defaults() -> dict:
    """Defaults that make a plain `calibrl train` work on a machine without a GPU (config values win)."""
    import torch

    return {} if torch.cuda.is_available() else {"use_cpu": True, "bf16": False}


def load_train_config(config_path: str | None = None, overrides: list[str] = (), section: str = "train",
                      values: dict | None = None) -> tuple[CalibRLConfig, RunArgs]:
    """(CalibRLConfig, RunArgs) from a YAML file (or a mapping) and `--key value` overrides; nothing is built.

    Derived defaults: `output_dir` runs/<run_name> (runs/train), `run_name` the output folder's name, and the
    official reward weights [1.0, 0.1] for the default accuracy + format pair.
    """
    def finalize(v: dict) -> None:
        if v.get("output_dir") is None:
            v["output_dir"] = os.path.join("runs", v.get("run_name") or "train")
        if v.get("run_name") is None:
            v["run_name"] = os.path.basename(os.path.normpath(v["output_dir"]))
        v["reward_weights"] = default_reward_weights(v["reward_funcs"], v.get("reward_weights"))

    config, run = parse_config([CalibRLConfig, RunArgs], config_path, overrides, section=section,
                               preset=cpu_defaults(), values=values, finalize=finalize)
    return config, run
