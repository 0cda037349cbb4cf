"""Worker for tests/train/test_engine.py: trains a tiny Qwen3 with one engine on fixed data, writes what it saw.

Run as ``python tests/engine_worker.py ...`` (engine single) or under ``torchrun --nproc_per_node N``. Each
global step uses the same 4 sequences whatever the world size: rank r takes rows r::world, split into
``--accum`` micro-batches. Rank 0 writes {"losses", "grad_norms", "lrs", "state"} to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from r4b.config import EngineConfig
from r4b.train.engine import build_engine, init_distributed, is_main_process

GLOBAL_BATCH, SEQ, VOCAB = 4, 16, 64


def tiny_model() -> torch.nn.Module:
    """A 2-layer Qwen3 (hidden 32, vocab 64), same weights in every process."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config)


def batch(step: int) -> torch.Tensor:
    """The global batch of step `step`: fixed random token ids."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def lr_lambda(step: int) -> float:
    """Warm-up over 2 steps, then decay: a non-trivial schedule to save and restore."""
    return min(1.0, (step + 1) / 2) * 0.8**step


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Per-module lrs like the trainer's: an lr-0 group, a frozen param, names and Parameter objects mixed."""
    model.model.layers[0].self_attn.q_norm.weight.requires_grad_(False)  # frozen: excluded from the optimizer
    named = dict(model.named_parameters())
    return [
        {"name": "embed", "lr": 0.0, "params": ["model.embed_tokens.weight"]},
        {"name": "llm", "lr": 3e-3, "params": [p for n, p in named.items() if n.startswith("model.layers.")]},
        {"name": "head", "lr": 1e-3, "params": ["model.norm.weight", "lm_head.weight"]},
        {"name": "empty", "lr": 1e-3, "params": []},
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="single")
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--grad-clip", type=float, default=0.5)
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--save-at", type=int, default=-1, help="save after this many steps into --ckpt")
    ap.add_argument("--load", action="store_true", help="resume from --ckpt (at step --save-at)")
    ap.add_argument("--ckpt", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(1)
    rank, world = init_distributed()
    model = tiny_model()
    config = EngineConfig(
        kind=args.kind,
        zero_stage=args.zero_stage,
        grad_clip=args.grad_clip,
        mixed_precision=args.mixed_precision,
        activation_checkpointing=args.activation_checkpointing,
    )
    engine = build_engine(model, param_groups(model), lr_lambda, config, weight_decay=0.01)
    start = 0
    if args.load:
        engine.load(args.ckpt)
        start = args.save_at

    losses, norms, lrs = [], [], []
    for step in range(start, args.steps):
        rows = batch(step)[rank::world].to(engine.device)
        micro = rows.chunk(args.accum)
        total = torch.zeros((), dtype=torch.float64, device=engine.device)  # NCCL reduces device tensors only
        for ids in micro:
            loss = engine.module(input_ids=ids, labels=ids).loss
            engine.backward(loss / args.accum)
            total += loss.detach().double() / args.accum
        if dist.is_initialized():
            dist.all_reduce(total)
            total /= world
        lrs.append(engine.lrs())
        norms.append(engine.step())
        losses.append(float(total))
        if step + 1 == args.save_at and not args.load:
            engine.save(args.ckpt)

    state = engine.full_state_dict()
    # the rollout sync's stream (every rank, one tensor at a time, on the device) gives the same weights
    streamed = {k: v.cpu() for k, v in engine.full_tensors()}
    streamed_bf16 = {k: v.cpu() for k, v in engine.full_tensors(torch.bfloat16)}
    if is_main_process():
        same = set(streamed) == set(state) and all(torch.equal(streamed[k].float(), state[k]) for k in state)
        same_bf16 = set(streamed_bf16) == set(state) and all(
            torch.equal(streamed_bf16[k], state[k].to(torch.bfloat16)) for k in state
        )
        out = {"losses": losses, "grad_norms": norms, "lrs": lrs, "state": state, "world": world}
        torch.save(out | {"streamed_equal": same, "streamed_bf16_equal": same_bf16}, args.out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
