"""The remote code of R-4B-family exports: configuration, modeling, image processing and processing files that
stock transformers loads with ``trust_remote_code=True``. They import only torch and transformers (never r4b);
:func:`r4b.models.checkpoint.save_pretrained_r4b` copies them into every export beside the ``auto_map`` entries
below, and r4b's own model classes are the ones defined here (one implementation)."""

from __future__ import annotations

from pathlib import Path

HUB_DIR = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_r4b.py", "modeling_r4b.py", "image_processing_r4b.py", "processing_r4b.py")
# config.json: R-4B's users load it with AutoModel (the released model card), the image-text-to-text pipeline
# with AutoModelForImageTextToText; both give the conditional-generation model.
CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_r4b.RConfig",
    "AutoModel": "modeling_r4b.RForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_r4b.RForConditionalGeneration",
}
# preprocessor_config.json and processor_config.json.
PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_r4b.RImageProcessorPil",
    "AutoProcessor": "processing_r4b.RProcessor",
}

__all__ = ["CONFIG_AUTO_MAP", "HUB_DIR", "PROCESSOR_AUTO_MAP", "REMOTE_CODE_FILES"]
