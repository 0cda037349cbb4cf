"""Rollouts with transformers' ``generate``: batched, left-padded, KV-cached; the reference engine.

Rows (prompt x sample) are generated ``batch_size`` at a time. Prompts are left-padded with an attention
mask, so every row's last prompt token sits at the same position and new tokens line up; the images of a
batch go in row order (the order the models scatter image features into the placeholder tokens): R-4B /
LLaVA-OneVision as one ``pixel_values`` / ``image_sizes``; Qwen2.5-VL / Qwen3-VL as their patch rows
concatenated with one ``image_grid_thw`` row per image, plus ``mm_token_type_ids``, from which the model
derives the rows' mRoPE positions (its ``get_rope_index`` skips the left padding). For the duration of a call
the model is in eval mode, any ``r4b_varlen`` attention (which refuses padding masks) is swapped for ``sdpa``
and the model's own ``generation_config`` is replaced by a neutral one, so that only :class:`SamplingParams`
shape the sampling; all three are restored afterwards. Sampling runs in a forked RNG seeded with
``sampling.seed``: the output depends on the seed, the prompts, ``n`` and ``batch_size``, and the caller's
global RNG state is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel

from r4b.data.encode import image_placeholder
from r4b.data.image import ImageProcessor
from r4b.models.attention import ATTENTION_NAME
from r4b.models.mrope import mm_token_type_ids
from r4b.models.qwen_vl import is_qwen_vl

from .base import Prompt, Rollout, RolloutEngine, SamplingParams, Weights, check_suffixes, weight_pairs
from .prompts import EncodedPrompt, encode_for_generation, stop_token_ids

__all__ = ["HFRolloutEngine", "generation_attention"]


@contextlib.contextmanager
def generation_attention(model: torch.nn.Module, implementation: str = "sdpa") -> Iterator[None]:
    """Within the block, every sub-model on ``r4b_varlen`` attention uses ``implementation``; restored after."""
    switched = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == ATTENTION_NAME:
            module.set_attn_implementation(implementation)
            switched.append(module)
    try:
        yield
    finally:
        for module in switched:
            module.set_attn_implementation(ATTENTION_NAME)


class HFRolloutEngine(RolloutEngine):
    """Generates with ``model.generate``: any LLaVA-OneVision-style model (R-4B, the tiny one), Qwen2.5-VL or Qwen3-VL.

    Args:
        model: the policy.
        tokenizer: a tokenizer with R-4B's chat template (``thinking_mode`` switch).
        processor: the image processor; default ``RImageProcessor.from_config(model.config)``, for Qwen-VL
            ``QwenVLImageProcessor.for_model(model)``.
        batch_size: rows (prompt x sample) per ``generate`` call.
        device: where inputs go; default the model's device.
        attn_implementation: the attention used instead of ``r4b_varlen`` while generating.
        suffixes: per-mode suffixes replacing the template's (:attr:`RolloutEngine.suffixes`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        processor: ImageProcessor | None = None,
        *,
        batch_size: int = 32,
        device: torch.device | str | None = None,
        attn_implementation: str = "sdpa",
        suffixes: Mapping[str, str] | None = None,
    ) -> None:
        self.suffixes = check_suffixes(suffixes)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mrope = is_qwen_vl(model)
        if processor is None:
            from r4b.models.image_processing import RImageProcessor
            from r4b.models.qwen_vl import QwenVLImageProcessor

            if self.mrope:
                processor = QwenVLImageProcessor.for_model(model)  # the directory's preprocessor_config.json
            else:
                processor = RImageProcessor.from_config(model.config)
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.batch_size, self.attn_implementation = batch_size, attn_implementation
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.stop_token_ids = stop_token_ids(tokenizer)
        # A response cannot hold an image placeholder (there is no image behind it): never sample one.
        self.suppressed_token_ids = [tokenizer.convert_tokens_to_ids(image_placeholder(processor))]
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.stop_token_ids[0])

    def generate(
        self, prompts: Sequence[Prompt], *, n: int, mode: str, sampling: SamplingParams
    ) -> list[list[Rollout]]:
        """For each prompt, in order, ``n`` rollouts in ``mode`` (see the module docstring)."""
        suffix = self.suffixes.get(mode)
        encoded = encode_for_generation(self.tokenizer, self.processor, prompts, n=n, mode=mode, suffix=suffix)
        rows = [i for i in range(len(encoded)) for _ in range(n)]
        results: list[list[Rollout]] = [[] for _ in encoded]
        with self._generation_state(sampling):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                for i, rollout in zip(
                    chunk, self._generate_batch([encoded[i] for i in chunk], mode, sampling), strict=True
                ):
                    results[i].append(rollout)
        return results

    def load_weights(self, weights: Weights) -> None:
        """Copy the weights into the model one tensor at a time (strict: every name known, none missing)."""
        targets, loaded = self.model.state_dict(), set()  # state_dict tensors share the parameters' storage
        with torch.no_grad():
            for name, tensor in weight_pairs(weights):
                if name not in targets:
                    raise KeyError(f"weight {name!r} is not in the rollout model")
                targets[name].copy_(tensor)
                loaded.add(name)
        missing = sorted(set(targets) - loaded)
        if missing:
            raise KeyError(f"{len(missing)} weights were not given, e.g. {missing[:3]}")

    @contextlib.contextmanager
    def _generation_state(self, sampling: SamplingParams) -> Iterator[None]:
        """Eval mode, generation attention, a neutral generation config and a forked, seeded RNG."""
        model, was_training, saved_config = self.model, self.model.training, self.model.generation_config
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        try:
            model.eval()
            model.generation_config = GenerationConfig()
            with generation_attention(model, self.attn_implementation), torch.random.fork_rng(devices=devices):
                torch.manual_seed(sampling.seed)
                with torch.inference_mode():
                    yield
        finally:
            model.generation_config = saved_config
            model.train(was_training)

    def _generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        stops = list(dict.fromkeys(self.stop_token_ids + sampling.stop_token_ids))
        neutral = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "num_beams": 1}
        if sampling.greedy:
            knobs: dict[str, Any] = {"do_sample": False}
        else:
            knobs = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            knobs |= {"top_k": sampling.top_k, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
        return GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stops,
            pad_token_id=self.pad_token_id,
            suppress_tokens=self.suppressed_token_ids,
            use_cache=True,
            return_dict_in_generate=True,
            output_logits=sampling.logprobs,
            **neutral,
            **knobs,
        )

    def _pixels(self, batch: Sequence[EncodedPrompt]) -> dict[str, torch.Tensor]:
        """The batch's images in row order (each distinct prompt preprocessed once): ``pixel_values`` and
        ``image_sizes`` (R-4B: one row per image), or ``image_grid_thw`` (Qwen-VL: ``pixel_values`` holds
        ``t * h * w`` patch rows per image)."""
        distinct = list({id(prompt): prompt for prompt in batch if prompt.images}.values())
        if not distinct:
            return {}
        offsets, images = {}, []
        for prompt in distinct:
            offsets[id(prompt)] = len(images)
            images.extend(prompt.images)
        pixels = self.processor.preprocess(images)
        index = torch.tensor(
            [offsets[id(p)] + k for p in batch if p.images for k in range(len(p.images))], dtype=torch.long
        )
        dtype = next(self.model.parameters()).dtype
        if "image_grid_thw" not in pixels:
            return {
                "pixel_values": pixels["pixel_values"][index].to(self.device, dtype=dtype),
                "image_sizes": pixels["image_sizes"][index].to(self.device),
            }
        grids = pixels["image_grid_thw"]
        patches = grids.prod(-1)
        starts = torch.cumsum(patches, 0) - patches
        rows = torch.cat([torch.arange(int(starts[k]), int(starts[k] + patches[k])) for k in index.tolist()])
        return {
            "pixel_values": pixels["pixel_values"][rows].to(self.device, dtype=dtype),
            "image_grid_thw": grids[index].to(self.device),
        }

    def _generate_batch(self, batch: Sequence[EncodedPrompt], mode: str, sampling: SamplingParams) -> list[Rollout]:
        width = max(len(prompt.ids) for prompt in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(batch):  # left padding
            input_ids[row, width - len(prompt.ids) :] = torch.tensor(prompt.ids, dtype=torch.long)
            attention_mask[row, width - len(prompt.ids) :] = 1
        extra = self._pixels(batch)
        if self.mrope:  # Qwen-VL derives mRoPE positions from the token types (text / image placeholder)
            extra["mm_token_type_ids"] = mm_token_type_ids(self.model.config, input_ids).to(self.device)
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=self._generation_config(sampling),
            **extra,
        )
        new_tokens = out.sequences[:, width:].tolist()
        stops = set(self.stop_token_ids + sampling.stop_token_ids)
        rollouts = []
        for row, (prompt, tokens) in enumerate(zip(batch, new_tokens, strict=True)):
            end = next((t + 1 for t, token in enumerate(tokens) if token in stops), None)
            response = tokens if end is None else tokens[:end]
            logprobs = self._logprobs(out.logits, row, response, sampling) if sampling.logprobs else None
            text_ids = response if end is None else response[:-1]
            text = self.tokenizer.decode(text_ids, skip_special_tokens=False)
            finished, suffix = end is not None, self.suffixes.get(mode)
            rollouts.append(Rollout(list(prompt.ids), response, text, finished, mode, logprobs, suffix))
        return rollouts

    @staticmethod
    def _logprobs(
        logits: Sequence[torch.Tensor], row: int, response: Sequence[int], sampling: SamplingParams
    ) -> list[float]:
        """Each response token's log-prob from the raw per-step logits at the sampling temperature."""
        scale = 1.0 if sampling.greedy else sampling.temperature
        steps = torch.stack([logits[t][row] for t in range(len(response))]).float() / scale
        chosen = torch.tensor(response, device=steps.device).unsqueeze(1)
        return torch.log_softmax(steps, dim=-1).gather(1, chosen).squeeze(1).tolist()
