"""One multimodal row: its images, the tokenizer inside a processor, TRL's image blocks, the prompt text, PNG bytes.

A row is a dict with a `prompt` (a string or chat messages) and its images in `images` (a list) or `image`
(one). Used by the trainer, evaluation, SFT, the data adapters and the tasks, so that all of them read a row
the same way.
"""

from __future__ import annotations

import io


def tokenizer_of(processing_class):
    """The tokenizer inside a processor, or the processing class itself when it is a tokenizer."""
    return getattr(processing_class, "tokenizer", processing_class)


def is_processor(processing_class) -> bool:
    """True for a multimodal processor (it has both a tokenizer and an image processor)."""
    return hasattr(processing_class, "tokenizer") and hasattr(processing_class, "image_processor")


def row_images(row: dict) -> list:
    """The row's images in order, read as TRL's GRPOTrainer reads them: the `images` list when the row has
    that column, else its single `image`, else none."""
    if "images" in row:
        return list(row["images"] or [])
    return [row["image"]] if row.get("image") is not None else []


def n_image_blocks(messages: list[dict]) -> int:
    """How many `{"type": "image"}` blocks the chat messages hold."""
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for block in m["content"]
        if isinstance(block, dict) and block.get("type") == "image"
    )


def with_image_blocks(messages: list[dict], n_images: int) -> list[dict]:
    """TRL's convention for plain-string contents with images: image blocks go in front of the first user turn."""
    out, done = [], False
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not done and m.get("role") == "user":
            content = [{"type": "image"} for _ in range(n_images)] + list(content or [])
            done = True
        out.append({**m, "content": content})
    return out


def prompt_text(processing_class, row: dict, index: int, use_images: bool) -> str:
    """The text a row's prompt becomes before tokenisation (a plain-string prompt is used as it is).

    Raises ValueError naming the row when the prompt is malformed or its image blocks do not match its images.
    """
    if "prompt" not in row:
        raise ValueError(f"row {index} has no 'prompt' column")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not all(isinstance(m, dict) for m in prompt):
        raise ValueError(f"row {index}: 'prompt' must be a string or a list of chat messages")
    if use_images:
        n_images, n_blocks = len(row_images(row)), n_image_blocks(prompt)
        if n_blocks == 0 and n_images:
            prompt = with_image_blocks(prompt, n_images)
        elif n_blocks != n_images:
            raise ValueError(f"row {index}: the prompt has {n_blocks} image blocks but the row has {n_images} images")
    return processing_class.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def png_dict(image, compress_level: int = 6) -> dict:
    """A PIL image as the `{"bytes", "path"}` dict of a Hugging Face `Image` feature (lossless PNG)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return {"bytes": buffer.getvalue(), "path": None}
