"""benchmarks.shared_prefix --quick: both layouts timed per phase, side by side, and their peak memory."""

import json

import pytest

from benchmarks import shared_prefix

pytestmark = pytest.mark.slow  # trains a nano model and starts two processes


def test_quick_times_both_layouts_per_phase_and_their_memory(tmp_path, capsys):
    out = tmp_path / "prefix.json"
    results = shared_prefix.main(["--quick", "--json", str(out)])
    r = results["quick"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    for layout in ("repeated", "shared"):
        med = r["median_s"][layout]
        assert all(med[p] > 0 for p in ("generation", "forward", "backward"))
        assert med["step"] == pytest.approx(sum(med[p] for p in ("generation", "forward", "backward")), rel=0.5)
        mem = r["memory"][layout]
        assert mem["layout"] == layout and mem["peak_rss_mib"] >= mem["rss_before_mib"] > 0
    assert r["speedup_per_step"] == pytest.approx(r["median_s"]["repeated"]["step"] / r["median_s"]["shared"]["step"])
    assert r["setting"]["timed_steps"] == 2 and r["setting"]["prompt_tokens_mean"] > r["setting"]["completion_tokens_mean"]
    assert r["machine"]["nproc"] >= 1 and len(r["machine"]["loadavg"]) == 3
    printed = capsys.readouterr().out
    assert "speed-up per step" in printed and "peak memory over start" in printed
