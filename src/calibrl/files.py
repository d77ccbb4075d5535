"""Files on disk: the cache root, settings hashes, atomic writes, run-folder preparation, library versions.

Everything here is standard library only, so any module may use it without import cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from calibrl.errors import UsageError

CACHE_ENV = "CALIBRL_CACHE"


def cache_dir() -> Path:
    """Where built tiny models and SFT warm starts are cached: `$CALIBRL_CACHE`, else `.cache/calibrl`."""
    return Path(os.environ.get(CACHE_ENV, os.path.join(".cache", "calibrl")))


def settings_hash(settings: dict) -> str:
    """A short stable hash of JSON-able settings (the cache key of a built artefact)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and one rename, so a reader (or a
    crash) sees either the old file or the new one, never half of it."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: str | os.PathLike, data, indent: int | None = 2) -> None:
    """`data` as JSON (NaN refused), written atomically, with a final newline."""
    atomic_write_text(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, replace: bool = False) -> None:
    """Move a folder built completely at `tmp` to `final` in one rename, so `final` is never half written.

    `replace=True` first removes an existing `final`; otherwise, if another process published `final` first
    (a cache entry built twice at once), theirs is kept and ours dropped.
    """
    final = Path(final)
    if replace and final.exists():
        shutil.rmtree(final)
    try:
        Path(tmp).rename(final)
    except OSError:  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Raise unless `path` is absent, an empty folder, or `overwrite` is set. Reads only."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"output folder {p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise UsageError(f"output folder {p} exists and is not empty (pass --overwrite to replace it)")
    return p


def prepare_output_dir(path: str | os.PathLike, overwrite: bool, is_main: bool = True) -> Path:
    """`check_output_dir`, then (on the main process) empty and create the folder."""
    p = check_output_dir(path, overwrite)
    if is_main:
        if p.is_dir() and any(p.iterdir()):
            shutil.rmtree(p)
        p.mkdir(parents=True, exist_ok=True)
    return p


def is_main_process() -> bool:
    """True on the process that prints and writes run files (rank 0; always true without a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on (written to run.json and the benchmark's results)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("calibrl", "torch", "transformers", "trl", "accelerate", "peft", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out
