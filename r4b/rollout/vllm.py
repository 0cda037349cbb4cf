"""Rollouts with vLLM: the fast engine for GPU training runs, colocated with the trainer (``pip install r4b[vllm]``).

vLLM serves R-4B as ``RForConditionalGeneration`` (a LLaVA-OneVision subclass) and Qwen2.5-VL / Qwen3-VL
natively. The engine renders each prompt with r4b's own chat template and mode suffix and hands vLLM the
token ids with one ``<image>`` per image plus the images; vLLM expands the placeholders itself. The
expanded prompt vLLM reports must equal r4b's (:func:`~r4b.rollout.prompts.encode_prompt`), because the
trainer re-encodes the same prompt for the policy update: a mismatch (two image processors disagreeing on a
token count) is an error, not a silent shift of every response token.

Weights come from the trainer through :meth:`VLLMRolloutEngine.load_weights` (the Hugging Face state dict;
vLLM's own weight mapper renames it) and the prefix cache is dropped afterwards, since cached prompt
states belong to the old weights. ``sleep_level`` puts vLLM to sleep between rollouts, handing its GPU
memory to the trainer (the LLM must be built with ``enable_sleep_mode=True``).

Sampling: each prompt is one vLLM request with ``n`` samples and its own seed (``sampling.seed`` plus the
prompt's index), so results do not depend on how vLLM batches requests. ``<image>`` gets a -100 logit bias
(vLLM's floor), the way the transformers engine suppresses it. Returned log-probs are whatever the LLM's
``logprobs_mode`` gives; :meth:`VLLMRolloutEngine.from_pretrained` asks for ``processed_logprobs``, which is
:class:`~r4b.rollout.SamplingParams`' meaning (at the temperature) when top-p and top-k are off.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from r4b.data.image import ImageProcessor
from r4b.models.tokenizer import IMAGE_TOKEN

from .base import Prompt, Rollout, RolloutEngine, SamplingParams
from .prompts import EncodedPrompt, encode_for_generation, stop_token_ids

__all__ = ["VLLMRolloutEngine", "import_vllm"]

IMAGE_LOGIT_BIAS = -100.0  # vLLM clamps biases to [-100, 100]


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        raise ImportError(
            "the vLLM rollout engine needs vLLM: pip install 'r4b[vllm]' (a CUDA machine), or use rollout.engine=hf"
        ) from error


class VLLMRolloutEngine(RolloutEngine):
    """Generates with a ``vllm.LLM``.

    Args:
        llm: the vLLM engine, holding the policy's architecture (its weights are replaced by
            :meth:`load_weights`).
        tokenizer: a tokenizer with R-4B's chat template (``thinking_mode`` switch).
        processor: the image processor the trainer uses (for the expected image token counts).
        sleep_level: 1 or 2 to put vLLM to sleep after each :meth:`generate` (woken before the next call
            and before weights load); None keeps it awake.
    """

    def __init__(self, llm: Any, tokenizer: Any, processor: ImageProcessor, *, sleep_level: int | None = None) -> None:
        if sleep_level not in (None, 1, 2):
            raise ValueError(f"sleep_level must be None, 1 or 2, got {sleep_level}")
        self.llm, self.tokenizer, self.processor, self.sleep_level = llm, tokenizer, processor, sleep_level
        self.vllm = import_vllm()
        self.stop_token_ids = stop_token_ids(tokenizer)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.asleep = False

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        tokenizer: Any,
        processor: ImageProcessor,
        *,
        sleep_level: int | None = None,
        **llm_kwargs: Any,
    ) -> VLLMRolloutEngine:
        """A colocated engine on the checkpoint at ``path``; ``llm_kwargs`` go to ``vllm.LLM`` and override
        r4b's defaults (processed log-probs, prefix caching, 40% of the GPU memory, sleep mode when asked)."""
        vllm = import_vllm()
        defaults: dict[str, Any] = {
            "logprobs_mode": "processed_logprobs",
            "enable_prefix_caching": True,  # the 2g rollouts of a prompt share its prefix
            "gpu_memory_utilization": 0.4,  # the trainer shares the GPU
            "enable_sleep_mode": sleep_level is not None,
        }
        llm = vllm.LLM(model=str(path), **(defaults | llm_kwargs))
        return cls(llm, tokenizer, processor, sleep_level=sleep_level)

    # -- weights and memory ---------------------------------------------------------------------------

    def load_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the policy's state dict into vLLM's model and drop the stale prefix cache."""
        self._wake()
        weights = [(name, tensor) for name, tensor in state.items()]
        self.llm.apply_model(lambda model: model.load_weights(iter(weights)))
        self.llm.reset_prefix_cache()

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _sleep(self) -> None:
        if self.sleep_level is not None:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    # -- generation ------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Prompt], *, n: int, mode: str, sampling: SamplingParams
    ) -> list[list[Rollout]]:
        """For each prompt, in order, ``n`` rollouts in ``mode`` (see the module docstring)."""
        encoded = encode_for_generation(self.tokenizer, self.processor, prompts, n=n, mode=mode)
        if not encoded:
            return []
        requests = [self._request(prompt) for prompt in encoded]
        params = [self._sampling_params(n, sampling, index) for index in range(len(encoded))]
        self._wake()
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            self._sleep()
        return [self._rollouts(prompt, output, mode, n) for prompt, output in zip(encoded, outputs, strict=True)]

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
            seed=sampling.seed + index,
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
        return Rollout(list(prompt.ids), response, text, finished, mode, logprobs)
