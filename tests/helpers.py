"""Shared test utilities: deterministic data rows, stand-in reward functions, and trainer helpers.

Test files import from here (`from helpers import ...`); fixtures live in conftest.py.
"""

import zlib

import numpy as np
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


def digit_indices(row: dict) -> list[int]:
    """The scikit-learn scan indices a digits task row shows (empty for other tasks)."""
    import json

    meta = json.loads(row["meta"]) if isinstance(row["meta"], str) else row["meta"]
    return list(meta.get("indices", [])) if row["task"].startswith("digits/") else []


def mixed_length_prompts(family: str, images_per_prompt: int = 1) -> list[tuple[list[dict], list]]:
    """Three chat prompts of different lengths (a batch of them is left-padded), each with its images: for a
    VLM family the digit scan of `digit_rows` plus `images_per_prompt - 1` generated images; none for qwen2."""
    out = []
    for i, n_words in enumerate((1, 6, 14)):
        question = "What is the sum of the digits? " + "Think carefully. " * n_words + INSTRUCTION
        if family == "qwen2":
            out.append(([{"role": "user", "content": question}], []))
            continue
        imgs = digit_rows(3)[i]["images"] + [Image.new("RGB", (28 + 28 * j, 28), (40 * i, 80, 30 * j))
                                             for j in range(images_per_prompt - 1)]
        content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": question}]
        out.append(([{"role": "user", "content": content}], imgs))
    return out


def text_of(c) -> str:
    return c[0]["content"] if isinstance(c, list) else c


def hash_accuracy(completions, answer=None, **kwargs):
    """A deterministic stand-in for correctness that varies within groups (so advantages are non-zero)."""
    return [float(zlib.crc32(text_of(c).encode()) % 3 == 0) for c in completions]


def hash_format(completions, **kwargs):
    return [float(zlib.crc32(text_of(c).encode()) % 2 == 0) for c in completions]


hash_accuracy.__name__ = "accuracy_reward"
hash_format.__name__ = "format_reward"


def text_rows(n: int = 16) -> list[dict]:
    """Text-only arithmetic rows in the same format, for text-only models."""
    rows = []
    for i in range(n):
        a, b = i % 10, (3 * i + 1) % 10
        sol = f"<think>{a} + {b} = {a + b}.</think><answer>{a + b}</answer>"
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}?\n" + INSTRUCTION}],
                     "answer": str(a + b), "solution": sol})
    return rows


# ------------------------------------------------------------------ trainers
COMMON = dict(
    use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, seed=0,
    per_device_train_batch_size=8, num_generations=4, max_completion_length=12, learning_rate=5e-3,
    reward_weights=[1.0, 0.1], disable_tqdm=True,
)


def make_trainer(model_dir, out, cls=None, cfg_cls=None, rows=None, **kw):
    """A trainer (CalibRLTrainer unless `cls`) on a fresh copy of the saved tiny model, with COMMON settings."""
    from datasets import Dataset

    from calibrl import CalibRLConfig, CalibRLTrainer
    from calibrl.models import load_tiny_model

    cls, cfg_cls = cls or CalibRLTrainer, cfg_cls or CalibRLConfig
    model, proc = load_tiny_model(model_dir)
    cfg = cfg_cls(output_dir=str(out), **{**COMMON, **kw})
    ds = Dataset.from_list(rows if rows is not None else digit_rows(32))
    return cls(model=model, reward_funcs=[hash_accuracy, hash_format], args=cfg, train_dataset=ds,
               processing_class=proc)


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def assert_same_params(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max parameter difference {worst}"


def losses_of(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]
