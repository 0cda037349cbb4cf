"""liger-kernel's per-layer ops (RMSNorm, RoPE, SwiGLU) on a model instance, without its fused linear cross-entropy.

r4b computes its losses with its own fused kernels from the final hidden states and ``lm_head.weight``, so
liger's ``fused_linear_cross_entropy`` / ``cross_entropy`` are never applied: the model's ``forward`` stays
transformers' own. Patches are per instance (the modules of ``model``) except RoPE: transformers' attention
calls the module-level ``apply_rotary_pos_emb`` of the modeling file, so liger's RoPE replaces that function
for every model of that type in the process; r4b installs it as a dispatcher (liger's kernel for CUDA tensors,
transformers' own function for any other), so a model that later runs on the CPU still works. liger also swaps
module-level classes (``Qwen3RMSNorm`` -> ``LigerRMSNorm``...) so that models built later come patched;
:func:`apply_liger_patches` puts those back, keeping the patch to the instance it was given.

Covered (liger-kernel 0.8.5, transformers 5.24): Qwen3 / Qwen2 / Llama-style text models and every other
model type liger maps, through liger's own ``apply_liger_kernel_to_<type>``; LLaVA-OneVision through its
language model's type (the SigLIP tower and projector are left alone); Qwen2.5-VL and Qwen3-VL patched here
with liger's ops (see :func:`_patch_qwen_vl`: liger's functions for them fail to import on transformers 5.24).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections import Counter

import torch

logger = logging.getLogger(__name__)


def _device_type(model: torch.nn.Module) -> str:
    param = next(model.parameters(), None)
    return "cpu" if param is None else param.device.type


def _liger_targets(model: torch.nn.Module, supported: set[str]) -> list[tuple[torch.nn.Module, str]]:
    """(module, model_type) pairs to hand to liger: the model itself, or else its language model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in supported:
        return [(model, model_type)]
    for holder in (model, getattr(model, "model", None)):
        language_model = getattr(holder, "language_model", None)
        text_type = getattr(getattr(language_model, "config", None), "model_type", None)
        if language_model is not None and text_type in supported:
            return [(language_model, text_type)]
    return []


def _on_cuda_only(liger_fn, stock_fn):
    """``liger_fn`` for CUDA tensors, ``stock_fn`` for any other: a module-level RoPE patch reaches every model of
    its type in the process, including one that later runs on the CPU (an evaluation after training), where
    liger's Triton kernel cannot run."""
    if getattr(stock_fn, "__wrapped__", None) is liger_fn:  # already dispatching
        return stock_fn

    @functools.wraps(liger_fn)
    def dispatch(q: torch.Tensor, *args, **kwargs):
        return (liger_fn if q.is_cuda else stock_fn)(q, *args, **kwargs)

    dispatch.stock = stock_fn
    return dispatch


def _instance_forwards(model: torch.nn.Module) -> dict[str, object]:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def _patch_qwen_vl(target: torch.nn.Module, model_type: str, rope: bool, rms_norm: bool, swiglu: bool) -> list[str]:
    """Qwen2.5-VL / Qwen3-VL: the instance patches of liger's ``apply_liger_kernel_to_qwen{2_5,3}_vl``, by hand.

    liger-kernel 0.8.5's functions for these two types cannot run on transformers 5.24: they import their
    fused-linear-cross-entropy forwards first, which fail (``Liger...CausalLMOutputWithPast`` is missing).
    Beyond liger's set: Qwen2.5-VL's RoPE (transformers 5.x merges the mRoPE sections in the rotary embedding
    and applies the plain ``apply_rotary_pos_emb``, as Qwen3-VL does, for which liger uses
    ``liger_rotary_pos_emb``) and Qwen3-VL's text SwiGLU (liger takes ``swiglu`` but ignores it).
    """
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
    from liger_kernel.transformers.rope import liger_rotary_pos_emb, liger_rotary_pos_emb_vision
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    base = getattr(target, "model", target)
    text = getattr(base, "language_model", base)
    vision = getattr(base, "visual", None)
    modeling = sys.modules[type(text).__module__]
    functions = {"apply_rotary_pos_emb": liger_rotary_pos_emb}
    if model_type.startswith("qwen3_vl"):
        functions["apply_rotary_pos_emb_vision"] = liger_rotary_pos_emb_vision
    done = []
    if rope:
        for name, function in functions.items():
            current = getattr(modeling, name)
            if getattr(current, "__wrapped__", None) is not function:
                setattr(modeling, name, _on_cuda_only(function, current))
                done.append(f"{function.__name__}: {modeling.__name__}.{name}")
    norms = [text.norm]
    for layer in text.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [n for n in (getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None)) if n]
        if swiglu and getattr(layer.mlp.config, "hidden_act", None) in ("silu", "swish"):
            _patch_swiglu_module(layer.mlp, LigerSwiGLUMLP)
    if vision is not None and model_type.startswith("qwen2_5_vl"):
        norms += [norm for block in vision.blocks for norm in (block.norm1, block.norm2)]
    if rms_norm:
        for norm in norms:
            _patch_rms_norm_module(norm)
    return done


# model types r4b patches itself (with liger's ops), the text-only classes included
_R4B_PATCHERS = {t: _patch_qwen_vl for t in ("qwen2_5_vl", "qwen2_5_vl_text", "qwen3_vl", "qwen3_vl_text")}


def apply_liger_patches(
    model: torch.nn.Module,
    *,
    rope: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    require_cuda: bool = True,
) -> list[str]:
    """Patch ``model`` with liger's RMSNorm / RoPE / SwiGLU; returns what was patched ([] when nothing).

    Does nothing (and logs why) when the model is not on a CUDA device, when liger-kernel is missing, or when
    liger has no ops for the model type. ``require_cuda=False`` patches a model still on the CPU (to be moved
    to the GPU later): liger's Triton kernels do not run on CPU tensors.
    Returned entries: ``"LigerRMSNorm: 13 modules"``, ``"liger_rotary_pos_emb: <module>.apply_rotary_pos_emb"``...
    """
    if require_cuda and _device_type(model) != "cuda":
        logger.info("liger patches skipped: the model is on %s, not on a CUDA device", _device_type(model))
        return []
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as err:
        logger.info("liger patches skipped: liger-kernel is not importable (%s)", err)
        return []

    targets = _liger_targets(model, set(MODEL_TYPE_TO_APPLY_LIGER_FN) | set(_R4B_PATCHERS))
    if not targets:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        logger.info("liger patches skipped: liger-kernel has no ops for model type %r", model_type)
        return []

    forwards = _instance_forwards(model)
    patched: list[str] = []
    for target, model_type in targets:
        if (r4b_patcher := _R4B_PATCHERS.get(model_type)) is not None:
            patched += r4b_patcher(target, model_type, rope, rms_norm, swiglu)
            continue
        apply_fn = MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]
        modeling = sys.modules[type(target).__module__]
        globals_before = dict(vars(modeling))
        options = dict(
            rope=rope, rms_norm=rms_norm, swiglu=swiglu, cross_entropy=False, fused_linear_cross_entropy=False
        )
        accepted = inspect.signature(apply_fn).parameters
        apply_fn(model=target, **{k: v for k, v in options.items() if k in accepted})
        for name, value in list(vars(modeling).items()):
            if name not in globals_before:  # a name this transformers does not have: liger's patch is a no-op
                delattr(modeling, name)
                logger.info("liger set %s.%s, which transformers does not use; removed", modeling.__name__, name)
            elif value is globals_before[name]:
                continue
            elif isinstance(globals_before[name], type):  # class swaps only reach models built later: undo
                setattr(modeling, name, globals_before[name])
            else:
                setattr(modeling, name, _on_cuda_only(value, globals_before[name]))
                patched.append(f"{getattr(value, '__name__', value)}: {modeling.__name__}.{name}")

    if "forward" in model.__dict__ and forwards.get("") is not model.__dict__["forward"]:
        raise RuntimeError("liger replaced the model's forward (fused linear cross-entropy), which r4b does not use")
    changed = Counter(
        m._get_name() for name, m in model.named_modules() if m.__dict__.get("forward") is not forwards.get(name)
    )
    patched = [f"{cls}: {count} modules" for cls, count in sorted(changed.items())] + patched
    logger.info("liger patches applied to %s: %s", type(model).__name__, patched)
    return patched


def apply_configured_liger(model: torch.nn.Module, enabled: bool, *, announce: bool = True) -> list[str]:
    """A training stage's ``model.liger``: patch ``model`` (still on the CPU; the engine moves it) when a GPU will
    run it, and say what was patched on the main process. Nothing on a CPU-only machine."""
    if not enabled or not torch.cuda.is_available():
        return []
    patched = apply_liger_patches(model, require_cuda=False)
    if announce:
        print(f"liger-kernel: {', '.join(patched) or 'nothing to patch'}")
    return patched
