"""Shared fixtures: a tiny Qwen2.5-VL and a small digits batch, built once per test session (offline)."""

import zlib

import numpy as np
import pytest
from PIL import Image

INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in "
    "<answer> </answer> tags."
)


def digit_rows(n: int = 32, missing_every: int = 0) -> list[dict]:
    """Two real handwritten digits side by side; the question asks their sum. Deterministic."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = []
    for i in range(n):
        a, b = int(d.target[2 * i]), int(d.target[2 * i + 1])
        pix = np.hstack([d.images[2 * i], d.images[2 * i + 1]]) * 15
        img = Image.fromarray(pix.astype(np.uint8)).resize((56, 28)).convert("RGB")
        sol = f"<think>The left digit is {a}. The right digit is {b}. {a} + {b} = {a + b}.</think><answer>{a + b}</answer>"
        rows.append({
            "prompt": [{"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": "What is the sum of the two digits?\n" + INSTRUCTION}]}],
            "images": [img],
            "answer": str(a + b),
            "solution": None if (missing_every and i % missing_every == 0) else sol,
        })
    return rows


def text_of(c) -> str:
    return c[0]["content"] if isinstance(c, list) else c


def hash_accuracy(completions, answer=None, **kwargs):
    """A deterministic stand-in for correctness that varies within groups (so advantages are non-zero)."""
    return [float(zlib.crc32(text_of(c).encode()) % 3 == 0) for c in completions]


def hash_format(completions, **kwargs):
    return [float(zlib.crc32(text_of(c).encode()) % 2 == 0) for c in completions]


hash_accuracy.__name__ = "accuracy_reward"
hash_format.__name__ = "format_reward"


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


def text_rows(n: int = 16) -> list[dict]:
    """Text-only arithmetic rows in the same format, for text-only models."""
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i + 1) % 10
        sol = f"<think>{a} + {b} = {a + b}.</think><answer>{a + b}</answer>"
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?\n" + INSTRUCTION}],
                     "answer": str(a + b), "solution": sol})
    return rows
