"""Rendered-image questions at two difficulties, deterministic from a seed.

Each picture shows a number written large on the left and a few shapes of one kind stacked on the right.
- easy: "How many circles are there?" - answerable at a glance: a direct (non-thinking) answer.
- hard: "Multiply the number in the picture by the number of circles, then add 7." - needs several
  steps: a thinking sample whose trace reads both quantities and does the arithmetic.
Annealing data takes thinking traces for hard items and direct answers for easy ones, in the
paper's proportion (about 1/3 thinking) by default.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from r4b.format import format_response

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "blue", "green")
IMAGE_SIZE = 56
NUMBERS = (1, 5)  # the written number's range: few distinct values, drawn large, so the tiny vision tower reads it
FONT_SIZE = 40  # a digit ~23 x 29 pixels over the left half of the image


@dataclass(frozen=True)
class SynthItem:
    id: str
    difficulty: str  # "easy" | "hard"
    shape: str
    count: int
    number: int
    offset: int
    question: str
    answer: str
    reasoning: str | None  # the step-by-step trace for hard items

    @property
    def image_name(self) -> str:
        return f"images/{self.id}.png"


def make_items(n: int, seed: int, *, hard_fraction: float = 1 / 3, prefix: str = "item") -> list[SynthItem]:
    rng = random.Random(seed)
    items = []
    for index in range(n):
        shape, count, number, offset = rng.choice(SHAPES), rng.randint(1, 4), rng.randint(*NUMBERS), rng.randint(1, 9)
        if rng.random() < hard_fraction:
            question = f"Multiply the number in the picture by the number of {shape}s, then add {offset}."
            product = number * count
            answer = str(product + offset)
            reasoning = (
                f"The number in the picture is {number}.\nThere are {count} {shape}s.\n"
                f"{number} * {count} = {product}.\n{product} + {offset} = {answer}."
            )
            difficulty = "hard"
        else:
            question, answer, reasoning, difficulty = f"How many {shape}s are there?", str(count), None, "easy"
        items.append(
            SynthItem(f"{prefix}-{index:05d}", difficulty, shape, count, number, offset, question, answer, reasoning)
        )
    return items


def render(item: SynthItem) -> Image.Image:
    """The picture: ``number`` written large over the left half (so it spans many vision patches and the tiny
    vision tower can read it) and ``count`` shapes stacked in the right column."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=FONT_SIZE)
    left, top, right, bottom = font.getbbox(str(item.number))
    x, y = (30 - (right - left)) // 2 - left, (IMAGE_SIZE - (bottom - top)) // 2 - top
    draw.text((x, y), str(item.number), fill="black", font=font)
    color = COLORS[SHAPES.index(item.shape)]
    for k in range(item.count):
        x, y = 38, 2 + k * 14
        box = (x, y, x + 11, y + 11)
        if item.shape == "circle":
            draw.ellipse(box, fill=color)
        elif item.shape == "square":
            draw.rectangle(box, fill=color)
        else:
            draw.polygon([(x + 5, y), (x, y + 11), (x + 11, y + 11)], fill=color)
    return image


def _user_message(item: SynthItem) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}


def _sft_record(item: SynthItem) -> dict:
    mode = "thinking" if item.reasoning is not None else "non_thinking"
    response = format_response(item.answer, item.reasoning)
    return {
        "messages": [_user_message(item), {"role": "assistant", "content": response}],
        "images": [item.image_name],
        "mode": mode,
        "answer": item.answer,
    }


def _prompt_record(item: SynthItem) -> dict:
    return {
        "messages": [_user_message(item)],
        "images": [item.image_name],
        "answer": item.answer,
        "meta": {"id": item.id, "difficulty": item.difficulty},
    }


def write_synthetic(
    out_dir: str | Path, *, n_sft: int = 512, n_rl: int = 256, n_eval: int = 128, seed: int = 0
) -> dict:
    """Write ``sft.jsonl`` (bi-mode annealing), ``rl.jsonl`` (prompts with answers), ``eval.jsonl``
    (held out) and their images under ``out_dir``; returns the counts."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = {
        "sft": (make_items(n_sft, seed, prefix="sft"), _sft_record),
        "rl": (make_items(n_rl, seed + 1, hard_fraction=0.5, prefix="rl"), _prompt_record),
        "eval": (make_items(n_eval, seed + 2, hard_fraction=0.5, prefix="eval"), _prompt_record),
    }
    counts = {}
    for split, (items, record) in splits.items():
        with (out / f"{split}.jsonl").open("w") as handle:
            for item in items:
                render(item).save(out / item.image_name)
                handle.write(json.dumps(record(item)) + "\n")
        counts[split] = {"items": len(items), "hard": sum(i.difficulty == "hard" for i in items)}
    (out / "items.json").write_text(json.dumps(counts, indent=2))
    return counts
