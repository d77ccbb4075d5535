"""The benchmarks by name, and the paper's set (`--bench paper`)."""

from __future__ import annotations

from calibrl.bench.base import Benchmark
from calibrl.bench.geoeval import GeoEval
from calibrl.bench.geometry import GeoQA, Geometry3K
from calibrl.bench.mathverse import MathVerse
from calibrl.bench.mathvision import MathVision
from calibrl.bench.mathvista import MathVista
from calibrl.bench.mmmu import MMMU
from calibrl.bench.scienceqa import ScienceQA
from calibrl.bench.wemath import WeMath

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (GeoEval(), Geometry3K(), GeoQA(), MathVista(), MathVerse(),
                                                        MathVision(), MMMU(), WeMath(), ScienceQA())}
# The paper's columns we can read, in its order: in-domain geometry, then out-of-domain.
PAPER = ("geoeval", "geometry3k", "geoqa", "mathvista", "mathverse", "mathvision", "mmmu", "wemath", "scienceqa")


def resolve_names(names: list[str] | str) -> list[str]:
    """Benchmark names from `--bench` values ("a,b", "paper"), in order, without repeats; unknown ones raise."""
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for value in names:
        for name in (n.strip().lower() for n in str(value).split(",")):
            if not name:
                continue
            expanded = PAPER if name == "paper" else (name,)
            for n in expanded:
                if n not in BENCHMARKS:
                    raise ValueError(f"unknown benchmark {n!r}: expected one of {', '.join(BENCHMARKS)} or paper")
                if n not in out:
                    out.append(n)
    if not out:
        raise ValueError("--bench names no benchmark")
    return out
