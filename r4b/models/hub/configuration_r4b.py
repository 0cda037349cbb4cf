"""R-4B's configuration: LLaVA-OneVision's under model type ``rvl``, the text model defaulting to Qwen3.

Remote code for ``trust_remote_code=True``: this file is copied into every R-4B-family export made by r4b and
imports only transformers, so the export loads without r4b. r4b's own :class:`RConfig` is this class.
"""

from __future__ import annotations

from transformers import AutoConfig
from transformers.models.llava_onevision.configuration_llava_onevision import LlavaOnevisionConfig

try:  # transformers >= 5.2x: composite configs declare their sub-configs' defaults as SubConfigSpec
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.17: a plain ``sub_configs`` table, defaults filled in by ``__post_init__``
    SubConfigSpec = None

MODEL_TYPE = "rvl"


class RConfig(LlavaOnevisionConfig):
    """LLaVA-OneVision's config under R-4B's model type; the text model defaults to Qwen3."""

    model_type = MODEL_TYPE
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            **LlavaOnevisionConfig.sub_configs_defaults,
            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3"),
        }

    def __post_init__(self, **kwargs):
        # Without SubConfigSpec (transformers 5.17) the parent's __post_init__ makes a text config that is None or
        # a dict without model_type a Qwen2 one: name Qwen3 first (a no-op where sub_configs_defaults already does).
        if self.text_config is None:
            self.text_config = {"model_type": "qwen3"}
        elif isinstance(self.text_config, dict) and "model_type" not in self.text_config:
            self.text_config = {**self.text_config, "model_type": "qwen3"}
        super().__post_init__(**kwargs)


__all__ = ["RConfig"]
