"""calibrl.evaluate: pass@k against enumeration, exact scoring of given completions, generation on nano models."""

import itertools
import json
import math
from collections import Counter

import pytest
import torch

import calibrl.evaluate as ev
from calibrl.evaluate import evaluate, format_table, generate_completions, pass_at_k, save_results, score_completions


# ----------------------------------------------------------------------------------------------------------
# pass@k
# ----------------------------------------------------------------------------------------------------------
def brute_pass_at_k(n, c, k):
    """Fraction of k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 7, 4) == 1.0  # k > n - c: every 4-subset has a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # large n stays stable
    for bad in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1)]:
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(*bad)


# ----------------------------------------------------------------------------------------------------------
# Scoring known completions
# ----------------------------------------------------------------------------------------------------------
GOOD = "<think>3 + 4 = 7.</think><answer>{}</answer>"


def scoring_rows():
    spec = [  # (answer, task, difficulty, split)
        ("7", "digits/sum", 1, "test"),
        ("12", "digits/sum", 1, "test"),
        ("B", "shapes/mc_count", 2, "ood"),
        ("9", "digits/sum3", 2, "test"),
        ("3", "shapes/count", 3, "ood"),
    ]
    return [{"prompt": "q", "answer": a, "task": t, "difficulty": d, "split": s} for a, t, d, s in spec]


GREEDY = [
    GOOD.format("7"),                # right, strict format
    GOOD.format("13"),               # wrong, strict format
    "<answer>(B)</answer>",          # right (choice letter), no <think>: bad format
    "the answer is 9",               # no answer tag: wrong, bad format
    "<think>x</think><answer>3</answer> trailing",  # right, text after the answer: bad format
]
SAMPLES = [  # correct counts 4, 0, 1, 2, 4 out of 4
    [GOOD.format("7")] * 4,
    [GOOD.format("1")] * 4,
    ["<answer>B</answer>", "<answer>C</answer>", "none", "<answer>A</answer>"],
    [GOOD.format("9"), "<answer>9</answer>", GOOD.format("8"), ""],
    ["\\boxed{3}"] * 4,
]


def test_score_completions_exact_numbers():
    r = score_completions(scoring_rows(), GREEDY, SAMPLES, k=[1, 2, 4])
    assert r["correct"] == [True, False, True, False, True]
    p2 = {4: 1.0, 0: 0.0, 1: 0.5, 2: 5 / 6}  # 1 - C(4-c, 2) / C(4, 2)
    overall = r["overall"]
    assert overall["n"] == 5 and overall["accuracy"] == pytest.approx(0.6) and overall["format_rate"] == pytest.approx(0.4)
    assert overall["stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5)) and r["stderr"] == overall["stderr"]
    assert overall["pass@1"] == pytest.approx((4 + 0 + 1 + 2 + 4) / 20)
    assert overall["pass@2"] == pytest.approx((p2[4] + p2[0] + p2[1] + p2[2] + p2[4]) / 5)
    assert overall["pass@4"] == pytest.approx(4 / 5)

    assert list(r["by_split"]) == ["ood", "test"]
    assert r["by_split"]["test"]["n"] == 3 and r["by_split"]["test"]["accuracy"] == pytest.approx(1 / 3)
    assert r["by_split"]["ood"]["accuracy"] == 1.0 and r["by_split"]["ood"]["format_rate"] == 0.0
    assert r["by_split"]["test"]["pass@2"] == pytest.approx((p2[4] + p2[0] + p2[2]) / 3)

    tasks = r["by_task"]
    assert {t: s["n"] for t, s in tasks.items()} == {"digits/sum": 2, "digits/sum3": 1, "shapes/count": 1,
                                                      "shapes/mc_count": 1}
    assert tasks["digits/sum"]["accuracy"] == 0.5 and tasks["digits/sum"]["format_rate"] == 1.0
    assert tasks["shapes/mc_count"]["pass@2"] == pytest.approx(0.5)

    diff = r["by_difficulty"]
    assert list(diff) == ["1", "2", "3"]
    assert [diff[d]["accuracy"] for d in "123"] == pytest.approx([0.5, 0.5, 1.0])
    assert [diff[d]["format_rate"] for d in "123"] == pytest.approx([1.0, 0.0, 0.0])
    json.dumps(r)  # JSON-serialisable


def test_score_completions_without_samples_and_errors():
    rows = scoring_rows()
    r = score_completions(rows, GREEDY)
    assert not any(key.startswith("pass@") for key in r["overall"])
    rows_no_groups = [{"answer": "1"}, {"answer": "2", "split": "test"}]
    r = score_completions(rows_no_groups, ["<answer>1</answer>", "<answer>1</answer>"])
    assert r["overall"]["accuracy"] == 0.5 and r["by_task"] == {} and r["by_split"]["test"]["n"] == 1
    with pytest.raises(ValueError, match="greedy: 4 completions for 5 rows"):
        score_completions(rows, GREEDY[:4])
    with pytest.raises(ValueError, match="needs at least 4 samples"):
        score_completions(rows, GREEDY, [s[:2] for s in SAMPLES], k=4)
    with pytest.raises(ValueError, match="row 1 has 3 samples"):
        score_completions(rows, GREEDY, [SAMPLES[0], SAMPLES[1][:3]] + SAMPLES[2:], k=2)
    with pytest.raises(ValueError, match="row 0 has no 'answer'"):
        score_completions([{"prompt": "q"}], ["x"])


def test_evaluate_routes_greedy_and_samples(monkeypatch):
    """evaluate() scores greedy completions for accuracy and the sampled ones (at the requested T) for pass@k."""
    seen = []

    def fake_generate(model, processing_class, rows, max_new_tokens=64, batch_size=32, num_samples=1,
                      temperature=0.0, seed=0):
        seen.append((num_samples, temperature))
        if temperature == 0:
            return [[GREEDY[i]] for i in range(len(rows))]
        return [SAMPLES[i][:num_samples] for i in range(len(rows))]

    monkeypatch.setattr(ev, "generate_completions", fake_generate)
    r = evaluate(None, None, scoring_rows(), k=[2, 4], temperature_for_pass_k=0.7, keep_completions=True)
    assert seen == [(1, 0.0), (4, 0.7)]
    assert r["overall"]["accuracy"] == pytest.approx(0.6) and r["overall"]["pass@4"] == pytest.approx(0.8)
    assert r["settings"]["num_samples"] == 4 and r["settings"]["k"] == [2, 4]
    assert [c["correct"] for c in r["completions"]] == [True, False, True, False, True]
    assert r["completions"][2] == {"answer": "B", "completion": GREEDY[2], "correct": True}

    seen.clear()
    r = evaluate(None, None, scoring_rows())  # k=1: greedy only, no sampling
    assert seen == [(1, 0.0)] and "pass@1" not in r["overall"] and r["settings"]["num_samples"] == 0
    with pytest.raises(ValueError, match="num_samples=2 is below the largest k=4"):
        evaluate(None, None, scoring_rows(), k=4, num_samples=2)


def test_format_table_and_save(tmp_path):
    r = score_completions(scoring_rows(), GREEDY, SAMPLES, k=[1, 4])
    table = format_table(r)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "n", "accuracy", "±stderr", "format", "pass@1", "pass@4"]
    names = [line.split()[0] for line in lines[2:]]
    assert names == ["overall", "split=ood", "split=test", "task=digits/sum", "task=digits/sum3", "task=shapes/count",
                     "task=shapes/mc_count", "difficulty=1", "difficulty=2", "difficulty=3"]
    assert lines[2].split()[1:4] == ["5", "60.0%", f"{100 * math.sqrt(0.24 / 5):.1f}"]
    save_results(r, tmp_path / "sub" / "results.json")
    assert json.loads((tmp_path / "sub" / "results.json").read_text()) == r


# ----------------------------------------------------------------------------------------------------------
# Generation on nano models
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_rows():
    from calibrl.tasks import make_dataset

    return make_dataset("digits", "test", n=10, seed=0) + make_dataset("shapes", "ood", n=6, seed=0)


@pytest.fixture(scope="module")
def nano_vlm(tiny_vlm_dir):
    from calibrl.models import load_tiny_model

    return load_tiny_model(tiny_vlm_dir)


def test_evaluate_nano_vlm_structure(nano_vlm, task_rows):
    model, proc = nano_vlm
    assert model.training
    r = evaluate(model, proc, task_rows, max_new_tokens=6, batch_size=12, k=[1, 2])
    assert model.training  # restored
    assert r["overall"]["n"] == 16
    assert {s: g["n"] for s, g in r["by_split"].items()} == {"test": 10, "ood": 6}
    assert {t: g["n"] for t, g in r["by_task"].items()} == dict(Counter(row["task"] for row in task_rows))
    assert sum(g["n"] for g in r["by_difficulty"].values()) == 16
    for group in [r["overall"], *r["by_split"].values(), *r["by_task"].values(), *r["by_difficulty"].values()]:
        assert set(group) == {"n", "accuracy", "format_rate", "stderr", "pass@1", "pass@2"}
        assert 0.0 <= group["accuracy"] <= 1.0 and 0.0 <= group["pass@1"] <= group["pass@2"] <= 1.0
    assert r["settings"] == {"max_new_tokens": 6, "k": [1, 2], "num_samples": 2, "temperature_for_pass_k": 1.0,
                             "seed": 0}
    json.dumps(r)


def test_generation_is_deterministic_and_leaves_rng_alone(nano_vlm, task_rows):
    model, proc = nano_vlm
    rows = task_rows[:5] + task_rows[:1]  # a duplicate prompt must get the same greedy completion
    state = torch.get_rng_state()
    g1 = generate_completions(model, proc, rows, max_new_tokens=8, batch_size=4)
    g2 = generate_completions(model, proc, rows, max_new_tokens=8, batch_size=4)
    assert g1 == g2 and len(g1) == 6 and all(len(c) == 1 and isinstance(c[0], str) for c in g1)
    assert g1[0] == g1[5]
    s1 = generate_completions(model, proc, rows[:3], max_new_tokens=8, num_samples=3, temperature=1.0, seed=1)
    s2 = generate_completions(model, proc, rows[:3], max_new_tokens=8, num_samples=3, temperature=1.0, seed=1)
    s3 = generate_completions(model, proc, rows[:3], max_new_tokens=8, num_samples=3, temperature=1.0, seed=2)
    assert s1 == s2 and s1 != s3 and all(len(s) == 3 for s in s1)
    assert torch.equal(state, torch.get_rng_state())  # evaluation does not perturb training randomness


def test_generation_input_errors(nano_vlm, task_rows):
    model, proc = nano_vlm
    row = dict(task_rows[0], images=[])
    with pytest.raises(ValueError, match="row 0: the prompt has 1 image blocks but the row has 0 images"):
        generate_completions(model, proc, [row])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_completions(model, proc, task_rows[:1], max_new_tokens=0)
    assert generate_completions(model, proc, []) == []


def test_text_only_qwen2(task_rows):
    from calibrl.models import build_tiny_model

    corpus = [row["prompt"][0]["content"][-1]["text"] for row in task_rows] + [row["solution"] for row in task_rows]
    model, tok = build_tiny_model("qwen2", "nano", corpus=corpus, seed=0)
    r = evaluate(model, tok, task_rows, max_new_tokens=8)  # image blocks render as nothing, images are ignored
    assert r["overall"]["n"] == 16 and set(r["by_split"]) == {"test", "ood"}
    plain = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}, {"prompt": "2 + 3 =", "answer": "5"}]
    out = generate_completions(model, tok, plain, max_new_tokens=6)
    assert out == generate_completions(model, tok, plain, max_new_tokens=6)
    assert len(out) == 2 and all(isinstance(c[0], str) for c in out)
    assert "<|im_end|>" not in "".join(c[0] for c in out)  # special tokens are skipped when decoding
