"""Reading benchmark copies in their published layouts (fixtures written in each release's schema), and the
one-line errors for a copy that is missing, truncated or not what we expect (exit 2 through the CLI)."""

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calibrl.bench import BENCHMARKS, PAPER, BenchDataError, resolve_names
from calibrl.bench.fixtures import write_fixtures
from calibrl.bench.runner import load_benchmark
from calibrl.cli import main

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # how `datasets` stores an Image column


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("benches")))


def copy_of(bench_dir, tmp_path):
    return shutil.copytree(bench_dir, tmp_path / "copy")


# Field names and types as the dataset cards list them (see docs/EVALUATION.md for the sources).
SCHEMAS = {
    "MathVista/data/testmini-00000-of-00001.parquet": {
        "pid": pa.string(), "question": pa.string(), "image": pa.string(), "decoded_image": IMAGE,
        "choices": pa.list_(pa.string()), "unit": pa.string(), "precision": pa.float64(), "answer": pa.string(),
        "question_type": pa.string(), "answer_type": pa.string(), "query": pa.string()},
    "MathVerse/testmini.parquet": {
        "sample_index": pa.string(), "problem_index": pa.string(), "problem_version": pa.string(),
        "question": pa.string(), "image": IMAGE, "answer": pa.string(), "question_type": pa.string(),
        "query_wo": pa.string(), "query_cot": pa.string(), "question_for_eval": pa.string()},
    "MathVision/data/test-00000-of-00001.parquet": {
        "id": pa.string(), "question": pa.string(), "options": pa.list_(pa.string()), "image": pa.string(),
        "decoded_image": IMAGE, "answer": pa.string(), "solution": pa.string(), "level": pa.int64(),
        "subject": pa.string()},
    "MMMU/Math/validation-00000-of-00001.parquet": {
        "id": pa.string(), "question": pa.string(), "options": pa.string(), "explanation": pa.string(),
        **{f"image_{n}": IMAGE for n in range(1, 8)}, "img_type": pa.string(), "answer": pa.string(),
        "topic_difficulty": pa.string(), "question_type": pa.string(), "subfield": pa.string()},
    "We-Math/data/testmini-00000-of-00001.parquet": {
        "ID": pa.string(), "split": pa.string(), "knowledge concept": pa.string(), "question": pa.string(),
        "option": pa.string(), "answer": pa.string(), "image_path": IMAGE, "key": pa.string(),
        "question number": pa.int64(), "knowledge concept description": pa.string()},
    "geometry3k/data/test-00000-of-00001.parquet": {
        "images": pa.list_(IMAGE), "problem": pa.string(), "answer": pa.string(), "id": pa.int64(),
        "choices": pa.list_(pa.string()), "ground_truth": pa.string()},
    "ScienceQA/ScienceQA-IMG/test-00000-of-00001.parquet": {
        "image": IMAGE, "question": pa.string(), "choices": pa.list_(pa.string()), "answer": pa.int8(),
        "hint": pa.string(), "grade": pa.string(), "subject": pa.string()},
}


@pytest.mark.parametrize("path", sorted(SCHEMAS))
def test_fixtures_are_written_in_the_published_schema(bench_dir, path):
    schema = pq.read_schema(os.path.join(bench_dir, path))
    for column, dtype in SCHEMAS[path].items():
        assert column in schema.names, column
        assert schema.field(column).type == dtype, (column, schema.field(column).type)


def test_geoqa_fixture_is_r1v_jsonl_with_an_image_folder(bench_dir):
    lines = open(os.path.join(bench_dir, "GeoQA", "geoqa_test_prompts.jsonl"), encoding="utf-8").read().splitlines()
    rows = [json.loads(line) for line in lines]
    assert set(rows[0]) == {"image_path", "question", "ground_truth"}
    assert all(os.path.isfile(os.path.join(bench_dir, "GeoQA", r["image_path"])) for r in rows)


def test_geoeval_fixture_is_the_release_json_with_an_image_folder(bench_dir):
    # as the release's code reads LLM_eval/dataset_merge/*.json: one object per subset, problem id -> row
    folder = os.path.join(bench_dir, "GeoEval")
    for file in ("select.json", "aug.json", "backward_aug.json", "solid.json"):
        data = json.load(open(os.path.join(folder, "dataset_merge", file), encoding="utf-8"))
        assert isinstance(data, dict) and all(isinstance(k, str) for k in data)
        for row in data.values():
            assert set(row) >= {"dataset_name", "diagram_name", "diagram_description", "text", "choice_list",
                                "answer_value", "solution", "geometry_shape"}
            assert isinstance(row["text"]["Num_Exp"], str) and isinstance(row["answer_value"], (str, float))
            assert row["choice_list"] is None or all(isinstance(c, str) for c in row["choice_list"])
            assert row["diagram_description"] is None or {"structure", "semantic"} <= set(row["diagram_description"])
            if row["diagram_name"] is not None:
                assert os.path.isfile(os.path.join(folder, "images", row["diagram_name"]))
    aug = json.load(open(os.path.join(folder, "dataset_merge", "aug.json"), encoding="utf-8"))
    assert all(isinstance(r["text"]["aug_problem"], str) for r in aug.values())
    back = json.load(open(os.path.join(folder, "dataset_merge", "backward_aug.json"), encoding="utf-8"))
    assert all(isinstance(r["backward_text"], str) and isinstance(r["backward_answer_value"], str)
               and "backward_semantic" in r["diagram_description"] for r in back.values())


@pytest.mark.parametrize("split, n", [("main", 5), ("aug", 1), ("backward", 1), ("hard", 1), ("all", 8)])
def test_geoeval_loads_each_subset_with_and_without_diagrams(bench_dir, split, n):
    items = load_benchmark("geoeval", bench_dir, split=split)
    assert len(items) == n and len({it.id for it in items}) == n
    for it in items:
        assert it.prompt_text().endswith("<answer> </answer> tags.")
        assert all(ref.load().size == (64, 48) for ref in it.images)
        assert len(it.images) == (1 if it.meta["input"] == "diagram" else 0)
    assert load_benchmark("geoeval", bench_dir) == load_benchmark("geoeval", bench_dir, split="main")


def test_geoeval_reads_a_relative_bench_dir(bench_dir, monkeypatch):
    monkeypatch.chdir(os.path.dirname(bench_dir))
    items = load_benchmark("geoeval", os.path.basename(bench_dir))
    assert [ref.load().size for it in items for ref in it.images] == [(64, 48)] * 3


def test_geoeval_renders_the_release_prompt_and_reads_each_subsets_gold(bench_dir):
    main_items = {it.id: it for it in load_benchmark("geoeval", bench_dir)}
    first = main_items["1"]
    assert first.prompt_text().startswith("<image>Find x.\nThe Choices are: [5, 7.5, 10, 12.5]\nYou FIRST think")
    assert first.gold == "7.5" and first.meta["gold_letter"] == "B"
    assert main_items["2"].gold == "50" and main_items["4"].options == [] and main_items["4"].kind == "expression"
    assert main_items["3"].images == [] and main_items["3"].prompt_text().startswith("the side of a square")
    assert BENCHMARKS["geoeval"].groups(first) == {"subset": ["GeoEval-2000"], "source": ["PGPS9K"],
                                                   "input": ["diagram"], "shape": ["Line"]}
    (aug,) = load_benchmark("geoeval", bench_dir, split="aug")
    assert "Determine the value of x" in aug.prompt_text() and aug.gold == "7.5"
    (back,) = load_benchmark("geoeval", bench_dir, split="backward")
    assert "Now please answer what is the value of x?" in back.prompt_text() and back.gold == "5"
    assert back.options == [] and "The Choices are" not in back.prompt_text()
    (hard,) = load_benchmark("geoeval", bench_dir, split="hard")
    assert hard.gold == "24" and hard.meta["gold_letter"] == "B"  # the gold letter B is the option 24
    ids = {it.id for it in load_benchmark("geoeval", bench_dir, split="all")}
    assert {"main/1", "aug/1", "backward/1", "hard/1"} <= ids


def test_geoeval_diagram_description_when_asked(bench_dir, monkeypatch):
    monkeypatch.setattr(BENCHMARKS["geoeval"], "with_description", True)
    first = load_benchmark("geoeval", bench_dir)[0]
    assert "Here are the basic description of the diagram: line A B C\nAB = 5, BC = x\nFind x." in first.prompt_text()
    (back,) = load_benchmark("geoeval", bench_dir, split="backward")
    assert "AB = x, BC = 2.5" in back.prompt_text()  # the backward subset's own description


@pytest.mark.parametrize("name, n", [("mathvista", 6), ("mathverse", 7), ("mathvision", 4), ("mmmu", 4),
                                     ("wemath", 7), ("geometry3k", 3), ("geoqa", 3), ("scienceqa", 3)])
def test_every_benchmark_loads_its_fixture(bench_dir, name, n):
    items = load_benchmark(name, bench_dir)
    assert len(items) == n and len({it.id for it in items}) == n
    for it in items:
        assert it.images and all(ref.load().size == (64, 48) for ref in it.images)
        assert it.prompt_text().endswith("<answer> </answer> tags.")  # the paper's instruction closes the turn


def test_mathvista_renders_the_published_query_and_converts_the_gold_to_a_letter(bench_dir):
    items = {it.id: it for it in load_benchmark("mathvista", bench_dir)}
    mc = items["1"]
    assert mc.kind == "choice" and mc.gold == "B" and mc.options == ["3/11", "8/11", "6/11", "3/5"]
    assert "Hint: Please answer the question and provide the correct option letter" in mc.prompt_text()
    assert "Choices:\n(A) 3/11\n(B) 8/11" in mc.prompt_text()
    assert items["3"].kind == "numeric" and items["3"].meta["precision"] == 2 and "(Unit: $)" in items[
        "3"].prompt_text()
    assert items["2"].meta["integer"] and items["5"].kind == "list"
    assert BENCHMARKS["mathvista"].groups(items["2"])["skill"] == ["logical reasoning", "arithmetic reasoning"]


def test_mathverse_versions_including_vision_only(bench_dir):
    items = load_benchmark("mathverse", bench_dir)
    versions = {it.meta["version"] for it in items}
    assert versions == {"Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only"}
    vision_only = [it for it in items if it.meta["version"] == "Vision Only"]
    assert all(it.options == [] and "shown in the image" in it.prompt_text() for it in vision_only)
    text_dominant = next(it for it in items if it.id == "1")
    assert text_dominant.options[2] == "\\sqrt{3}" and text_dominant.gold == "C"


def test_mmmu_interleaves_up_to_seven_images_in_placeholder_order(bench_dir):
    items = {it.id: it for it in load_benchmark("mmmu", bench_dir)}
    art = items["validation_Art_Theory_1"]
    # question names image 1, the three options images 2-4: five segments of text between four images
    assert len(art.images) == 4 and art.prompt_text().count("<image>") == 4
    assert art.prompt_text().startswith("Which painting is in the style of <image>?\nChoices:\n(A) <image>")
    assert [ref.load().getpixel((4, 4)) for ref in art.images] == [(255, 165, 0), (128, 128, 128), (165, 42, 42),
                                                                   (255, 192, 203)]  # orange, gray, brown, pink
    assert items["validation_Math_1"].segments[0] is items["validation_Math_1"].images[0]
    assert art.meta["discipline"] == "Art and Design" and items["validation_Math_2"].kind == "mmmu_open"


def test_wemath_groups_a_problem_with_its_sub_problems(bench_dir):
    items = load_benchmark("wemath", bench_dir)
    keys = {(it.meta["group"], it.meta["key"]) for it in items}
    assert ("1", "2steps_multi") in keys and ("2", "3steps_3") in keys
    assert items[0].options[-1] == "No correct answer" and items[0].gold == "A"


def test_limit_and_split_override(bench_dir, tmp_path):
    assert len(load_benchmark("mathvista", bench_dir, limit=2)) == 2
    with pytest.raises(BenchDataError, match="no test parquet"):
        load_benchmark("mathvista", bench_dir, split="test")


def test_resolve_names():
    assert resolve_names(["paper"]) == list(PAPER)
    assert resolve_names(["mmmu,MathVista", "mmmu"]) == ["mmmu", "mathvista"]
    assert resolve_names(["paper"])[:3] == ["geoeval", "geometry3k", "geoqa"]  # the paper's in-domain columns
    with pytest.raises(ValueError, match="unknown benchmark 'geomverse'"):
        resolve_names("geomverse")


# ---------------------------------------------------------------------------------------------------------
# Copies that are not what we expect: one line, naming the file / column / row, before any model loads
# ---------------------------------------------------------------------------------------------------------
def _cli_error(capsys, argv, *expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("calibrl: error: ") and "\n" not in err and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def _eval(bench_dir, bench, tmp_path):
    return ["eval", "tiny:qwen2_5_vl:nano", "--bench", bench, "--bench-dir", str(bench_dir), "--out",
            str(tmp_path / "out"), "--no_progress"]


def test_missing_copy_names_the_folder_and_the_release(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _cli_error(capsys, _eval(tmp_path / "empty", "mathvista", tmp_path), "mathvista: no folder MathVista",
               "AI4Math/MathVista")
    _cli_error(capsys, _eval(tmp_path / "nowhere", "mathvista", tmp_path), "--bench-dir", "is not a folder")


def test_missing_file_names_the_pattern(capsys, bench_dir, tmp_path):
    copy = copy_of(bench_dir, tmp_path)
    os.remove(copy / "MathVerse" / "testmini.parquet")
    _cli_error(capsys, _eval(copy, "mathverse", tmp_path), "mathverse: no testmini.parquet or testmini.json")


def test_truncated_parquet_is_one_line(capsys, bench_dir, tmp_path):
    copy = copy_of(bench_dir, tmp_path)
    path = copy / "MMMU" / "Math" / "validation-00000-of-00001.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _cli_error(capsys, _eval(copy, "mmmu", tmp_path), "mmmu: cannot read", "validation-00000-of-00001.parquet")
    assert not (tmp_path / "out").exists()  # nothing was generated or written


def test_missing_column_names_it(capsys, bench_dir, tmp_path):
    copy = copy_of(bench_dir, tmp_path)
    path = copy / "We-Math" / "data" / "testmini-00000-of-00001.parquet"
    pq.write_table(pq.read_table(path).drop(["key"]), path)
    _cli_error(capsys, _eval(copy, "wemath", tmp_path), "wemath:", "has no column 'key'")


def test_bad_image_and_bad_gold_name_the_row(capsys, bench_dir, tmp_path):
    copy = copy_of(bench_dir, tmp_path)
    (copy / "GeoQA" / "Geo170K" / "images" / "test" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _cli_error(capsys, _eval(copy, "geoqa", tmp_path), "geoqa: geoqa_test_prompts.jsonl line 2", "unreadable image")
    os.remove(copy / "GeoQA" / "Geo170K" / "images" / "test" / "1.png")
    _cli_error(capsys, _eval(copy, "geoqa", tmp_path), "line 2", "not found")
    path = copy / "MathVista" / "data" / "testmini-00000-of-00001.parquet"
    table = pq.read_table(path)
    answers = table.column("answer").to_pylist()
    answers[0] = "9/11"  # a multiple-choice gold that is none of the choices
    pq.write_table(table.set_column(table.schema.get_field_index("answer"), "answer", pa.array(answers)), path)
    _cli_error(capsys, _eval(copy, "mathvista", tmp_path), "mathvista:", "pid 1", "'9/11' is not one of the choices")


def test_geoeval_missing_truncated_or_malformed_copy_names_the_file_and_problem(capsys, bench_dir, tmp_path):
    copy = copy_of(bench_dir, tmp_path)
    merged = copy / "GeoEval" / "dataset_merge"
    _cli_error(capsys, _eval(copy, "geoeval", tmp_path) + ["--bench-split", "geoeval=test"], "geoeval: no split 'test'")
    os.remove(copy / "GeoEval" / "images" / "geoqa_2.png")
    _cli_error(capsys, _eval(copy, "geoeval", tmp_path), "select.json problem 2", "diagram geoqa_2.png not found",
               "looked in dataset_merge/, dataset_merge/images/, ./, images/")
    shutil.copy(os.path.join(bench_dir, "GeoEval", "images", "geoqa_2.png"), copy / "GeoEval" / "images")
    rows = json.loads((merged / "select.json").read_text(encoding="utf-8"))
    del rows["3"]["answer_value"]
    (merged / "select.json").write_text(json.dumps(rows), encoding="utf-8")
    _cli_error(capsys, _eval(copy, "geoeval", tmp_path), "select.json problem 3 has no field 'answer_value'")
    rows = json.loads((merged / "aug.json").read_text(encoding="utf-8"))
    rows["1"]["text"] = {"Num_Exp": "Find x."}  # an aug row without its rephrased problem
    (merged / "aug.json").write_text(json.dumps(rows), encoding="utf-8")
    _cli_error(capsys, _eval(copy, "geoeval", tmp_path) + ["--bench-split", "geoeval=aug"],
               "aug.json problem 1", "'text' has no 'aug_problem'")
    rows = json.loads((merged / "solid.json").read_text(encoding="utf-8"))
    rows["1"]["answer_value"] = None
    (merged / "solid.json").write_text(json.dumps(rows), encoding="utf-8")
    _cli_error(capsys, _eval(copy, "geoeval", tmp_path) + ["--bench-split", "geoeval=hard"],
               "solid.json problem 1: 'answer_value' is not an answer (got None)")
    path = merged / "backward_aug.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _cli_error(capsys, _eval(copy, "geoeval", tmp_path) + ["--bench-split", "geoeval=backward"],
               "geoeval:", "backward_aug.json is not valid JSON", "truncated?")
    os.remove(path)
    _cli_error(capsys, _eval(copy, "geoeval", tmp_path) + ["--bench-split", "geoeval=backward"],
               "geoeval: no dataset_merge/backward_aug.json")
    shutil.rmtree(copy / "GeoEval")
    _cli_error(capsys, _eval(copy, "geoeval", tmp_path), "geoeval: no folder GeoEval", "github.com/GeoEval/GeoEval")
    assert not (tmp_path / "out").exists()  # nothing was generated or written


def test_mmmu_placeholder_without_its_image(capsys, bench_dir, tmp_path):
    copy = copy_of(bench_dir, tmp_path)
    path = copy / "MMMU" / "Math" / "validation-00000-of-00001.parquet"
    table = pq.read_table(path)
    questions = table.column("question").to_pylist()
    questions[1] += " Compare with <image 5>."
    pq.write_table(table.set_column(table.schema.get_field_index("question"), "question", pa.array(questions)), path)
    _cli_error(capsys, _eval(copy, "mmmu", tmp_path), "validation_Math_2", "'<image 5>'", "that image is empty")


def test_bench_flags_errors(capsys, bench_dir, tmp_path):
    _cli_error(capsys, ["eval", "tiny:qwen2_5_vl:nano", "--bench", "mathvista"], "--bench needs --bench-dir")
    _cli_error(capsys, _eval(bench_dir, "geomverse", tmp_path), "unknown benchmark 'geomverse'")
    _cli_error(capsys, _eval(bench_dir, "mathvista", tmp_path) + ["--bench-split", "mathvista"], "NAME=SPLIT")
    _cli_error(capsys, _eval(bench_dir, "mathvista", tmp_path) + ["--n", "-1"], "limit=-1")
    _cli_error(capsys, ["eval", "a", "b", "--data", "task:digits"], "several checkpoints need --bench")
    _cli_error(capsys, ["eval", "tiny:nope:nano", "--bench", "mathvista", "--bench-dir", str(bench_dir)],
               "tiny:<family>:<size>")
