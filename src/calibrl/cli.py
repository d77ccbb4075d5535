"""The `calibrl` command line: argument wiring only; each command lives in `calibrl.commands.<name>`.

    calibrl train CONFIG.yaml [--key value ...]   RL (CalibRL or a baseline) with TRL's GRPO machinery
    calibrl sft CONFIG.yaml [--key value ...]     supervised warm start on expert solutions
    calibrl eval MODEL --data task:digits         held-out greedy accuracy, pass@k, format rate
    calibrl eval MODEL [MODEL ...] --bench paper --bench-dir DIR   the paper's benchmarks, each by its own rules
    calibrl plot RUN_DIR [RUN_DIR ...]            training curves of run folders, overlaid
    calibrl probe MODEL --data task:digits        before training: where the expert sits for the policy
    calibrl demo                                  the whole pipeline on a tiny model, offline, on CPU

A command module has `run(...)` and either `add_arguments(parser)` (argparse options) or `CONFIG_TYPES` (it
takes `CONFIG.yaml [--key value ...]` over those dataclasses, parsed by `calibrl.config`); a new command is a
new module plus one line in `COMMANDS`. Mistakes in the input print one line, `calibrl: error: ...`, on
stderr and exit with status 2, without a traceback. Command modules are imported only when run, so
`calibrl --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from calibrl.errors import UsageError

EXIT_USAGE = 2
EXIT_STORAGE = 1  # a full or read-only disk: not the user's input

# name -> (module under calibrl.commands, one-line help, takes a config file)
COMMANDS: dict[str, tuple[str, str, bool]] = {
    "train": ("train", "RL training (CalibRL, GRPO, DAPO, LUFFY, RL-PLUS) from a YAML config", True),
    "sft": ("sft", "supervised warm start on expert solutions", True),
    "eval": ("eval", "held-out accuracy / pass@k / format rate of a model", False),
    "plot": ("plot", "PNG training curves of one or more run folders", False),
    "probe": ("probe", "before training: where the expert sits for your policy (the regime CalibRL works in)", False),
    "demo": ("demo", "tiny Qwen2.5-VL, digits task: SFT warm start, evaluate, CalibRL, evaluate (CPU, offline)", False),
}


def command_module(name: str):
    return importlib.import_module(f"calibrl.commands.{COMMANDS[name][0]}")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `calibrl`; option commands get their arguments from their module (imported here)."""
    parser = argparse.ArgumentParser(prog="calibrl", description="CalibRL: hybrid-policy RLVR with an expert "
                                     "calibration baseline, on TRL.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text, takes_config) in COMMANDS.items():
        if takes_config:  # parsed by calibrl.config; registered here for `calibrl --help`
            sp = sub.add_parser(name, help=help_text, add_help=False)
            sp.add_argument("config", nargs="?")
            sp.add_argument("overrides", nargs=argparse.REMAINDER)
        else:
            sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(command=name)
    return parser


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    def error(message: str):
        raise UsageError(" ".join(message.split()))

    parser.error = error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sp in action.choices.values():
                _one_line_errors(sp)


def _config_command(name: str, argv: list[str]) -> int:
    """`calibrl train|sft [CONFIG.yaml] [--key value ...]`."""
    if "-h" in argv or "--help" in argv or "--help-all" in argv:
        from calibrl.config import config_help

        module = command_module(name)
        print(config_help(list(module.CONFIG_TYPES), f"calibrl {name}", module.DESCRIPTION, full="--help-all" in argv))
        return 0
    config = argv[0] if argv and not argv[0].startswith("-") else None
    overrides = argv[1:] if config is not None else argv
    if config is not None and not os.path.isfile(config):  # before any slow import
        raise UsageError(f"config file not found: {config}")
    return command_module(name).run(config, overrides)


def _options_command(name: str, argv: list[str]) -> int:
    """A command with argparse options (eval, plot, demo)."""
    module = command_module(name)
    parser = argparse.ArgumentParser(prog=f"calibrl {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    _one_line_errors(parser)
    return module.run(parser.parse_args(argv))


def _quiet_library_warnings() -> None:
    """Hide deprecation noise we cannot act on: TRL's configs default `gradient_checkpointing=True`, a name
    transformers 5 deprecates, and TRL's trainers call the deprecated model methods of that name."""
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing\w*` is deprecated", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_library_warnings()
    try:
        if argv and argv[0] in COMMANDS:
            name = argv[0]
            return (_config_command if COMMANDS[name][2] else _options_command)(name, argv[1:])
        parser = build_parser()
        _one_line_errors(parser)
        ns = parser.parse_args(argv)  # an unknown command or --help
        parser.print_help()
        return EXIT_USAGE if ns.command is None else 0
    except UsageError as e:
        print(f"calibrl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a full or read-only disk (StorageError, or any other write that met one)
        from calibrl.storage import StorageError, storage_cause

        if isinstance(e, StorageError):
            print(f"calibrl: error: {' '.join(str(e).split())}", file=sys.stderr)
            return EXIT_STORAGE
        found = storage_cause(e)
        if found is None:
            raise
        print(f"calibrl: error: could not write {e.filename or 'an output file'}: {found[1]}", file=sys.stderr)
        return EXIT_STORAGE
    except ValueError as e:  # a checkpoint that is not whole
        from calibrl.checkpoints import CheckpointError

        if not isinstance(e, CheckpointError):
            raise
        print(f"calibrl: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("calibrl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
