"""r4b.rollout: prompts end with the mode suffix, batched (left-padded) greedy generation equals one prompt at
a time, seeded sampling is reproducible, generation stops at <|im_end|> or max_new_tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from r4b.format import MODE_SUFFIX, MODES
from r4b.models.attention import ATTENTION_NAME
from r4b.models.image_processing import RImageProcessor
from r4b.models.packed import use_varlen_language_model
from r4b.models.tiny import build_tiny_r4b
from r4b.models.tokenizer import IMAGE_TOKEN
from r4b.rollout import HFRolloutEngine, Prompt, Rollout, RolloutEngine, SamplingParams, encode_prompt

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


@pytest.fixture()
def model(tokenizer):
    model = build_tiny_r4b(seed=1, tokenizer=tokenizer)
    with torch.no_grad():  # sharper logits than at init: greedy choices with clear margins
        model.lm_head.weight.mul_(30.0)
    return model


def _image(width: int, height: int, color: str) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def _prompts() -> list[Prompt]:
    """Different lengths, with and without images, images of different tile counts (56x28: 3 tiles, 84x28: 4)."""
    return [
        Prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}],
               [_image(56, 28, "red")]),
        Prompt([{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is seven plus five, written as a number with no words?"}]),
        Prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Both?"}, {"type": "image"}]}],
               [_image(28, 84, "blue"), _image(28, 28, "green")]),
        Prompt([{"role": "user", "content": "Hi"}]),
    ]  # fmt: skip


def test_engine_is_a_rollout_engine(model, tokenizer):
    assert isinstance(HFRolloutEngine(model, tokenizer), RolloutEngine)


@pytest.mark.parametrize("mode", MODES)
def test_prompt_ids_end_with_mode_suffix(model, tokenizer, mode):
    processor = RImageProcessor.from_config(model.config)
    suffix_ids = tokenizer(MODE_SUFFIX[mode], add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for prompt in _prompts():
        encoded = encode_prompt(tokenizer, processor, prompt, mode)
        assert encoded.ids[-len(suffix_ids) :] == suffix_ids
        expected = sum(processor.num_image_tokens(im.height, im.width) for im in prompt.images)
        assert encoded.ids.count(image_id) == expected
    engine = HFRolloutEngine(model, tokenizer, batch_size=4)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=2)
    for rollouts in engine.generate(_prompts(), n=1, mode=mode, sampling=sampling):
        (rollout,) = rollouts
        assert rollout.prompt_ids[-len(suffix_ids) :] == suffix_ids
        assert rollout.mode == mode and rollout.full_text == MODE_SUFFIX[mode] + rollout.text


def test_prompt_validation(model, tokenizer):
    processor = RImageProcessor.from_config(model.config)
    with pytest.raises(ValueError, match="placeholder"):
        encode_prompt(
            tokenizer,
            processor,
            Prompt([{"role": "user", "content": "no image here"}], [_image(28, 28, "red")]),
            "auto",
        )
    with pytest.raises(ValueError, match="unknown mode"):
        encode_prompt(tokenizer, processor, Prompt([{"role": "user", "content": "x"}]), "long")
    with pytest.raises(ValueError, match="assistant"):
        encode_prompt(
            tokenizer,
            processor,
            Prompt([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]),
            "auto",
        )
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)  # fmt: skip


def test_image_paths_load_like_pil_images(model, tokenizer, tmp_path):
    image = _image(56, 28, "red")
    image.save(tmp_path / "a.png")
    messages = [{"role": "user", "content": "<image>\nWhat?"}]
    engine = HFRolloutEngine(model, tokenizer)
    by_path = engine.generate([Prompt(messages, [tmp_path / "a.png"])], n=1, mode="auto", sampling=GREEDY)
    by_pil = engine.generate([Prompt(messages, [image])], n=1, mode="auto", sampling=GREEDY)
    assert by_path[0][0].response_ids == by_pil[0][0].response_ids


@pytest.mark.parametrize("mode", ["thinking", "non_thinking"])
def test_batched_greedy_equals_one_at_a_time(model, tokenizer, mode):
    prompts = _prompts()
    sampling = SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=True)
    batched = HFRolloutEngine(model, tokenizer, batch_size=8).generate(prompts, n=2, mode=mode, sampling=sampling)
    single = HFRolloutEngine(model, tokenizer, batch_size=1)
    assert [len(rollouts) for rollouts in batched] == [2] * len(prompts)
    for prompt, rollouts in zip(prompts, batched, strict=True):
        (alone,) = single.generate([prompt], n=1, mode=mode, sampling=sampling)[0]
        for rollout in rollouts:
            assert rollout.prompt_ids == alone.prompt_ids
            assert rollout.response_ids == alone.response_ids
            assert rollout.text == alone.text
            torch.testing.assert_close(torch.tensor(rollout.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=0)
    assert len({tuple(r[0].response_ids) for r in batched}) > 1  # the prompts are not all answered alike


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model, tokenizer):
    engine = HFRolloutEngine(model, tokenizer, batch_size=4)
    prompts = _prompts()[:2]
    sampling = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=8, seed=7)
    state = torch.get_rng_state()
    first = engine.generate(prompts, n=2, mode="auto", sampling=sampling)
    assert torch.equal(torch.get_rng_state(), state)
    again = engine.generate(prompts, n=2, mode="auto", sampling=sampling)
    other = engine.generate(prompts, n=2, mode="auto", sampling=dataclasses.replace(sampling, seed=8))
    ids = lambda result: [[r.response_ids for r in rollouts] for rollouts in result]
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert any(rollouts[0].response_ids != rollouts[1].response_ids for rollouts in first)  # samples differ


def test_stops_at_im_end(model, tokenizer):
    prompt = [Prompt([{"role": "user", "content": "Hi"}])]
    engine = HFRolloutEngine(model, tokenizer)
    first = engine.generate(prompt, n=1, mode="non_thinking", sampling=GREEDY)[0][0]
    assert not first.finished and len(first.response_ids) == GREEDY.max_new_tokens and first.text
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # <|im_end|> scores twice the (positive) top logit of the first step: it wins there
        model.lm_head.weight[im_end] = 2 * model.lm_head.weight[first.response_ids[0]]
    stopped = engine.generate(prompt, n=1, mode="non_thinking", sampling=GREEDY)[0][0]
    assert stopped.response_ids == [im_end] and stopped.finished and stopped.text == ""
    assert stopped.full_text == MODE_SUFFIX["non_thinking"]


def test_extra_stop_tokens(model, tokenizer):
    prompt = [Prompt([{"role": "user", "content": "Hi"}])]
    engine = HFRolloutEngine(model, tokenizer)
    first = engine.generate(prompt, n=1, mode="thinking", sampling=GREEDY)[0][0]
    stop = first.response_ids[2]
    cut = first.response_ids.index(stop) + 1
    sampling = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,))
    stopped = engine.generate(prompt, n=1, mode="thinking", sampling=sampling)[0][0]
    assert stopped.finished and stopped.response_ids == first.response_ids[:cut]
    assert stopped.text == tokenizer.decode(first.response_ids[: cut - 1])


def test_varlen_attention_is_swapped_for_generation_and_restored(model, tokenizer):
    reference = HFRolloutEngine(model, tokenizer).generate(_prompts(), n=1, mode="auto", sampling=GREEDY)
    use_varlen_language_model(model)
    model.train()
    result = HFRolloutEngine(model, tokenizer, batch_size=4).generate(_prompts(), n=1, mode="auto", sampling=GREEDY)
    assert [r[0].response_ids for r in result] == [r[0].response_ids for r in reference]
    assert model.model.language_model.config._attn_implementation == ATTENTION_NAME
    assert model.training


def test_rollout_full_text():
    rollout = Rollout([1, 2], [5, 2], "12", True, "thinking")
    assert rollout.full_text == "<think>\n12" and rollout.logprobs is None


def test_load_weights_streams_pairs_strictly(model, tokenizer):
    """The transformers engine takes a state dict or a stream of (name, tensor) pairs; unknown or missing names
    are errors."""
    engine = HFRolloutEngine(model, tokenizer)
    state = {name: torch.full_like(t, 0.5) for name, t in model.state_dict().items()}
    engine.load_weights(iter(state.items()))
    assert all(bool((t == 0.5).all()) for t in model.state_dict().values())
    with pytest.raises(KeyError, match="not in the rollout model"):
        engine.load_weights({**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="were not given"):
        engine.load_weights(dict(list(state.items())[1:]))
