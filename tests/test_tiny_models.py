"""Tests for the offline tiny models: tokenizer properties, processors, save/load, training and generation.

Every family is built once at the "nano" size (module-scoped fixtures) from a small corpus written
here, so these tests do not depend on `calibrl.tasks`. Images are real scikit-learn handwritten digits.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, LlavaProcessor

from calibrl.models import (
    FAMILIES,
    SIZES,
    TinyQwen2_5_VLProcessor,
    build_tiny_model,
    build_tokenizer,
    load_processor,
    load_tiny_model,
    save_tiny_model,
)

VLM_FAMILIES = ("qwen2_5_vl", "llava")
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in <answer> </answer> tags."
)


def make_corpus() -> list[str]:
    """A few hundred task-like strings: questions, expert traces in two styles, answers."""
    rng = np.random.default_rng(0)
    shapes = ["circle", "square", "triangle"]
    corpus = [INSTRUCTION]
    for i in range(120):
        a, b = (int(x) for x in rng.integers(0, 10, size=2))
        corpus.append(f"What is the sum of the two digits? {INSTRUCTION}")
        corpus.append(f"<think>The left digit is {a}. The right digit is {b}. {a} + {b} = {a + b}.</think><answer>{a + b}</answer>")
        corpus.append(f"<think>Left: {a}; right: {b}. So the sum is {a + b}!</think> <answer>{a + b}</answer>")
        shape, n = shapes[i % 3], int(rng.integers(1, 30))
        corpus.append(f"How many {shape}s are there? Count each {shape}, then answer with one number. ({n})")
        corpus.append(f"<think>I count the {shape}s: there are {n} of them.</think><answer>{n}</answer>")
    return corpus


CORPUS = make_corpus()


def digit_images() -> tuple[Image.Image, Image.Image, Image.Image]:
    """Two real handwritten digits upscaled to 28x28, and the pair side by side (28x56)."""
    digits = load_digits()
    left, right = (
        Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).resize((28, 28)).convert("RGB")
        for i in (0, 1)
    )
    pair = Image.new("RGB", (56, 28))
    pair.paste(left, (0, 0))
    pair.paste(right, (28, 0))
    return left, right, pair


def conversation(question: str, with_image: bool) -> list[dict]:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def tokenizer_of(processing_class):
    return getattr(processing_class, "tokenizer", processing_class)


def batch_of_two(family: str, processing_class, images) -> dict:
    """Two chat prompts of different lengths (left-padded), each with one image for VLMs."""
    with_image = family in VLM_FAMILIES
    texts = [
        processing_class.apply_chat_template(conversation(q, with_image), tokenize=False, add_generation_prompt=True)
        for q in ("What is the sum of the two digits?", "Sum?")
    ]
    if with_image:
        return processing_class(text=texts, images=[[images[2]], [images[0]]], padding=True, return_tensors="pt")
    return processing_class(text=texts, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def images():
    return digit_images()


@pytest.fixture(scope="module")
def built():
    """family -> (model, processing class), nano size, seed 0."""
    return {family: build_tiny_model(family, "nano", corpus=CORPUS, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    """family -> (directory, reloaded model, reloaded processing class)."""
    out = {}
    for family, (model, processing_class) in built.items():
        path = save_tiny_model(model, processing_class, str(tmp_path_factory.mktemp(family)))
        out[family] = (path, *load_tiny_model(path))
    return out


# ----------------------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_every_digit_is_its_own_token(built, family):
    tokenizer = tokenizer_of(built[family][1])
    for digit in "0123456789":
        ids = tokenizer.encode(digit, add_special_tokens=False)
        assert len(ids) == 1 and tokenizer.decode(ids) == digit
    # Digits never merge with each other or with neighbours, wherever they appear.
    text = "The sum is 1907; 12+7=19. (42)"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    digit_tokens = [t for t in tokens if any(c.isdigit() for c in t)]
    assert digit_tokens == list("19071271942")


@pytest.mark.parametrize("family", FAMILIES)
def test_tags_are_ordinary_tokens_that_survive_skip_special(built, family):
    tokenizer = tokenizer_of(built[family][1])
    for tag in TAGS:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] not in tokenizer.all_special_ids
    completion = "<think>The left digit is 3. 3 + 5 = 8.</think><answer>8</answer>"
    ids = tokenizer.encode(completion + "<|im_end|><|endoftext|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == completion
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_end|><|endoftext|>")


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_settings(built, family):
    tokenizer = tokenizer_of(built[family][1])
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert 300 < len(tokenizer) <= 512 + len(TAGS)
    vision = {"<|vision_start|>", "<|image_pad|>", "<|vision_end|>"}
    specials = set(tokenizer.all_special_tokens)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} <= specials
    assert (vision <= specials) == (family == "qwen2_5_vl")
    assert ("<image>" in specials) == (family == "llava")
    with pytest.raises(ValueError, match="family"):
        build_tokenizer(CORPUS, family="gpt2")


def test_tokenizer_is_deterministic():
    a, b = build_tokenizer(CORPUS), build_tokenizer(CORPUS)
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template(built, family):
    tokenizer = tokenizer_of(built[family][1])
    placeholder = {"qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>", "qwen2": ""}[family]
    prompt = conversation("Sum?", with_image=True)
    rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered == f"<|im_start|>user\n{placeholder}Sum?<|im_end|>\n<|im_start|>assistant\n"
    # String content renders like a single text block.
    as_string = tokenizer.apply_chat_template([{"role": "user", "content": "Sum?"}], tokenize=False)
    assert as_string == tokenizer.apply_chat_template(conversation("Sum?", False), tokenize=False)
    # TRL appends the completion as an assistant turn: the generation prompt must be its prefix.
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "<answer>8</answer>"}], tokenize=False)
    assert full == rendered + "<answer>8</answer><|im_end|>\n"


# ----------------------------------------------------------------------------------------------- processors


@pytest.mark.parametrize("side, expected", [((28, 28), 1), ((28, 56), 2), ((56, 56), 4), ((40, 30), 1)])
def test_qwen_image_tokens_follow_the_grid(built, images, side, expected):
    processor = built["qwen2_5_vl"][1]
    image = images[0].resize((side[1], side[0]))  # PIL takes (width, height)
    text = processor.apply_chat_template(conversation("Sum?", True), tokenize=False, add_generation_prompt=True)
    batch = processor(text=[text], images=[[image]], return_tensors="pt")
    grid = batch["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == expected  # 2x2 patches merge into one token
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == expected
    assert batch["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 14 * 14)


def test_llava_image_tokens(built, images):
    processor = built["llava"][1]
    batch = batch_of_two("llava", processor, images)
    model = built["llava"][0]
    per_row = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert per_row.tolist() == [model.config.image_seq_length] * 2 == [16, 16]
    assert batch["pixel_values"].shape == (2, 3, 56, 56)


def test_qwen_processor_reloads_with_same_settings(built, saved):
    processor = built["qwen2_5_vl"][1]
    path, _, reloaded = saved["qwen2_5_vl"]
    via_auto = AutoProcessor.from_pretrained(path)
    for other in (reloaded, via_auto):
        assert isinstance(other, TinyQwen2_5_VLProcessor)
        for key in ("size", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std"):
            assert getattr(other.image_processor, key) == getattr(processor.image_processor, key), key
        assert other.image_processor.size["shortest_edge"] == 28 * 28
        assert other.tokenizer.padding_side == "left"
        assert other.chat_template == processor.chat_template


def test_llava_reloads_with_auto_classes(built, saved):
    path = saved["llava"][0]
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(processor, LlavaProcessor) and processor.image_processor.size == {"height": 56, "width": 56}
    model = AutoModelForImageTextToText.from_pretrained(path)
    original = built["llava"][0].state_dict()
    assert all(torch.equal(value, original[key]) for key, value in model.state_dict().items())


def test_grpo_style_processor_call(built, images):
    """The call TRL makes: a batch of rendered prompts, one image list per prompt, left padding."""
    model, processor = built["qwen2_5_vl"]
    prompts = [conversation("What is the sum of the two digits?", True), conversation("Sum?", True)]
    texts = [processor.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = processor(text=texts, images=[[images[2]], [images[2]]], padding=True, padding_side="left", return_tensors="pt")
    mask = batch["attention_mask"]
    assert mask[0].all() and not mask[1, 0] and mask[1, -1]  # the shorter prompt is padded on the left
    assert batch["input_ids"][1, 0] == processor.tokenizer.pad_token_id
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 4]]
    assert (batch["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == [2, 2]
    # TRL's other path: the processor's own chat template with the PIL image inside the message.
    with_pixels = [[{"role": "user", "content": [{"type": "image", "image": images[2]}, *p[0]["content"][1:]]}] for p in prompts]
    tokenized = processor.apply_chat_template(
        with_pixels, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True, return_tensors="pt"
    )
    assert torch.equal(tokenized["input_ids"], batch["input_ids"])
    assert torch.equal(tokenized["pixel_values"], batch["pixel_values"])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(built, saved, images, family):
    model, processing_class = built[family]
    path, model2, processing_class2 = saved[family]
    assert type(model2) is type(model) and model2.training
    state, state2 = model.state_dict(), model2.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)

    tokenizer, tokenizer2 = tokenizer_of(processing_class), tokenizer_of(processing_class2)
    via_auto = AutoTokenizer.from_pretrained(path)  # for qwen2 this is transformers' Qwen2Tokenizer
    texts = [
        "<|im_start|>user\nThe left digit is 3; right: 12.</think>  <answer>15</answer><|im_end|>\n",
        "(circle's) don't\n\n   x\t\"42\"  caf\u00e9 cafe\u0301 \u00bd",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer2.encode(text) == via_auto.encode(text) == ids
        assert tokenizer2.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    assert (tokenizer2.pad_token, tokenizer2.eos_token, tokenizer2.padding_side) == ("<|endoftext|>", "<|im_end|>", "left")
    assert tokenizer2.chat_template == tokenizer.chat_template

    batch, batch2 = batch_of_two(family, processing_class, images), batch_of_two(family, processing_class2, images)
    assert batch.keys() == batch2.keys()
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, model2(**batch).logits)
    assert type(load_processor(path)) is type(processing_class2)


def test_load_rejects_a_directory_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tiny_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        load_tiny_model(str(tmp_path))


# ----------------------------------------------------------------------------------------------- training and generation


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_gives_finite_gradients(built, images, family):
    model, processing_class = built[family]
    batch = batch_of_two(family, processing_class, images)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.zero_grad()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    grads = {name: p.grad for name, p in model.named_parameters()}
    unused = {name for name, g in grads.items() if g is None}
    # LLaVA reads SigLIP's last hidden state, before its final layer norm; nothing else may be left out.
    assert unused == ({"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"} if family == "llava" else set())
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    if family in VLM_FAMILIES:  # the image really feeds the language model
        vision = [g for name, g in grads.items() if "visual" in name or "vision_tower" in name]
        assert vision and any(g.abs().sum() > 0 for g in vision)
    model.zero_grad()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batch_of_two_left_padded(built, images, family):
    model, processing_class = built[family]
    batch = batch_of_two(family, processing_class, images)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert (out[:, -3:] < model.config.get_text_config().vocab_size).all()


# ----------------------------------------------------------------------------------------------- build options


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights(built, family):
    model = built[family][0]
    again = build_tiny_model(family, "nano", corpus=CORPUS, seed=0)[0]
    other = build_tiny_model(family, "nano", corpus=CORPUS, seed=1)[0]
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    assert not all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
    assert model.dtype == torch.float32 and model.training


@pytest.mark.parametrize(
    "size, low, high", [("nano", 0.1e6, 0.35e6), ("small", 0.7e6, 1.3e6), ("base", 2.0e6, 4.0e6), ("large", 12e6, 18e6)]
)
def test_parameter_counts_and_mrope(size, low, high):
    model = build_tiny_model("qwen2_5_vl", size, corpus=CORPUS)[0]
    assert low <= sum(p.numel() for p in model.parameters()) <= high
    text = model.config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    assert text.hidden_size == SIZES[size]["hidden"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="family"):
        build_tiny_model("gpt2", corpus=CORPUS)
    with pytest.raises(ValueError, match="size"):
        build_tiny_model("qwen2", "huge", corpus=CORPUS)
    with pytest.raises(ValueError, match="corpus"):
        build_tokenizer([])
