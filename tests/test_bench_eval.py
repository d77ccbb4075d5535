"""`calibrl eval --bench` end to end: a tiny model on every fixture through `calibrl.cli.main`, resume after an
interruption (only the rest is generated), metrics checked against an oracle, checkpoints side by side."""

import hashlib
import json
import os

import pytest

from calibrl.bench import runner
from calibrl.bench.fixtures import write_fixtures
from calibrl.bench.report import format_table
from calibrl.bench.runner import BenchSettings, evaluate_benchmarks, load_benchmark
from calibrl.cli import main

pytestmark = pytest.mark.slow  # every test here generates with tiny models


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("benches")))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------------
# A scripted generator: answers chosen per question, counts what it is asked to generate
# ---------------------------------------------------------------------------------------------------------
class Scripted:
    """Stands in for a model: maps a question's text to a completion; records every prompt it generates for."""

    def __init__(self, answers: dict[str, str], fail_after: int | None = None):
        self.answers, self.fail_after, self.calls = answers, fail_after, []

    def factory(self, model, max_new_tokens, batch_size):
        return self.generate, True

    def generate(self, rows, num_samples, temperature, seed):
        out = []
        for row in rows:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise KeyboardInterrupt
            text = "".join(b.get("text", "") for b in row["prompt"][0]["content"])
            self.calls.append((text, num_samples))
            answer = self.answers.get(_key(text, row["images"]), "no idea")
            out.append([f"<think>working</think><answer>{answer}</answer>"] * num_samples)
        return out


def _text(item):
    return "".join(s for s in item.segments if isinstance(s, str))


def _key(text, images):
    """A question by its text and pictures (MathVerse's Vision Only rows share their text)."""
    return text + "|" + ",".join(hashlib.md5(img.tobytes()).hexdigest() for img in images)


def oracle_answers(bench_dir, right: set[str] | None = None, wrong: set[str] | None = None) -> dict[str, str]:
    """The right answer to every fixture question, in varied forms (letter, '(B)', option text, units), except
    for the (bench, id) pairs in `wrong`, answered wrongly."""
    forms = {  # (bench, id) -> the written answer; default below is the gold itself
        ("mathvista", "1"): "(B) 8/11", ("mathvista", "2"): "14.0", ("mathvista", "3"): "$1.45",
        ("mathvista", "4"): "0.60", ("mathvista", "5"): "2007 and 2008", ("mathvista", "6"): "equal to",
        ("mathverse", "1"): "\\sqrt{3}", ("mathverse", "2"): "C", ("mathverse", "6"): "4 units",
        ("mathvision", "3"): "0.5", ("mathvision", "4"): "16",
        ("mmmu", "validation_Math_2"): "about 3.14", ("mmmu", "validation_Math_3"): "3/2",
        ("geometry3k", "2401"): "B", ("geometry3k", "2403"): "40/3",
        ("geoqa", "0"): "140^\\circ", ("geoqa", "1"): "3 cm", ("geoqa", "2"): "9",
        ("scienceqa", "test-00000-of-00001.parquet:0"): "duck",
        ("geoeval", "main/1"): "B", ("geoeval", "main/2"): "50°", ("geoeval", "main/3"): "(B) 16",
        ("geoeval", "main/4"): "\\sqrt{32}", ("geoeval", "main/5"): "2.3094", ("geoeval", "hard/1"): "B",
    }
    answers = {}
    for name in ("mathvista", "mathverse", "mathvision", "mmmu", "wemath", "geometry3k", "geoqa", "scienceqa",
                 "geoeval"):
        # GeoEval: every subset (ids "main/1", ...); its default split asks the same questions as main/*
        for item in load_benchmark(name, bench_dir, split="all" if name == "geoeval" else None):
            key = (name, item.id)
            answers[_key(_text(item), [ref.load() for ref in item.images])] = "Z" if wrong and key in wrong else forms.get(key, str(item.gold))
    return answers


def test_oracle_scores_every_benchmark_full_and_reports_its_own_metrics(bench_dir, tmp_path):
    scripted = Scripted(oracle_answers(bench_dir))
    report = evaluate_benchmarks("oracle", "paper", bench_dir, str(tmp_path), BenchSettings(batch_size=3),
                                 progress=False, generator_factory=scripted.factory)
    results = report["results"]["oracle"]
    for name, summary in results.items():
        assert summary["accuracy"] == 1.0, (name, [r for r in read_jsonl(report["predictions"]["oracle"][name])
                                                   if not r["correct"]])
    assert results["wemath"]["metrics"]["score_strict"] == 1.0 and results["wemath"]["metrics"]["IK"] == 0.0
    assert results["mathverse"]["breakdowns"]["version"]["Vision Only"] == {"n": 2, "accuracy": 1.0}
    assert set(results["mathvista"]["breakdowns"]) == {"task", "skill", "question_type"}
    assert set(results["mmmu"]["breakdowns"]["discipline"]) == {"Art and Design", "Science"}
    assert results["mathvista"]["format_rate"] == 1.0 and results["mathvista"]["answered_rate"] == 1.0
    assert set(results["geoeval"]["breakdowns"]) == {"subset", "source", "input", "shape"}
    assert results["geoeval"]["breakdowns"]["input"] == {"diagram": {"n": 3, "accuracy": 1.0},
                                                         "text": {"n": 2, "accuracy": 1.0}}


def test_geoeval_every_subset_with_the_release_breakdowns(bench_dir, tmp_path):
    # a text-only problem and the hard problem answered wrongly; the 2000-set's UniGeo value just outside 1e-3
    wrong = {("geoeval", "main/3"), ("geoeval", "hard/1")}
    answers = oracle_answers(bench_dir, wrong=wrong)
    fifth = next(it for it in load_benchmark("geoeval", bench_dir, split="all") if it.id == "main/5")
    answers[_key(_text(fifth), [ref.load() for ref in fifth.images])] = "2.312"
    scripted = Scripted(answers)
    report = evaluate_benchmarks("m", "geoeval", bench_dir, str(tmp_path), BenchSettings(splits={"geoeval": "all"}),
                                 progress=False, generator_factory=scripted.factory)
    s = report["results"]["m"]["geoeval"]
    assert s["n"] == 8 and s["accuracy"] == pytest.approx(5 / 8)
    b = s["breakdowns"]
    assert b["subset"] == {"GeoEval-2000": {"n": 5, "accuracy": 0.6}, "GeoEval-aug": {"n": 1, "accuracy": 1.0},
                           "GeoEval-backward": {"n": 1, "accuracy": 1.0}, "GeoEval-hard": {"n": 1, "accuracy": 0.0}}
    assert b["input"]["text"] == {"n": 2, "accuracy": 0.5}  # the release's T; "diagram" is its A
    assert b["input"]["diagram"] == {"n": 6, "accuracy": pytest.approx(4 / 6)}
    assert b["source"]["MathQA"]["accuracy"] == 0.0 and b["source"]["PGPS9K"] == {"n": 3, "accuracy": 1.0}
    rows = read_jsonl(report["predictions"]["m"]["geoeval"])
    assert {r["id"] for r in rows if not r["correct"]} == {"main/3", "main/5", "hard/1"}
    assert json.load(open(tmp_path / "m" / "geoeval.settings.json"))["split"] == "all"


def test_wemath_metrics_and_breakdowns_follow_the_rows(bench_dir, tmp_path):
    # problem 1: both steps right, the 2-step problem wrong (IG); problem 2: step 1 wrong, the 3-step problem
    # right (RM strict, CM loose). N = 2.
    wrong = {("wemath", "1:2steps_multi"), ("wemath", "2:3steps_1"), ("mathvista", "2"), ("mathvista", "5")}
    scripted = Scripted(oracle_answers(bench_dir, wrong=wrong))
    report = evaluate_benchmarks("m", "wemath,mathvista", bench_dir, str(tmp_path), BenchSettings(),
                                 progress=False, generator_factory=scripted.factory)
    m = report["results"]["m"]["wemath"]["metrics"]
    assert m["problems"] == 2 and m["IG"] == 0.5 and m["IK"] == 0.0
    assert m["CM_strict"] == 0.0 and m["RM_strict"] == 1.0 and m["score_strict"] == pytest.approx(0.25)
    assert m["CM_loose"] == 0.5 and m["RM_loose"] == 0.0 and m["score_loose"] == pytest.approx(0.75)
    vista = report["results"]["m"]["mathvista"]
    assert vista["accuracy"] == pytest.approx(4 / 6)
    assert vista["breakdowns"]["task"]["figure question answering"] == {"n": 2, "accuracy": 0.0}
    assert vista["breakdowns"]["skill"]["arithmetic reasoning"]["accuracy"] == pytest.approx(3 / 4)
    # every number traces to the rows of the predictions file
    rows = read_jsonl(report["predictions"]["m"]["mathvista"])
    assert sum(r["correct"] for r in rows) == 4 and {r["id"] for r in rows if not r["correct"]} == {"2", "5"}
    assert set(rows[0]) >= {"id", "prompt", "completion", "extracted", "gold", "correct"}


def test_interrupted_run_resumes_with_only_the_rest(bench_dir, tmp_path):
    answers = oracle_answers(bench_dir)
    first = Scripted(answers, fail_after=4)  # dies inside the second batch of 3 questions
    with pytest.raises(KeyboardInterrupt):
        evaluate_benchmarks("m", "mathvista", bench_dir, str(tmp_path), BenchSettings(batch_size=3),
                            progress=False, generator_factory=first.factory)
    path = tmp_path / "m" / "mathvista.jsonl"
    kept = read_jsonl(path)
    assert [r["id"] for r in kept] == ["1", "2", "3"]  # the first batch was written before the interruption
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "4", "prompt": "half a li')  # and a line cut short by the kill
    second = Scripted(answers)
    report = evaluate_benchmarks("m", "mathvista", bench_dir, str(tmp_path), BenchSettings(batch_size=3),
                                 progress=False, generator_factory=second.factory)
    items = load_benchmark("mathvista", bench_dir)
    assert [text for text, _ in second.calls] == [_text(it) for it in items[3:]]  # only the rest
    assert [r["id"] for r in read_jsonl(path)] == ["1", "2", "3", "4", "5", "6"]
    assert report["results"]["m"]["mathvista"]["accuracy"] == 1.0
    third = Scripted(answers)  # a finished file: nothing more to generate, same report
    again = evaluate_benchmarks("m", "mathvista", bench_dir, str(tmp_path), BenchSettings(batch_size=3),
                                progress=False, generator_factory=third.factory)
    assert third.calls == [] and again["results"] == report["results"]


def test_resume_refuses_other_settings_and_overwrite_starts_over(bench_dir, tmp_path):
    scripted = Scripted(oracle_answers(bench_dir))
    evaluate_benchmarks("m", "geoqa", bench_dir, str(tmp_path), BenchSettings(max_new_tokens=16), progress=False,
                        generator_factory=scripted.factory)
    with pytest.raises(runner.BenchDataError, match="max_new_tokens=16, not 32"):
        evaluate_benchmarks("m", "geoqa", bench_dir, str(tmp_path), BenchSettings(max_new_tokens=32),
                            progress=False, generator_factory=scripted.factory)
    scripted.calls.clear()
    evaluate_benchmarks("m", "geoqa", bench_dir, str(tmp_path), BenchSettings(max_new_tokens=32), overwrite=True,
                        progress=False, generator_factory=scripted.factory)
    assert len(scripted.calls) == 3


def test_corrupt_middle_line_is_an_error_not_a_silent_skip(bench_dir, tmp_path):
    scripted = Scripted(oracle_answers(bench_dir))
    evaluate_benchmarks("m", "geoqa", bench_dir, str(tmp_path), progress=False, generator_factory=scripted.factory)
    path = tmp_path / "m" / "geoqa.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], "garbage", lines[2]]) + "\n", encoding="utf-8")
    with pytest.raises(runner.BenchDataError, match="geoqa.jsonl line 2 is not a predictions row"):
        evaluate_benchmarks("m", "geoqa", bench_dir, str(tmp_path), progress=False, generator_factory=scripted.factory)


def test_pass_at_k_from_samples(bench_dir, tmp_path):
    class Alternating(Scripted):
        def generate(self, rows, num_samples, temperature, seed):
            if num_samples == 1:  # greedy: always wrong
                return [["<answer>Z</answer>"] for _ in rows]
            return [["<answer>C</answer>", "<answer>Z</answer>", "<answer>Z</answer>", "<answer>Z</answer>"]
                    for _ in rows]  # one right sample in four for gold C

    gen = Alternating({})
    report = evaluate_benchmarks("m", "mathverse", bench_dir, str(tmp_path), BenchSettings(k=[1, 2, 4]),
                                 progress=False, generator_factory=gen.factory)
    s = report["results"]["m"]["mathverse"]
    assert s["accuracy"] == 0.0
    n_c = 5  # five of the seven questions have gold C
    assert s["pass@1"] == pytest.approx(n_c / 7 * 0.25) and s["pass@4"] == pytest.approx(n_c / 7)
    assert s["pass@2"] == pytest.approx(n_c / 7 * 0.5)  # 1 - C(3,2)/C(4,2)
    row = read_jsonl(report["predictions"]["m"]["mathverse"])[0]
    assert row["samples_correct"] == [True, False, False, False] and len(row["samples"]) == 4


def test_checkpoints_side_by_side_with_paired_difference(bench_dir, tmp_path):
    good = oracle_answers(bench_dir)
    worse = oracle_answers(bench_dir, wrong={("mathvista", "1"), ("mathvista", "2"), ("mathvista", "3")})
    gens = {"runs/a/model": Scripted(worse), "runs/b/model": Scripted(good), "c": Scripted(worse)}
    report = evaluate_benchmarks(list(gens), "mathvista", bench_dir, str(tmp_path), progress=False,
                                 generator_factory=lambda m, t, b: gens[m].factory(m, t, b))
    assert report["labels"] == ["a/model", "b/model", "c"]
    head = report["table"][0]
    assert head["bench"] == "mathvista" and head["values"] == [0.5, 1.0, 0.5]
    assert head["deltas"][0]["diff"] == pytest.approx(0.5)
    # paired: d = (1,1,1,0,0,0) over six questions -> s.e. = sd / sqrt(6)
    assert head["deltas"][0]["stderr"] == pytest.approx((0.3 / 6) ** 0.5)
    assert head["deltas"][1] == {"diff": 0.0, "stderr": 0.0}
    table = format_table(report)
    assert "Δ b/model − a/model" in table.splitlines()[0] and "+50.0 ± 22.4" in table
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert md.count("| mathvista |") == 1 and "`b/model` = runs/b/model" in md
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["results"]["runs/b/model"]["mathvista"]["accuracy"] == 1.0
    assert os.path.isfile(tmp_path / "runs_a_model" / "mathvista.jsonl")


# ---------------------------------------------------------------------------------------------------------
# The real thing on CPU: tiny models through the command line
# ---------------------------------------------------------------------------------------------------------
def test_cli_eval_bench_paper_with_tiny_models(bench_dir, tiny_vlm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "tiny:qwen2_5_vl:nano", tiny_vlm_dir, "--bench", "paper", "--bench-dir", bench_dir,
            "--out", str(out), "--max_new_tokens", "6", "--batch_size", "4", "--no_progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("geoeval", "geometry3k", "geoqa", "mathvista", "mathverse", "mathvision", "mmmu", "wemath",
                 "scienceqa", "version: Vision Only", "discipline: Science", "skill: arithmetic reasoning",
                 "score (strict)", "input: text"):
        assert name in printed, name
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert len(report["models"]) == 2 and report["benchmarks"][0] == "geoeval"
    for model in report["models"]:
        for name, path in report["predictions"][model].items():
            rows = read_jsonl(path)
            assert len(rows) == report["results"][model][name]["n"]
            # every prompt shows its image(s), but GeoEval's text-only problems (its "T" column) have none
            assert all(r["completion"] is not None and ("<image>" in r["prompt"] or name == "geoeval") for r in rows)
            # the reported accuracy is the share of correct rows in the file
            assert report["results"][model][name]["accuracy"] == sum(r["correct"] for r in rows) / len(rows)
    # a second run finds every prediction in place: it generates nothing and reports the same
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text(encoding="utf-8"))["results"] == report["results"]


def test_vllm_flag_without_vllm_is_one_line(bench_dir, tmp_path, capsys):
    if runner.vllm_available():
        pytest.skip("vLLM is installed here: the missing-vLLM message cannot be produced")
    assert main(["eval", "tiny:qwen2_5_vl:nano", "--bench", "geoqa", "--bench-dir", bench_dir, "--out",
                 str(tmp_path), "--vllm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("calibrl: error: --vllm needs vLLM, which is not installed (pip install 'calibrl[vllm]' on a CUDA "
                   "host); leave out --vllm to generate with transformers")
