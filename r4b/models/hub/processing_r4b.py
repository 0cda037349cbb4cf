"""R-4B's processor: the tokenizer (with R-4B's chat template) and the image processor, each ``<image>`` of the
text expanded to the number of features its image becomes.

The chat template renders a user image as ``<image>\\n`` and ends the generation prompt with the mode suffix:
``thinking_mode="auto"`` (default) ``<think>``, ``"long"`` ``<think>\\n`` (thinking), ``"short"``
``<think>\\n\\n</think>`` (non-thinking)::

    text = processor.apply_chat_template(messages, add_generation_prompt=True, thinking_mode="auto")
    inputs = processor(images=[image], text=text, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=1024)

Remote code for ``trust_remote_code=True``: this file is copied into every R-4B-family export made by r4b and
imports only torch and transformers, so the export loads without r4b.
"""

from __future__ import annotations

import math

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .image_processing_r4b import image_token_count


class RProcessor(ProcessorMixin):
    """Tokenizer + image processor. ``num_image_tokens`` is the features of one tile (``(tile / patch) ** 2``)."""

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        image_token: str = "<image>",
        num_image_tokens: int = 729,
        vision_aspect_ratio: str = "anyres_max_9",
        **kwargs,
    ):
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.vision_aspect_ratio = vision_aspect_ratio
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token) if self.tokenizer else None

    def image_tokens(self, height: int, width: int) -> int:
        """How many ``<image>`` tokens an image of ``height`` x ``width`` pixels becomes."""
        size = self.image_processor.size
        image_size = size["height"] if isinstance(size, dict) else size.height
        side = math.isqrt(self.num_image_tokens)
        return image_token_count(
            height,
            width,
            image_size=image_size,
            patch_size=image_size // side,
            image_grid_pinpoints=self.image_processor.image_grid_pinpoints,
            vision_aspect_ratio=self.vision_aspect_ratio,
        )

    def __call__(self, images=None, text=None, return_tensors=None, **kwargs) -> BatchFeature:
        """``text`` (one string or a list, one per sample) with its ``<image>`` placeholders, in order, for
        ``images`` (a flat list over the samples); returns ``input_ids``, ``attention_mask`` and, with images,
        ``pixel_values`` and ``image_sizes``."""
        if text is None:
            raise ValueError("RProcessor needs text with one <image> per image")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        images = [im for group in (images or []) for im in (group if isinstance(group, (list, tuple)) else [group])]
        out = {}
        if images:
            pixels = self.image_processor(images, return_tensors="pt")
            # r4b tiles every image (AnyRes), as LLaVA-OneVision does a lone image: no batch_num_images
            out = {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}
            counts = [self.image_tokens(int(h), int(w)) for h, w in out["image_sizes"].tolist()]
            found = sum(t.count(self.image_token) for t in texts)
            if found != len(counts):
                raise ValueError(f"the text has {found} {self.image_token} placeholder(s) for {len(counts)} image(s)")
            expanded, k = [], 0
            for t in texts:
                pieces = t.split(self.image_token)
                body = pieces[0]
                for piece in pieces[1:]:
                    body += self.image_token * counts[k] + piece
                    k += 1
                expanded.append(body)
            texts = expanded
        kwargs.setdefault("add_special_tokens", False)
        tokens = self.tokenizer(texts, return_tensors=return_tensors, **kwargs)
        return BatchFeature(data={**tokens, **out}, tensor_type=return_tensors)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


__all__ = ["RProcessor"]
