"""Write the benchmark fixtures (a handful of made-up rows per benchmark, in each release's published layout)
to a folder, so `calibrl eval MODEL --bench paper --bench-dir FOLDER` runs offline, as in the README.

    python scripts/make_bench_fixtures.py bench_fixtures
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from calibrl.bench.fixtures import WRITERS, write_fixtures  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default="bench_fixtures", help="where to write (default bench_fixtures)")
    p.add_argument("--bench", nargs="+", choices=sorted(WRITERS), default=None, help="only these benchmarks")
    ns = p.parse_args()
    write_fixtures(ns.folder, ns.bench)
    for name in sorted(os.listdir(ns.folder)):
        print(os.path.join(ns.folder, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
