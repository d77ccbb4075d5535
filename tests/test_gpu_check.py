"""scripts/gpu_check.sh on a machine without CUDA: the whole check as a CPU dry run (--cpu-only), the wheel
install it does where packages are missing, its time budget, the expert log-prob check, and what it says
without a GPU.

The CUDA run itself (bf16, peak memory, realistic shapes) needs a GPU; everything around it is checked here.
"""

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from helpers import digit_rows, make_trainer

pytestmark = pytest.mark.slow  # every test here trains a model or starts processes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "scripts"))
import gpu_bench  # noqa: E402

RUNS = {"grpo", "dapo", "calibrl_token", "calibrl_sequence", "calibrl_sequence_mean", "calibrl_constant", "luffy",
        "rlplus"}


def _run(args: list[str], tmp_path: Path, path_prefix: str | None = None, **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env_extra}
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env["PATH"]
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_cpu_dry_run_runs_every_part_and_writes_the_json_and_log(tmp_path):
    proc = _run(["--cpu-only", "--out", "out", "--steps", "2", "--threads", "1"], tmp_path)
    out = tmp_path / "out"  # relative to the caller's folder, not the repository
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] is True and report["complete"] is True and report["device"] == "cpu"
    assert report["versions"]["trl"] == "1.16.0" and report["elapsed_s"] < report["budget_s"]
    runs = report["correctness"]["runs"]
    assert set(runs) == RUNS
    for name, r in runs.items():
        assert r["ok"] and r["steps"] == 2 and r["skipped_steps"] == 0 and r["param_device"] == "cpu", (name, r)
        assert all(abs(x) < 1e6 for x in r["losses"]) and len(r["losses"]) == 2
        if name.startswith("calibrl"):  # the trainer's expert log-probs against our own forward
            ex = r["expert_logps"]
            assert ex["ok"] and ex["experts"], ex
            for e in ex["experts"]:
                assert e["ids_match"] and e["max_abs"] < 1e-3 and e["shifted_mean_abs"] > 0.01, e
        else:
            assert "expert_logps" not in r
    ov = report["overhead"]
    assert ov["ok"] and ov["timed_steps_per_method"] == 2 and ov["setting"]["widths"] == "tiny"
    assert ov["expert_logps"]["ok"] and ov["expert_logps"]["experts"][0]["tokens"] == 16
    assert 0.2 < ov["ratio_calibrl_over_grpo"] < 5
    assert all(len(v) == 3 for v in ov["losses"].values())  # warm-up + 2 timed steps, each finite (ov["ok"])
    for m in ("grpo", "calibrl"):
        split = ov["median_s"][m]
        assert set(split) == {"step", "generation", "expert_forward", "scoring_other", "policy_fwd_bwd"}
        assert split["generation"] > 0 and split["policy_fwd_bwd"] > 0
    assert ov["median_s"]["grpo"]["expert_forward"] == 0 < ov["median_s"]["calibrl"]["expert_forward"]
    log = (out / "gpu_check.log").read_text()
    assert "CPU dry run" in log.splitlines()[-1] and "ratio" in log


def test_the_time_budget_skips_what_it_cannot_hold_and_says_so(tmp_path):
    proc = _run(["--cpu-only", "--out", str(tmp_path), "--runs", "grpo,dapo", "--steps", "1", "--threads", "1",
                 "--budget-s", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["correctness"]["runs"]) == {"grpo"}  # the first run always, then nothing past the budget
    assert report["complete"] is False and report["overhead"] is None
    assert any("dapo" in s for s in report["skipped"]) and any(s.startswith("overhead") for s in report["skipped"])
    assert "skipped:" in proc.stdout


def _probe_wheel(folder: Path) -> Path:
    """A minimal wheel of a module `gpucheck_probe`, standing in for trl & co. on the GPU machine."""
    folder.mkdir()
    path = folder / "gpucheck_probe-1.0-py3-none-any.whl"
    info = "gpucheck_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gpucheck_probe/__init__.py", "VALUE = 1\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        files = ["gpucheck_probe/__init__.py", f"{info}/METADATA", f"{info}/WHEEL", f"{info}/RECORD"]
        z.writestr(f"{info}/RECORD", "".join(f"{f},,\n" for f in files))
    return path


def test_a_missing_package_is_installed_from_the_wheels_folder(tmp_path):
    _probe_wheel(tmp_path / "wheels")
    site = tmp_path / "site"
    proc = _run(["--wheels", "wheels"], tmp_path, GPU_CHECK_NEEDS="trl gpucheck_probe", GPU_CHECK_SITE=str(site))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (site / "gpucheck_probe" / "__init__.py").is_file()
    assert "installed 1 wheels from" in proc.stdout and "No CUDA GPU here" in proc.stdout


def test_a_missing_package_without_wheels_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run(["--wheels", "empty", "--out", "out"], tmp_path, GPU_CHECK_NEEDS="gpucheck_absent",
                GPU_CHECK_SITE=str(tmp_path / "site"))
    assert proc.returncode == 2
    line = "gpu_check: error: cannot import one of: gpucheck_absent, and --wheels"
    assert line in proc.stdout + proc.stderr and line in (tmp_path / "out" / "gpu_check.log").read_text()


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


@pytest.mark.parametrize("shift", [0, 1])
def test_the_expert_check_tells_aligned_from_misaligned_log_probs(tiny_vlm_dir, tmp_path, shift):
    """The check must fail on log-probs off by one token (the classic slicing bug), not only pass on good ones."""
    tr = make_trainer(tiny_vlm_dir, tmp_path, rows=digit_rows(8), max_completion_length=24)
    good = tr._expert_forward

    def off_by(inputs, rows, expert_ids):
        logps, ent, mask = good(inputs, rows, expert_ids)
        return torch.roll(logps, shift, dims=1), ent, mask

    tr._expert_forward = off_by
    result: dict = {}
    gpu_bench.install_expert_check(tr, torch.float32, result)
    rows = [tr.train_dataset[i] for i in range(2)]
    ids = [tr.expert_token_ids(r["solution"])[0] for r in rows]
    tr._expert_forward(rows, [0, 1], ids)
    assert len(result["experts"]) == 2 and all(e["ids_match"] for e in result["experts"])
    assert result["ok"] is (shift == 0), result
