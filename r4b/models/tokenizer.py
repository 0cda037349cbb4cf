"""R-4B's chat template and the tiny tokenizer shipped with r4b (the embedded default).

R-4B's prompt is ChatML with an ``<image>`` placeholder; the mode is forced by what follows
``<|im_start|>assistant\\n``: the template's ``thinking_mode`` (:data:`TEMPLATE_MODE`) renders the mode's suffix,
:data:`r4b.format.MODE_SUFFIX` (the think tags, modes and response format live in :mod:`r4b.format`).
"""

from __future__ import annotations

from pathlib import Path

from r4b.format import THINK_CLOSE, THINK_OPEN

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN)
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)

# The chat template's `thinking_mode` switch uses R-4B's own names.
TEMPLATE_MODE = {"auto": "auto", "thinking": "long", "non_thinking": "short"}

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-tokenizer"


def chat_template(image: str = "<image>\\n", text_filter: str = "") -> str:
    """R-4B's chat template (ChatML, ``thinking_mode`` = auto | long | short picks the suffix after
    ``<|im_start|>assistant\\n``), an image part rendered as ``image`` (a Jinja string literal's body) and
    text passed through the Jinja ``text_filter`` (e.g. ``" | replace('<image>', ...)"``)."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content']" + text_filter + " }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text']" + text_filter + " }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
        "{%- if thinking_mode is defined and thinking_mode == 'long' -%}{{ '<think>\\n' }}"
        "{%- elif thinking_mode is defined and thinking_mode == 'short' -%}{{ '<think>\\n\\n</think>' }}"
        "{%- else -%}{{ '<think>' }}{%- endif -%}"
        "{%- endif -%}"
    )


CHAT_TEMPLATE = chat_template()


def load_tokenizer(path: str | Path | None = None):
    """A Hugging Face tokenizer from ``path`` (a local model directory), by default the tiny one."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path or TINY_TOKENIZER_DIR))
