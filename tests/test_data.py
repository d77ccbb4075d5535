"""Dataset adapters: both input schemas, every storage format, and every bad-row case named in the spec."""

import io
import json

import datasets
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calibrl.data import (
    IMAGE_PLACEHOLDERS,
    ColumnMap,
    DataError,
    DataSummary,
    load_dataset_for_training,
    load_rows,
    normalize_rows,
    save_rows,
)


def _image(color, size=(12, 8)) -> PIL.Image.Image:
    image = PIL.Image.new("RGB", size, color)
    image.putpixel((1, 1), (color[2], color[0], color[1]))  # not a flat image, so pixel order matters
    return image


def _png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


RED, GREEN, BLUE = _image((200, 10, 10)), _image((10, 200, 10)), _image((10, 10, 200), size=(6, 10))
COT = ["<think>three dots</think><answer>3</answer>", "<think>left is larger</think><answer>B</answer>", "<think>2+2=4</think><answer>4</answer>"]
EXTRA = [{"split": "train", "index": i} for i in range(3)]

# What every source below must normalise to.
EXPECTED = [
    {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the dots."}]}],
        "images": [RED],
        "answer": "3",
        "solution": COT[0],
        "data_source": "dots",
        "extra_info": json.dumps(EXTRA[0]),
    },
    {
        "prompt": [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is larger?"}]},
        ],
        "images": [GREEN, BLUE],
        "answer": "B",
        "solution": COT[1],
        "data_source": "compare",
        "extra_info": json.dumps(EXTRA[1]),
    },
    {
        "prompt": [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}],
        "images": [],
        "answer": "4",
        "solution": COT[2],
        "data_source": "arith",
        "extra_info": json.dumps(EXTRA[2]),
    },
]
QUESTIONS = ["Count the dots.", "Which is larger?", "What is 2+2?"]
ANSWERS = ["3", "B", "4"]
IMAGES = [[RED], [GREEN, BLUE], []]


def _messages(i: int, text: str) -> list[dict]:
    system = [{"role": "system", "content": "Be brief."}] if i == 1 else []
    return system + [{"role": "user", "content": text}]


def _passthrough(i: int, extra) -> dict:
    return {"data_source": EXPECTED[i]["data_source"], "extra_info": extra}


# TRL: string contents, the images go in front of the user text.
TRL_ROWS = [
    {"prompt": _messages(i, QUESTIONS[i]), "images": IMAGES[i], "answer": ANSWERS[i], "solution": COT[i], **_passthrough(i, json.dumps(EXTRA[i]))}
    for i in range(3)
]
# verl / ViRL39K as stored in files: one type per column, `<image>` placeholders, reward_model, list solutions.
VERL_ROWS = [
    {
        "prompt": _messages(i, "<image>" * len(IMAGES[i]) + QUESTIONS[i]),
        "images": IMAGES[i],
        "reward_model": {"ground_truth": ANSWERS[i], "style": "rule"},
        "solution": [COT[i], "a second expert trace, ignored"],
        **_passthrough(i, EXTRA[i]),
    }
    for i in range(3)
]
# verl rows in memory, where every accepted variant of a column can be mixed.
VERL_MIXED = [
    {**VERL_ROWS[0], "images": [_png(RED)], "solution": COT[0]},  # raw bytes; str solution
    {**VERL_ROWS[1], "images": [{"bytes": _png(GREEN), "path": None}, BLUE]},  # parquet-style dict and PIL; list
    {**VERL_ROWS[2], "prompt": QUESTIONS[2], "solution": {"role": "assistant", "content": COT[2]}},  # plain string; dict
]


def _canon(rows):
    """Rows with images as (mode, size, pixels) and image blocks without arrow's filled-in `text: None`."""
    out = []
    for row in rows:
        row = dict(row)
        row["images"] = [(im.mode, im.size, im.tobytes()) for im in row.get("images") or []]
        row["prompt"] = [
            {**m, "content": [{k: v for k, v in b.items() if v is not None} for b in m["content"]]} for m in row["prompt"]
        ]
        out.append(row)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Both schemas in memory, as parquet, jsonl (images as files), a save_to_disk dir and a Dataset."""
    tmp = tmp_path_factory.mktemp("data")
    out = {"trl-list": TRL_ROWS, "verl-list": VERL_MIXED}
    for schema, rows in (("trl", TRL_ROWS), ("verl", VERL_ROWS)):
        for kind, name in (("parquet", "d.parquet"), ("jsonl", "d.jsonl"), ("dir", "d_dir")):
            path = tmp / schema / name
            path.parent.mkdir(exist_ok=True)
            save_rows(rows, path)
            out[f"{schema}-{kind}"] = path
    out["verl-dataset"] = datasets.load_from_disk(str(out["verl-dir"]))
    return out


SOURCE_NAMES = ["trl-list", "verl-list"] + [f"{s}-{k}" for s in ("trl", "verl") for k in ("parquet", "jsonl", "dir")] + ["verl-dataset"]


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_every_source_normalises_to_the_same_rows(sources, name):
    source = sources[name]
    base_dir = source.parent if hasattr(source, "suffix") and source.suffix else None
    rows, summary = normalize_rows(load_rows(source), base_dir=base_dir)
    assert _canon(rows) == _canon(EXPECTED)
    assert all(im.mode == "RGB" for row in rows for im in row["images"])
    assert summary.schema == name.split("-")[0]
    assert (summary.rows, summary.with_images, summary.missing_solution, summary.stripped_placeholder_rows) == (3, 2, 0, 0)


@pytest.mark.parametrize("name", ["trl-list", "verl-parquet", "verl-jsonl", "trl-dir"])
def test_training_dataset_reads_back_pil_images_and_messages(sources, name):
    ds, summary = load_dataset_for_training(sources[name])
    assert isinstance(ds, datasets.Dataset) and len(ds) == 3
    assert ds.features["images"] == datasets.List(datasets.Image(mode="RGB"))
    read = [ds[i] for i in range(len(ds))]  # what the trainer's dataloader sees (to_list() does not decode)
    assert all(isinstance(im, PIL.Image.Image) and im.mode == "RGB" for row in read for im in row["images"])
    assert _canon(read) == _canon(EXPECTED)
    assert read[1]["prompt"][1]["role"] == "user" and read[1]["prompt"][1]["content"][1]["type"] == "image"
    assert summary.rows == 3 and str(summary).startswith(summary.source)


def test_placeholders_become_image_blocks_at_their_positions(tmp_path):
    rows = [{"prompt": "<image>a<image><image> b <image>", "images": [RED, GREEN, BLUE, RED], "answer": "1"}]
    save_rows(rows, tmp_path / "p.parquet")
    ds, summary = load_dataset_for_training(tmp_path / "p.parquet")
    (row,) = _canon([ds[0]])
    assert summary.schema == "verl"
    assert [size for _, size, _ in row["images"]] == [(12, 8), (12, 8), (6, 10), (12, 8)]  # order kept
    assert row["prompt"] == [
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "a"},
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": " b "},
                {"type": "image"},
            ],
        }
    ]


def test_trl_string_prompt_gets_images_before_the_user_text_and_single_image_column():
    rows = [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "image": GREEN, "answer": "x"}]
    (row,), summary = normalize_rows(rows)
    assert summary.schema == "trl"
    assert row["prompt"][1]["content"] == [{"type": "image"}, {"type": "text", "text": "q"}]
    assert row["prompt"][0]["content"] == [{"type": "text", "text": "s"}]
    assert [im.tobytes() for im in row["images"]] == [GREEN.tobytes()] and "image" not in row


def test_forced_schema_decides_string_prompts_without_placeholders():
    rows = [{"prompt": "what colour?", "images": [RED], "answer": "red"}]
    (row,), _ = normalize_rows(rows, schema="trl")
    assert row["prompt"][0]["content"][0] == {"type": "image"}
    with pytest.raises(DataError, match=r"row 0, column 'images': 1 images but the prompt has 0"):
        normalize_rows(rows, schema="verl")
    with pytest.raises(ValueError, match="schema="):
        normalize_rows(rows, schema="sharegpt")


def test_text_only_data_has_string_contents_and_no_images_column():
    rows = [{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}], "answer": 4}]
    ds, summary = load_dataset_for_training(rows)
    assert "images" not in ds.column_names and summary.with_images == 0
    assert ds[0]["prompt"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]
    assert ds[0]["answer"] == "4"  # numbers become text


def _bad(rows, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        normalize_rows(rows, **kwargs)
    return info.value


GOOD = {"prompt": "<image>q", "images": [_png(RED)], "answer": "1"}


@pytest.mark.parametrize(
    "change, column, message",
    [
        ({"answer": None}, "answer", "missing or empty answer"),
        ({"answer": "  "}, "answer", "missing or empty answer"),
        ({"answer": ["1", "2"]}, "answer", "answer must be text or a number"),
        ({"prompt": None}, "prompt", "missing or empty prompt"),
        ({"prompt": ""}, "prompt", "missing or empty prompt"),
        ({"prompt": [], "images": []}, "prompt", "missing or empty prompt"),
        ({"prompt": [{"role": "user", "content": " "}], "images": []}, "prompt", "missing or empty prompt"),
        ({"prompt": [{"role": "robot", "content": "hi"}]}, "prompt", "message 0 is not"),
        ({"images": [b"definitely not an image"]}, "images", "image 0 is not a readable image"),
        ({"images": [_png(RED)[:60]]}, "images", "image 0 is not a readable image"),
        ({"images": ["/nonexistent/x.png"]}, "images", "image 0 cannot be read from"),
        ({"images": [{"path": None, "bytes": None}]}, "images", "without 'bytes' or 'path'"),
        ({"prompt": "<image> and <image>?"}, "images", "1 images but the prompt has 2"),
        ({"images": [_png(RED), _png(RED)]}, "images", "2 images but the prompt has 1"),
        ({"answer": b"\xff\xfe1"}, "answer", "not valid UTF-8"),
        ({"solution": b"ok \xc3"}, "solution", "not valid UTF-8"),
        ({"prompt": b"<image>\xff"}, "prompt", "not valid UTF-8"),
        ({"note": b"\x80"}, "note", "not valid UTF-8"),
        ({"solution": {"text": "no content key"}}, "solution", "no 'content' key"),
    ],
)
def test_each_bad_row_names_row_and_column(change, column, message):
    rows = [dict(GOOD), dict(GOOD), {**GOOD, **change}]
    error = _bad(rows, source_name="t.jsonl")
    assert str(error).startswith("1 bad row in t.jsonl: row 2, column ")
    assert f"row 2, column '{column}': " in str(error) and message in str(error)
    assert {(e.row, e.column) for e in error.errors} == {(2, column)}


def test_truncated_png_in_the_middle_of_its_data_is_caught():
    png = _png(PIL.Image.effect_noise((64, 64), 50).convert("RGB"))
    rows = [{**GOOD, "images": [png[: len(png) - 40]]}]
    assert "row 0, column 'images': image 0 is not a readable image" in str(_bad(rows))


def test_passthrough_column_with_mixed_types_is_named():
    with pytest.raises(DataError, match="column 'level' of <list> mixes value types"):
        load_dataset_for_training([{"prompt": "a", "answer": "1", "level": 3}, {"prompt": "b", "answer": "2", "level": "hard"}])


def test_bad_prompt_in_the_first_row_of_a_trl_dataset():
    error = _bad([{"prompt": None, "answer": "1"}, {"prompt": {"role": "user"}, "answer": "1"}, {"prompt": "ok", "answer": "1"}])
    assert [(e.row, e.column) for e in error.errors] == [(0, "prompt"), (1, "prompt")]
    assert "row 1, column 'prompt': prompt must be a string or a list" in str(error)


def test_several_bad_rows_are_reported_together_and_never_dropped():
    rows = [dict(GOOD), {**GOOD, "answer": ""}, dict(GOOD), {**GOOD, "images": [b"xx"]}, {**GOOD, "prompt": None, "answer": None}]
    error = _bad(rows, source_name="data.jsonl")
    text = str(error)
    assert text.startswith("3 bad rows in data.jsonl: row 1, column 'answer': missing or empty answer; row 3, column 'images'")
    assert "row 4, column 'prompt'" in text and "row 4, column 'answer'" in text
    assert [e.row for e in error.errors] == [1, 3, 4, 4]

    kept, summary = pytest.warns(UserWarning, normalize_rows, rows, on_error="report")
    assert len(kept) == 2 and summary.rows == 2
    assert [e.row for e in summary.bad_rows] == [1, 3, 4, 4] and "3 bad rows left out" in str(summary)


def test_error_list_is_capped_but_counts_every_row():
    rows = [{**GOOD, "answer": ""} for _ in range(20)]
    error = _bad(rows)
    assert str(error).startswith("20 bad rows") and "... and 12 more" in str(error) and len(error.errors) == 20


def test_non_utf8_bytes_in_a_jsonl_file_name_row_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": "hi", "answer": "1"}).encode(), b'{"prompt": "hi", "answer": "\xff1"}', b'{"prompt": "q\xe9", "answer": "2"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"^2 bad rows in bad.jsonl: row 1, column 'answer': text is not valid UTF-8; row 2, column 'prompt'"):
        load_dataset_for_training(path)


def test_non_utf8_string_in_a_parquet_file_names_row_and_column(tmp_path):
    raw = pa.array([b"fine", b"bad \xff"], type=pa.binary())
    answers = pa.Array.from_buffers(pa.string(), 2, raw.buffers())  # arrow string column holding invalid UTF-8
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "answer": answers}), path)
    with pytest.raises(DataError, match=r"^1 bad row in bad.parquet: row 1, column 'answer': text is not valid UTF-8$"):
        load_dataset_for_training(path)


def test_bad_json_line_is_reported(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": \n')
    with pytest.raises(DataError, match="row 1: line 2 is not valid JSON"):
        load_rows(path)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    for source in ([], tmp_path / "empty.jsonl", datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}]).select([])):
        with pytest.raises(DataError, match="has no rows"):
            load_dataset_for_training(source)
    with pytest.raises(DataError, match="not found"):
        load_rows(tmp_path / "missing.parquet")
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}]))
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\]"):
        load_rows(tmp_path / "splits")


def test_missing_solution_is_allowed_and_counted():
    rows = [
        {"prompt": "a", "answer": "1"},
        {"prompt": "a", "answer": "1", "solution": None},
        {"prompt": "a", "answer": "1", "solution": "  "},
        {"prompt": "a", "answer": "1", "solution": []},
        {"prompt": "a", "answer": "1", "solution": "<think>x</think>"},
    ]
    out, summary = normalize_rows(rows)
    assert [r["solution"] for r in out] == [None, None, None, None, "<think>x</think>"]
    assert summary.missing_solution == 4 and summary.rows == 5
    ds, _ = load_dataset_for_training(rows)
    assert ds.features["solution"] == datasets.Value("string") and ds["solution"][0] is None


def test_image_placeholders_are_stripped_from_the_solution_and_counted():
    assert "<|image_pad|>" in IMAGE_PLACEHOLDERS and "<image>" in IMAGE_PLACEHOLDERS
    rows = [
        {"prompt": "a", "answer": "1", "solution": "<think>see <|vision_start|><|image_pad|><|vision_end|> here</think>"},
        {"prompt": "a", "answer": "1", "solution": ["<image><think>ok</think><|video_pad|>"]},
        {"prompt": "a", "answer": "1", "solution": "<image>"},  # only a placeholder: nothing left
        {"prompt": "a", "answer": "1", "solution": "<think>clean</think>"},
    ]
    out, summary = normalize_rows(rows)
    assert [r["solution"] for r in out] == ["<think>see  here</think>", "<think>ok</think>", None, "<think>clean</think>"]
    assert summary.stripped_placeholder_rows == 3 and summary.missing_solution == 1
    assert not any(p in (r["solution"] or "") for r in out for p in IMAGE_PLACEHOLDERS)


def test_configurable_column_names_and_dotted_answer_path():
    rows = [{"question": "<image>how many?", "pics": [_png(RED)], "meta": {"label": 7}, "cot": "<think>7</think>", "id": 5}]
    columns = ColumnMap(prompt="question", images="pics", answer="meta.label", solution="cot")
    (row,), summary = normalize_rows(rows, columns)
    assert (row["answer"], row["solution"], row["id"], len(row["images"])) == ("7", "<think>7</think>", 5, 1)
    assert not {"question", "pics", "meta", "cot"} & set(row)
    (row,), _ = normalize_rows([{**rows[0], "answer": "stale"}], columns)  # never overrides the normalised answer
    assert row["answer"] == "7"
    (same,), _ = normalize_rows(rows, prompt="question", images="pics", answer="meta.label", solution="cot")
    assert _canon([same]) == _canon([row])
    with pytest.raises(DataError, match=r"row 0, column 'meta.label': missing or empty answer"):
        normalize_rows([{**rows[0], "meta": {}}], columns)
    with pytest.raises(TypeError, match="unknown column"):
        normalize_rows(rows, question="prompt")


def test_default_answer_falls_back_to_reward_model_and_names_it():
    with pytest.raises(DataError, match=r"row 0, column 'reward_model.ground_truth': missing or empty answer"):
        normalize_rows([{"prompt": "a", "reward_model": {"style": "rule"}}])
    (row,), _ = normalize_rows([{"prompt": "a", "answer": "x", "reward_model": {"ground_truth": "y"}}])
    assert row["answer"] == "x" and row["reward_model"] == {"ground_truth": "y"}
    # a merged dataset where verl rows carry an empty `answer` column still finds the ground truth
    (row,), _ = normalize_rows([{"prompt": "a", "answer": None, "reward_model": {"ground_truth": "y"}}])
    assert row["answer"] == "y" and "reward_model" not in row


def test_summary_is_one_readable_line():
    summary = DataSummary(rows=10, with_images=9, missing_solution=2, stripped_placeholder_rows=1, schema="verl", source="d.parquet")
    assert str(summary) == (
        "d.parquet: 10 rows (verl schema), 9 with images, 2 without expert solution, "
        "1 with image placeholders stripped from the solution"
    )


def test_training_rows_fit_trl_prepare_multimodal_messages():
    """Contract with TRL: its own helper fills our image blocks, in order, from the images column."""
    from trl.data_utils import prepare_multimodal_messages

    ds, _ = load_dataset_for_training(VERL_MIXED)
    row = ds[1]
    filled = prepare_multimodal_messages(row["prompt"], row["images"])
    blocks = [b for b in filled[1]["content"] if b["type"] == "image"]
    assert [b["image"].size for b in blocks] == [GREEN.size, BLUE.size]
