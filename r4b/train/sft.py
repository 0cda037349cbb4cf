"""Bi-mode annealing: packed SFT over thinking and non-thinking samples (``r4b sft``).

One optimizer step = one global batch of ``global_batch_samples`` samples, split across ranks and
packed into token-budget micro-batches (r4b.train.batches). The loss is the token mean over the
whole global batch: each micro-batch contributes its sum of token cross-entropies divided by the
global batch's labelled-token count, so the result does not depend on how the batch was packed or
how many processes share it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from r4b.train.batches import GlobalBatchPlanner, StepPlan
from r4b.train.checkpoint import save_checkpoint
from r4b.train.engine import EngineConfig, build_engine
from r4b.train.loader import MicroBatchLoader, default_workers, rank_micro_batches
from r4b.train.logging import RunLogger
from r4b.train.objective import PackedSFTObjective
from r4b.train.runtime import StopSignal, export_model, resume, start_run
from r4b.train.schedule import MODULES, parameter_groups, warmup_cosine
from r4b.train.sft_data import SFTDataset, batch_to_device


@dataclass
class ModelSection:
    path: str | None = None  # a Hugging Face directory (R-4B, Qwen2.5-VL, Qwen3-VL); None = the embedded tiny model
    tokenizer: str | None = None  # default: the model directory's, or the tiny tokenizer
    seed: int = 0  # initialises the tiny model
    train: list[str] = field(default_factory=lambda: list(MODULES))  # which of vision, projector, llm train
    liger: bool = True  # liger-kernel's RMSNorm / RoPE / SwiGLU on a GPU (never on a CPU)


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # JSONL files
    max_tokens: int = 16384  # packed micro-batch budget (the paper: 16,384)
    on_error: str = "raise"  # "raise" | "skip": a bad or over-long sample stops the run or is counted
    mask_empty_think: bool = True  # the paper's non-thinking loss masking
    # DataLoader processes per rank that read, pack and preprocess images ahead of the step (r4b.train.loader);
    # None: 0 on a CPU, else up to 4 per rank. The batches do not depend on it.
    workers: int | None = None


@dataclass
class OptimSection:
    lr_llm: float = 4e-5
    lr_vision: float = 4e-6
    lr_projector: float = 4e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0


@dataclass
class TrainSection:
    global_batch_samples: int = 1024
    epochs: int = 1
    max_steps: int | None = None  # stop early (the schedule still spans epochs unless schedule_steps is set)
    schedule_steps: int | None = None  # length of the cosine schedule; default: all steps of all epochs
    seed: int = 0
    save_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # "auto" (newest checkpoint in output_dir), "none", or a checkpoint directory
    allow_config_change: list[str] = field(default_factory=list)  # keys (or sections) a resume may change
    attention_cost_weight: float = 0.0  # quadratic term when balancing ranks (verl's seqlen balancing)
    tensorboard: bool = True
    progress: bool = True
    export: bool = True  # write output_dir/model (Hugging Face, R-4B layout) at the end


@dataclass
class SFTConfig:
    output_dir: str = "runs/sft"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    engine: EngineConfig = field(default_factory=EngineConfig)


def train_sft(config: SFTConfig) -> Path:
    """Run bi-mode annealing; returns the run directory."""
    rank, world_size, run_dir = start_run(config, config.output_dir, config.train.seed)
    main = rank == 0

    from r4b.models.loading import load_model_and_processor

    model, tokenizer, processor = load_model_and_processor(
        config.model.path, config.model.tokenizer, config.model.seed, dtype=torch.float32
    )
    model.train()
    from r4b.models.liger import apply_configured_liger

    apply_configured_liger(model, config.model.liger, announce=main)
    dataset = SFTDataset.from_files(
        config.data.train,
        tokenizer,
        processor,
        max_tokens=config.data.max_tokens,
        on_error=config.data.on_error,
        mask_empty_think=config.data.mask_empty_think,
        report_to=run_dir / "data_report.json" if main else None,  # written even when no sample is left
    )
    if main:
        (run_dir / "data_report.json").write_text(dataset.report.to_json())
        print(f"data: {dataset.report}")
    planner = GlobalBatchPlanner(
        dataset.lengths,
        dataset.loss_tokens,
        global_batch_samples=config.train.global_batch_samples,
        max_tokens=config.data.max_tokens,
        world_size=world_size,
        seed=config.train.seed,
        attention_weight=config.train.attention_cost_weight,
    )
    total_steps = planner.steps_per_epoch * config.train.epochs
    schedule_steps = config.train.schedule_steps or total_steps
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)

    lrs = {"llm": config.optim.lr_llm, "vision": config.optim.lr_vision, "projector": config.optim.lr_projector}
    objective = PackedSFTObjective(model, vision_every_step=world_size > 1)
    engine = build_engine(
        objective,
        parameter_groups(objective, lrs, config.model.train),
        warmup_cosine(schedule_steps, math.ceil(config.optim.warmup_ratio * schedule_steps), config.optim.min_lr_ratio),
        config.engine,
        betas=tuple(config.optim.betas),
        weight_decay=config.optim.weight_decay,
        eps=config.optim.eps,
    )
    start_step = resume(config.train.resume, run_dir, engine)
    logger = RunLogger(
        run_dir,
        total_steps,
        start_step=start_step,
        enabled=main,
        tensorboard=config.train.tensorboard,
        progress=config.train.progress,
        description="sft",
    )
    workers = config.data.workers
    workers = default_workers(engine.device, world_size) if workers is None else workers
    keys = rank_micro_batches(
        planner, rank, start_step, total_steps, lambda plan: padding_sample(plan, planner.lengths)
    )
    loader = MicroBatchLoader(
        dataset.host_batch, keys, workers=workers, pin_memory=torch.device(engine.device).type == "cuda"
    )
    stop = StopSignal()  # Ctrl-C: stop after this step with a checkpoint; again: at once
    try:
        for step in range(start_step, total_steps):
            metrics = _train_step(engine, loader, planner.plan(step), world_size)
            logger.log(metrics)
            done = step + 1
            halt = stop.should_stop(engine.device)
            if (config.train.save_every and done % config.train.save_every == 0) or done == total_steps or halt:
                save_checkpoint(run_dir, done, engine, {"epoch": metrics["epoch"]}, keep=config.train.keep_checkpoints)
            if halt:
                raise stop.interrupted(run_dir, done)
    finally:
        loader.close()
        stop.restore()
        logger.close()
    if config.train.export:
        export_model(engine, model, tokenizer, run_dir / "model", main)
        if main:
            from r4b.models.model_card import write_model_card

            write_model_card(
                run_dir / "model", stage="sft", config=config, run_dir=run_dir, data_files=config.data.train
            )
    return run_dir


def padding_sample(plan: StepPlan, lengths: list[int]) -> tuple[int]:
    """The zero-weight micro-batch of a rank with fewer micro-batches: the global batch's shortest sample (the
    lowest index among equals), the same whichever rank pads. Images or not, the vision tower runs (objectives
    with ``vision_every_step``), so the choice changes no collective."""
    samples = {i for r in plan.micro_batches for m in r for i in m}
    return (min(samples, key=lambda i: (lengths[i], i)),)


def _train_step(engine, loader: MicroBatchLoader, plan: StepPlan, world: int) -> dict:
    started = time.perf_counter()
    # Gradients are averaged over ranks: scale so their average is sum / (labelled tokens of the global batch).
    scale = world / max(1, plan.loss_tokens)
    # on the engine's device: NCCL reduces device tensors only (and the sum needs no host sync per micro-batch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    data_wait = 0.0
    for index in range(plan.micro_steps):
        # a rank with fewer micro-batches gets a zero-weight pass (rank_micro_batches) to keep collectives paired
        key, host, waited = loader.next(plan.step, index)
        data_wait += waited
        loss = engine.module(**batch_to_device(host, engine.device))
        engine.backward(loss * (0.0 if key.padding else scale))
        if not key.padding:
            loss_sum += loss.detach().double()
    lrs = engine.lrs()  # the rates this step used (the scheduler advances in step())
    grad_norm = engine.step()
    if world > 1:
        dist.all_reduce(loss_sum)
    elapsed = time.perf_counter() - started
    return {
        "step": plan.step + 1,
        "epoch": plan.epoch,
        "loss": float(loss_sum) / max(1, plan.loss_tokens),
        "lr": lrs.get("llm", next(iter(lrs.values()), 0.0)),
        "lrs": lrs,
        "grad_norm": grad_norm,
        "tokens": plan.tokens,
        "loss_tokens": plan.loss_tokens,
        "samples": sum(len(m) for r in plan.micro_batches for m in r),
        "tokens_per_s": plan.tokens / elapsed,
        "step_time_s": elapsed,
        "data_wait_s": data_wait,  # of step_time_s, waiting for the loader (r4b.train.loader)
    }
