"""Files on disk: the cache root, settings hashes, run-folder preparation, library versions (atomic writes: storage).

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


def weights_fingerprint(model_dir: str | os.PathLike) -> str:
    """A short hash of a model folder's weight files (*.safetensors, *.bin): which model a result came from,
    where a cache key cannot tell (the same settings trained on another CPU can give other weights)."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"no weight files in {model_dir}")
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:12]


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
