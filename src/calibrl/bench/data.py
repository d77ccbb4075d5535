"""Reading benchmark copies as published: parquet shards, JSON / JSONL files, image structs and image folders.

Everything here fails with a `BenchDataError` whose message is one line naming the benchmark, the file and
the row or column at fault, so the command line can print it as it is. Images are checked when a copy is
read (their header is parsed) but decoded only when a batch needs them, so a full benchmark never sits in
memory as pixels.
"""

from __future__ import annotations

import glob
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

__all__ = ["BenchDataError", "ImageRef", "Item", "find_files", "read_json_keyed", "read_json_rows",
           "read_parquet_rows", "require_columns", "image_ref"]


class BenchDataError(ValueError):
    """A benchmark copy is missing, truncated or not in the layout it is published in (one-line message)."""


@dataclass(frozen=True)
class ImageRef:
    """An image as stored: encoded bytes (a Hugging Face `Image` struct) or a file path; decoded on demand."""

    data: bytes | None = None
    path: str | None = None

    def load(self) -> Image.Image:
        source = io.BytesIO(self.data) if self.data is not None else self.path
        with Image.open(source) as img:
            return img.convert("RGB")


@dataclass
class Item:
    """One benchmark question, rendered and ready to score.

    `segments` is the user turn in order: strings and `ImageRef`s (images interleaved where the benchmark
    puts them). `gold` is the answer as the benchmark stores it; `options` the option texts (A, B, ...) of
    a multiple-choice question; `meta` the fields the benchmark's breakdowns and scoring rules read.
    """

    id: str
    segments: list
    gold: Any
    kind: str  # "choice", "numeric", "list", "expression", "mmmu_open"
    options: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def images(self) -> list[ImageRef]:
        return [s for s in self.segments if isinstance(s, ImageRef)]

    def prompt_text(self) -> str:
        """The user turn as text, `<image>` where an image goes (what the predictions file records)."""
        return "".join("<image>" if isinstance(s, ImageRef) else s for s in self.segments)


def find_files(root: str, patterns: list[str], bench: str, what: str) -> list[str]:
    """The files under `root` matching the first pattern that matches any (sorted); an error naming them all."""
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(root, pattern)))
        if found:
            return found
    raise BenchDataError(f"{bench}: no {what} in {root} (looked for {' or '.join(patterns)})")


def read_parquet_rows(path: str, bench: str, columns: list[str] | None = None) -> list[dict]:
    """Rows of one parquet file as dicts; an unreadable or truncated file is a one-line error."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BenchDataError(f"{bench}: cannot read {path} ({first})") from None
    if columns is not None:
        require_columns(table.column_names, columns, bench, path)
    return table.to_pylist()


def _read_text(path: str, bench: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchDataError(f"{bench}: cannot read {path} ({type(e).__name__})") from None


def _parse_json(text: str, path: str, bench: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchDataError(f"{bench}: {path} is not valid JSON (line {e.lineno}: {e.msg}; truncated?)") from None


def read_json_keyed(path: str, bench: str) -> list[tuple[str, dict]]:
    """(id, row) pairs of a JSON file holding a dict of id -> row (GeoEval's files); a list gets its indices."""
    data = _parse_json(_read_text(path, bench), path, bench)
    pairs = list(data.items()) if isinstance(data, dict) else list(enumerate(data)) if isinstance(data, list) else None
    if pairs is None or not all(isinstance(row, dict) for _, row in pairs):
        raise BenchDataError(f"{bench}: {path} does not hold a list of rows")
    return [(str(key), row) for key, row in pairs]


def read_json_rows(path: str, bench: str) -> list[dict]:
    """Rows of a JSON file (a list, or a dict of id -> row) or of a JSONL file."""
    text = _read_text(path, bench)
    if path.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BenchDataError(f"{bench}: {path} line {n} is not JSON ({e.msg})") from None
    else:
        data = _parse_json(text, path, bench)
        rows = list(data.values()) if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BenchDataError(f"{bench}: {path} does not hold a list of rows")
    return rows


def require_columns(columns, needed: list[str], bench: str, path: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise BenchDataError(f"{bench}: {path} has no column {missing[0]!r} (columns: {', '.join(columns)})")


def read_rows(path: str, bench: str, needed: list[str]) -> list[dict]:
    """The rows of a `.json` release (each checked for the `needed` fields) or a parquet one (those columns)."""
    if not path.endswith(".json"):
        return read_parquet_rows(path, bench, needed)
    rows = read_json_rows(path, bench)
    for i, row in enumerate(rows):
        missing = [c for c in needed if c not in row]
        if missing:
            raise BenchDataError(f"{bench}: {path} row {i} has no field {missing[0]!r}")
    return rows


def decoded_image(row: dict, root: str, bench: str, where: str) -> ImageRef:
    """The image of a row that stores it in `decoded_image` (the hub's parquet) or `image` (a path or bytes)."""
    stored = row.get("decoded_image") or row.get("image")
    if not stored:
        raise BenchDataError(f"{where}: neither 'decoded_image' nor 'image' holds an image")
    return image_ref(stored, root, bench, where)


def image_ref(value: Any, root: str, bench: str, where: str) -> ImageRef:
    """An `ImageRef` from a stored image (struct with bytes/path, raw bytes, or a path relative to `root`).

    The header is parsed now, so a missing, truncated or non-image file fails here, before any model runs.
    """
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, str):
        data, path = None, value
    else:
        raise BenchDataError(f"{bench}: {where}: no image (got {type(value).__name__})")
    if data is None:
        if not path:
            raise BenchDataError(f"{bench}: {where}: the image struct has neither bytes nor a path")
        full = path if os.path.isabs(path) else os.path.join(root, path)
        if not os.path.isfile(full):
            raise BenchDataError(f"{bench}: {where}: image file {full} not found (unzip the image archive?)")
        ref = ImageRef(path=full)
    else:
        ref = ImageRef(data=bytes(data))
    try:
        with Image.open(io.BytesIO(ref.data) if ref.data is not None else ref.path) as img:
            img.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad image
        raise BenchDataError(f"{bench}: {where}: unreadable image ({type(e).__name__})") from None
    return ref
