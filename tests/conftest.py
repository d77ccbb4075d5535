"""Shared fixtures: a tiny Qwen2.5-VL and a small digits batch, built once per test session (offline)."""

import pytest

from helpers import digit_rows


def _tiny_dir(tmp_path_factory, family: str) -> str:
    from calibrl.models import build_tiny_model, save_tiny_model

    corpus = []
    for r in digit_rows(64):
        corpus += [r["prompt"][0]["content"][1]["text"], r["solution"] or "", r["answer"]]
    model, proc = build_tiny_model(family, "nano", corpus=corpus * 2, seed=0)
    out = tmp_path_factory.mktemp(f"tiny_{family}")
    save_tiny_model(model, proc, str(out))
    return str(out)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A nano Qwen2.5-VL saved to disk (so each test loads a fresh copy with identical weights)."""
    return _tiny_dir(tmp_path_factory, "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    return _tiny_dir(tmp_path_factory, "llava")


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    return _tiny_dir(tmp_path_factory, "qwen2")
