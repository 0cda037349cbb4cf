"""RL prompt sets in other trainers' layouts (verl's, EasyR1's), for the tests of r4b.data.prompt_tables and of
BPO reading them: the same three questions as an r4b JSONL would hold them."""

import io

from PIL import Image

from r4b.data.prompt_tables import PromptKeys

VERL = PromptKeys(prompt="prompt", answer="reward_model.ground_truth", image="images")
EASYR1 = PromptKeys(prompt="problem", answer="answer", image="images")
QUESTIONS = [("Find x.", "3", "red"), ("How many sides?", "4", "blue"), ("What is 2 + 5?", "7", None)]


def png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), color).save(buffer, format="PNG")
    return buffer.getvalue()


def verl_rows() -> list[dict]:
    return [
        {
            "data_source": "geo3k",
            "prompt": [{"role": "user", "content": ("<image>" if color else "") + question}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "images": [{"bytes": png(color), "path": None}] if color else [],
            "extra_info": {"index": k},
        }
        for k, (question, answer, color) in enumerate(QUESTIONS)
    ]


def easyr1_rows() -> list[dict]:  # no placeholder: one per image goes before the problem
    return [
        {"problem": question, "answer": answer, "images": [png(color)] if color else []}
        for question, answer, color in QUESTIONS
    ]
