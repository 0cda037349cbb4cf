"""What r4b.data needs from an image processor, and the helpers that use it.

The concrete processor (AnyRes tiling for SigLIP2) lives in r4b.models.image_processing; r4b.data only
relies on this protocol, so tests and other models can plug in their own.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from r4b.data.errors import DataError

__all__ = ["ImageProcessor", "decode_images", "image_sizes", "image_token_counts", "load_images"]

# What PIL raises for a file that is not a readable image: OSError / ValueError for bad bytes, and
# DecompressionBombError (an Exception of its own) for one whose header claims more pixels than PIL decodes
UNREADABLE_IMAGE = (OSError, ValueError, Image.DecompressionBombError)


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
        except UNREADABLE_IMAGE as error:
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
        except UNREADABLE_IMAGE as error:
            raise DataError(
                where, f"cannot read image {path}: {error}", field=f"images[{k}]", reason="bad_image"
            ) from None
    return images


def decode_images(images: Sequence[Image.Image | str | os.PathLike], *, where: str = "prompt") -> list[Image.Image]:
    """RGB images of a prompt's ``images``, PIL images or paths: an RGB image is kept as it is (the same object),
    another PIL image converted, a path decoded (:func:`load_images`; a bad file raises :class:`DataError` naming
    ``{where} image {k}``). The rollout engines and the BPO batch all read a prompt's images through this, so a
    caller that decodes once (``Prompt.decoded``) hands every later reader the same pixels."""
    out = []
    for k, image in enumerate(images):
        if isinstance(image, Image.Image):
            out.append(image if image.mode == "RGB" else image.convert("RGB"))
        elif isinstance(image, (str, os.PathLike)):
            out.extend(load_images([Path(image)], where=f"{where} image {k}"))
        else:
            raise TypeError(f"{where} image {k} is a {type(image).__name__}, not a PIL image or a path")
    return out
