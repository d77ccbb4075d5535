"""Two gloo processes on CPU give what one process gives: advantages, expert log-probs, guidance loss, weights."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here trains a model or starts processes

HERE = os.path.dirname(__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, model_dir: str, out: str, shared_prefix: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           os.path.join(HERE, "dist_worker.py"), model_dir, out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "SHARED_PREFIX": "1" if shared_prefix else "0"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]


def load(out: str):
    records = []
    for name in sorted(os.listdir(out)):
        if name.startswith("records-"):
            records += json.load(open(os.path.join(out, name)))
    key = {(r["step"], r["uid"], r["slot"]): r for r in records}
    key["_files"] = sorted(n for n in os.listdir(out) if n.startswith("records-"))
    return key, json.load(open(os.path.join(out, "logs.json"))), torch.load(os.path.join(out, "params.pt"))


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def runs(tiny_vlm_dir, dist_dir):
    base = dist_dir
    launch(1, tiny_vlm_dir, str(base / "one"))
    launch(2, tiny_vlm_dir, str(base / "two"))
    return load(str(base / "one")), load(str(base / "two"))


def test_two_processes_keep_groups_whole(runs):
    (_, _, _), (two, _, _) = runs
    assert two.pop("_files") == ["records-0.json", "records-1.json"]  # really two processes
    assert len(two) == 2 * 16  # 2 steps x 16 rows, each recorded once
    for r in two.values():
        assert r["group_uids"] == [r["uid"]], "a group mixed prompts"
        assert r["expert_len"] > 0


def test_two_processes_match_one(runs):
    (one, logs1, p1), (two, logs2, p2) = runs
    one, two = {k: v for k, v in one.items() if k != "_files"}, {k: v for k, v in two.items() if k != "_files"}
    assert one.keys() == two.keys()
    for k in one:
        a, b = one[k], two[k]
        assert a["completion"] == b["completion"]
        assert a["sign"] == b["sign"]
        assert a["advantage"] == pytest.approx(b["advantage"], abs=1e-6)
        assert a["expert_len"] == b["expert_len"]
        assert a["expert_logp_sum"] == pytest.approx(b["expert_logp_sum"], abs=1e-4)
    assert any(abs(r["advantage"]) > 0 for r in one.values())
    for key in ("calibrl/guide_loss", "calibrl/pg_loss", "loss"):
        assert [h[key] for h in logs2] == pytest.approx([h[key] for h in logs1], abs=1e-6), key
    assert any(abs(h["calibrl/guide_loss"]) > 0 for h in logs1)
    worst = max((p1[n] - p2[n]).abs().max().item() for n in p1)
    assert worst < 1e-5, worst


def test_two_processes_shared_prefix_equals_the_repeated_layout(runs, dist_dir, tiny_vlm_dir, tmp_path):
    """Under DDP (2 gloo processes) the shared-prefix forward trains as the repeated layout: same rollouts,
    losses to float rounding; weights to 1e-4 (Adam divides each gradient by its own running size, so rounding in
    a near-zero gradient grows to a small share of a step: tests/test_prefix.py compares them under SGD)."""
    _, (two, logs2, p2) = runs  # shared prefix (the default)
    launch(2, tiny_vlm_dir, str(tmp_path / "off"), shared_prefix=False)
    off, logs_off, p_off = load(str(tmp_path / "off"))
    shared_calls = {run: [json.load(open(os.path.join(folder, f"shared-{r}.json"))) for r in (0, 1)]
                    for run, folder in (("on", str(dist_dir / "two")), ("off", str(tmp_path / "off")))}
    assert all(n > 0 for n in shared_calls["on"]) and shared_calls["off"] == [0, 0], shared_calls
    two, off = {k: v for k, v in two.items() if k != "_files"}, {k: v for k, v in off.items() if k != "_files"}
    assert two.keys() == off.keys()
    for k in off:
        assert two[k]["completion"] == off[k]["completion"]
        assert two[k]["expert_logp_sum"] == pytest.approx(off[k]["expert_logp_sum"], abs=1e-4)
    for key in ("calibrl/guide_loss", "calibrl/pg_loss", "loss", "entropy"):
        assert [h[key] for h in logs2] == pytest.approx([h[key] for h in logs_off], abs=1e-5), key
    worst = max((p2[n] - p_off[n]).abs().max().item() for n in p_off)
    assert worst < 1e-4, worst
