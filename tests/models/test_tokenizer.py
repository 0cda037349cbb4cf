"""The tiny tokenizer shipped in r4b/assets: R-4B's specials, prompt format and mode suffixes."""

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from r4b.format import MODE_SUFFIX, MODES, format_response
from r4b.models.tokenizer import TEMPLATE_MODE, TINY_TOKENIZER_DIR, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_newline_and_blank_line_are_distinct_single_tokens(tokenizer):
    newline, blank = tokenizer.encode("\n"), tokenizer.encode("\n\n")
    assert len(newline) == len(blank) == 1 and newline != blank


@pytest.mark.parametrize("token", ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<think>", "</think>"])
def test_specials_are_single_tokens(tokenizer, token):
    assert len(tokenizer.encode(token)) == 1
    assert len(tokenizer.encode(f"a{token}b")) == 3


@pytest.mark.parametrize("mode", MODES)
def test_chat_template_ends_with_the_mode_suffix(tokenizer, mode):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many stars?"}]}]
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, thinking_mode=TEMPLATE_MODE[mode]
    )
    assert text == f"<|im_start|>user\n<image>\nHow many stars?<|im_end|>\n<|im_start|>assistant\n{MODE_SUFFIX[mode]}"
    ids = tokenizer.encode(text)
    suffix = tokenizer.encode(MODE_SUFFIX[mode])
    assert ids[-len(suffix) :] == suffix


def test_the_token_after_think_is_the_mode_decision(tokenizer):
    thinking = tokenizer.encode(format_response("12", "5 + 7 = 12."))
    direct = tokenizer.encode(format_response("12", None))
    think = tokenizer.convert_tokens_to_ids("<think>")
    assert thinking[0] == direct[0] == think
    assert thinking[1] == tokenizer.encode("\n")[0] and direct[1] == tokenizer.encode("\n\n")[0]
    assert tokenizer.decode(thinking) == "<think>\n5 + 7 = 12.\n</think>\n\n12"


@pytest.mark.subprocess
def test_build_script_reproduces_the_shipped_files(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_tiny_tokenizer.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for path in TINY_TOKENIZER_DIR.iterdir():
        assert filecmp.cmp(path, tmp_path / path.name, shallow=False), path.name
