"""R-4B in transformers' LLaVA-OneVision class family.

R-4B = SigLIP(2) vision tower ("full" patch features, AnyRes tiles, image newline) -> a projector with a
LayerNorm in front (``pre_norm``) -> Qwen3. transformers' stock LLaVA-OneVision projector lacks the LayerNorm,
so :class:`RMultiModalProjector` replaces it; everything else (feature packing, unpadding, placeholder
scatter, generation) is LLaVA-OneVision's own code. Architecture ``RForConditionalGeneration``, the name R-4B's
checkpoint and vLLM use.

Remote code for ``trust_remote_code=True``: this file is copied into every R-4B-family export made by r4b and
imports only torch and transformers, so the export loads without r4b. r4b's own model classes are these.
"""

from __future__ import annotations

from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionPreTrainedModel,
)

from .configuration_r4b import RConfig

ARCHITECTURE = "RForConditionalGeneration"


class RMultiModalProjector(nn.Module):
    """R-4B's projector: LayerNorm(vision, eps 1e-6) -> Linear(vision -> text) -> GELU -> Linear(text -> text)."""

    def __init__(self, config: RConfig) -> None:
        super().__init__()
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        vision_hidden, text_hidden = config.vision_config.hidden_size * layers, config.text_config.hidden_size
        self.pre_norm = nn.LayerNorm(vision_hidden, eps=1e-6)
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=config.multimodal_projector_bias)

    def forward(self, image_features):
        return self.linear_2(self.act(self.linear_1(self.pre_norm(image_features))))


class RPreTrainedModel(LlavaOnevisionPreTrainedModel):
    config: RConfig
    config_class = RConfig


class RModel(RPreTrainedModel, LlavaOnevisionModel):
    """LLaVA-OneVision's base model (vision tower, projector, image newline, language model) with R-4B's projector."""

    def __init__(self, config: RConfig) -> None:
        super().__init__(config)
        self.multi_modal_projector = RMultiModalProjector(config)
        self.post_init()


class RForConditionalGeneration(RPreTrainedModel, LlavaOnevisionForConditionalGeneration):
    """R-4B: :class:`RModel` plus the LM head (tied to the input embeddings when the config says so)."""

    def __init__(self, config: RConfig) -> None:
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = RModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


__all__ = ["RForConditionalGeneration", "RModel", "RMultiModalProjector", "RPreTrainedModel"]
