"""Offline tasks: determinism, split hygiene, correct answers, expert styles, prompt format, HF conversion."""

import re
import time

import numpy as np
import pytest
from PIL import Image

from calibrl.rewards import accuracy_reward, format_reward
from calibrl.tasks import INSTRUCTION, make_dataset, native_solution, task_corpus, to_hf_dataset
from calibrl.tasks import digits as digits_mod
from calibrl.tasks import shapes as shapes_mod
from helpers import digit_indices

PAPER_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in <answer> </answer> tags."
)
TASKS, SPLITS = ("digits", "shapes", "mixed"), ("train", "test", "ood")
N = 150


@pytest.fixture(scope="module")
def data():
    """(task, split, style) -> rows, built once."""
    return {
        (task, split, style): make_dataset(task, split, n=N, seed=7, expert_style=style)
        for task in TASKS
        for split in SPLITS
        for style in ("native", "mismatched")
    }


def image_bytes(rows):
    return [[(im.size, im.tobytes()) for im in r["images"]] for r in rows]


def test_instruction_is_the_papers():
    assert INSTRUCTION == PAPER_INSTRUCTION


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_in_seed(task):
    a = make_dataset(task, "train", n=40, seed=3, expert_style="noisy")
    b = make_dataset(task, "train", n=40, seed=3, expert_style="noisy")
    c = make_dataset(task, "train", n=40, seed=4, expert_style="noisy")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b) and image_bytes(a) == image_bytes(b)
    assert strip(a) != strip(c) and image_bytes(a) != image_bytes(c)


def test_styles_share_questions_and_images(data):
    native, verbose = data[("mixed", "train", "native")], data[("mixed", "train", "mismatched")]
    assert [r["prompt"] for r in native] == [r["prompt"] for r in verbose]
    assert [r["answer"] for r in native] == [r["answer"] for r in verbose]
    assert image_bytes(native) == image_bytes(verbose)
    assert [native_solution(r) for r in verbose] == [r["solution"] for r in native]


def test_digit_images_disjoint_between_train_and_test(data):
    pools = digits_mod.split_indices()
    train, test = set(pools["train"].tolist()), set(pools["test"].tolist())
    assert not train & test and len(train | test) == 1797 and len(train) == 1198
    used = {s: {i for r in data[("digits", s, "native")] for i in digit_indices(r)} for s in SPLITS}
    assert used["train"] <= train and used["test"] <= test and used["ood"] <= test
    assert len(used["train"]) > 100 and len(used["test"]) > 100
    assert all(digit_indices(r) == [] for r in data[("shapes", "train", "native")])


def test_ood_holds_out_operations(data):
    for task in ("digits", "shapes"):
        seen = {r["task"] for s in ("train", "test") for r in data[(task, s, "native")]}
        ood = {r["task"] for r in data[(task, "ood", "native")]}
        assert not seen & ood and len(seen) >= 3 and len(ood) == 3
    # multiplication only ever appears out of domain for digits
    assert not any(" * " in r["solution"] for s in ("train", "test") for r in data[("digits", s, "native")])
    assert any(" * " in r["solution"] for r in data[("digits", "ood", "native")])


@pytest.mark.parametrize("style", ["native", "mismatched"])
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", TASKS)
def test_expert_solutions_are_correct_and_formatted(data, task, split, style):
    rows = data[(task, split, style)]
    solutions, answers = [r["solution"] for r in rows], [r["answer"] for r in rows]
    assert accuracy_reward(solutions, answer=answers) == [1.0] * len(rows)
    assert format_reward(solutions) == [1.0] * len(rows)


@pytest.mark.parametrize("n,rate", [(1, 0.3), (7, 0.3), (100, 0.3), (333, 0.5), (50, 0.0), (50, 1.0), (10, 0.25)])
def test_noisy_realises_the_error_rate_exactly(n, rate):
    rows = make_dataset("mixed", "train", n=n, seed=11, expert_style="noisy", noise_rate=rate)
    acc = accuracy_reward([r["solution"] for r in rows], answer=[r["answer"] for r in rows])
    expected_wrong = int(rate * n + 0.5)
    assert acc.count(0.0) == expected_wrong
    assert [a == 0.0 for a in acc] == [r["meta"]["wrong_expert"] for r in rows]
    assert format_reward([r["solution"] for r in rows]) == [1.0] * n  # wrong, but still well formed
    correct = [r for r, a in zip(rows, acc) if a == 1.0]  # the others are the mismatched expert
    mismatched = make_dataset("mixed", "train", n=n, seed=11, expert_style="mismatched")
    assert all(r["solution"] in {m["solution"] for m in mismatched} for r in correct)


def test_mismatched_wording_is_different_and_longer(data):
    for task in ("digits", "shapes"):
        native, verbose = data[(task, "train", "native")], data[(task, "train", "mismatched")]
        ratio = sum(len(r["solution"]) for r in verbose) / sum(len(r["solution"]) for r in native)
        assert 1.8 < ratio < 4.0
        for a, b in zip(native, verbose):
            first_native_sentence = a["solution"][len("<think>") :].split(".")[0]
            assert first_native_sentence not in b["solution"]


def _digits_answer(op, d, target):
    return {
        "sum": lambda: d[0] + d[1],
        "difference": lambda: abs(d[0] - d[1]),
        "larger": lambda: max(d),
        "smaller": lambda: min(d),
        "product": lambda: d[0] * d[1],
        "sum3": lambda: sum(d),
        "add_subtract": lambda: d[0] + d[1] - d[2],
        "multiply_add": lambda: d[0] * d[1] + d[2],
        "add_multiply": lambda: (d[0] + d[1]) * d[2],
        "count3": lambda: d.count(target),
        "count4": lambda: d.count(target),
    }[op]()


@pytest.mark.parametrize("split", SPLITS)
def test_digits_answers_recomputed_from_labels_and_pixels(data, split):
    pixels, labels = digits_mod.digit_bank()
    for r in data[("digits", split, "native")]:
        m = r["meta"]
        assert m["labels"] == [int(labels[i]) for i in m["indices"]]
        assert r["task"] == f"digits/{m['op']}"
        assert r["answer"] == str(_digits_answer(m["op"], m["labels"], m["target"]))
        expected = np.concatenate([pixels[i] for i in m["indices"]], axis=1)
        assert np.array_equal(np.asarray(r["images"][0])[:, :, 0], expected)
        assert r["images"][0].size == (28 * len(m["indices"]), 28)


def _shape_value(m):
    if m["op"] == "count":
        kinds = [s["kind"] for s in m["shapes"]]
        return len(kinds) if m["asked"] is None else kinds.count(m["asked"])
    if m["op"] == "compare":
        return "left" if m["sizes"][0] > m["sizes"][1] else "right"
    return m["w"] * m["h"] if m["op"] == "area" else 2 * (m["w"] + m["h"])


@pytest.mark.parametrize("split", SPLITS)
def test_shapes_answers_recomputed_from_parameters(data, split):
    for r in data[("shapes", split, "native")]:
        m, image = r["meta"], np.asarray(r["images"][0])
        value = _shape_value(m)
        if r["task"].startswith("shapes/mc_"):
            assert re.fullmatch("[ABCD]", r["answer"]) and value == m["value"]
            assert m["options"]["ABCD".index(r["answer"])] == value and len(set(m["options"])) == 4
            assert "\n(A) " in r["prompt"][0]["content"][-1]["text"]
        else:
            assert r["answer"] == str(value)
        if m["op"] in ("area", "perimeter"):  # the centre of each grid cell is filled iff inside the rectangle
            u = shapes_mod.GRID_UNIT
            for cx in range(shapes_mod.GRID_CELLS):
                for cy in range(shapes_mod.GRID_CELLS):
                    inside = m["x0"] <= cx < m["x0"] + m["w"] and m["y0"] <= cy < m["y0"] + m["h"]
                    centre = image[cy * u + u // 2, cx * u + u // 2]
                    assert (tuple(centre) != (255, 255, 255)) == inside
        if m["op"] == "count":
            for s in m["shapes"]:  # every listed shape is painted at its centre
                assert tuple(image[int(s["cy"]), int(s["cx"])]) == tuple(s["color"])


def test_prompt_structure(data):
    for rows in data.values():
        for r in rows:
            (message,) = r["prompt"]
            assert message["role"] == "user"
            blocks = message["content"]
            assert sum(b["type"] == "image" for b in blocks) == len(r["images"]) >= 1
            assert blocks[-1]["type"] == "text" and blocks[-1]["text"].endswith("\n" + INSTRUCTION)
            assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in r["images"])
            assert all(w % 28 == 0 and h % 28 == 0 for w, h in (im.size for im in r["images"]))
            assert isinstance(r["answer"], str) and r["answer"]
            assert r["split"] in SPLITS and r["difficulty"] in (1, 2, 3)


def test_difficulty_selects_levels():
    easy = make_dataset("digits", "train", n=60, seed=1, difficulty=1)
    assert {r["difficulty"] for r in easy} == {1} and all(r["images"][0].size == (56, 28) for r in easy)
    hard = make_dataset("mixed", "ood", n=60, seed=1, difficulty=[2, 3])
    assert {r["difficulty"] for r in hard} == {2, 3}
    assert {r["difficulty"] for r in make_dataset("shapes", "test", n=60, seed=1)} == {1, 2, 3}


def test_ten_thousand_digits_quickly():
    make_dataset("digits", "train", n=10, seed=0)  # scans loaded and cached
    start = time.perf_counter()
    rows = make_dataset("digits", "train", n=10_000, seed=0)
    elapsed = time.perf_counter() - start
    assert len(rows) == 10_000 and len({r["answer"] for r in rows}) > 20
    assert elapsed < 30, f"10k digits rows took {elapsed:.1f}s"  # ~1.5 s measured; generous for loaded CI


def test_to_hf_dataset_round_trip(data):
    rows = data[("mixed", "ood", "mismatched")][:20]
    ds = to_hf_dataset(rows)
    assert len(ds) == 20 and set(ds.column_names) >= {"prompt", "images", "answer", "solution", "task", "meta"}
    for row, back in zip(rows, ds):
        assert [np.asarray(im).tolist() for im in back["images"]] == [np.asarray(im).tolist() for im in row["images"]]
        assert all(im.mode == "RGB" for im in back["images"])
        blocks = [{k: v for k, v in b.items() if v is not None} for b in back["prompt"][0]["content"]]
        assert blocks == row["prompt"][0]["content"] and back["prompt"][0]["role"] == "user"
        assert (back["answer"], back["solution"], back["task"], back["difficulty"]) == (
            row["answer"], row["solution"], row["task"], row["difficulty"])  # fmt: skip
        assert native_solution(back) == native_solution(row) and digit_indices(back) == digit_indices(row)
    with pytest.raises(ValueError, match="empty"):
        to_hf_dataset([])


def test_task_corpus_covers_the_vocabulary():
    corpus = task_corpus()
    assert all(isinstance(t, str) for t in corpus) and 500 < len(corpus) < 5000
    vocab = {w for t in corpus for w in re.findall(r"[A-Za-z]+|[^\sA-Za-z0-9]", t)}
    fresh = []
    for task in ("digits", "shapes"):
        for split in SPLITS:
            fresh += make_dataset(task, split, n=200, seed=99, expert_style="noisy", noise_rate=0.5)
    texts = [r["prompt"][0]["content"][-1]["text"] + r["solution"] + r["answer"] for r in fresh]
    missing = {w for t in texts for w in re.findall(r"[A-Za-z]+|[^\sA-Za-z0-9]", t)} - vocab
    assert not missing
    assert any(INSTRUCTION in t for t in corpus) and set("ABCD") <= set(corpus)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"task": "faces"}, "task="),
        ({"split": "validation"}, "split="),
        ({"expert_style": "gpt4o"}, "expert_style="),
        ({"n": 0}, "n="),
        ({"n": -3}, "n="),
        ({"n": 2.5}, "n="),
        ({"noise_rate": -0.1}, "noise_rate="),
        ({"noise_rate": 1.5}, "noise_rate="),
        ({"difficulty": 0}, "difficulty="),
        ({"difficulty": [1, 4]}, "difficulty="),
        ({"difficulty": []}, "difficulty="),
        ({"difficulty": "2"}, "difficulty="),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dataset(**{"n": 5, **kwargs})
