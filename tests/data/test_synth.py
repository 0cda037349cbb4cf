"""The synthetic task: deterministic from the seed, the documented proportions, records the data layer accepts."""

import filecmp

from r4b.data import read_jsonl
from r4b.synth import make_items, write_synthetic


def test_same_seed_same_files_other_seed_other_items(tmp_path):
    for name in ("a", "b"):
        write_synthetic(tmp_path / name, n_sft=24, n_rl=8, n_eval=8, seed=3)
    for path in sorted((tmp_path / "a").rglob("*")):
        if path.is_file():
            assert filecmp.cmp(path, tmp_path / "b" / path.relative_to(tmp_path / "a"), shallow=False), path.name
    assert make_items(24, seed=3) != make_items(24, seed=4)


def test_items_are_correct_and_in_proportion():
    items = make_items(3000, seed=0)
    hard = [i for i in items if i.difficulty == "hard"]
    assert abs(len(hard) / len(items) - 1 / 3) < 0.03  # the paper's share of thinking samples
    for item in items:
        if item.difficulty == "hard":
            assert int(item.answer) == item.number * item.count + item.offset
            assert item.reasoning.endswith(f"= {item.answer}.")
        else:
            assert item.answer == str(item.count) and item.reasoning is None


def test_files_load_with_the_data_layer(tmp_path):
    counts = write_synthetic(tmp_path, n_sft=30, n_rl=10, n_eval=10, seed=0)
    sft, _ = read_jsonl(tmp_path / "sft.jsonl")
    rl, _ = read_jsonl(tmp_path / "rl.jsonl")
    assert len(sft) == 30 and len(rl) == 10 and counts["sft"]["hard"] == sum(s.mode == "thinking" for s in sft)
    assert all(s.answer and s.meta["difficulty"] in ("easy", "hard") and not s.has_response for s in rl)
