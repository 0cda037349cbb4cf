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
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from r4b.config.loading import config_to_dict
from r4b.config.sections import SFTConfig  # the run config (every key: docs/config.md)
from r4b.train.accumulate import MicroStep, NonFiniteGuard, accumulate_gradients
from r4b.train.batches import GlobalBatchPlanner, StepPlan
from r4b.train.checkpoint import save_checkpoint
from r4b.train.engine import build_engine
from r4b.train.loader import MicroBatchLoader, default_workers, rank_micro_batches
from r4b.train.logging import RunLogger
from r4b.train.objective import PackedSFTObjective
from r4b.train.run_lock import releases_run_locks
from r4b.train.runtime import export_trained, lora_base_dtype, resume, start_run
from r4b.train.schedule import parameter_groups, warmup_cosine
from r4b.train.sft_data import SFTDataset
from r4b.train.signals import StopSignal


@releases_run_locks  # the run directory's lock (r4b.train.run_lock) ends with the run
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
    from r4b.models.lora import apply_lora

    apply_lora(model, config.model.lora, lora_base_dtype(config.engine), announce=main)  # model.lora.rank 0: none
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
        settings=config.logging,
        run_config=config_to_dict(config),
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
    guard = NonFiniteGuard(engine, config.train.on_nonfinite)  # no non-finite update, checkpoint or export
    stop = StopSignal()  # Ctrl-C: stop after this step with a checkpoint; again: at once
    try:
        for step in range(start_step, total_steps):
            guard.begin(step + 1)
            metrics = _train_step(guard, loader, planner.plan(step), world_size)
            logger.log(metrics)
            done = step + 1
            halt = stop.should_stop(engine.device)
            if (config.train.save_every and done % config.train.save_every == 0) or done == total_steps or halt:
                guard.check_weights()
                save_checkpoint(run_dir, done, engine, {"epoch": metrics["epoch"]}, keep=config.train.keep_checkpoints)
            if halt:
                raise stop.interrupted(run_dir, done)
    finally:
        loader.close()
        stop.restore()
        logger.close()
    if config.train.export:
        guard.check_weights()
        export_trained(engine, model, tokenizer, config, run_dir, main, stage="sft", data_files=config.data.train)
    return run_dir


def padding_sample(plan: StepPlan, lengths: list[int]) -> tuple[int]:
    """The zero-weight micro-batch of a rank with fewer micro-batches: the global batch's shortest sample (the
    lowest index among equals), the same whichever rank pads. Images or not, the vision tower runs (objectives
    with ``vision_every_step``), so the choice changes no collective."""
    samples = {i for r in plan.micro_batches for m in r for i in m}
    return (min(samples, key=lambda i: (lengths[i], i)),)


def _train_step(engine: NonFiniteGuard, loader: MicroBatchLoader, plan: StepPlan, world: int) -> dict:
    started = time.perf_counter()
    # Gradients are averaged over ranks: scale so their average is sum / (labelled tokens of the global batch).
    scale = world / max(1, plan.loss_tokens)
    # on the engine's device: NCCL reduces device tensors only (and the sum needs no host sync per micro-batch)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    data_wait = 0.0

    def micro_steps() -> Iterator[MicroStep]:
        nonlocal data_wait
        for index in range(plan.micro_steps):  # padding passes included (rank_micro_batches)
            key, host, waited = loader.next(plan.step, index)
            data_wait += waited
            yield MicroStep(host.to(engine.device).inputs(), scale, key.padding)

    accumulate_gradients(engine, micro_steps(), lambda _, loss: loss_sum.add_(loss.detach().double()))
    lrs = engine.lrs()  # the rates this step used (the scheduler advances in step())
    if world > 1:
        dist.all_reduce(loss_sum)
    grad_norm = engine.step()  # the guard's: refuses a non-finite loss or gradient norm first
    elapsed = time.perf_counter() - started
    return {
        "step": plan.step + 1,
        "epoch": plan.epoch,
        "loss": float(loss_sum) / max(1, plan.loss_tokens),
        "lr": lrs.get("llm", next(iter(lrs.values()), 0.0)),
        "lrs": lrs,
        "grad_norm": grad_norm,
        "skipped_updates": engine.skipped,  # train.on_nonfinite=skip: its loss and grad_norm are null
        "tokens": plan.tokens,
        "loss_tokens": plan.loss_tokens,
        "samples": sum(len(m) for r in plan.micro_batches for m in r),
        "tokens_per_s": plan.tokens / elapsed,
        "step_time_s": elapsed,
        "data_wait_s": data_wait,  # of step_time_s, waiting for the loader (r4b.train.loader)
    }
