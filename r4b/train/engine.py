"""Distributed-training engines behind one small interface: single process, FSDP2, DeepSpeed ZeRO-2/3.

The trainer builds an engine with :func:`build_engine` and then only calls::

    loss = engine.module(**batch).loss / accum    # the caller scales for gradient accumulation
    engine.backward(loss)                         # once per micro-batch
    grad_norm = engine.step()                     # once per global step: clip, optimizer, scheduler, zero grads
    engine.lrs(); engine.save(dir); engine.load(dir); engine.full_state_dict()
    engine.full_tensors(dtype)                    # (name, tensor) on the device, one at a time: the rollout sync

Every engine uses AdamW (``torch.optim.AdamW``; DeepSpeed wraps the same torch optimizer in its ZeRO
optimizer, so all engines produce the same numbers) and a ``LambdaLR`` schedule: each group's lr is its
base lr times ``lr_lambda(step)``. Gradients are averaged over ranks (each rank's loss is a mean over its
share of the batch). DeepSpeed is configured with ``gradient_accumulation_steps=1``: its ``backward`` never
rescales the loss and every ``engine.step()`` is an optimizer step; micro-batch gradients accumulate in its
partitioned gradient buffers across several ``backward`` calls (checked by tests/train/test_engine.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from r4b.config.sections import EngineConfig  # engine.* of the run configs
from r4b.errors import InputError
from r4b.train.ranks import barrier, rank

__all__ = [
    "DeepSpeedEngine",
    "Engine",
    "FSDP2Engine",
    "SingleEngine",
    "build_engine",
    "init_distributed",
    "is_main_process",
]

_STATE_FILE = "engine_state.pt"  # scheduler state (and the single engine's model/optimizer)


# --------------------------------------------------------------------------------------------------------------
# distributed helpers


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_MINUTES = EngineConfig.timeout_minutes


def init_distributed(timeout_minutes: float | None = None) -> tuple[int, int]:
    """Initialize torch.distributed from torchrun's env (RANK/WORLD_SIZE/LOCAL_RANK); return (rank, world_size).

    Backend nccl on CUDA, gloo on the CPU, with a collective timeout of ``timeout_minutes`` (default
    ``EngineConfig.timeout_minutes``: ranks wait in a barrier while rank 0 exports or saves). Without torchrun's
    env this is a no-op returning (0, 1). Idempotent: an already initialized process group is reused.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = _timeout(timeout_minutes)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def _timeout(minutes: float | None) -> timedelta:
    minutes = DEFAULT_TIMEOUT_MINUTES if minutes is None else minutes
    if not minutes > 0:
        raise ValueError(f"engine.timeout_minutes must be positive, got {minutes}")
    return timedelta(minutes=minutes)


def _ensure_process_group(timeout_minutes: float | None = None) -> None:
    """The distributed engines need a process group; outside torchrun make a one-process one."""
    init_distributed(timeout_minutes)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{_free_port()}",
            rank=0,
            world_size=1,
            timeout=_timeout(timeout_minutes),
        )


def is_main_process() -> bool:
    """True on rank 0, or when torch.distributed is not initialized."""
    return rank() == 0


# --------------------------------------------------------------------------------------------------------------
# parameter groups, activation checkpointing, layer discovery


@dataclass
class _Group:
    name: str
    lr: float
    names: list[str]  # trainable parameter names (model.named_parameters() names)


def _resolve_groups(model: nn.Module, param_groups: list[dict]) -> list[_Group]:
    """Map each group's params (names or Parameter objects) to trainable parameter names.

    Frozen params (requires_grad False) are dropped; a trainable param in no group, or in two, is an error.
    """
    named = dict(model.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    seen: dict[str, str] = {}
    groups = []
    for i, g in enumerate(param_groups):
        gname = str(g.get("name", f"group{i}"))
        if "lr" not in g:
            raise ValueError(f"param group {gname!r} has no 'lr'")
        names = []
        for p in g["params"]:
            if isinstance(p, str):
                if p not in named:
                    raise ValueError(f"param group {gname!r}: no parameter named {p!r}")
                n = p
            else:
                if id(p) not in name_of:
                    raise ValueError(f"param group {gname!r}: a parameter that is not in the model")
                n = name_of[id(p)]
            if not named[n].requires_grad:
                continue
            if n in seen:
                raise ValueError(f"parameter {n!r} is in param groups {seen[n]!r} and {gname!r}")
            seen[n] = gname
            names.append(n)
        groups.append(_Group(gname, float(g["lr"]), names))
    if len({g.name for g in groups}) != len(groups):
        raise ValueError("param group names must be unique")
    missing = [n for n, p in named.items() if p.requires_grad and n not in seen]
    if missing:
        raise ValueError(f"trainable parameters in no param group (freeze them or add them): {missing[:8]}")
    return groups


def _make_optimizer(
    model: nn.Module, groups: list[_Group], lr_lambda: Callable[[int], float], betas, weight_decay: float, eps: float
) -> tuple[torch.optim.AdamW, LambdaLR, list[_Group]]:
    """AdamW over the non-empty groups (looked up by name in `model`, after any wrapping) and its LambdaLR."""
    # names as resolved before wrapping: torch's checkpoint wrapper inserts a level into them
    named = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in model.named_parameters()}
    used = [g for g in groups if g.names]
    if not used:
        raise ValueError("no trainable parameters")
    opt_groups = [{"params": [named[n] for n in g.names], "lr": g.lr, "name": g.name} for g in used]
    # torch's default implementation choice (foreach on CUDA, per-tensor loop on the CPU) in every engine
    opt = torch.optim.AdamW(opt_groups, lr=used[0].lr, betas=betas, eps=eps, weight_decay=weight_decay)
    sched = LambdaLR(opt, [lr_lambda] * len(opt_groups))
    return opt, sched, used


def _decoder_layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes named in `_no_split_modules` of any transformers (sub)model: the units to shard/checkpoint."""
    names: set[str] = set()
    for m in model.modules():
        ns = getattr(m, "_no_split_modules", None)
        if ns:
            names.update(ns)
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def _enable_activation_checkpointing(model: nn.Module, layer_classes: tuple[type, ...]) -> None:
    """Non-reentrant activation checkpointing: transformers' own when supported, else wrap the decoder layers.

    Must run before FSDP2 sharding / DeepSpeed wrapping.
    """
    # The trainer hands a wrapper (the loss objective) around the transformers model: find the model inside.
    inner = next((m for m in model.modules() if getattr(m, "supports_gradient_checkpointing", False)), None)
    if inner is not None:
        kwargs = {"use_reentrant": False}
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            return
        if hasattr(inner, "gradient_checkpointing_enable"):
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            return
    if not layer_classes:
        raise ValueError("activation_checkpointing: the model has no gradient_checkpointing_enable() and no layers")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_classes))


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _grads(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _add_initial_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter that has no AdamW state yet the state AdamW creates at its first gradient (step 0,
    zero moments), so that a sharded checkpoint holds state for every trainable parameter. A parameter whose
    output no loss reads (the vision tower's post_layernorm under LLaVA's feature layer) never has a gradient,
    and torch.distributed.checkpoint's loader expects its state. AdamW skips parameters without a gradient, and
    on their first gradient it would create exactly this state: nothing it computes changes (no dummy step,
    which would apply weight decay)."""
    from torch.optim.optimizer import _get_scalar_dtype

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not param.requires_grad or optimizer.state.get(param):
                continue
            on_device = group.get("capturable") or group.get("fused")
            state = {
                "step": torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=param.device)
                if on_device
                else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu"),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            optimizer.state[param] = state


def host_norm(norm: torch.Tensor | None) -> float:
    """A :meth:`_TorchOptimEngine.grad_norm` as a Python float (0 for None; a DTensor's full value under FSDP2)."""
    if norm is None:
        return 0.0
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _lrs(groups: list[_Group], opt: torch.optim.Optimizer, sched: LambdaLR, lr_lambda) -> dict[str, float]:
    by_name = {g["name"]: g["lr"] for g in opt.param_groups}
    # groups with no trainable parameter are not in the optimizer: report the lr they would have
    return {g.name: float(by_name.get(g.name, g.lr * lr_lambda(sched.last_epoch))) for g in groups}


def _adapters_only(module: nn.Module) -> bool:
    """Whether checkpoints hold the trainable parameters only: a model with LoRA adapters (r4b.models.lora), whose
    frozen base is the loaded model's and never changes."""
    from r4b.models.lora import has_lora

    return has_lora(module)


def _checkpointed(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of ``state`` (the module's state dict): with LoRA, its adapters alone."""
    from r4b.models.lora import is_adapter_parameter

    return {k: v for k, v in state.items() if is_adapter_parameter(k)} if _adapters_only(module) else state


# --------------------------------------------------------------------------------------------------------------
# engines


class Engine(ABC):
    """What the trainer drives: forward on `.module`, `backward(loss)` per micro-batch, `step()` per global step."""

    module: nn.Module
    config: EngineConfig

    @property
    def device(self) -> torch.device:
        """Where to put the inputs."""
        return _device()

    @property
    def unwrapped_module(self) -> nn.Module:
        """The model itself (for its config, parameter names, generate); forward goes through `.module`."""
        return self.module

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of `loss` (already scaled by the caller for gradient accumulation)."""

    @abstractmethod
    def step(self) -> float:
        """Clip grads to grad_clip, optimizer step, scheduler step, zero grads; return the pre-clip grad norm."""

    @abstractmethod
    def lrs(self) -> dict[str, float]:
        """Current learning rate of each param group, by group name."""

    @abstractmethod
    def save(self, path: str) -> None:
        """Save model, optimizer and scheduler state into directory `path` (collective; writes only inside it)."""

    @abstractmethod
    def load(self, path: str) -> None:
        """Restore what :meth:`save` wrote (collective)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full unsharded fp32 model state dict (CPU tensors) on rank 0; None on other ranks (collective)."""

    def full_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """The full model state on every rank as ``(name, tensor)`` pairs on :attr:`device`, one tensor at a time,
        floating-point ones cast to ``dtype`` (None: as trained); every rank must consume all pairs (collective).
        What refreshes rollout weights. This default gathers rank 0's :meth:`full_state_dict` and broadcasts it
        tensor by tensor; the single and FSDP2 engines stream without it."""
        from r4b.train.weight_sync import broadcast_state_dict

        state = self.full_state_dict()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            yield from broadcast_state_dict(state, self.device, dtype)
            return
        for name, tensor in state.items():  # type: ignore[union-attr]
            yield name, _cast(tensor.to(self.device), dtype)


class _TorchOptimEngine(Engine):
    """Shared step/lrs of the engines that own a torch AdamW over the module's (possibly DTensor) parameters."""

    def __init__(self, groups, lr_lambda, betas, weight_decay, eps):
        self._groups = groups
        self._lr_lambda = lr_lambda
        self.optimizer, self.scheduler, self._used = _make_optimizer(
            self.module, groups, lr_lambda, betas, weight_decay, eps
        )
        self._params = [p for g in self.optimizer.param_groups for p in g["params"]]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self) -> torch.Tensor | None:
        """The global 2-norm of the gradients (a DTensor under FSDP2: one all-reduce), None where none has one."""
        grads = _grads(self._params)
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else None

    def step(self, norm: torch.Tensor | None = None) -> float:
        """Clip to ``grad_clip`` and take the optimizer and schedule step; returns the gradient norm. ``norm``: the
        caller's :meth:`grad_norm` of these gradients (the non-finite guard's), not computed a second time."""
        norm = self.grad_norm() if norm is None else norm
        if norm is not None and self.config.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.config.grad_clip, norm)
        norm_value = host_norm(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm_value

    def lrs(self) -> dict[str, float]:
        return _lrs(self._groups, self.optimizer, self.scheduler, self._lr_lambda)


class SingleEngine(_TorchOptimEngine):
    """Plain single-process training (bf16 = autocast around the forward; parameters stay fp32)."""

    def __init__(self, model, groups, lr_lambda, config, betas, weight_decay, eps):
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("engine 'single' runs in one process; use 'fsdp2' or 'deepspeed' under torchrun")
        self.config = config
        if config.activation_checkpointing:
            _enable_activation_checkpointing(model, _decoder_layer_classes(model))
        self.module = model.to(_device())
        if config.mixed_precision == "bf16":
            # an instance attribute: nn.Module.__call__ finds it, state_dict is unaffected
            model.forward = torch.autocast(_device().type, dtype=torch.bfloat16)(model.forward)
        super().__init__(groups, lr_lambda, betas, weight_decay, eps)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        state = {
            "model": _checkpointed(self.module, self.module.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, os.path.join(path, _STATE_FILE))

    def load(self, path: str) -> None:
        state = torch.load(os.path.join(path, _STATE_FILE), map_location=_device(), weights_only=True)
        expected = _checkpointed(self.module, self.module.state_dict()).keys()
        if set(state["model"]) != set(expected):  # a LoRA checkpoint and a full run's (or other adapters) differ
            raise InputError(f"{path}: its model state does not fit this run's model (model.lora changed?)")
        self.module.load_state_dict(state["model"], strict=not _adapters_only(self.module))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    def full_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self.module.state_dict().items():
            yield name, _cast(tensor.detach(), dtype)


class FSDP2Engine(_TorchOptimEngine):
    """FSDP2 (``fully_shard``): each decoder layer (``_no_split_modules`` classes) is a unit, then the root.

    bf16: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``; the sharded parameters (what AdamW
    updates) stay fp32. Checkpoints are sharded, written with torch.distributed.checkpoint.
    """

    def __init__(self, model, groups, lr_lambda, config, betas, weight_decay, eps):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        _ensure_process_group(config.timeout_minutes)
        self.config = config
        layer_classes = _decoder_layer_classes(model)
        if config.activation_checkpointing:
            _enable_activation_checkpointing(model, layer_classes)
        mesh = init_device_mesh(_device().type, (dist.get_world_size(),))
        kwargs: dict[str, Any] = {"mesh": mesh}
        root_kwargs: dict[str, Any] = {"mesh": mesh}
        if config.mixed_precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # The root (the loss objective) must not round its inputs: the RL update passes fp32 old/ref
            # log-probs and advantages, and the importance ratio and KL need them in fp32. The layers still cast
            # their float inputs; pixel values are cast to the vision tower's dtype by the packed forward.
            root_kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
            )
        layers = [m for m in model.modules() if isinstance(m, layer_classes) and m is not model]
        for layer in layers:
            fully_shard(layer, **kwargs)
        fully_shard(model, **root_kwargs)
        self.module = model
        self.layers_sharded = len(layers)
        super().__init__(groups, lr_lambda, betas, weight_decay, eps)

    def save(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        os.makedirs(path, exist_ok=True)
        _add_initial_optimizer_state(self.optimizer)  # the loader expects state for every trainable parameter
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=self._state_options())
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)
        if is_main_process():
            torch.save({"scheduler": self.scheduler.state_dict()}, os.path.join(path, _STATE_FILE))
        barrier()

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer, options=self._state_options())
        # Checkpoints written before save() added the state of parameters that never had a gradient lack it:
        # restore those parameters without state, as the run that wrote the checkpoint had them.
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        stateless = [fqn for fqn in optim_sd["state"] if f"optimizer.state.{fqn}.step" not in saved]
        for fqn in stateless:
            del optim_sd["state"][fqn]
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.module, state["model"], options=self._state_options())
        set_optimizer_state_dict(
            self.module, self.optimizer, state["optimizer"], options=StateDictOptions(strict=not stateless)
        )
        if stateless:
            named = {n.replace("_checkpoint_wrapped_module.", ""): p for n, p in self.module.named_parameters()}
            for fqn in stateless:
                self.optimizer.state.pop(named[fqn], None)
        extra = torch.load(os.path.join(path, _STATE_FILE), weights_only=True)
        self.scheduler.load_state_dict(extra["scheduler"])

    def _state_options(self) -> Any:
        """torch.distributed.checkpoint's options of a checkpoint: with LoRA, the frozen base is left out."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        lora = _adapters_only(self.module)
        return StateDictOptions(ignore_frozen_params=lora, strict=not lora)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not is_main_process():
            return None
        return {k: v.detach().float().cpu() for k, v in sd.items()}

    def full_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Each parameter gathered on the device (``DTensor.full_tensor()``, an all-gather every rank makes in the
        same order) and cast: never the whole model in fp32 on rank 0's CPU."""
        from torch.distributed.tensor import DTensor

        for name, tensor in self.module.state_dict().items():
            tensor = tensor.detach()
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            yield name, _cast(tensor.to(self.device), dtype)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO (stage 2 or 3) around a torch AdamW; LambdaLR owned here, not by DeepSpeed.

    Config: ``gradient_accumulation_steps=1`` (no loss rescaling in ``backward``; the caller scales, and
    several ``backward`` calls before one ``step`` accumulate), ``gradient_clipping=grad_clip``, bf16 via
    DeepSpeed's bf16 mode (bf16 module parameters, fp32 master partitions in the optimizer). On the CPU,
    DeepSpeed's cpu accelerator is selected (``DS_ACCELERATOR=cpu``) and it communicates over torch's gloo.
    """

    def __init__(self, model, groups, lr_lambda, config, betas, weight_decay, eps):
        if config.zero_stage not in (1, 2, 3):
            raise ValueError(f"zero_stage must be 1, 2 or 3, not {config.zero_stage}")
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not torch.cuda.is_available():
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about a minute, once per
            # machine) used only by inference_all_reduce; training collectives go through torch's gloo.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        _ensure_process_group(config.timeout_minutes)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.config = config
        self._groups = groups
        self._lr_lambda = lr_lambda
        if config.activation_checkpointing:
            _enable_activation_checkpointing(model, _decoder_layer_classes(model))
        optimizer, self.scheduler, self._used = _make_optimizer(model, groups, lr_lambda, betas, weight_decay, eps)
        self.optimizer = optimizer  # the torch AdamW inside DeepSpeed's ZeRO optimizer: holds the group lrs
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,  # unused: the trainer feeds the batches
            "gradient_accumulation_steps": 1,  # backward() never rescales the loss
            # the caller owns the boundary: micro-batch grads accumulate over backward() calls until step()
            "managed_gradient_accumulation": False,
            "gradient_clipping": float(config.grad_clip),
            "zero_optimization": {"stage": config.zero_stage},
            "bf16": {"enabled": config.mixed_precision == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
            "wall_clock_breakdown": False,
        }
        self._ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        # forward through the DeepSpeed engine (it runs ZeRO's per-forward bookkeeping); the model is .unwrapped_module
        self.module = self._ds
        self._zero3 = config.zero_stage == 3

    @property
    def unwrapped_module(self) -> nn.Module:
        return self._ds.module

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)

    def step(self) -> float:
        self._ds.step()
        norm = self._ds.get_global_grad_norm()
        self.scheduler.step()
        return float(norm) if norm is not None else 0.0

    def lrs(self) -> dict[str, float]:
        return _lrs(self._groups, self.optimizer, self.scheduler, self._lr_lambda)

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        client = {"scheduler": self.scheduler.state_dict()}
        lora = _adapters_only(self._ds.module)  # the frozen base is the loaded model's
        self._ds.save_checkpoint(
            path, tag="engine", client_state=client, save_latest=False, exclude_frozen_parameters=lora
        )
        barrier()

    def load(self, path: str) -> None:
        from r4b.train.zero_universal import ranks_written, universal_copy

        # ZeRO's state is partitioned by rank: another rank count loads DeepSpeed's universal form of it
        written, ranks = ranks_written(path), dist.get_world_size()
        reshard = written > 0 and written != ranks
        if reshard and self._zero3:  # DeepSpeed's universal load of ZeRO-3 gave parameters other groups' lrs
            raise InputError(
                f"{os.path.dirname(os.path.normpath(path))} was written by {written} ranks and this run has {ranks}: "
                f"a DeepSpeed ZeRO-3 checkpoint resumes on {written} ranks only (ZeRO-1 and 2 ones reshard)"
            )
        with universal_copy(path) if reshard else contextlib.nullcontext(path) as source:
            self._ds._config.load_universal_checkpoint = reshard
            load_path, client = self._ds.load_checkpoint(
                source,
                tag="engine",
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=not _adapters_only(self._ds.module),
            )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {path}")
        self.scheduler.load_state_dict(client["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module = self._ds.module
        full: dict[int, torch.Tensor] = {}
        for _, p in module.named_parameters():
            t = safe_get_full_fp32_param(p) if p.requires_grad else None  # collective under ZeRO-3
            if t is None:
                if self._zero3:
                    with deepspeed.zero.GatheredParameters([p]):
                        t = p.data.detach().clone()
                else:
                    t = p.data.detach().clone()
            full[id(p)] = t.float().cpu()
        if not is_main_process():
            return None
        out = {}
        for k, v in module.state_dict(keep_vars=True).items():
            out[k] = full[id(v)] if id(v) in full else v.detach().float().cpu().clone()
        return out


def build_engine(
    model: nn.Module,
    param_groups: list[dict],
    lr_lambda: Callable[[int], float],
    config: EngineConfig,
    *,
    betas: tuple[float, float] = (0.9, 0.95),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> Engine:
    """Wrap `model` for training as `config.kind` says.

    `param_groups`: ``[{"params": [names or Parameters], "lr": float, "name": str}, ...]``; frozen params
    (requires_grad False) are skipped, groups may be empty or have lr 0. The model must be identical on every
    rank (same init/seed); the engine takes ownership of it (moves, shards or wraps it).
    """
    if config.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be 'no' or 'bf16', not {config.mixed_precision!r}")
    groups = _resolve_groups(model, param_groups)
    cls = {"single": SingleEngine, "fsdp2": FSDP2Engine, "deepspeed": DeepSpeedEngine}.get(config.kind)
    if cls is None:
        raise ValueError(f"unknown engine kind {config.kind!r} (single, fsdp2, deepspeed)")
    model.train()
    return cls(model, groups, lr_lambda, config, betas, weight_decay, eps)
