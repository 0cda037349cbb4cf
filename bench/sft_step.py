"""A packed SFT step against the padded Hugging Face-style step, on the same samples.

    python bench/sft_step.py            # a Qwen3-0.6B-sized R-4B language model on a GPU, bf16
    python bench/sft_step.py --smoke    # the tiny embedded model on a CPU: a check that it runs

Both sides train the same model on the same samples (lengths from a long-tailed distribution, as in
annealing data) for one forward+backward over the whole batch:
- r4b: samples packed into token-budget micro-batches (best-fit decreasing), varlen attention
  (r4b_varlen), the fused linear cross-entropy on the final hidden states (no [N, V] logits);
- hf-padded: micro-batches of a fixed number of samples right-padded to their longest, sdpa with a
  padding mask, the stock forward with ``labels`` (full logits + cross-entropy).
Reports tokens/s over the real (non-pad) tokens, the padding share and the peak memory; each row records what ran
(the attention backend setting and the fused-loss method). Rows stream into ``rows-<device>-<date>.jsonl`` and the
JSON as they are measured (bench/common.py: Results). Writes bench/results/sft_step-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, error_row, exit_code, median_ms, peak_gib, print_table

from r4b.kernels import fused_grad
from r4b.models import build_tiny_r4b, tiny_r4b_config
from r4b.models.attention_backends import attention_backend
from r4b.models.r4b_model import RForConditionalGeneration
from r4b.packing import plan_micro_batches
from r4b.train.objective import PackedSFTObjective

QWEN3_0_6B = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU check)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16384, help="packed micro-batch budget")
    parser.add_argument("--padded-batch", type=int, default=4, help="samples per padded micro-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples, args.max_tokens, args.repeats = 12, 256, 2
    return args


def full_size_config():
    """The tiny R-4B's config with Qwen3-0.6B's language model shape and R-4B's vocabulary."""
    config = tiny_r4b_config()
    text = config.text_config
    text.update(QWEN3_0_6B)
    text.layer_types = ["full_attention"] * text.num_hidden_layers  # sized by the constructor: one per layer
    return config


def build_model(smoke: bool, device: torch.device) -> RForConditionalGeneration:
    if smoke:
        return build_tiny_r4b(seed=0).to(device)
    config = full_size_config()
    with torch.device(device):
        model = RForConditionalGeneration(config)
    return model.to(torch.bfloat16)


def sample_lengths(n: int, smoke: bool, generator: torch.Generator) -> list[int]:
    """Log-normal lengths: most samples short, a long tail (annealing data mixes captions and long traces)."""
    median, cap = (24, 96) if smoke else (600, 8192)
    lengths = torch.distributions.LogNormal(torch.log(torch.tensor(float(median))), 1.0).sample((n,))
    return lengths.clamp(8, cap).long().tolist()


def ran(impl: str) -> dict:
    """What a row ran: r4b's packed step takes the r4b_varlen backend setting and r4b's fused loss; the padded
    step sdpa and the stock loss (full logits)."""
    if impl == "r4b":
        return {"attention": attention_backend(), "fused_loss_method": fused_grad.resolve_method(None)}
    return {"attention": "sdpa", "fused_loss_method": "none (full logits)"}


def run(args: argparse.Namespace, results: Results) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    model = build_model(args.smoke, device).train()
    vocab = model.config.text_config.vocab_size
    lengths = sample_lengths(args.samples, args.smoke, generator)
    # text tokens only (ids above the specials), so both paths see the same language-model work
    samples = [torch.randint(8, min(vocab, 900), (n,), generator=generator).to(device) for n in lengths]
    objective = PackedSFTObjective(model)

    bins = plan_micro_batches(lengths, args.max_tokens)
    packed_batches = []
    for b in bins:
        ids = torch.cat([samples[i] for i in b])
        targets = torch.cat([torch.cat([samples[i][1:], samples[i].new_full((1,), -100)]) for i in b])
        cu = torch.tensor([0, *torch.tensor([lengths[i] for i in b]).cumsum(0).tolist()], dtype=torch.int32)
        positions = torch.cat([torch.arange(lengths[i], device=device) for i in b])
        longest = max(lengths[i] for i in b)
        packed_batches.append(
            {"input_ids": ids, "position_ids": positions, "targets": targets, "cu_seqlens": cu.to(device),
             "max_seqlen": longest}
        )  # fmt: skip
    padded_batches = []
    for start in range(0, len(samples), args.padded_batch):
        chunk = samples[start : start + args.padded_batch]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(chunk):
            ids[row, : len(s)], mask[row, : len(s)] = s, 1
        padded_batches.append(dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)))

    def packed_step():
        for batch in packed_batches:
            objective(**batch).backward()
        model.zero_grad(set_to_none=True)

    def padded_step():
        model.set_attn_implementation("sdpa")
        for batch in padded_batches:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    real_tokens = sum(lengths)
    padded_tokens = sum(b["input_ids"].numel() for b in padded_batches)
    params = sum(p.numel() for p in model.parameters())
    results.update(model_params=params, dtype=str(next(model.parameters()).dtype))
    for impl, step, micro, computed in (
        ("r4b", packed_step, len(packed_batches), real_tokens),
        ("hf-padded", padded_step, len(padded_batches), padded_tokens),
    ):
        row = {"impl": impl, "samples": len(samples), "tokens": real_tokens, "computed_tokens": computed,
               "pad_frac": 1 - real_tokens / computed, "micro_batches": micro, **ran(impl)}  # fmt: skip
        with error_row(row):  # an OOM or a failing step is this row's error; the other side still runs
            row["ms"] = median_ms(step, warmup=1, repeats=args.repeats)
            row["tokens_per_s"] = real_tokens / (row["ms"] * 1e-3)
            row["peak_gib"] = peak_gib(step)
        model.zero_grad(set_to_none=True)
        results.add("rows", row)


def ratios(rows: list[dict]) -> list[dict]:
    """The padded step's time (and peak memory) over r4b's, same run."""
    timed = {r["impl"]: r for r in rows if "ms" in r and "error" not in r}
    if timed.keys() != {"r4b", "hf-padded"}:
        return []
    ours, theirs = timed["r4b"], timed["hf-padded"]
    out = {"vs": "hf-padded", "r4b_speedup": theirs["ms"] / ours["ms"]}
    if ours["peak_gib"] is not None and ours["peak_gib"] > 0:
        out["r4b_mem_ratio"] = theirs["peak_gib"] / ours["peak_gib"]
    return [out]


def main(argv=None) -> int:
    args = parse_args(argv)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = Results("sft_step", args.out, ("transformers",), config)
    status = results.run(lambda: run(args, results))
    rows = results.section("rows")
    results.update(ratios=ratios(rows))
    path = results.finish(status)
    columns = ["impl", "samples", "tokens", "computed_tokens", "pad_frac", "micro_batches", "ms", "tokens_per_s",
               "peak_gib", "attention", "error"]  # fmt: skip
    params = results.payload.get("model_params", 0)
    print_table(f"SFT step, {results.env['device']}, {params / 1e6:.1f}M params", rows, columns)
    print_table("r4b vs the padded step (same run)", results.payload["ratios"], ["vs", "r4b_speedup", "r4b_mem_ratio"])
    print(f"wrote {path} ({status}; rows also in {results.rows_path})")
    return exit_code(status)


if __name__ == "__main__":
    raise SystemExit(main())
