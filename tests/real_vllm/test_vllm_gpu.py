"""What only a GPU shows of the vLLM rollout engine (scripts/gpu_checks.sh runs it where the image has vLLM): CUDA
graphs (vLLM's default, not eager) reproduce the transformers engine's greedy rollouts, and sleep mode hands GPU
memory back and wakes with the same policy (level 1 keeps the weights in host memory; level 2 discards them, so the
next sync reloads them). vLLM's CPU build refuses sleep mode and has no CUDA graphs: tests/real_vllm/
test_vllm_engine.py covers the rest on the CPU. Many ranks (``distributed_executor_backend="external_launcher"``
under torchrun) need two GPUs and are not covered here."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(), reason="needs vLLM and a GPU"
    ),
]

from test_vllm_engine import GREEDY, KV_CACHE_GIB, _model, _reference, _responses  # noqa: E402

from r4b.models.image_processing import RImageProcessor  # noqa: E402
from r4b.models.loading import save_model  # noqa: E402


@pytest.mark.parametrize("level", [1, 2])
def test_cuda_graphs_and_sleep_mode_keep_the_policy(tokenizer, tmp_path, level):
    from r4b.rollout.vllm import VLLMRolloutEngine

    model = _model(1, tokenizer)
    path = save_model(model, tmp_path / "model", tokenizer)
    processor = RImageProcessor.from_config(model.config)
    engine = VLLMRolloutEngine.from_pretrained(
        path, tokenizer, processor, dtype="float32", seed=0, sleep_level=level, kv_cache_gib=KV_CACHE_GIB
    )
    try:
        expected = _responses(_reference(copy.deepcopy(model).cuda(), tokenizer), "auto", GREEDY)
        assert _responses(engine, "auto", GREEDY) == expected  # compiled with CUDA graphs
        awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert torch.cuda.mem_get_info()[0] > awake + (KV_CACHE_GIB * (1 << 30)) // 2  # the KV cache handed back
        assert engine.needs_weights is (level == 2)
        if level == 2:
            engine.load_weights(model.state_dict())
        assert _responses(engine, "auto", GREEDY) == expected
    finally:
        engine.close()
