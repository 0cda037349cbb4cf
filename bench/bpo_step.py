"""BPO policy update: shared-prefix packing against unshared packing, on the same batch, in the same run.

    python bench/bpo_step.py              # GPU: 8 prompts of ~1000 tokens (image + text), 2g = 16 responses each
    python bench/bpo_step.py --smoke      # tiny sizes on a CPU: a check that it runs

Also times whole ``r4b bpo`` steps (rollout, reward, log-probs, update: ``--full-step-steps``) of the embedded
tiny model on the synthetic task, shared vs unshared, with the time split.

A BPO batch: every prompt has g thinking and g non-thinking responses (lengths uniform in
[resp-min, resp-max]); the two modes have different prompt suffixes, so a prompt is two shared-prefix
entries. ``r4b-shared`` packs each entry once with its responses (segment ids, the vision tower once per
entry); ``unshared`` packs every response with its own copy of the prompt and image (what trainers
without prompt sharing do). Both run the same model, fused loss and engine. Timed: one
``policy_update`` (forward + backward + optimizer step, off-policy ratio, token-mean) and the
forward-only ``compute_logprobs``. Writes bench/results/bpo_step-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0"  # on a CPU, the torch reference path (the interpreter is far too slow)

import torch
from PIL import Image
from transformers import Qwen3Config, SiglipVisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, median_ms, peak_gib, print_table, write_results

from r4b.models.image_processing import RImageProcessor
from r4b.models.r4b_model import RConfig, RForConditionalGeneration
from r4b.rl import BPOObjective, RolloutBatch, UpdateConfig, compute_logprobs, policy_update
from r4b.rl.batch import chunk_tokens
from r4b.train.engine import EngineConfig, build_engine

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
IMAGE_TOKEN_ID = 3  # <image> in the bench vocabulary
SUFFIX = {"thinking": [11, 12, 13], "non_thinking": [11, 12, 12, 14]}  # stand-ins for the two mode suffixes


def bench_config(args: argparse.Namespace) -> RConfig:
    """R-4B's architecture (SigLIP tower, MLP projector, Qwen3) at the sizes asked for."""
    text = Qwen3Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 4),
        head_dim=args.hidden // args.heads, max_position_embeddings=8192, tie_word_embeddings=False,
    )  # fmt: skip
    vision = SiglipVisionConfig(
        image_size=args.image_size, patch_size=14, hidden_size=args.vision_hidden,
        intermediate_size=4 * args.vision_hidden, num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 64), vision_use_head=False,
    )  # fmt: skip
    s = args.image_size
    return RConfig(
        text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]], vision_feature_select_strategy="full",
        vision_feature_layer=-1, tie_word_embeddings=False,
    )  # fmt: skip


def make_batch(args: argparse.Namespace, processor: RImageProcessor, seed: int = 0) -> RolloutBatch:
    """``prompts`` prompts of ~``prompt_len`` tokens (one image + text) x (g thinking + g non-thinking) responses."""
    gen = torch.Generator().manual_seed(seed)
    rand_ids = lambda n: torch.randint(20, args.vocab, (n,), generator=gen)
    prompt_ids, entry_prompts, modes, images, pixels, sizes = [], [], [], [], [], []
    for p in range(args.prompts):
        image = Image.new("RGB", (args.image_size, args.image_size), (40 * p % 255, 90, 160))
        vision = processor.preprocess([image])
        n_image = processor.num_image_tokens(args.image_size, args.image_size)
        body = torch.cat(
            [rand_ids(8), torch.full((n_image,), IMAGE_TOKEN_ID), rand_ids(max(1, args.prompt_len - 8 - n_image))]
        )
        for mode in ("thinking", "non_thinking"):
            prompt_ids.append(torch.cat([body, torch.tensor(SUFFIX[mode])]))
            entry_prompts.append(p)
            modes.append(mode)
            images.append([image])
            pixels.append(vision["pixel_values"])
            sizes.append(vision["image_sizes"])
    responses = args.prompts * 2 * args.g
    lengths = torch.randint(args.resp_min, args.resp_max + 1, (responses,), generator=gen)
    response_ids = rand_ids(responses * int(lengths.max())).view(responses, -1)
    groups = torch.arange(2 * args.prompts).repeat_interleave(args.g)
    advantages = torch.randn(responses, generator=gen)
    return RolloutBatch(
        prompt_ids, entry_prompts, modes, images, pixels, sizes, response_ids, lengths, groups, advantages,
        [modes[e] for e in groups.tolist()],
    )  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = bench_config(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RForConditionalGeneration(config)
    processor = RImageProcessor.from_config(config)
    batch = make_batch(args, processor)
    objective = BPOObjective(model)
    engine = build_engine(
        objective, [{"params": list(objective.parameters()), "lr": 1e-6, "name": "all"}], lambda step: 1.0,
        EngineConfig(grad_clip=1.0, mixed_precision="bf16" if device == "cuda" else "no"),
    )  # fmt: skip
    with torch.no_grad():  # stand-in rollout log-probs: off-policy ratios, as in a real update
        old = compute_logprobs(engine, batch, max_tokens=args.max_tokens) - 0.05

    rows = []
    for shared in (True, False):
        impl = "r4b-shared" if shared else "unshared"
        update = UpdateConfig(clip_eps_high=0.28, max_tokens=args.max_tokens, shared_prefix=shared)
        packed = sum(
            chunk_tokens(batch, e, rs, shared=shared) for e, rs in enumerate(batch.entry_responses())
        )  # before any splitting by the budget
        calls = {
            "update": lambda: policy_update(engine, batch, update, old_logprobs=old),
            "logprobs": lambda: compute_logprobs(engine, batch, max_tokens=args.max_tokens, shared_prefix=shared),
        }
        for mode, fn in calls.items():
            row = {
                "impl": impl, "mode": mode, "prompts": args.prompts, "responses": batch.num_responses,
                "prompt_len": int(batch.prompt_ids[0].numel()), "response_tokens": int(batch.response_lengths.sum()),
                "packed_tokens": packed,
            }  # fmt: skip
            try:
                row["ms"] = median_ms(fn, warmup=args.warmup, repeats=args.repeats)
                row["peak_gib"] = peak_gib(fn)
                row["response_tokens_per_s"] = row["response_tokens"] / (row["ms"] * 1e-3)
            except torch.OutOfMemoryError:
                row["error"] = "OOM"
                torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
    if args.full_step_steps:
        rows += full_step_rows(args)
    return {"rows": rows, "ratios": ratios(rows)}


def full_step_rows(args: argparse.Namespace) -> list[dict]:
    """Whole ``r4b bpo`` steps (rollout, reward, log-probs, update) of the embedded tiny model on the synthetic
    task, shared vs unshared; the rollouts are the same for both (seeded by the step), so only the update differs."""
    import tempfile

    from r4b.config import load_config
    from r4b.synth import write_synthetic
    from r4b.train.bpo import BPOConfig, BPOTrainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic(data, n_sft=1, n_rl=args.prompts * (args.full_step_steps + 1), n_eval=1)
        for shared in (True, False):
            overrides = [
                f"output_dir={Path(tmp) / str(shared)}", "model.path=null", f"data.prompts=[{data / 'rl.jsonl'}]",
                "data.eval=null", f"rollout.group_size={args.g}", f"rollout.max_new_tokens={args.full_step_tokens}",
                f"train.prompts_per_step={args.prompts}", f"policy.shared_prefix={str(shared).lower()}",
                "train.tensorboard=false", "train.progress=false",
            ]  # fmt: skip
            trainer = BPOTrainer(load_config(BPOConfig, CONFIGS / "bpo.yaml", overrides))
            steps = [trainer.step(step) for step in range(args.full_step_steps + 1)][1:]  # step 0 warms up
            split = {k: sum(s["time"][k] for s in steps) / len(steps) * 1e3 for k in steps[0]["time"]}
            rows.append({
                "impl": "r4b-shared" if shared else "unshared", "mode": "full-step (tiny model)",
                "prompts": args.prompts, "responses": steps[0]["responses"], "packed_tokens": steps[0]["packed_tokens"],
                "ms": sum(split.values()), **{f"{k}_ms": v for k, v in split.items()},
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """unshared time / shared time (and memory), same mode, same run."""
    ours = {r["mode"]: r for r in rows if r["impl"] == "r4b-shared" and "ms" in r}
    out = []
    for r in rows:
        base = ours.get(r["mode"])
        if r["impl"] == "r4b-shared" or base is None or "ms" not in r:
            continue
        mem = r.get("peak_gib") and base.get("peak_gib") and r["peak_gib"] / base["peak_gib"]
        out.append({
            "mode": r["mode"], "vs": r["impl"], "shared_speedup": r["ms"] / base["ms"],
            "packed_token_ratio": r["packed_tokens"] / base["packed_tokens"], "memory_ratio": mem,
        })  # fmt: skip
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU check that the benchmark runs")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--g", type=int, default=8, help="responses per mode (2g per prompt)")
    parser.add_argument("--prompt-len", type=int, default=1000, help="prompt tokens, image tokens included")
    parser.add_argument("--resp-min", type=int, default=50)
    parser.add_argument("--resp-max", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--image-size", type=int, default=224, help="tile side (SigLIP patch 14)")
    parser.add_argument("--vision-hidden", type=int, default=384)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16384, help="micro-batch token budget")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-step-steps", type=int, default=2, help="whole BPO steps to time (0 = skip)")
    parser.add_argument("--full-step-tokens", type=int, default=64, help="max new tokens per rollout, full steps")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.g, args.prompt_len, args.resp_min, args.resp_max = 2, 2, 40, 3, 12
        args.hidden, args.layers, args.heads, args.vocab = 32, 1, 2, 256
        args.image_size, args.vision_hidden, args.vision_layers = 28, 32, 1
        args.max_tokens, args.warmup, args.repeats = 256, 0, 1
        args.full_step_steps, args.full_step_tokens = 1, 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    payload["environment"] = environment()
    payload["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    columns = [
        "impl",
        "mode",
        "responses",
        "prompt_len",
        "packed_tokens",
        "ms",
        "peak_gib",
        "response_tokens_per_s",
        "rollout_ms",
        "update_ms",
        "error",
    ]
    print_table(f"BPO policy update, {payload['environment']['device']}", payload["rows"], columns)
    print_table("shared prefix vs unshared (same run)", payload["ratios"],
                ["mode", "vs", "shared_speedup", "packed_token_ratio", "memory_ratio"])  # fmt: skip
    path = write_results("bpo_step", payload, *([args.out] if args.out else []))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
