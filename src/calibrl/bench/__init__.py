"""The paper's benchmarks read from local copies in their published layouts, each scored by its own rules.

    calibrl eval MODEL [MODEL ...] --bench paper --bench-dir DIR [--out OUT]

`registry.BENCHMARKS` maps a name to a `Benchmark` (one module per family: mathvista, mathverse,
mathvision, mmmu, wemath, geoeval, geometry, scienceqa); `scoring` holds the shared rule-based matchers;
`runner.evaluate_benchmarks` generates (resumably, one JSONL row per question) and scores; `command`
wires it to `calibrl eval`. docs/EVALUATION.md states every rule.
"""

from calibrl.bench.data import BenchDataError
from calibrl.bench.registry import BENCHMARKS, PAPER, resolve_names
from calibrl.bench.runner import BenchSettings, evaluate_benchmarks

__all__ = ["BENCHMARKS", "PAPER", "BenchDataError", "BenchSettings", "evaluate_benchmarks", "resolve_names"]
