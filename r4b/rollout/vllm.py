"""Rollouts with vLLM: the fast engine for GPU training runs, colocated with the trainer (``pip install r4b[vllm]``).

vLLM serves R-4B as ``RForConditionalGeneration`` (a LLaVA-OneVision subclass, ``rvl``). The engine renders each
prompt with r4b's own chat template and mode suffix and hands vLLM the token ids with one ``<image>`` per image
plus the images; vLLM expands the placeholders itself (already-expanded ids would be expanded again). The
expanded prompt vLLM reports must equal r4b's (:func:`~r4b.rollout.prompts.encode_prompt`), because the
trainer re-encodes the same prompt for the policy update: a mismatch (two image processors disagreeing on a
token count) is an error, not a silent shift of every response token. vLLM (checked against 0.33) counts
``rvl`` image tokens the LLaVA-NeXT way but merges features the OneVision way (``anyres_max_9``), which
disagree above about 3x3 tiles; :func:`align_rvl_image_token_count` makes its count OneVision's.

Weights come from the trainer through :meth:`VLLMRolloutEngine.load_weights` (the Hugging Face state dict,
renamed to the checkpoint's names, which vLLM's loader maps) inside this process (the engine core runs
in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the weight stream never crosses a process boundary). They go
through vLLM's checkpoint-format reload (``collective_rpc("reload_weights")``), not ``model.load_weights``: backends
that repack weights after loading (the CPU backend prepacks fp32 linear layers and leaves an empty ``Parameter``;
quantized kernels) repack the new ones too. Afterwards the prefix cache and the encoder cache are dropped: cached
prompt states and image embeddings belong to the old weights. ``verify_sync`` asks the trainer's weight sync to
compare a probe's log-probs with the trainer's (:mod:`r4b.train.sync_probe`), so a sync that did not take effect
is an error. The KV cache gets a stated budget (``kv_cache_gib``): vLLM's own default on a CPU reserves a share
of the machine's RAM. On a CPU prompts are prefilled whole (:data:`CPU_DEFAULTS`). With ``sleep_level``,
:meth:`VLLMRolloutEngine.sleep` hands vLLM's GPU memory to the trainer between rollout phases (the LLM must be
built with ``enable_sleep_mode=True``); level 2 discards the weights, so :attr:`VLLMRolloutEngine.needs_weights`
asks the trainer for a fresh :meth:`load_weights`.

Sampling: each prompt is one vLLM request with ``n`` samples; vLLM seeds sample k with ``seed + k``, so request
seeds are hashed from (``sampling.seed``, prompt index) into blocks 2**16 apart and never collide. Greedy
requests with ``n > 1`` (which vLLM refuses) generate once and repeat the answer. The image placeholder
(``<image>``; Qwen-VL's ``<|image_pad|>``) gets a -100 logit bias (vLLM's floor), as the transformers engine
suppresses it. Returned log-probs are what the LLM's ``logprobs_mode`` gives;
:meth:`VLLMRolloutEngine.from_pretrained` asks for ``processed_logprobs`` (after temperature and top-p /
top-k truncation: :class:`~r4b.rollout.SamplingParams`' meaning when those are off).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from r4b.data.encode import image_placeholder
from r4b.data.image import ImageProcessor
from r4b.models.checkpoint import checkpoint_name

from .base import Prompt, Rollout, RolloutEngine, SamplingParams, Weights, check_suffixes, weight_pairs
from .prompts import EncodedPrompt, encode_for_generation, stop_token_ids

__all__ = [
    "VLLMRolloutEngine",
    "align_rvl_image_token_count",
    "check_cpu_head_dim",
    "import_vllm",
    "kv_cache_args",
    "request_seed",
]

IMAGE_LOGIT_BIAS = -100.0  # vLLM clamps biases to [-100, 100]
SEED_BLOCK = 1 << 16  # vLLM seeds a request's sample k with seed + k: room for n < 65536
CPU_KV_CACHE_GIB = 1.0  # on a CPU vLLM's default reserves a share of the machine's RAM (0.4 of 24 GiB: 9.6 GiB)
GPU_MEMORY_SHARE = 0.4  # the trainer shares the GPU
# vLLM's CPU backend fails a seeded request whose prefill is split over steps (it rewinds the request's generator,
# which a CPU generator cannot: "CPU Generator does not use offset"), so prompts are prefilled whole there.
CPU_DEFAULTS: dict[str, Any] = {"enable_chunked_prefill": False}
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32's CPU attention kernels


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise ImportError(
            "the vLLM rollout engine needs vLLM: pip install 'r4b[vllm]' on a CUDA machine (a CPU: README's vLLM "
            "section), or use rollout.engine=hf"
        ) from error


def request_seed(seed: int, index: int) -> int:
    """The vLLM seed of prompt ``index`` in a call seeded ``seed``: a hash, a multiple of 2**16, below 2**62."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 2) // SEED_BLOCK * SEED_BLOCK


def align_rvl_image_token_count(processor: ImageProcessor) -> None:
    """Make vLLM's ``rvl`` count image tokens as its model merges them (LLaVA-OneVision's ``anyres_max_9``
    downscale), the count r4b's processor gives; a no-op where vLLM lacks those classes."""
    try:
        from vllm.model_executor.models import llava_onevision, rvl
    except ImportError:
        return
    onevision = getattr(llava_onevision.LlavaOnevisionProcessingInfo, "_get_num_unpadded_features", None)
    if onevision is None or not hasattr(rvl.RVLProcessingInfo, "_get_num_unpadded_features"):
        return
    if getattr(processor, "max_num_patches", 9) != 9:
        raise ValueError("vLLM's rvl model merges image features with anyres_max_9; this processor uses another")
    rvl.RVLProcessingInfo._get_num_unpadded_features = onevision


def kv_cache_args(kv_cache_gib: float | None, *, on_gpu: bool) -> dict[str, Any]:
    """``vllm.LLM`` arguments for a KV cache of ``kv_cache_gib`` GiB (``kv_cache_memory_bytes``, which overrides
    the memory share on both backends); None: vLLM sizes it from the GPU's share on a GPU, 1 GiB on a CPU."""
    if kv_cache_gib is None and not on_gpu:
        kv_cache_gib = CPU_KV_CACHE_GIB
    if kv_cache_gib is None:
        return {}
    if kv_cache_gib <= 0:
        raise ValueError(f"the KV cache budget must be positive, got {kv_cache_gib} GiB")
    return {"kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30))}


def check_cpu_head_dim(path: str | Path) -> None:
    """Refuse, before vLLM loads it, a model whose text attention vLLM's CPU build cannot run (it would fail at the
    first generate with "Unsupported CPU attention configuration")."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return  # vLLM says what is missing
    config = json.loads(config_file.read_text())
    text = config.get("text_config", config)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    if head_dim not in CPU_HEAD_DIMS:
        raise ValueError(
            f"{path}: vLLM's CPU build runs text head dims {', '.join(map(str, CPU_HEAD_DIMS))}, this model's is "
            f"{head_dim} (the embedded tiny model's is 32); use rollout.engine=hf"
        )


def _cpu_backend() -> bool:
    """Whether the installed vLLM is its CPU build."""
    try:
        from vllm.platforms import current_platform
    except ImportError:  # an older vLLM
        return False
    return bool(current_platform.is_cpu())


class VLLMRolloutEngine(RolloutEngine):
    """Generates with a ``vllm.LLM``.

    Args:
        llm: the vLLM engine, holding the policy's architecture (its weights are replaced by
            :meth:`load_weights`).
        tokenizer: a tokenizer with R-4B's chat template (``thinking_mode`` switch).
        processor: the image processor the trainer uses (for the expected image token counts).
        sleep_level: 1 or 2: :meth:`sleep` releases vLLM's GPU memory (level 2 also its weights) until the
            next call; None keeps it awake.
        suffixes: per-mode suffixes replacing the template's (:attr:`RolloutEngine.suffixes`).
    """

    verify_sync = True  # r4b.train.weight_sync checks a probe's log-probs after each sync (r4b.train.sync_probe)

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        processor: ImageProcessor,
        *,
        sleep_level: int | None = None,
        suffixes: Mapping[str, str] | None = None,
    ) -> None:
        self.suffixes = check_suffixes(suffixes)
        if sleep_level not in (None, 1, 2):
            raise ValueError(f"sleep_level must be None, 1 or 2, got {sleep_level}")
        self.llm, self.tokenizer, self.processor, self.sleep_level = llm, tokenizer, processor, sleep_level
        self.vllm = import_vllm()
        self.stop_token_ids = stop_token_ids(tokenizer)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_placeholder(processor))
        self.sleeping: set[str] = set()  # the memory tags vLLM has released
        self.needs_weights = False  # True after a level-2 sleep discarded them
        # the synced tensors are cast to it on the training device (r4b.train.weight_sync.rollout_weights_dtype)
        self.weights_dtype = getattr(getattr(llm.llm_engine, "model_config", None), "dtype", None)
        if not hasattr(llm.llm_engine, "reset_encoder_cache"):  # else image embeddings outlive a weight sync
            raise ImportError("this vLLM cannot reset its encoder cache after a weight update: install r4b[vllm]")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        tokenizer: Any,
        processor: ImageProcessor,
        *,
        sleep_level: int | None = None,
        suffixes: Mapping[str, str] | None = None,
        kv_cache_gib: float | None = None,
        **llm_kwargs: Any,
    ) -> VLLMRolloutEngine:
        """A colocated engine on the checkpoint at ``path`` (r4b's export: it holds the processor config vLLM
        reads); ``llm_kwargs`` go to ``vllm.LLM`` and override r4b's defaults (processed log-probs, prefix
        caching, 40% of the GPU memory, sleep mode when asked). ``kv_cache_gib``: the KV cache's budget
        (:func:`kv_cache_args`)."""
        vllm = import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the weight stream stays in-process
        align_rvl_image_token_count(processor)
        if _cpu_backend():
            check_cpu_head_dim(path)
        defaults: dict[str, Any] = {
            "logprobs_mode": "processed_logprobs",
            "enable_prefix_caching": True,  # the 2g rollouts of a prompt share its prefix
            "gpu_memory_utilization": GPU_MEMORY_SHARE,
            "enable_sleep_mode": sleep_level is not None,
            **kv_cache_args(kv_cache_gib, on_gpu=torch.cuda.is_available()),
            **({} if torch.cuda.is_available() else CPU_DEFAULTS),
        }
        llm = vllm.LLM(model=str(path), **(defaults | llm_kwargs))
        return cls(llm, tokenizer, processor, sleep_level=sleep_level, suffixes=suffixes)

    # -- weights and memory ---------------------------------------------------------------------------

    def load_weights(self, weights: Weights) -> None:
        """Load the policy's weights into vLLM's model, one tensor at a time as they come, through vLLM's
        checkpoint-format reload (every backend's repacking runs again); drop the caches computed with the old
        weights."""
        self._wake("weights")
        renamed = ((checkpoint_name(name), tensor) for name, tensor in weight_pairs(weights))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": renamed, "is_checkpoint_format": True})
        self.needs_weights = False
        self._wake("kv_cache")
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()  # image embeddings of the old vision tower

    def close(self) -> None:
        """Shut vLLM down and free its GPU memory and distributed state, for a process that goes on without it
        (``r4b eval`` of several models). It also ends torch.distributed: not for a training process."""
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()

    def sleep(self) -> None:
        """Release vLLM's GPU memory until the next :meth:`generate` or :meth:`load_weights` (with
        ``sleep_level``; otherwise a no-op). The trainer calls it once per rollout phase."""
        if self.sleep_level is None or self.sleeping:
            return
        self.llm.sleep(level=self.sleep_level)
        self.sleeping = {"weights", "kv_cache"}
        self.needs_weights = self.sleep_level == 2

    def _wake(self, *tags: str) -> None:
        wanted = [tag for tag in (tags or ("weights", "kv_cache")) if tag in self.sleeping]
        if wanted:
            # The trainer's freed blocks still sit in torch's caching allocator: hand them back to the driver
            # first, or vLLM's weights and KV cache may not fit (TRL empties the cache here for this reason).
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=wanted)
            self.sleeping.difference_update(wanted)

    # -- generation ------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], *, n: int, mode: str, sampling: SamplingParams
    ) -> list[list[Rollout]]:
        """For each prompt, in order, ``n`` rollouts in ``mode`` (see the module docstring)."""
        suffix = self.suffixes.get(mode)
        encoded = encode_for_generation(self.tokenizer, self.processor, prompts, n=n, mode=mode, suffix=suffix)
        if not encoded:
            return []
        if self.needs_weights:
            raise RuntimeError("vLLM slept at level 2 and discarded its weights: call load_weights first")
        self._wake()
        per_request = 1 if sampling.greedy else n  # vLLM refuses greedy n > 1: the n answers are one answer
        requests = [self._request(prompt) for prompt in encoded]
        params = [self._sampling_params(per_request, sampling, index) for index in range(len(encoded))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rows = [self._rollouts(p, output, mode, per_request) for p, output in zip(encoded, outputs, strict=True)]
        if per_request < n:
            rows = [[dataclasses.replace(row[0]) for _ in range(n)] for row in rows]
        return rows

    def _request(self, prompt: EncodedPrompt) -> dict[str, Any]:
        request: dict[str, Any] = {"prompt_token_ids": list(prompt.template_ids)}
        if prompt.images:
            request["multi_modal_data"] = {"image": list(prompt.images)}
        return request

    def _sampling_params(self, n: int, sampling: SamplingParams, index: int) -> Any:
        return self.vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            seed=request_seed(sampling.seed, index),
            stop_token_ids=list(dict.fromkeys(self.stop_token_ids + sampling.stop_token_ids)),
            logprobs=0 if sampling.logprobs else None,
            logit_bias={self.image_token_id: IMAGE_LOGIT_BIAS},
            detokenize=False,  # r4b decodes the ids itself, exactly as the transformers engine does
        )

    def _rollouts(self, prompt: EncodedPrompt, output: Any, mode: str, n: int) -> list[Rollout]:
        if list(output.prompt_token_ids) != prompt.ids:
            raise ValueError(
                f"vLLM expanded the prompt to {len(output.prompt_token_ids)} tokens, r4b to {len(prompt.ids)}: "
                "the image processors disagree on image token counts (check the checkpoint's preprocessor "
                "config against the one the trainer uses)"
            )
        completions = sorted(output.outputs, key=lambda completion: completion.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for a request of n={n}")
        return [self._rollout(prompt, completion, mode) for completion in completions]

    def _rollout(self, prompt: EncodedPrompt, completion: Any, mode: str) -> Rollout:
        # vLLM keeps the stop token (ours or the model's eos) as the last output id, as r4b's Rollout does.
        response = [int(token) for token in completion.token_ids]
        finished = completion.finish_reason == "stop"
        text_ids = response[:-1] if finished else response
        logprobs = None
        if completion.logprobs is not None:
            logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, response, strict=True)]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
        return Rollout(list(prompt.ids), response, text, finished, mode, logprobs, self.suffixes.get(mode))
