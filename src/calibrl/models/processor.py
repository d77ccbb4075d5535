"""An image-only Qwen2.5-VL processor that works without torchvision.

Why: the stock `Qwen2_5_VLProcessor` also owns a video processor, and transformers can only build
that one with torchvision, which breaks next to our pinned CPU torch. Our tiny models never see
video, so this subclass keeps everything the stock processor does for images (placeholder
expansion, `mm_token_type_ids`, decoding) and drops the video half.

Importing this module registers the class with `AutoProcessor`, so that
`AutoProcessor.from_pretrained(saved_dir)` works in any process that has imported
`calibrl.models` (TRL's GRPOTrainer loads processors that way). Without that import, use
`calibrl.models.load_processor(saved_dir)` or pass the processor to the trainer explicitly.
"""

from __future__ import annotations

from transformers import AutoProcessor, PreTrainedConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin


class TinyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` with an image processor and a tokenizer only (no video processor).

    `ProcessorMixin` reads the sub-processors from the `__init__` signature, so leaving
    `video_processor` out of it is what makes saving and loading skip the video half.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, **kwargs):
        if tokenizer is None:
            raise ValueError("TinyQwen2_5_VLProcessor: argument `tokenizer` is required")
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"TinyQwen2_5_VLProcessor: the tokenizer has no {self.image_token!r} token")
        # Kept so that inherited code reading these attributes finds them; no video is ever processed.
        self.video_token = "<|video_pad|>"
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class _TinyQwen2_5_VLProcessorKey(PreTrainedConfig):
    """A stand-in config class used only as the key of the `AutoProcessor` registration.

    `AutoProcessor` finds a registered processor by the class name saved in
    `processor_config.json`; registering under the real `Qwen2_5_VLConfig` would instead replace the
    stock processor for every Qwen2.5-VL checkpoint in the process, which we do not want.
    """

    model_type = "calibrl_tiny_qwen2_5_vl"


AutoProcessor.register(_TinyQwen2_5_VLProcessorKey, TinyQwen2_5_VLProcessor, exist_ok=True)
