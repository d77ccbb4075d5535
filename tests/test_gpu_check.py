"""scripts/gpu_check.sh on a machine without CUDA: the CPU part end to end, and what it says without a GPU.

The CUDA part needs a GPU (bf16 on the device, peak memory); here we check everything around it: every
method trains through the script, the JSON carries the figures, and a missing or unusable GPU is reported.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here trains a model or starts processes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(args: list[str], tmp_path: Path, path_prefix: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env["PATH"]
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_cpu_part_trains_every_method_and_writes_the_figures(tmp_path):
    out = tmp_path / "check.json"
    proc = _run(["--cpu-only", "--size", "nano", "--steps", "3", "--prompts", "2", "--generations", "4",
                 "--max-new-tokens", "8", "--threads", "1", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["gpu"] == {}
    assert set(report["cpu"]) == {"grpo", "dapo", "calibrl", "luffy", "rlplus"}
    for method, r in report["cpu"].items():
        assert r["steps"] == 3 and r["ok"], (method, r)
        assert 0 < r["steps_per_s"] < 1e4 and r["peak_gpu_mib"] is None and r["param_device"] == "cpu"
    assert "(CPU part only: no CUDA here)" in proc.stdout  # this machine has no CUDA


def test_without_cuda_it_says_so(tmp_path):
    proc = _run([], tmp_path)
    assert proc.returncode == 0 and "No CUDA GPU here" in proc.stdout, proc.stdout + proc.stderr


def test_a_gpu_that_torch_cannot_use_is_an_error(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    proc = _run([], tmp_path, path_prefix=str(fake))
    assert proc.returncode == 1 and "install a CUDA build of torch" in proc.stdout, proc.stdout + proc.stderr
