"""The R-4B architecture in transformers' LLaVA-OneVision class family.

R-4B = SigLIP(2) vision tower ("full" patch features, AnyRes tiles, image newline) -> a projector with a
LayerNorm in front (``pre_norm``) -> Qwen3. transformers' stock LLaVA-OneVision projector lacks the LayerNorm,
so :class:`RMultiModalProjector` replaces it; everything else (feature packing, unpadding, placeholder
scatter, generation) is LLaVA-OneVision's own code. Model type ``rvl``, architecture
``RForConditionalGeneration``, the names R-4B's checkpoint and vLLM use; importing this module registers
them with transformers' Auto classes (:func:`register_r4b_model`).
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers.activations import ACT2FN
from transformers.models.llava_onevision.configuration_llava_onevision import LlavaOnevisionConfig
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionPreTrainedModel,
)

try:  # transformers >= 5.2x: composite configs declare their sub-configs' defaults as SubConfigSpec
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.17: a plain ``sub_configs`` table, defaults filled in by ``__post_init__``
    SubConfigSpec = None

MODEL_TYPE = "rvl"
ARCHITECTURE = "RForConditionalGeneration"


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


def register_r4b_model() -> None:
    """Register ``rvl`` with AutoConfig, AutoModel and AutoModelForImageTextToText (idempotent)."""
    AutoConfig.register(MODEL_TYPE, RConfig, exist_ok=True)
    AutoModel.register(RConfig, RModel, exist_ok=True)
    AutoModelForImageTextToText.register(RConfig, RForConditionalGeneration, exist_ok=True)


# At import, not only in load_r4b: anything reading an R-4B directory's config.json first (AutoTokenizer does,
# before the model loads) must find ``rvl``; unknown, transformers falls back to the base config class and warns
# "You are using a model of type `rvl` to instantiate a model of type ``".
register_r4b_model()
