"""What r4b.data needs from an image processor, and the helpers that use it.

The concrete processor (AnyRes tiling for SigLIP2) lives in r4b.models.image_processing; r4b.data only
relies on this protocol, so tests and other models can plug in their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from r4b.data.errors import DataError

__all__ = ["ImageProcessor", "image_sizes", "image_token_counts", "load_images"]


@runtime_checkable
class ImageProcessor(Protocol):
    """Turns images into model inputs and says how many ``<image>`` tokens each one expands to."""

    def num_image_tokens(self, height: int, width: int) -> int:
        """The number of image tokens an image of this size occupies in the LLM sequence."""
        ...

    def preprocess(self, images: Sequence[Image.Image]) -> dict[str, Any]:
        """``{"pixel_values": ..., "image_sizes": ...}`` for the images, in order."""
        ...


def image_sizes(paths: Sequence[Path], *, where: str = "<memory>") -> list[tuple[int, int]]:
    """``(height, width)`` of each image, read from the file header only."""
    sizes = []
    for k, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError) as error:
            raise DataError(
                where, f"cannot read image {path}: {error}", field=f"images[{k}]", reason="bad_image"
            ) from None
        sizes.append((height, width))
    return sizes


def image_token_counts(paths: Sequence[Path], processor: ImageProcessor, *, where: str = "<memory>") -> list[int]:
    """The token count of each image, from ``processor.num_image_tokens(height, width)``."""
    return [int(processor.num_image_tokens(h, w)) for h, w in image_sizes(paths, where=where)]


def check_images(paths: Sequence[Path], *, where: str = "<memory>") -> None:
    """Raise :class:`DataError` (``bad_image``, naming the sample's location) for an image that cannot be read: the
    header and, for formats that carry them, the checksums (PIL's ``verify``) without decoding the pixels."""
    for k, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types (SyntaxError, struct.error) on bad bytes
            raise DataError(
                where, f"cannot read image {path}: {error}", field=f"images[{k}]", reason="bad_image"
            ) from None


def load_images(paths: Sequence[Path], *, where: str = "<memory>") -> list[Image.Image]:
    """Decode the images (RGB), raising :class:`DataError` with the sample's location on a bad file."""
    images = []
    for k, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise DataError(
                where, f"cannot read image {path}: {error}", field=f"images[{k}]", reason="bad_image"
            ) from None
    return images
