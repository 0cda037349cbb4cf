"""Build the tiny tokenizer shipped in r4b/assets/tiny-tokenizer (the embedded default; no download).

A byte-level BPE with Qwen's pre-tokenizer, trained on a small corpus generated here, plus the
special tokens R-4B uses: ChatML (<|im_start|>, <|im_end|>), <|endoftext|>, <image>, <think>,
</think>. As in Qwen3's vocabulary, "\\n" and "\\n\\n" are distinct tokens, so the token after
<think> is the mode decision. Deterministic: the same files every run.

    python scripts/build_tiny_tokenizer.py [--out r4b/assets/tiny-tokenizer]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN_PRETOKENIZE_REGEX

from r4b.models.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS, THINK_TOKENS

VOCAB_SIZE = 1024
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "r4b" / "assets" / "tiny-tokenizer"

WORDS = """the a an of to and in is it that for on with as what how many which picture image shown number
numbers shape shapes circle circles square squares triangle triangles star stars red blue green yellow
count counted there are total sum difference product add added subtract multiply times plus minus equals
answer question step first second third then so therefore thus because read reads see look let us
compute calculate result final value left right top bottom largest smallest more less than each
written label labels digit digits chart bar table row column color colors how much is are was be
think thinking reasoning direct easy hard problem solve solution check correct wrong choose option
yes no true false not one two three four five six seven eight nine ten hundred""".split()  # noqa: SIM905


def corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Sentences in the style of the synthetic task: questions, step-by-step traces, answers."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14)))
        capital = words[:1].upper() + words[1:]
        out += [
            f"{capital}?",
            f"Step 1: read {a}.\nStep 2: {a} + {b} = {a + b}.\n\nThe answer is \\boxed{{{a + b}}}.",
            f"How many {rng.choice(['circles', 'squares', 'stars', 'triangles'])} are there? {b}",
            f"{words}, so {a} * {b} = {a * b} and {a} - {b} = {a - b}.",
            f"({chr(65 + rng.randint(0, 3))}) {words}",
            f"<|im_start|>{rng.choice(['system', 'user', 'assistant'])}\n{words}<|im_end|>\n",
        ]
    return out


def build(out: Path) -> None:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS) - len(THINK_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..3, never merged with text
        show_progress=False,
    )
    text = corpus()
    # "\n\n" must be one token (as in Qwen3): make its merge frequent.
    tokenizer.train_from_iterator([*text, *["\n\n"] * 100], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )
    # <think>/</think> stay normal added tokens (special=False) as in Qwen3, so decode keeps them.
    fast.add_tokens(list(THINK_TOKENS), special_tokens=False)
    newline, blank = fast.convert_tokens_to_ids(["Ċ", "ĊĊ"])
    assert fast.encode("\n") == [newline] and fast.encode("\n\n") == [blank] and newline != blank
    assert fast.convert_tokens_to_ids(IMAGE_TOKEN) is not None
    fast.save_pretrained(out)
    print(f"wrote {out} ({len(fast)} tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
