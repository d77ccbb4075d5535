"""Dataset adapters: bring TRL-style or verl/ViRL39K-style rows to the one format the trainer consumes.

Normalised row (what `load_dataset_for_training` returns, as a `datasets.Dataset`):

    prompt    list of messages {"role", "content"}; with images, every content is a list of blocks
              {"type": "image"} / {"type": "text", "text": ...}, one image block per image, in order.
              In a dataset with no image at all, contents are plain strings (what text-only chat
              templates expect) and the `images` column is absent.
    images    list of PIL RGB images
    answer    str, non-empty (stripped)
    solution  str or None: the expert chain of thought, with image placeholder tokens removed
    ...       every other column passes through (`extra_info` as a JSON string)

Input schemas:
  trl   `prompt` (messages or a plain string), `image` or `images`, `answer`, `solution`. A string content
        without `<image>` placeholders gets the row's image blocks in front of its first user message
        (TRL's own convention).
  verl  `prompt` (messages or a string) whose text marks each image with `<image>`, `images` (raw bytes,
        {"bytes", "path"} dicts as parquet stores HF images, file paths, or PIL), `reward_model.ground_truth`,
        `solution` (str, list -> first item, dict -> its `content`), `data_source`, `extra_info`. Every image
        needs its placeholder.
`<image>` placeholders are turned into image blocks at their positions in both schemas.

Every row is validated; all problems are collected and raised as one `DataError` naming row index (0-based,
in source order) and column. Rows are never dropped silently.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps

from calibrl.errors import UsageError
from calibrl.multimodal import png_dict

# Image markers that must never appear in an expert solution: a Qwen2.5-VL `<|image_pad|>` in the expert
# text would be expanded by the processor (or break its rope index) although there is no image for it.
IMAGE_PLACEHOLDERS: tuple[str, ...] = (
    "<image>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
)
PROMPT_IMAGE_TOKEN = "<image>"  # how verl / ViRL39K prompts mark where an image goes
SCHEMAS = ("auto", "trl", "verl")
ROLES = ("system", "user", "assistant", "tool")
FALLBACK_ANSWER = "reward_model.ground_truth"  # tried when the default `answer` column is absent
MAX_LISTED_ERRORS = 8

_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in IMAGE_PLACEHOLDERS))


class DataError(ValueError):
    """Bad input data. `errors` holds every `RowError` found (the message lists the first few)."""

    def __init__(self, message: str, errors: list[RowError] | None = None):
        super().__init__(message)
        self.errors = list(errors or [])


@dataclass(frozen=True)
class RowError:
    row: int | None  # 0-based index in the source; None for whole-dataset problems
    column: str | None
    message: str

    def __str__(self) -> str:
        where = [f"row {self.row}"] if self.row is not None else []
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


@dataclass
class ColumnMap:
    """Input column names. `answer` may be a dotted path into a dict column (e.g. `reward_model.ground_truth`);
    with the default `answer`, rows without that column fall back to `reward_model.ground_truth`."""

    prompt: str = "prompt"
    images: str = "images"
    image: str = "image"
    answer: str = "answer"
    solution: str = "solution"


@dataclass
class DataSummary:
    rows: int
    with_images: int
    missing_solution: int
    stripped_placeholder_rows: int
    schema: str
    source: str
    bad_rows: list[RowError] = field(default_factory=list)  # only non-empty with on_error="report"

    def __str__(self) -> str:
        text = (
            f"{self.source}: {self.rows} rows ({self.schema} schema), {self.with_images} with images, "
            f"{self.missing_solution} without expert solution, "
            f"{self.stripped_placeholder_rows} with image placeholders stripped from the solution"
        )
        if self.bad_rows:
            n = len({e.row for e in self.bad_rows})
            text += f", {n} bad rows left out (see .bad_rows)"
        return text


class _Undecodable:
    """Stands in for a stored text value that is not valid UTF-8 (pyarrow cannot convert it)."""

    def __repr__(self) -> str:
        return "<undecodable text>"


UNDECODABLE = _Undecodable()


# ----------------------------------------------------------------------------------------------- loading


def load_rows(source: Any) -> list[dict]:
    """Raw rows from a parquet / jsonl / json file, a `save_to_disk` directory, a `datasets.Dataset`, or a
    list of dicts. Images stay as stored (bytes dicts, paths, ...); `normalize_rows` decodes and checks them."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return _arrow_to_rows(source.with_format("arrow")[:])
    if isinstance(source, datasets.DatasetDict):
        raise DataError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. data['train']")
    if isinstance(source, (list, tuple)):
        for i, row in enumerate(source):
            if not isinstance(row, dict):
                raise DataError(f"row {i}: expected a dict, got {type(row).__name__}")
        return [dict(row) for row in source]
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot load rows from a {type(source).__name__}; pass a path, a Dataset or a list of dicts")

    path = Path(source)
    if not path.exists():
        raise DataError(f"data source not found: {path}")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable saved dataset ({_short(e)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{path} holds a DatasetDict with splits {list(loaded)}; pass one split's directory")
        return load_rows(loaded)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        if path.stat().st_size == 0:  # (an empty jsonl is read as "no rows", which says the same)
            raise DataError(f"{path.name} is empty (0 bytes)")
        import pyarrow
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pyarrow.ArrowException, OSError) as e:
            raise DataError(f"{path.name} is not a readable parquet file ({_short(e)})") from None
        return _arrow_to_rows(table)
    if suffix in (".jsonl", ".json"):
        return _read_json_rows(path)
    raise DataError(f"unsupported data file {path.name!r}: expected .parquet, .jsonl, .json or a saved directory")


def _arrow_to_rows(table: Any) -> list[dict]:
    """pyarrow Table -> list of dicts; a value holding invalid UTF-8 becomes `UNDECODABLE` instead of raising."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    columns = {}
    for name in table.column_names:
        col = table.column(name)
        try:
            columns[name] = col.to_pylist()
        except UnicodeDecodeError:
            values = []
            for scalar in col:
                try:
                    values.append(scalar.as_py())
                except UnicodeDecodeError:
                    values.append(UNDECODABLE)
            columns[name] = values
    return [{name: columns[name][i] for name in table.column_names} for i in range(table.num_rows)]


def _read_json_rows(path: Path) -> list[dict]:
    """JSON lines (or one JSON array). Bytes that are not UTF-8 survive as lone surrogates, so the bad
    column can be named later instead of failing the whole file."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name} is not valid JSON (line {e.lineno}: {e.msg})") from None
    else:
        rows, errors = [], []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                errors.append(RowError(len(rows) + len(errors), None, f"line {line_no} is not valid JSON ({e.msg})"))
        if errors:
            raise _data_error(errors, path.name)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"row {i} of {path.name}: expected a JSON object, got {type(row).__name__}")
    return rows


# ----------------------------------------------------------------------------------------------- normalising


def normalize_rows(
    rows: list[dict],
    columns: ColumnMap | None = None,
    schema: str = "auto",
    source_name: str = "<data>",
    on_error: str = "raise",
    base_dir: str | os.PathLike | None = None,
    **column_names: str,
) -> tuple[list[dict], DataSummary]:
    """Validate and normalise raw rows; images come back as PIL RGB images.

    Column names come from `columns` and/or keyword overrides (`normalize_rows(rows, answer="gt")`).
    `on_error="raise"` raises one DataError listing every bad row; `"report"` leaves bad rows out and lists
    them in `summary.bad_rows` (with a warning). Relative image paths resolve against `base_dir` when given.
    """
    return _normalize(rows, _columns(columns, column_names), schema, source_name, on_error, base_dir, "pil")


def load_dataset_for_training(
    source: Any,
    columns: ColumnMap | None = None,
    schema: str = "auto",
    on_error: str = "raise",
    **column_names: str,
) -> tuple[Any, DataSummary]:
    """Load, validate and normalise `source` into a `datasets.Dataset` ready for the trainer.

    Images are kept as their original encoded bytes (validated, not re-encoded) in a
    `List(Image(mode="RGB"))` column, so reading a row gives PIL RGB images.
    """
    cols = _columns(columns, column_names)
    base_dir = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        base_dir = path if path.is_dir() else path.parent
        name = path.name
    else:
        name = f"<{type(source).__name__}>"
    raw = load_rows(source)
    rows, summary = _normalize(raw, cols, schema, name, on_error, base_dir, "bytes")
    return _to_dataset(rows, name), summary


def load_data_file(path: str | os.PathLike) -> tuple[Any, DataSummary]:
    """`load_dataset_for_training` for a command: a missing or bad file is a one-line `UsageError`."""
    if not os.path.exists(path):
        raise UsageError(f"dataset not found: {path}")
    try:
        return load_dataset_for_training(path)
    except DataError as e:
        raise UsageError(" ".join(str(e).split())) from None


def _to_dataset(rows: list[dict], source_name: str) -> Any:
    """Normalised rows (images as {"bytes", "path"}) -> Dataset with an `images` column of RGB Image features.

    Built from an arrow table with a random fingerprint: `Dataset.from_list` + `cast` would hash every image
    byte twice (about 3x slower on a real image set) for a cache key that in-memory datasets never use.
    """
    import datasets
    import pyarrow as pa
    from datasets.fingerprint import generate_random_fingerprint

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        for key in rows[0]:
            try:
                pa.array([row[key] for row in rows])
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                raise DataError(f"column {key!r} of {source_name} mixes value types across rows ({e})") from None
        raise
    features = datasets.Features.from_arrow_schema(table.schema)
    if "images" in features:
        features["images"] = datasets.List(datasets.Image(mode="RGB"))
    for col in ("answer", "solution"):
        features[col] = datasets.Value("string")  # an all-None solution column would otherwise be typed null
    table = table.cast(features.arrow_schema)
    info = datasets.DatasetInfo(features=features)
    return datasets.Dataset(table, info=info, fingerprint=generate_random_fingerprint())


def _columns(columns: ColumnMap | None, overrides: dict[str, str]) -> ColumnMap:
    columns = columns or ColumnMap()
    unknown = set(overrides) - set(ColumnMap.__dataclass_fields__)
    if unknown:
        fields = list(ColumnMap.__dataclass_fields__)
        raise TypeError(f"unknown column argument(s) {sorted(unknown)}; ColumnMap fields are {fields}")
    return replace(columns, **overrides)


def _normalize(rows, columns, schema, source_name, on_error, base_dir, image_format):
    if schema not in SCHEMAS:
        raise ValueError(f"schema={schema!r}; expected one of {SCHEMAS}")
    if on_error not in ("raise", "report"):
        raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'report'")
    if not rows:
        raise DataError(f"{source_name} has no rows")
    if schema == "auto":
        schema = _detect_schema(rows, columns)

    out, errors = [], []
    missing_solution = stripped = 0
    for index, raw in enumerate(rows):
        row_errors: list[RowError] = []
        row, flags = _normalize_row(raw, index, columns, schema, base_dir, image_format, row_errors)
        if row_errors:
            errors.extend(row_errors)
            continue
        out.append(row)
        missing_solution += flags["missing_solution"]
        stripped += flags["stripped"]

    if errors and (on_error == "raise" or not out):
        raise _data_error(errors, source_name)
    if errors:
        warnings.warn(str(_data_error(errors, source_name)) + " (left out: on_error='report')", stacklevel=3)

    # Every row gets the same keys (Dataset.from_list only looks at the first row's keys).
    keys = list(dict.fromkeys(k for row in out for k in row))
    out = [{k: row.get(k) for k in keys} for row in out]
    with_images = sum(1 for row in out if row.get("images"))
    if with_images == 0:  # text-only: plain string contents, no images column
        for row in out:
            row.pop("images", None)
            row["prompt"] = [{**m, "content": _join_text(m["content"])} for m in row["prompt"]]
    summary = DataSummary(len(out), with_images, missing_solution, stripped, schema, source_name, errors)
    return out, summary


def _data_error(errors: list[RowError], source_name: str) -> DataError:
    n_rows = len({e.row for e in errors})
    listed = "; ".join(str(e) for e in errors[:MAX_LISTED_ERRORS])
    more = f"; ... and {len(errors) - MAX_LISTED_ERRORS} more" if len(errors) > MAX_LISTED_ERRORS else ""
    return DataError(f"{n_rows} bad row{'s' if n_rows != 1 else ''} in {source_name}: {listed}{more}", errors)


def _detect_schema(rows: list[dict], columns: ColumnMap) -> str:
    """verl if any row has a `reward_model` column or `<image>` placeholders in its prompt text."""
    for row in rows:
        if isinstance(row.get("reward_model"), dict):
            return "verl"
        prompt = row.get(columns.prompt)
        messages = [prompt] if isinstance(prompt, str) else _as_list(prompt) or []
        texts = [m if isinstance(m, str) else m.get("content") for m in messages if isinstance(m, (str, dict))]
        if any(isinstance(t, str) and PROMPT_IMAGE_TOKEN in t for t in texts):
            return "verl"
    return "trl"


def _normalize_row(raw, index, columns, schema, base_dir, image_format, errors):
    """One raw row -> normalised row; problems go to `errors` (the row is then discarded by the caller)."""

    def fail(column, message):
        errors.append(RowError(index, column, message))

    for key, value in raw.items():
        if value is UNDECODABLE:
            fail(key, "text is not valid UTF-8")

    # images: `images` column first, then the single `image` column
    image_col = columns.images if raw.get(columns.images) is not None else columns.image
    image_values = raw.get(image_col)
    image_values = [] if image_values is None or image_values is UNDECODABLE else _as_list(image_values, single=True)
    images = []
    for j, value in enumerate(image_values):
        image = _load_image(value, base_dir, image_format)
        if isinstance(image, str):
            fail(image_col, f"image {j} {image}")
        images.append(image)

    # prompt
    prompt, messages = raw.get(columns.prompt), None
    if prompt is not UNDECODABLE:
        messages = _normalize_prompt(prompt, len(images), schema, lambda m: fail(columns.prompt, m))
        if messages is not None:
            n_blocks = sum(1 for m in messages for b in m["content"] if b["type"] == "image")
            if n_blocks != len(images):
                how = "<image> placeholders/image blocks" if schema == "verl" else "image blocks"
                fail(image_col, f"{len(images)} images but the prompt has {n_blocks} {how}")

    # answer
    answer_col, answer = columns.answer, _get_path(raw, columns.answer)
    if answer is None and columns.answer == ColumnMap.answer:
        fallback = _get_path(raw, FALLBACK_ANSWER)
        if fallback is not None or (columns.answer not in raw and "reward_model" in raw):
            answer_col, answer = FALLBACK_ANSWER, fallback
    if answer is not UNDECODABLE:
        answer = _answer_text(answer, lambda m: fail(answer_col, m))

    # solution
    solution, stripped = None, False
    sol_raw = raw.get(columns.solution)
    if sol_raw is not UNDECODABLE:
        solution = _solution_text(sol_raw, lambda m: fail(columns.solution, m))
        if solution is not None:
            cleaned = _PLACEHOLDER_RE.sub("", solution)
            stripped = cleaned != solution
            solution = cleaned if cleaned.strip() else None

    # passthrough columns (input columns named like an output column are replaced by it)
    consumed = {columns.prompt, columns.images, columns.image, columns.solution, answer_col, answer_col.split(".")[0]}
    consumed |= {"prompt", "images", "image", "answer", "solution"}
    extra = {}
    for key, value in raw.items():
        if key in consumed or value is UNDECODABLE:
            continue
        if key == "extra_info" and isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False, default=str)
        if isinstance(value, (bytes, bytearray)):
            value = _decode(value, lambda m, k=key: fail(k, m))
        elif not _valid_utf8(value):
            fail(key, "text is not valid UTF-8")
        extra[key] = value

    if errors:
        return None, {}
    row = {"prompt": messages, "images": images, "answer": answer, "solution": solution, **extra}
    return row, {"missing_solution": solution is None, "stripped": stripped}


# ----------------------------------------------------------------------------------------------- per column


def _normalize_prompt(prompt, n_images, schema, fail) -> list[dict] | None:
    """Messages with content as block lists; `<image>` in text becomes an image block at its position."""
    if isinstance(prompt, (bytes, bytearray)):
        prompt = _decode(prompt, fail)
        if prompt is None:
            return None
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None:
        fail("missing or empty prompt")
        return None
    prompt = _as_list(prompt)
    if prompt is None:
        fail("prompt must be a string or a list of {'role', 'content'} messages")
        return None

    messages = []
    for k, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            fail(f"message {k} is not a {{'role', 'content'}} dict with role in {ROLES}")
            return None
        content = message.get("content")
        if isinstance(content, (bytes, bytearray)):
            content = _decode(content, fail)
            if content is None:
                return None
        if isinstance(content, str):
            if not _valid_utf8(content):
                fail("text is not valid UTF-8")
                return None
            blocks = _split_placeholders(content)
        elif _as_list(content) is not None:
            blocks = []
            for block in _as_list(content):
                block = _normalize_block(block, fail)
                if block is None:
                    return None
                blocks.extend(block)
        else:
            fail(f"message {k} has no text content")
            return None
        messages.append({"role": message["role"], "content": blocks})

    has_text = any(b["type"] == "text" and b["text"].strip() for m in messages for b in m["content"])
    has_image = any(b["type"] == "image" for m in messages for b in m["content"])
    if not (has_text or has_image):
        fail("missing or empty prompt")
        return None
    # TRL convention: string prompts without placeholders get the images in front of the first user text.
    if schema == "trl" and n_images and not has_image:
        for m in messages:
            if m["role"] == "user":
                m["content"] = [{"type": "image"} for _ in range(n_images)] + m["content"]
                break
    return messages


def _normalize_block(block, fail) -> list[dict] | None:
    if not isinstance(block, dict) or block.get("type") not in ("text", "image"):
        fail(f"content block {block!r:.60} is not a {{'type': 'text'|'image'}} dict")
        return None
    if block["type"] == "image":
        if any(block.get(k) is not None for k in ("image", "url", "path")):
            fail("image blocks that carry the image itself are not supported; put images in the images column")
            return None
        return [{"type": "image"}]
    text = block.get("text")
    if isinstance(text, (bytes, bytearray)):
        text = _decode(text, fail)
        if text is None:
            return None
    if not isinstance(text, str):
        fail("text block without a 'text' string")
        return None
    if not _valid_utf8(text):
        fail("text is not valid UTF-8")
        return None
    return _split_placeholders(text)


def _split_placeholders(text: str) -> list[dict]:
    """'a <image> b' -> [text 'a ', image, text ' b'] (empty pieces dropped, whitespace kept)."""
    blocks = []
    for i, piece in enumerate(text.split(PROMPT_IMAGE_TOKEN)):
        if i > 0:
            blocks.append({"type": "image"})
        if piece:
            blocks.append({"type": "text", "text": piece})
    return blocks


def _join_text(blocks: list[dict]) -> str:
    return "".join(b["text"] for b in blocks if b["type"] == "text")


def _answer_text(value, fail) -> str | None:
    if isinstance(value, (bytes, bytearray)):
        value = _decode(value, fail)
        if value is None:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        fail("missing or empty answer")
        return None
    if not isinstance(value, str):
        fail(f"answer must be text or a number, got {type(value).__name__}")
        return None
    if not _valid_utf8(value):
        fail("text is not valid UTF-8")
        return None
    return value.strip()


def _solution_text(value, fail) -> str | None:
    """str as is; list -> first item; dict -> its 'content'; None/empty -> None (allowed)."""
    if value is not None and not isinstance(value, (str, bytes, bytearray, dict)):
        items = _as_list(value)
        if items is None:
            fail(f"solution must be a string, list or dict, got {type(value).__name__}")
            return None
        value = items[0] if items else None
    if isinstance(value, dict):
        if "content" not in value:
            fail(f"solution dict has no 'content' key (keys: {sorted(value)})")
            return None
        value = value["content"]
    if isinstance(value, (bytes, bytearray)):
        value = _decode(value, fail)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        fail(f"solution text must be a string, got {type(value).__name__}")
        return None
    if not _valid_utf8(value):
        fail("text is not valid UTF-8")
        return None
    return value


def _load_image(value, base_dir, image_format):
    """Decode one stored image fully (open + load). Returns PIL RGB ("pil") or {"bytes", "path": None}
    ("bytes"), or an error string for the caller to report."""
    data, pil = None, None
    if isinstance(value, PIL.Image.Image):
        pil = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, dict) and value.get("bytes") is not None:
        data = bytes(value["bytes"])
    elif isinstance(value, dict) and value.get("path"):
        value = value["path"]
    elif isinstance(value, dict):
        return "is a dict without 'bytes' or 'path'"
    if data is None and pil is None:
        if not isinstance(value, (str, os.PathLike)):
            return f"has unsupported type {type(value).__name__} (expected bytes, a bytes/path dict, a path or PIL)"
        path = Path(value)
        if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).exists():
            path = Path(base_dir) / path
        try:
            data = path.read_bytes()
        except OSError as e:
            return f"cannot be read from {str(value)!r} ({e.strerror or e})"
    try:
        if pil is None:
            pil = PIL.Image.open(io.BytesIO(data))
        pil.load()
    except Exception as e:  # PIL raises many types for bad data
        return f"is not a readable image ({_short(e)})"
    if image_format == "bytes":
        if data is None:
            buffer = io.BytesIO()
            pil.save(buffer, format="PNG")
            data = buffer.getvalue()
        return {"bytes": data, "path": None}
    # Same steps as datasets.Image(mode="RGB") decoding, so both paths give the same pixels.
    if pil.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
        pil = PIL.ImageOps.exif_transpose(pil)
    return pil if pil.mode == "RGB" else pil.convert("RGB")


# ----------------------------------------------------------------------------------------------- helpers


def _as_list(value, single: bool = False) -> list | None:
    """list/tuple/numpy array -> list; other values -> [value] if `single` else None."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return list(value.tolist()) if getattr(value, "ndim", 0) else [value.tolist()]
    return [value] if single else None


def _get_path(row: dict, path: str):
    """row['a.b'] if that literal key exists, else row['a']['b']; None when missing."""
    if path in row:
        return row[path]
    value = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _decode(value: bytes, fail) -> str | None:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"text is not valid UTF-8 (byte {e.start})")
        return None


def _valid_utf8(value) -> bool:
    """False for strings holding lone surrogates (undecodable bytes read with surrogateescape)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    elif isinstance(value, (dict, list)):
        try:
            json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "bytes", text)[:120]


# ----------------------------------------------------------------------------------------------- saving


def save_rows(rows: list[dict], path: str | os.PathLike, image_columns: tuple[str, ...] = ("images", "image")) -> None:
    """Write rows (normalised or raw) to `.parquet`, `.jsonl` or a `save_to_disk` directory (any other path).

    Images in `image_columns` (PIL, bytes, bytes dicts or paths) are written as PNG: inside the file for
    parquet and directories (HF Image features), as PNG files in `<stem>_images/` next to a jsonl file,
    referenced by paths relative to it (which `load_dataset_for_training` resolves).
    """
    import datasets

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        image_dir = path.parent / f"{path.stem}_images"
        with open(path, "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                row = dict(row)
                for col in image_columns:
                    if row.get(col) is None:
                        continue
                    single = not isinstance(row[col], (list, tuple))
                    names = []
                    for j, image in enumerate(_as_list(row[col], single=True)):
                        image_dir.mkdir(parents=True, exist_ok=True)
                        name = f"row{i}_{col}{j}.png"
                        _to_pil(image).save(image_dir / name, format="PNG")
                        names.append(f"{image_dir.name}/{name}")
                    row[col] = names[0] if single else names
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return

    encoded = []
    for row in rows:
        row = dict(row)
        for col in image_columns:
            if row.get(col) is not None:
                if isinstance(row[col], (list, tuple)):
                    row[col] = [_png_dict(image) for image in row[col]]
                else:
                    row[col] = _png_dict(row[col])
        encoded.append(row)
    ds = datasets.Dataset.from_list(encoded)
    features = ds.features.copy()
    for col in image_columns:
        if col in features:
            single = any(not isinstance(r.get(col), (list, tuple)) for r in encoded if r.get(col) is not None)
            features[col] = datasets.Image() if single else datasets.List(datasets.Image())
    ds = ds.cast(features)
    if suffix == ".parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))


def _to_pil(image) -> PIL.Image.Image:
    loaded = _load_image(image, None, "pil")
    if isinstance(loaded, str):
        raise DataError(f"cannot save image: it {loaded}")
    return loaded


def _png_dict(image) -> dict:
    return png_dict(_to_pil(image))
