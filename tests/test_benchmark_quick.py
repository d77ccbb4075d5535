"""benchmarks.reproduce --quick end to end into a tmp folder (JSON per run, resume), then benchmarks.report on it
(tables, completeness line, a figure), plus the grid selection and the statistics the report prints."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from benchmarks import branches, report, reproduce
from calibrl.config import DataSource
from calibrl.files import weights_fingerprint
from calibrl.tasks.common import noisy_count

pytestmark = pytest.mark.slow  # every test here trains a model or starts processes


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick grid (2 methods x 2 seeds, nano model), run once for the module; the cache is private."""
    root = tmp_path_factory.mktemp("bench")
    old = os.environ.get("CALIBRL_CACHE")
    os.environ["CALIBRL_CACHE"] = str(root / "cache")
    try:
        args = ["--quick", "--out", str(root / "results"), "--work-dir", str(root / "work")]
        assert reproduce.main(args) == 0
        yield root, args
    finally:
        if old is None:
            os.environ.pop("CALIBRL_CACHE", None)
        else:
            os.environ["CALIBRL_CACHE"] = old


def test_quick_writes_one_json_per_run(quick):
    root, _ = quick
    files = sorted(p.name for p in (root / "results").glob("*.json"))
    assert files == ["base.json", "calibrl_token__s0.json", "calibrl_token__s1.json", "grpo__s0.json", "grpo__s1.json"]
    runs = {r["run_id"]: r for r in reproduce.load_runs(root / "results")}
    assert len({r["settings_hash"] for r in runs.values()}) == 1
    for run_id, r in runs.items():
        assert r["run_id"] == run_id and r["quick"] is True and r["global_step"] == 3
        assert r["method"] == run_id.split("_")[0]
        for split in ("test", "ood"):
            assert r["final"][split]["n"] == 8 and 0.0 <= r["final"][split]["accuracy"] <= 1.0
        assert [s for s, _ in r["curves"]["entropy"]] == [1, 2, 3]
        assert r["entropy_final"] > 0
        assert r["time"]["steps_timed"] == 3 and r["time"]["per_step_s"] > 0
        assert r["time"]["total_s"] >= r["time"]["train_s"]
        assert {e["step"] for e in r["curves"]["heldout"]} == {0, 2, 3}  # start, every 2 steps, end
        assert r["machine"]["nproc"] == os.cpu_count() and r["machine"]["cpu_model"]
    # the same seed gives both methods the same base and the same eval rows; CalibRL logs its guidance
    assert runs["grpo__s0"]["base_model"] == runs["calibrl_token__s0"]["base_model"]
    base = json.loads((root / "results" / "base.json").read_text(encoding="utf-8"))
    assert {r["base_fingerprint"] for r in runs.values()} == {base["base_fingerprint"]}
    assert base["base_fingerprint"] == weights_fingerprint(base["base_model"])
    assert runs["calibrl_token__s0"]["config"]["train"]["gap"] == "token"


def test_rerun_skips_finished_runs(quick, capsys):
    root, args = quick
    before = {p.name: p.stat().st_mtime_ns for p in (root / "results").glob("*.json")}
    assert reproduce.main(args) == 0
    assert "0 to run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (root / "results").glob("*.json")} == before

    # a result made with other shared settings is not "done": it is scheduled again (and replaced)
    copy = root / "results_stale"
    shutil.copytree(root / "results", copy)
    path = copy / "grpo__s1.json"
    path.write_text(path.read_text(encoding="utf-8").replace('"settings_hash": "', '"settings_hash": "x'),
                    encoding="utf-8")
    listed = ["--quick", "--out", str(copy), "--work-dir", str(root / "work"), "--list"]
    assert reproduce.main(listed) == 0
    out = capsys.readouterr().out
    assert "todo  main     grpo__s1" in out and "3 done, 1 to run" in out


def test_report_tables_claims_and_figure(quick, tmp_path):
    root, _ = quick
    text = report.build_report(root / "results", tmp_path / "RESULTS.md", tmp_path / "figures")
    assert (tmp_path / "RESULTS.md").read_text(encoding="utf-8") == text
    head = text.split("## Setting")[0]
    assert "Grid complete: 4 of 4 runs" in head and "QUICK MODE" in head
    assert "| GRPO | 2/2 |" in text and "| CalibRL, token gap (code) | 2/2 |" in text
    calibrl_row = next(line for line in text.splitlines() if line.startswith("| CalibRL, token gap (code) | 2/2"))
    assert "p = " in calibrl_row or "identical on every seed (n = 2)" in calibrl_row  # paired with GRPO, 2 seeds
    assert "CalibRL (token gap, official code) beats GRPO in-domain" in text
    png = tmp_path / "figures" / "baselines_heldout_test.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](figures/baselines_heldout_test.png)" in text

    # a partial grid says so in its first lines, and never shows the missing run's numbers
    partial = tmp_path / "partial"
    shutil.copytree(root / "results", partial)
    (partial / "calibrl_token__s1.json").unlink()
    text = report.build_report(partial, tmp_path / "partial.md", tmp_path / "figures2")
    assert "PARTIAL GRID: 3 of 4 runs complete" in "\n".join(text.splitlines()[:4])
    assert "| CalibRL, token gap (code) | 1/2 |" in text


def test_a_result_from_another_base_model_is_made_again(quick, capsys):
    """The same warm-start settings can train other weights on another CPU: a run whose base fingerprint is
    not the current base's is replaced, and base.json re-evaluated; a result without one (older) is kept."""
    root, args = quick
    copy = root / "results_other_base"
    shutil.copytree(root / "results", copy)
    for name in ("grpo__s1.json", "base.json"):
        path = copy / name
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**data, "base_fingerprint": "0" * 12}), encoding="utf-8")
    legacy = copy / "grpo__s0.json"
    data = json.loads(legacy.read_text(encoding="utf-8"))
    data.pop("base_fingerprint")
    legacy.write_text(json.dumps(data), encoding="utf-8")
    capsys.readouterr()
    assert reproduce.main(["--quick", "--out", str(copy), "--work-dir", str(root / "work"), "--only", "method=grpo"]) == 0
    out = capsys.readouterr().out
    assert "1 result files were made from another base model and will be replaced: grpo__s1" in out
    assert "2 runs selected: 1 already done, 1 to run" in out
    fingerprint = json.loads((root / "results" / "base.json").read_text(encoding="utf-8"))["base_fingerprint"]
    for name in ("grpo__s1.json", "base.json"):
        assert json.loads((copy / name).read_text(encoding="utf-8"))["base_fingerprint"] == fingerprint
    assert "base_fingerprint" not in json.loads(legacy.read_text(encoding="utf-8"))
    assert reproduce.on_base(None, fingerprint) is None


def test_weights_fingerprint_follows_the_weights(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "config.json").write_text("{}")
    first = weights_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text('{"x": 1}')
    assert weights_fingerprint(tmp_path) == first  # the config is not the weights
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert weights_fingerprint(tmp_path) != first
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        weights_fingerprint(tmp_path / "empty")


def test_grid_selection_only_seeds_shards():
    grid = reproduce.load_grid()
    runs = reproduce.grid_runs(grid, "calibrl_token")
    main = [r for r in runs if r.group == "main"]
    abl = [r for r in runs if r.group == "ablation"]
    assert len(main) == len(grid["main"]) * len(grid["seeds"]["main"]) == 55
    on_base = [r for r in abl if r.ablation_of == "calibrl_token"]
    assert len(on_base) == len(grid["ablations"]) * len(grid["seeds"]["ablation"]) == 18
    assert [r.seed for r in main[:11]] == [0] * 11  # seed-major: an interrupted grid leaves whole seeds
    assert abl[0].cell == "calibrl_token+guide_coef=0.01" and abl[0].keys["guide_coef"] == 0.01
    assert abl[0].keys["gap"] == "token"
    assert next(r for r in main if r.cell == "sft_grpo").sft_first
    picked = reproduce.select_runs(runs, reproduce.parse_only(["method=grpo,calibrl_token"]), seeds=[0, 1])
    assert [r.run_id for r in picked] == ["grpo__s0", "calibrl_token__s0", "grpo__s1", "calibrl_token__s1"]
    halves = [reproduce.select_runs(runs, shard=(i, 2)) for i in (0, 1)]
    assert sorted(r.run_id for h in halves for r in h) == sorted(r.run_id for r in runs)
    assert not {r.run_id for r in halves[0]} & {r.run_id for r in halves[1]}
    assert reproduce.grid_runs(grid, None) == main  # no ablations before the base is known
    with pytest.raises(SystemExit, match="--only"):
        reproduce.parse_only(["seed=1"])
    with pytest.raises(SystemExit, match="--shard"):
        reproduce.parse_shard("2/2")


def test_statistics_match_scipy_by_hand():
    c = report.mean_ci([1.0, 2.0, 3.0])
    assert c["mean"] == 2.0 and c["sd"] == 1.0 and abs(c["half"] - 4.302653 / 3 ** 0.5) < 1e-5
    d = report.paired({0: 1.0, 1: 2.0, 2: 4.0, 3: 9.0}, {0: 0.0, 1: 0.0, 2: 1.0})  # seed 3 has no pair
    assert d["seeds"] == [0, 1, 2] and d["mean"] == 2.0
    assert abs(d["p"] - 0.07418) < 1e-4  # t = 2 / (1 / sqrt 3) = 3.46 on 2 df
    assert report.verdict(d, 1) == "not significant"
    strong = report.paired({s: 10.0 + s % 2 for s in range(5)}, {s: 0.0 for s in range(5)})
    assert report.verdict(strong, 1) == "holds"
    assert report.verdict(strong, -1).startswith("contradicted")
    assert report.verdict(report.paired({0: 1.0}, {0: 0.0}), 1).startswith("not testable")


def test_minimum_detectable_effect_and_seeds_needed():
    # (t_{0.975,4} + t_{0.8,4}) / sqrt(5) = (2.7764 + 0.9410) / 2.2361
    assert report.mde({"n": 5, "sd": 1.0}) == pytest.approx(1.6625, abs=1e-3)
    assert report.mde({"n": 5, "sd": 0.0}) is None and report.mde({"n": 1, "sd": None}) is None
    n = report.seeds_for(6.9, 3.0)
    assert report.mde({"n": n, "sd": 6.9}) <= 3.0 < report.mde({"n": n - 1, "sd": 6.9})
    assert report.seeds_for(6.9, 5.45) < n


def test_ablations_also_on_another_cell_are_scheduled_with_their_own_base():
    grid = reproduce.load_grid()
    assert grid["ablations_also_on"] == {"calibrl_sequence": ["noisy_expert"]}
    runs = reproduce.grid_runs(grid, "calibrl_token")
    extra = [r for r in runs if r.cell == "calibrl_sequence+noisy_expert"]
    assert [r.seed for r in extra] == grid["seeds"]["ablation"]
    assert all(r.ablation_of == "calibrl_sequence" and r.keys["gap"] == "sequence"
               and r.keys["expert_style"] == "noisy" and r.group == "ablation" for r in extra)
    assert all(r.ablation_of == "calibrl_token" for r in runs if r.group == "ablation" and r not in extra)
    # on the cell that is already the base, nothing is repeated
    on_seq = reproduce.grid_runs(grid, "calibrl_sequence")
    assert len(on_seq) == len({r.run_id for r in on_seq}) == 55 + 18
    assert {r.ablation_of for r in on_seq if r.group == "ablation"} == {"calibrl_sequence"}


def test_ablations_also_on_names_are_checked(tmp_path):
    text = (reproduce.GRID_PATH).read_text(encoding="utf-8")
    for wrong, message in (("calibrl_sequence: [noisy_expert]", "calibrl_sequence: [no_such_ablation]"),
                           ("calibrl_sequence: [noisy_expert]", "no_such_cell: [noisy_expert]")):
        p = tmp_path / "grid.yaml"
        p.write_text(text.replace(wrong, message), encoding="utf-8")
        with pytest.raises(SystemExit, match="ablations_also_on"):
            reproduce.load_grid(p)


def test_expert_facts_locate_where_the_noisy_expert_differs(quick, tmp_path):
    root, _ = quick
    base_dir = json.loads((root / "results" / "base.json").read_text(encoding="utf-8"))["base_model"]
    grid = reproduce.load_grid(quick=True)
    assert reproduce.ensure_expert_facts(grid, base_dir, str(tmp_path)) is None  # no noisy ablation: nothing
    grid["ablations"] = {"noisy_expert": {"expert_style": "noisy"}}
    facts = reproduce.ensure_expert_facts(grid, base_dir, str(tmp_path))
    n, t = grid["train"]["n_train"], grid["train"]
    source = DataSource(dataset=t["dataset"], n_train=n, task_seed=t["task_seed"], noise_rate=0.3,
                        difficulty=t.get("difficulty"), task_types=t.get("task_types"))
    right, wrong = (source.training_rows(expert_style=style) for style in ("mismatched", "noisy"))
    differ = sum(a["solution"] != b["solution"] for a, b in zip(right, wrong))
    assert facts["rows"] == n and facts["noisy_rows"] == differ > 0
    # noise is drawn before the task_types filter, so the kept rows hold about (not exactly) noise_rate
    assert abs(differ - noisy_count(n, 0.3)) <= max(3, n // 10)
    fd, el = facts["first_diff_token"], facts["expert_tokens"]
    assert 0 < fd["min"] <= fd["median"] <= fd["max"] < el["max"]  # the answer is changed, not the opening
    written = tmp_path / reproduce.EXPERTS_FILE
    assert json.loads(written.read_text(encoding="utf-8")) == facts
    mtime = written.stat().st_mtime_ns
    assert reproduce.ensure_expert_facts(grid, base_dir, str(tmp_path)) == facts and written.stat().st_mtime_ns == mtime


def test_noisy_expert_reading_counts_identical_seeds():
    def run(cell, seed, test, ood, lengths=None):
        curves = {}
        if lengths:
            curves["completion_max_length"] = [[i + 1, m] for i, m in enumerate(lengths)]
            curves["completion_mean_length"] = [[i + 1, 30.0] for i in range(len(lengths))]
        return {"run_id": f"{cell}__s{seed}", "cell": cell, "seed": seed, "entropy_final": 0.2, "curves": curves,
                "final": {"test": {"accuracy": test}, "ood": {"accuracy": ood}}, "time": {}}

    runs = [run("calibrl_token", 0, 0.4, 0.05), run("calibrl_token+noisy_expert", 0, 0.4, 0.05),
            run("calibrl_token", 1, 0.3, 0.05), run("calibrl_token+noisy_expert", 1, 0.31, 0.05, [20, 50, 44])]
    data = {"experts": {"rows": 10, "noisy_rows": 3, "expert_style": "mismatched",
                        "first_diff_token": {"min": 43, "median": 44, "max": 45},
                        "expert_tokens": {"min": 58, "median": 59, "max": 62},
                        "native_tokens": {"min": 28, "median": 28, "max": 30}},
            "ablation_base": "calibrl_token", "runs": runs,
            "grid": {"ablations": {"noisy_expert": {"expert_style": "noisy"}}, "ablations_also_on": {}}}
    text = "\n".join(report.noisy_expert_reading(data, report.by_cell(runs)))
    assert "3 of 10 noisy expert solutions" in text and "at token 43–45 (median 44)" in text
    assert "in 2 of 3 logged steps" in text  # 50 and 44 are longer than 43 tokens
    assert "identical to the correct expert's on 1 of 2 paired seeds (seeds 0)" in text
    data["experts"] = None
    assert report.noisy_expert_reading(data, report.by_cell(runs)) == []


def test_no_spread_differences_are_not_tested():
    same = report.paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same["p"] == 1.0 and report.fmt_diff(same) == "identical on every seed (n = 2)"
    shifted = report.paired({0: 1.2, 1: 2.2}, {0: 1.0, 1: 2.0})
    assert shifted["p"] is None and "no spread" in report.fmt_diff(shifted)
    assert report.verdict(shifted, 1).startswith("not testable")


def test_branch_audit_counts_steps_whose_slope_follows_correctness(tmp_path):
    grid = reproduce.load_grid()
    h = reproduce.settings_hash(grid)
    results, work = tmp_path / "results", tmp_path / "work"

    def run(run_id, cell, method, gap, steps, settings=h, global_step=None):
        reproduce.write_json(results / f"{run_id}.json", {
            "kind": "run", "run_id": run_id, "cell": cell, "method": method, "settings_hash": settings,
            "global_step": len(steps) if global_step is None else global_step, "config": {"train": {"gap": gap}}})
        (work / run_id).mkdir(parents=True)
        (work / run_id / "metrics.jsonl").write_text("".join(json.dumps(
            {"step": i + 1, "calibrl/frac_full_slope": full, "rewards/accuracy_reward/mean": acc,
             "calibrl/gap_mean": 5.0, "calibrl/expert_logp_mean": -8.0}) + "\n" for i, (full, acc) in enumerate(steps)))

    run("calibrl_sequence__s0", "calibrl_sequence", "calibrl", "sequence", [(0.75, 0.25), (0.5, 0.25)])
    run("calibrl_sequence__s1", "calibrl_sequence", "calibrl", "sequence", [(0.9, 0.1)])
    run("calibrl_token__s0", "calibrl_token", "calibrl", "token", [(0.6, 0.25)], settings="stale")
    run("calibrl_token__s1", "calibrl_token", "calibrl", "token", [(0.6, 0.25)], global_step=5)  # other run's folder
    run("grpo__s0", "grpo", "grpo", "token", [(0.0, 0.5)])
    out = branches.audit(results, [work], grid)
    assert list(out["cells"]) == ["calibrl_sequence"]
    c = out["cells"]["calibrl_sequence"]
    assert (c["runs"], c["steps"], c["steps_equal"]) == (2, 3, 2)
    assert abs(c["full_minus_wrong"]["min"] + 0.25) < 1e-12 and c["expert_logp_per_token"] == -8.0
    data = {"branches": out, "grid": grid}
    text = "\n".join(report.branch_reading(data))
    assert "equal in 2 of 3 logged steps" in text and "8.0 nats per token" in text
    assert c["gap_positive"] is None and text.count("| — |") == 1

    # a rerun of seed 1 in another work dir, logging the share with Δℓ > 0: the last work dir wins
    rerun = tmp_path / "rerun" / "calibrl_sequence__s1"
    rerun.mkdir(parents=True)
    (rerun / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "calibrl/frac_full_slope": 0.8, "rewards/accuracy_reward/mean": 0.1, "calibrl/gap_mean": 5.0,
         "calibrl/frac_gap_positive": 0.97}) + "\n")
    c = branches.audit(results, [work, tmp_path / "rerun"], grid)["cells"]["calibrl_sequence"]
    assert (c["runs"], c["steps"], c["steps_equal"]) == (2, 3, 1)
    assert c["gap_positive"] == {"runs": 1, "mean": 0.97, "min": 0.97, "max": 0.97}
