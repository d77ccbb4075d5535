"""`calibrl sft`: the supervised warm start (`calibrl.sft`) from a config, then a summary of what was kept."""

from __future__ import annotations

import os

from calibrl.config import SFTArgs, parse_config

CONFIG_TYPES = (SFTArgs,)
DESCRIPTION = "Supervised warm start. Keys from CONFIG.yaml (flat, or its `sft:` section) and/or --key value."


def run(config_path: str | None, overrides: list[str]) -> int:
    """`calibrl sft [CONFIG.yaml] [--key value ...]`."""
    from calibrl.sft import run_sft, summary_table
    from calibrl.storage import check_writable

    (args,) = parse_config([SFTArgs], config_path, overrides, section="sft")
    check_writable(args.output_dir or os.path.join("runs", "sft"))
    summary = run_sft(args)
    print(f"\nmodel saved to {summary['output_dir']}")
    print(summary_table(summary))
    return 0
