"""The R-4B architecture in transformers' LLaVA-OneVision class family, registered with the Auto classes.

The classes live in :mod:`r4b.models.hub` (``configuration_r4b.py``, ``modeling_r4b.py``): the same files are
copied into every export as its ``trust_remote_code`` code, so r4b and a user without r4b run one implementation.
R-4B = SigLIP(2) vision tower -> :class:`RMultiModalProjector` (a LayerNorm in front of LLaVA-OneVision's
projector) -> Qwen3. Model type ``rvl``, architecture ``RForConditionalGeneration``, the names R-4B's checkpoint
and vLLM use; importing this module registers them with transformers' Auto classes (:func:`register_r4b_model`).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .hub.configuration_r4b import MODEL_TYPE, RConfig
from .hub.modeling_r4b import (
    ARCHITECTURE,
    RForConditionalGeneration,
    RModel,
    RMultiModalProjector,
    RPreTrainedModel,
)

__all__ = [
    "ARCHITECTURE",
    "MODEL_TYPE",
    "RConfig",
    "RForConditionalGeneration",
    "RModel",
    "RMultiModalProjector",
    "RPreTrainedModel",
    "register_r4b_model",
]


def register_r4b_model() -> None:
    """Register ``rvl`` with AutoConfig, AutoModel and AutoModelForImageTextToText (idempotent)."""
    AutoConfig.register(MODEL_TYPE, RConfig, exist_ok=True)
    AutoModel.register(RConfig, RModel, exist_ok=True)
    AutoModelForImageTextToText.register(RConfig, RForConditionalGeneration, exist_ok=True)


# At import, not only in load_r4b: anything reading an R-4B directory's config.json first (AutoTokenizer does,
# before the model loads) must find ``rvl``; unknown, transformers falls back to the base config class and warns
# "You are using a model of type `rvl` to instantiate a model of type ``".
register_r4b_model()
