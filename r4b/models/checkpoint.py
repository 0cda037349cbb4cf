"""R-4B checkpoints: save in R-4B's own layout, load R-4B's layout and the older LLaVA layout.

R-4B's safetensors (transformers >= 4.52 layout, the one vLLM's ``RForConditionalGeneration`` maps) hold
``model.language_model.*``, ``model.vision_tower.vision_model.*``, ``model.multi_modal_projector.{pre_norm,
linear_1,linear_2}.*``, ``model.image_newline`` and ``lm_head.weight`` (absent when the embeddings are tied).
transformers 5 keeps the SigLIP tower without its ``vision_model`` level in memory and strips that prefix on
load by itself, so a directory written here loads with plain ``AutoModelForImageTextToText.from_pretrained``
once :func:`register_r4b_model` has run (importing ``r4b.models`` runs it) and, without r4b, with
``trust_remote_code=True``: :func:`save_pretrained_r4b` copies the remote code of :mod:`r4b.models.hub`
(configuration, modeling, image processing and processing files importing only torch and transformers) and
writes the ``auto_map`` entries that point to it, as the released R-4B does. The older layout
(``language_model.model.*``, ``vision_tower.*``, ``multi_modal_projector.*``, ``image_newline``,
``language_model.lm_head.*``) loads through :func:`load_r4b`, which adds the renames. Note that stock
``model.save_pretrained`` of a model built from scratch writes the vision tower without ``vision_model.``: use
:func:`save_pretrained_r4b` to write R-4B's exact layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open

from .hub import CONFIG_AUTO_MAP, HUB_DIR, REMOTE_CODE_FILES
from .r4b_model import ARCHITECTURE, MODEL_TYPE, RForConditionalGeneration, register_r4b_model

VISION_PREFIX, VISION_PREFIX_ON_DISK = "model.vision_tower.", "model.vision_tower.vision_model."
R4B_KEY_PREFIXES = (
    "model.language_model.",
    VISION_PREFIX_ON_DISK,
    "model.multi_modal_projector.",
    "model.image_newline",
    "lm_head.",
)
# Older LLaVA layout (transformers < 4.52) -> R-4B layout, as regexes for from_pretrained's ``key_mapping``.
LEGACY_KEY_MAPPING = {
    r"^language_model\.model\.": "model.language_model.",
    r"^language_model\.lm_head\.": "lm_head.",
    r"^vision_tower\.": "model.vision_tower.",
    r"^multi_modal_projector\.": "model.multi_modal_projector.",
    r"^image_newline$": "model.image_newline",
}
LEGACY_PREFIXES = ("language_model.", "vision_tower.", "multi_modal_projector.", "image_newline")


def lm_head_is_tied(model: RForConditionalGeneration) -> bool:
    """Whether ``lm_head.weight`` is the input embedding matrix itself."""
    return model.lm_head.weight is model.get_input_embeddings().weight


def checkpoint_name(name: str) -> str:
    """A parameter's name in R-4B's checkpoint (and vLLM's loader): the SigLIP tower regains ``vision_model.``."""
    if name.startswith(VISION_PREFIX) and not name.startswith(VISION_PREFIX_ON_DISK):
        return VISION_PREFIX_ON_DISK + name[len(VISION_PREFIX) :]
    return name


def r4b_state_dict(model: RForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's weights under R-4B's checkpoint names (``lm_head.weight`` left out when tied)."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and lm_head_is_tied(model):
            continue
        name = checkpoint_name(name)
        if not name.startswith(R4B_KEY_PREFIXES):
            raise ValueError(f"parameter {name!r} has no place in R-4B's checkpoint layout {R4B_KEY_PREFIXES}")
        state[name] = tensor.detach()
    return state


def save_pretrained_r4b(
    model: RForConditionalGeneration,
    save_directory: str | Path,
    tokenizer=None,
    *,
    processor=None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write config.json (``architectures: [RForConditionalGeneration]``, ``model_type: rvl``, ``auto_map`` to the
    remote code), generation config, safetensors shards under R-4B's key names, the remote code files
    (:data:`~r4b.models.hub.REMOTE_CODE_FILES`) and, if given, the tokenizer and the image processor's
    preprocessor_config.json / processor_config.json. Byte-identical on re-save."""
    if model.config.model_type != MODEL_TYPE:
        raise ValueError(f"expected a model of type {MODEL_TYPE!r}, got {model.config.model_type!r}")
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()  # shards of an earlier, differently sharded save
    model.config.architectures = [ARCHITECTURE]
    model.config.auto_map = dict(CONFIG_AUTO_MAP)
    model.config.save_pretrained(out)
    copy_remote_code(out)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    save_torch_state_dict(r4b_state_dict(model), out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if processor is not None:
        processor.save_pretrained(out)
    return out


def copy_remote_code(directory: str | Path) -> None:
    """Copy the export's ``trust_remote_code`` files (:mod:`r4b.models.hub`) into ``directory``."""
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(HUB_DIR / name, Path(directory) / name)


def checkpoint_keys(directory: str | Path) -> list[str]:
    """Tensor names stored in a safetensors checkpoint directory (single file or sharded with an index)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return sorted(json.loads(index.read_text())["weight_map"])
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files")
    keys = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys.extend(f.keys())
    return sorted(keys)


def is_legacy_layout(keys: list[str]) -> bool:
    """True for the pre-4.52 layout (``language_model.model.*`` ...), False for R-4B's."""
    legacy = [k for k in keys if k.startswith(LEGACY_PREFIXES)]
    if legacy and len(legacy) != len(keys):
        other = next(k for k in keys if not k.startswith(LEGACY_PREFIXES))
        raise ValueError(f"checkpoint mixes the legacy layout ({legacy[0]!r}) with another one ({other!r})")
    return bool(legacy)


def load_r4b(directory: str | Path, **kwargs) -> RForConditionalGeneration:
    """``RForConditionalGeneration.from_pretrained`` over R-4B's layout or the legacy one (keyword arguments
    pass through, e.g. ``dtype``, ``attn_implementation``)."""
    register_r4b_model()
    if is_legacy_layout(checkpoint_keys(directory)):
        kwargs.setdefault("key_mapping", LEGACY_KEY_MAPPING)
    return RForConditionalGeneration.from_pretrained(str(directory), **kwargs)
