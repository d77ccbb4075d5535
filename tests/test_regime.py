"""The regime knob: SFT targets with a share in the mismatched wording, and the base-measuring script."""

import json

import pytest

from calibrl.config import SFTArgs
from calibrl.files import weights_fingerprint
from calibrl.sft import mix_wordings, sft_rows


def test_mismatched_share_switches_exactly_that_many_targets_and_nothing_else():
    args = SFTArgs(dataset="task:digits", n_train=40, difficulty=[1], mismatched_share=0.1)
    train, _, description = sft_rows(args)
    native = SFTArgs(dataset="task:digits", n_train=40, difficulty=[1]).training_rows()
    switched = [i for i, (a, b) in enumerate(zip(train, native)) if a["solution"] != b["solution"]]
    assert len(switched) == 4 and "4 of them in the mismatched wording" in description
    assert all(train[i]["prompt"] == native[i]["prompt"] and train[i]["answer"] == native[i]["answer"] for i in range(40))
    assert sft_rows(args)[0] == train  # deterministic in task_seed
    with pytest.raises(ValueError, match="same problems"):
        mix_wordings(native, native[::-1], 0.5, 0)
    with pytest.raises(ValueError, match="mismatched_share"):
        SFTArgs(mismatched_share=1.5)


def test_warm_start_cache_key_ignores_an_unset_share():
    from calibrl.commands.demo import warm_start_dir

    plain, mixed = SFTArgs(), SFTArgs(mismatched_share=0.05)
    assert warm_start_dir(plain) != warm_start_dir(mixed)
    assert warm_start_dir(plain) == warm_start_dir(SFTArgs(mismatched_share=0.0))


@pytest.mark.slow
def test_regime_script_quick_is_resumable(tmp_path, monkeypatch):
    from benchmarks import regime, report

    monkeypatch.setenv("CALIBRL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bases.json"
    assert regime.main(["--quick", "--out", str(out), "--shares", "0", "0.5"]) == 0
    data = json.loads(out.read_text())
    assert set(data["bases"]) == {"0", "0.5"} and data["quick"] is True
    for entry in data["bases"].values():
        assert 0.0 <= entry["probe"]["share_gap_positive"]["token"] <= 1.0 and "test" in entry["heldout"]
        assert entry["base_fingerprint"] == weights_fingerprint(entry["base_model"])
        flips = entry["flips"]
        assert flips["token_vs_constant"] == entry["probe"]["content_flips"]
        assert 0 <= flips["noisy_rows"] <= entry["probe"]["prompts"]
        for name in ("token_vs_noisy", "sequence_vs_noisy", "token_vs_noisy_where_differs",
                     "sequence_vs_noisy_where_differs", "token_vs_constant"):
            share = flips[name]["share"]
            assert share is None or 0.0 <= share <= 1.0
        # flips against the noisy expert can only happen where it differs: the same units, counted on fewer prompts
        where, overall = flips["token_vs_noisy_where_differs"], flips["token_vs_noisy"]
        assert where["units"] <= overall["units"]
        if where["units"] and overall["share"] is not None:
            assert where["share"] * where["units"] == pytest.approx(overall["share"] * overall["units"])
    section = "\n".join(report.regime_section({"regime": data, "base": None}))
    assert "| 0% |" in section and "| 50% |" in section and "Bases in the target regime" in section
    assert "token gap vs noisy expert" in section
    stamp = out.stat().st_mtime_ns
    assert regime.main(["--quick", "--out", str(out), "--shares", "0"]) == 0  # done already: nothing redone
    assert out.stat().st_mtime_ns == stamp


def test_regime_grid_extends_the_benchmark_grid(tmp_path):
    from benchmarks import reproduce

    base = reproduce.load_grid()
    grid = reproduce.load_grid(reproduce.ROOT / "benchmarks" / "regime_grid.yaml")
    assert grid["sft"] == {**base["sft"], "mismatched_share": 0.2}  # one key on top of the benchmark's warm start
    assert grid["train"] == base["train"] and grid["final_eval"] == base["final_eval"]
    assert len(grid["seeds"]["main"]) >= 10 and grid["ablations"] == {}
    assert reproduce.settings_hash(grid) != reproduce.settings_hash(base)  # its results never mix with the table's
    assert "grpo" in grid["main"] and "dapo" not in grid["main"]  # its own cells replace the parent's
    missing = tmp_path / "g.yaml"
    missing.write_text("extends: nowhere.yaml\nmain: {grpo: {method: grpo}}\n")
    with pytest.raises(SystemExit, match="extends: grid file not found"):
        reproduce.load_grid(missing)


def _run(cell: str, seed: int, test: float) -> dict:
    return {"cell": cell, "seed": seed, "final": {"test": {"accuracy": test / 100}, "ood": {"accuracy": 0.05}}}


def test_base_consistency_names_runs_from_another_base():
    from benchmarks.report import base_consistency

    base = {"base_fingerprint": "aaa"}
    runs = [{"base_fingerprint": "aaa"}, {"base_fingerprint": "aaa"}, {}]
    text = base_consistency(runs, base, {"base_fingerprint": "aaa"})
    assert "made from this base (`aaa`)" in text and "1 run(s) predate" in text and "of the same base" in text
    text = base_consistency(runs + [{"base_fingerprint": "bbb"}], base, {"base_fingerprint": "ccc"})
    assert "2 different base models" in text and "of another base" in text
    assert "cannot be checked" in base_consistency(runs, {}, None)


def test_regime_runs_section_pairs_by_seed_and_says_how_partial(tmp_path):
    from benchmarks import report, reproduce

    grid = reproduce.load_grid(reproduce.ROOT / "benchmarks" / "regime_grid.yaml")
    # GRPO 30 + s; CalibRL token 2 points above on every seed but seed 2 (+5); the constant control only on 0-1
    runs = [_run("grpo", s, 30 + s) for s in range(4)] + [_run("calibrl_token", s, 32 + s + 3 * (s == 2))
                                                        for s in range(4)]
    runs += [_run("calibrl_constant", s, 31 + s) for s in range(2)]
    study = {"grid": grid, "runs": runs, "base": None, "expected": reproduce.grid_runs(grid, None)}
    main_cells = report.by_cell([_run("grpo", s, 40) for s in range(3)] + [_run("calibrl_token", s, 40 + s)
                                                                          for s in range(3)])
    text = "\n".join(report.regime_runs_section({0.2: study}, main_cells, None))
    assert "**10 of 70 planned runs are finished**" in text and "nothing below stands for them" in text
    d = report.paired({s: 32 + s + 3 * (s == 2) for s in range(4)}, {s: 30 + s for s in range(4)})
    assert d["n"] == 4 and abs(d["mean"] - 2.75) < 1e-9
    row = next(line for line in text.splitlines() if line.startswith("| CalibRL (token gap) beats GRPO"))
    assert f"| 4 | {report.fmt_diff(d)} | {report.mde(d):.1f} |" in row
    content = next(line for line in text.splitlines() if line.startswith("| the expert's content matters"))
    assert "| 2 |" in content  # paired on the two seeds both cells have
    side = [line for line in text.splitlines() if line.startswith("| CalibRL (token gap) beats GRPO")][-1]
    assert "+1.0 [" in side and "+2.8 [" in side  # share 0 (main grid: 0, 1, 2 above GRPO) next to share 20%
    fig = report.regime_figure({0.2: study}, main_cells, tmp_path)
    assert fig and (tmp_path / "regime_dose_response.png").stat().st_size > 0
