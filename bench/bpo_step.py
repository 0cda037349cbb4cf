"""BPO policy update: shared-prefix packing against unshared packing, on the same batch, in the same run.

    python bench/bpo_step.py              # GPU: 8 prompts of ~1000 tokens (image + text), 2g = 16 responses each
    python bench/bpo_step.py --smoke      # tiny sizes on a CPU: a check that it runs

A BPO batch: every prompt has g thinking and g non-thinking responses (lengths uniform in
[resp-min, resp-max]); the two modes have different prompt suffixes, so a prompt is two shared-prefix
entries. ``r4b-shared`` packs each entry once with its responses (segment ids, the vision tower once per
entry); ``unshared`` packs every response with its own copy of the prompt and image (what trainers
without prompt sharing do). Both run the same model, fused loss and engine. Timed: one
``policy_update`` (forward + backward + optimizer step, off-policy ratio, token-mean) and the
forward-only ``compute_logprobs``; r4b's rows record what ran (the attention backend setting, the fused-loss
method). Rows stream into ``rows-<device>-<date>.jsonl`` and the JSON as they are measured (bench/common.py:
Results). Writes bench/results/bpo_step-<device>-<date>.json.

Whole RL steps (``--full-step-steps``; rollout, reward, log-probs, update, with the time split) of the embedded
tiny model (image + text, untrained) on the synthetic task, all in the same run: ``r4b bpo`` shared vs unshared,
r4b's GRPO baseline (``rollout.strategy=grpo``: 2g auto-mode rollouts, shared prefix) and TRL's ``GRPOTrainer``
(``trl-grpo``; ``--no-trl`` skips it, and it is recorded as skipped where TRL is not importable).

TRL runs the same multimodal model, not a text-only stand-in: its VLM path takes a transformers processor, so
the bench wraps transformers' ``LlavaOnevisionProcessor`` (video half dropped: it needs torchvision) around r4b's
tokenizer, chat template and tile settings, and checks that it renders the first prompt to the same token ids and
pixels as r4b's rollout encoding. Matched with r4b's GRPO run: initial weights (the tiny model's seed), the
prompts of each step in the same order, r4b's answer reward on the same text (auto suffix + completion), 2g
rollouts per prompt in auto mode (TRL has no forced modes, so against r4b's BPO rows the rollouts differ: g
thinking + g non-thinking there), max new tokens, temperature / top-p / top-k, beta=0 (no reference model), one
PPO epoch (``num_iterations=1``, on-policy), clip 0.2 / 0.28, token-mean loss (TRL ``bnpo``), group-std reward
scaling, one optimizer step per step over all 2g x prompts completions, r4b's AdamW groups and LR schedule
(``optimizers=``), gradient clipping, fp32 on both (the demo config has no mixed precision) and no activation
checkpointing. Not matched, by design: TRL generates all rows in one ``generate`` call (r4b: ``rollout.batch_size``
rows per call), pads rows instead of packing (``packed_tokens`` is its padded prompt + completion tokens) and
computes entropies in its loss; r4b's BPO rows also train the mode-decision token. TRL's split: ``rollout_ms`` is
its ``_generate``, ``reward_ms`` its ``_calculate_rewards``, ``logprobs_ms`` the rest of its scoring (image
processing for the forward, advantages), ``update_ms`` the loss forward, backward and optimizer step; a step is
timed from ``on_step_begin`` to ``on_step_end``. ``trl_ratios`` holds TRL time / r4b time (>1: r4b faster).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if "--smoke" in sys.argv and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "0"  # on a CPU, the torch reference path (the interpreter is far too slow)

import torch
from PIL import Image
from transformers import Qwen3Config, SiglipVisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, error_row, exit_code, median_ms, peak_gib, print_table, synchronize

from r4b.config import EngineConfig
from r4b.kernels import fused_grad
from r4b.models.attention_backends import attention_backend
from r4b.models.image_processing import RImageProcessor
from r4b.models.r4b_model import RConfig, RForConditionalGeneration
from r4b.rl import BPOObjective, RolloutBatch, UpdateConfig, compute_logprobs, policy_update
from r4b.rl.batch import chunk_tokens
from r4b.train.engine import build_engine

if TYPE_CHECKING:
    from r4b.train.bpo import BPOTrainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
IMAGE_TOKEN_ID = 3  # <image> in the bench vocabulary
SUFFIX = {"thinking": [11, 12, 13], "non_thinking": [11, 12, 12, 14]}  # stand-ins for the two mode suffixes
FULL_STEP = "full-step (tiny model)"
# r4b's loss_agg_mode -> TRL's loss_type with the same token weighting (one process, no gradient accumulation).
TRL_LOSS = {"token-mean": "bnpo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


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


def ran() -> dict:
    """What r4b's rows ran: the r4b_varlen backend setting and r4b's fused-loss method."""
    return {"attention": attention_backend(), "fused_loss_method": fused_grad.resolve_method(None)}


def run(args: argparse.Namespace, results: Results) -> None:
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
                "packed_tokens": packed, **ran(),
            }  # fmt: skip
            with error_row(row):  # an OOM or a failing update is this row's error; the run goes on
                row["ms"] = median_ms(fn, warmup=args.warmup, repeats=args.repeats)
                row["peak_gib"] = peak_gib(fn)
                row["response_tokens_per_s"] = row["response_tokens"] / (row["ms"] * 1e-3)
            results.add("rows", row)
    results.update(trl={"version": None, "skipped": "--full-step-steps 0"})
    if args.full_step_steps:
        results.update(trl=full_step_rows(args, results))


def full_step_rows(args: argparse.Namespace, results: Results) -> dict:
    """Whole ``r4b bpo`` steps (rollout, reward, log-probs, update) of the embedded tiny model on the synthetic
    task: BPO shared vs unshared (the rollouts are the same for both, seeded by the step, so only the update
    differs), r4b's GRPO baseline (2g auto-mode rollouts) and TRL's GRPOTrainer on the same model, prompts and
    reward; each row into ``results`` as it is measured. Returns what was run for TRL (its version, settings, or why
    it was skipped)."""
    import tempfile

    from r4b.config import load_config
    from r4b.synth import write_synthetic
    from r4b.train.bpo import BPOConfig, BPOTrainer

    runs = [("r4b-shared", "bpo", True), ("unshared", "bpo", False), ("r4b-shared-grpo", "grpo", True)]
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_synthetic(data, n_sft=1, n_rl=args.prompts * (args.full_step_steps + 1), n_eval=1)
        for impl, strategy, shared in runs:
            overrides = [
                f"output_dir={Path(tmp) / impl}", "model.path=null", f"data.prompts=[{data / 'rl.jsonl'}]",
                "data.eval=null", f"rollout.group_size={args.g}", f"rollout.max_new_tokens={args.full_step_tokens}",
                f"rollout.strategy={strategy}", f"train.prompts_per_step={args.prompts}",
                f"policy.shared_prefix={str(shared).lower()}", "train.tensorboard=false", "train.progress=false",
                "policy.beta=0",  # no reference model, as TRL's arm (the demo config's KL is not what is timed)
            ]  # fmt: skip
            row = {"impl": impl, "mode": FULL_STEP, "rollouts": rollouts_label(strategy, args.g), **ran()}
            row["prompts"] = args.prompts
            with error_row(row):  # a failing run is this row's error; the others still run
                trainer = BPOTrainer(load_config(BPOConfig, CONFIGS / "bpo.yaml", overrides))
                steps = [trainer.step(step) for step in range(args.full_step_steps + 1)][1:]  # step 0 warms up
                split = {k: sum(s["time"][k] for s in steps) / len(steps) * 1e3 for k in steps[0]["time"]}
                row |= {"responses": steps[0]["responses"], "packed_tokens": steps[0]["packed_tokens"],
                        "ms": sum(split.values()), **{f"{k}_ms": v for k, v in split.items()}}  # fmt: skip
                if strategy == "grpo":  # TRL gets the GRPO run's config, prompts and initial weights
                    reference = trainer
            results.add("rows", row)
        trl_row, trl_info = None, {"version": None, "skipped": "--no-trl"}
        if args.trl and reference is None:
            trl_info["skipped"] = "r4b's GRPO full-step run failed: nothing to match"
        elif args.trl:
            trl_row, trl_info = trl_full_step_row(args, reference, Path(tmp) / "trl")
        if trl_row is not None:
            results.add("rows", trl_row)
    return trl_info


def rollouts_label(strategy: str, g: int) -> str:
    return f"bpo: {g} thinking + {g} non-thinking" if strategy == "bpo" else f"grpo: {2 * g} auto"


def trl_full_step_row(args: argparse.Namespace, reference: BPOTrainer, out_dir: Path) -> tuple[dict | None, dict]:
    """TRL's ``GRPOTrainer`` whole steps (generation, reward, loss + backward + optimizer step) on what ``reference``
    (r4b's GRPO-baseline run) trained: the same tiny model weights, prompts per step, reward, sampling, clip range
    and optimizer. ``(None, {"skipped": ...})`` where TRL is not importable."""
    try:
        import trl
        from trl import GRPOConfig, GRPOTrainer
    except Exception as error:  # TRL carried with --no-deps may fail in any way: a row, not the whole run
        print(f"TRL skipped: not importable ({error})", flush=True)
        return None, {"version": None, "skipped": f"trl not importable: {error}"}

    config = reference.config
    g2 = 2 * config.rollout.group_size
    settings = {
        "num_generations": g2, "rollouts": f"{g2} per prompt in auto mode (prompt ends with <think>), the GRPO "
        f"baseline; r4b's BPO rows force {g2 // 2} thinking + {g2 // 2} non-thinking instead",
        "per_device_train_batch_size": args.prompts * g2, "gradient_accumulation_steps": 1,
        "max_completion_length": config.rollout.max_new_tokens, "temperature": config.rollout.temperature,
        "top_p": config.rollout.top_p, "top_k": config.rollout.top_k, "beta": config.policy.beta,
        "num_iterations": config.policy.ppo_epochs, "epsilon": config.policy.clip_eps_low,
        "epsilon_high": config.policy.clip_eps_high,
        "loss_type": TRL_LOSS[UpdateConfig.from_policy(config.policy).aggregation],
        "scale_rewards": "group" if config.advantages.scale_by_std else "none",
        "max_grad_norm": config.engine.grad_clip, "bf16": config.engine.mixed_precision == "bf16",
        "activation_checkpointing": config.engine.activation_checkpointing,
    }  # fmt: skip
    info = {
        "version": trl.__version__, "trainer": "trl.GRPOTrainer", **settings,
        "generation": "transformers generate (use_vllm=False), one call for the step's prompts x num_generations",
        "optimizer": "r4b's AdamW parameter groups and LambdaLR schedule, passed as optimizers=",
        "processor": "transformers LlavaOnevisionProcessor over r4b's tokenizer, chat template and tile settings "
        "(checked: same prompt ids and pixels as r4b's rollout encoding)",
        "timed": "on_step_begin to on_step_end (the dataloader's batch fetch and the logging are outside)",
    }  # fmt: skip
    row = {"impl": "trl-grpo", "mode": FULL_STEP, "rollouts": rollouts_label("grpo", config.rollout.group_size)}
    row |= {"prompts": args.prompts, "responses": args.prompts * g2, "trl_version": trl.__version__}
    try:
        trainer, timer = build_trl_trainer(args, reference, out_dir, GRPOConfig, GRPOTrainer, settings)
        trainer.train()
        if len(timer.steps) != args.full_step_steps + 1:
            raise RuntimeError(f"TRL ran {len(timer.steps)} steps, not {args.full_step_steps + 1}")
        steps = timer.steps[1:]  # step 0 warms up, as for r4b
        split = {k: sum(s[k] for s in steps) / len(steps) * 1e3 for k in ("rollout", "reward", "logprobs", "update")}
        row |= {"packed_tokens": steps[0]["tokens"], "ms": sum(s["total"] for s in steps) / len(steps) * 1e3}
        row |= {f"{k}_ms": v for k, v in split.items()}
    except Exception as error:  # a TRL API change must not lose the rest of the run; the test checks "ms"
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {error}"[:300]
    return row, info


def build_trl_trainer(
    args: argparse.Namespace, reference: BPOTrainer, out_dir: Path, config_cls: type, trainer_cls: type, settings: dict
) -> tuple[Any, Any]:
    """A ``GRPOTrainer`` on a fresh copy of the reference run's initial model, its prompts in its step order, and a
    timer that splits each step into rollout / reward / log-probs (TRL's remaining scoring) / update."""
    import math
    import time

    from datasets import Dataset
    from transformers import LlavaOnevisionProcessor, PrinterCallback, TrainerCallback
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from r4b.format import MODE_SUFFIX
    from r4b.models.image_processing import SIGLIP_MEAN, SIGLIP_STD
    from r4b.models.loading import load_model_and_processor
    from r4b.models.tokenizer import CHAT_TEMPLATE, IMAGE_TOKEN
    from r4b.rl import REWARDS
    from r4b.rollout import Prompt, encode_prompt
    from r4b.train.bpo import prompt_indices
    from r4b.train.schedule import parameter_groups, warmup_cosine

    config = reference.config
    model, tokenizer, processor = load_model_and_processor(None, config.model.tokenizer, config.model.seed)
    model.to(reference.engine.device)  # before the optimizer is built over its parameters

    class TileProcessor(LlavaOnevisionProcessor):
        """LLaVA-OneVision's processor without its video half (which needs torchvision): TRL takes VLMs only
        through a transformers processor, and r4b's own image processor is not one."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    vision = model.config.vision_config
    tiles = LlavaOnevisionImageProcessorPil(
        size={"height": processor.image_size, "width": processor.image_size},
        image_grid_pinpoints=processor.image_grid_pinpoints, image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD),
    )  # fmt: skip
    trl_processor = TileProcessor(
        tiles, tokenizer, chat_template=CHAT_TEMPLATE, num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy, image_token=IMAGE_TOKEN,
        vision_aspect_ratio=processor.vision_aspect_ratio,
    )  # fmt: skip

    # The reference run's prompts in its step order: TRL's step k sees r4b's step k prompts (no shuffling).
    order = [
        i
        for step in range(args.full_step_steps + 1)
        for i in prompt_indices(step, config.train.prompts_per_step, len(reference.prompts), config.train.seed)
    ]
    records = []
    for i in order:
        prompt = Prompt.from_sample(reference.prompts[i])
        (image,) = [Image.open(path).convert("RGB") for path in prompt.images]
        records.append({"prompt": prompt.messages, "image": image, "answer": reference.prompts[i].answer})
    # Same inputs or no comparison: TRL's rendering of the first prompt must equal r4b's (ids and pixels).
    first = Prompt.from_sample(reference.prompts[order[0]])
    rendered = trl_processor.apply_chat_template(
        [[{**m, "content": [{**p, "image": records[0]["image"]} if p["type"] == "image" else p for p in m["content"]]}
          for m in first.messages]],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    ours = encode_prompt(tokenizer, processor, first, "auto")
    if rendered["input_ids"][0].tolist() != ours.ids:
        raise RuntimeError("TRL's processor renders other prompt ids than r4b's rollout encoding")
    if not torch.equal(rendered["pixel_values"][0], processor.preprocess(ours.images)["pixel_values"][0]):
        raise RuntimeError("TRL's processor makes other pixels than r4b's image processor")

    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}  # r4b's rollout stop tokens
    reward_fn, pattern = REWARDS[config.reward.name], config.reward.pattern

    def answer_reward(prompts: list, completions: list, completion_ids: list, answer: list, **_: Any) -> list:
        """r4b's reward on r4b's text: the auto suffix + the decoded completion without its stop token."""
        out = []
        for ids, gold in zip(completion_ids, answer, strict=True):
            ids = ids[:-1] if ids and ids[-1] in stops else ids
            text = MODE_SUFFIX["auto"] + tokenizer.decode(ids, skip_special_tokens=False)
            out.append(reward_fn(text, gold, **({"pattern": pattern} if pattern else {})))
        return out

    lrs = {"llm": config.optim.lr_llm, "vision": config.optim.lr_vision, "projector": config.optim.lr_projector}
    groups = parameter_groups(model, lrs, [m for m in config.model.train if lrs[m] > 0])
    optimizer = torch.optim.AdamW(
        groups, lr=groups[0]["lr"], betas=tuple(config.optim.betas), eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )  # fmt: skip
    steps = config.train.steps
    schedule = warmup_cosine(steps, math.ceil(config.optim.warmup_ratio * steps), config.optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule] * len(groups))

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step and of the trainer methods inside it."""

        def __init__(self) -> None:
            self.steps: list[dict] = []
            self.current: dict = {}

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            synchronize()
            self.current = {"rollout": 0.0, "reward": 0.0, "score": 0.0, "tokens": 0, "start": time.perf_counter()}

        def on_step_end(self, *_: Any, **__: Any) -> None:
            synchronize()
            c = self.current
            c["total"] = time.perf_counter() - c.pop("start")
            # "logprobs": the scoring TRL does besides generation and rewards (image processing for the forward,
            # old / reference log-probs when needed, advantages); "update": loss forward + backward + optimizer step.
            c["logprobs"] = c["score"] - c["rollout"] - c["reward"]
            c["update"] = c["total"] - c["score"]
            self.steps.append(c)

    timer = StepTimer()
    trl_args = config_cls(
        output_dir=str(out_dir), max_steps=args.full_step_steps + 1, learning_rate=config.optim.lr_llm,
        shuffle_dataset=False, seed=config.train.seed, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_pin_memory=torch.cuda.is_available(),
        **{k: v for k, v in settings.items() if k not in ("rollouts",)},
    )  # fmt: skip
    trainer = trainer_cls(
        model=model, reward_funcs=answer_reward, args=trl_args, train_dataset=Dataset.from_list(records),
        processing_class=trl_processor, callbacks=[timer], optimizers=(optimizer, scheduler),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dump; the row holds what is measured

    def timed(key: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            out = fn(*a, **k)
            synchronize()
            timer.current[key] += time.perf_counter() - start
            if key == "score":  # the rows the loss forward runs: padded prompt + completion
                timer.current["tokens"] += out["prompt_ids"].numel() + out["completion_ids"].numel()
            return out

        return wrapper

    # Instance attributes shadow the methods TRL calls through self (generation, rewards, all scoring).
    trainer._generate = timed("rollout", trainer._generate)
    trainer._calculate_rewards = timed("reward", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("score", trainer._generate_and_score_completions)
    return trainer, timer


def ratios(rows: list[dict]) -> list[dict]:
    """unshared time / shared time (and memory), same mode, same run."""
    ours = {r["mode"]: r for r in rows if r["impl"] == "r4b-shared" and "ms" in r and "error" not in r}
    out = []
    for r in rows:
        base = ours.get(r["mode"])
        if r["impl"] != "unshared" or base is None or "ms" not in r or "error" in r:
            continue
        mem = r.get("peak_gib") and base.get("peak_gib") and r["peak_gib"] / base["peak_gib"]
        out.append({
            "mode": r["mode"], "vs": r["impl"], "shared_speedup": r["ms"] / base["ms"],
            "packed_token_ratio": r["packed_tokens"] / base["packed_tokens"], "memory_ratio": mem,
        })  # fmt: skip
    return out


def trl_ratios(rows: list[dict]) -> list[dict]:
    """TRL step time / r4b step time (>1: r4b faster), whole step and per phase, for r4b's BPO and GRPO rows."""
    trl = next((r for r in rows if r["impl"] == "trl-grpo" and "ms" in r and "error" not in r), None)
    if trl is None:
        return []
    out = []
    for r in rows:
        if r["mode"] != FULL_STEP or r["impl"] not in ("r4b-shared", "r4b-shared-grpo") or "error" in r:
            continue
        entry = {"r4b": r["impl"], "r4b_rollouts": r["rollouts"], "vs": "trl-grpo", "speedup": trl["ms"] / r["ms"]}
        for phase in ("rollout", "reward", "update"):
            ours = r[f"{phase}_ms"] + (r["logprobs_ms"] if phase == "update" else 0.0)
            theirs = trl[f"{phase}_ms"] + (trl["logprobs_ms"] if phase == "update" else 0.0)
            entry[f"{phase}_speedup"] = theirs / ours if ours > 0 else None
        entry["token_ratio"] = trl["packed_tokens"] / r["packed_tokens"]
        out.append(entry)
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
    parser.add_argument("--no-trl", dest="trl", action="store_false", help="skip TRL's GRPOTrainer full steps")
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
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results = Results("bpo_step", args.out, ("transformers", "trl", "accelerate"), config)
    status = results.run(lambda: run(args, results))
    rows = results.section("rows")
    results.update(ratios=ratios(rows), trl_ratios=trl_ratios(rows))
    path = results.finish(status)
    payload = results.payload
    device = results.env["device"]
    update_rows = [r for r in rows if r["mode"] != FULL_STEP]
    columns = ["impl", "mode", "responses", "prompt_len", "packed_tokens", "ms", "peak_gib", "response_tokens_per_s"]
    print_table(f"BPO policy update, {device}", update_rows, [*columns, "error"])
    full_rows = [r for r in rows if r["mode"] == FULL_STEP]
    phases = ["rollout_ms", "reward_ms", "logprobs_ms", "update_ms"]
    print_table(f"whole RL steps, tiny model, {device}", full_rows,
                ["impl", "rollouts", "responses", "packed_tokens", "ms", *phases, "error"])  # fmt: skip
    print_table("shared prefix vs unshared (same run)", payload["ratios"],
                ["mode", "vs", "shared_speedup", "packed_token_ratio", "memory_ratio"])  # fmt: skip
    trl = payload.get("trl", {})
    if trl.get("version"):
        print_table(f"TRL {trl['version']} GRPOTrainer time / r4b time (same run; >1: r4b faster)",
                    payload["trl_ratios"], ["r4b", "r4b_rollouts", "vs", "speedup", "rollout_speedup",
                                            "reward_speedup", "update_speedup", "token_ratio"])  # fmt: skip
    else:
        print(f"TRL skipped: {trl.get('skipped')}")
    print(f"wrote {path} ({status}; rows also in {results.rows_path})")
    return exit_code(status)


if __name__ == "__main__":
    raise SystemExit(main())
