"""BPO: the dual-rollout RL stage (``r4b bpo``).

Each step takes ``prompts_per_step`` prompts (a per-epoch shuffle, deterministic from the seed and the
step) and for each generates ``g`` responses with the thinking suffix and ``g`` with the non-thinking
suffix (``rollout.strategy: bpo``; ``grpo`` generates 2g in auto mode, the baseline the paper compares
against). Rule-based rewards give advantages normalised over the joint group of 2g; the policy update
packs each (prompt, mode) once with its responses (shared prefix) and trains with the fused BPO loss.

Rollouts (``rollout.engine: hf``) run on the policy itself in one plain process, and otherwise on a plain
copy of it; ``rollout.engine: vllm`` runs a colocated vLLM per rank. Either way the rollout weights are
synced from the engine after each update, and no collective runs inside generation, so ranks never wait
on each other's response lengths. Prompts are generated in
fixed chunks whose sampling seed depends only on (seed, step, chunk), so 1 and N processes, and a
resumed run, see the same rollouts.

This module is the loop: :meth:`BPOTrainer.step` generates, scores, computes advantages, builds the batch and
updates. The pieces live where they belong: reward shaping in :mod:`r4b.rl.shaping`, mode-decision credit in
:mod:`r4b.rl.credit`, the step's rollout metrics in :mod:`r4b.rl.metrics`, the rollout engine's construction in
:mod:`r4b.rollout.factory`, the weight sync in :mod:`r4b.train.weight_sync` and the prompt order in
:func:`r4b.train.batches.epoch_order` (SFT's planner's shuffle).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# the run config (every key: docs/config.md)
from r4b.config.sections import AdvantageSection, BPOConfig, RewardSection, RolloutSection
from r4b.format import is_thinking
from r4b.rl import REWARDS, RolloutBatch, UpdateConfig, compute_advantages, compute_logprobs, policy_update
from r4b.rl.credit import credit_mode_decision, decision_token_counts
from r4b.rl.metrics import rollout_metrics, update_scalars
from r4b.rl.shaping import score, shape_rewards
from r4b.rl.update import BPOObjective
from r4b.rollout import Prompt, Rollout, RolloutEngine, SamplingParams, build_rollout_engine, check_suffixes
from r4b.train.batches import epoch_order
from r4b.train.checkpoint import save_checkpoint
from r4b.train.engine import build_engine
from r4b.train.logging import RunLogger
from r4b.train.runtime import StopSignal, export_model, resume, start_run
from r4b.train.schedule import parameter_groups, warmup_cosine
from r4b.train.weight_sync import sync_rollout_weights


def read_prompt_files(paths: list[str], on_error: str) -> tuple[list[Any], Any]:
    """RL prompts (no assistant turn, a reference ``answer``) of every file, and the report of what was skipped."""
    from r4b.data import DataReport, read_prompts

    prompts, report = [], DataReport()
    for path in paths:
        samples, read_report = read_prompts(path, on_error=on_error, what="an RL prompt")
        prompts += samples
        report = report.merge(read_report)
    if not prompts:
        from r4b.errors import InputError

        raise InputError(f"no RL prompts in {', '.join(paths)}: {str(report).splitlines()[0]}")
    return prompts, report


def prompt_indices(step: int, per_step: int, total: int, seed: int) -> list[int]:
    """The prompts of ``step``: consecutive positions of the per-epoch shuffles that SFT's planner walks too
    (:func:`r4b.train.batches.epoch_order`; deterministic from the seed and the step)."""
    out, orders = [], {}
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(position, total)
        if epoch not in orders:
            orders[epoch] = epoch_order(total, seed, epoch)
        out.append(int(orders[epoch][index]))
    return out


def _check_rollout_and_reward(rollout: RolloutSection, reward: RewardSection, advantages: AdvantageSection) -> None:
    """Settings that cannot work together, refused before any model loads (each value's own choices and range are
    checked with the config: r4b.config.check_values)."""
    if rollout.engine != "vllm" and (rollout.vllm or rollout.vllm_sleep_level is not None):
        raise ValueError("rollout.vllm and rollout.vllm_sleep_level are for rollout.engine=vllm")
    check_suffixes(rollout.suffixes)
    if reward.name not in REWARDS:
        raise ValueError(f"unknown reward {reward.name!r}; registered: {', '.join(sorted(REWARDS))}")
    if reward.name == "format" and (reward.format_weight or reward.pattern):
        raise ValueError("reward.name=format is the format reward alone: no reward.format_weight or reward.pattern")


class BPOTrainer:
    def __init__(self, config: BPOConfig) -> None:
        from r4b.models.loading import load_model_and_processor

        self.config = config
        self.rank, self.world_size, self.run_dir = start_run(config, config.output_dir, config.train.seed)
        self.main = self.rank == 0
        _check_rollout_and_reward(config.rollout, config.reward, config.advantages)
        self.prompts, report = read_prompt_files(config.data.prompts, config.data.on_error)
        self.eval_prompts = []
        if config.data.eval:  # data.on_error applies to the evaluation prompts too, counted in the one report
            self.eval_prompts, eval_report = read_prompt_files([config.data.eval], config.data.on_error)
            report = report.merge(eval_report)
        if self.main:
            (self.run_dir / "data_report.json").write_text(report.to_json())
            print(f"data: {report}")
        model, self.tokenizer, self.processor = load_model_and_processor(
            config.model.path, config.model.tokenizer, config.model.seed, dtype=torch.float32
        )
        from r4b.models.liger import apply_configured_liger

        # before the reference and rollout copies are made, so that they run patched too
        apply_configured_liger(model, config.model.liger, announce=self.main)
        # checked before anything runs: the token count depends on the model family's vocabulary
        self.decision_tokens = None
        if config.advantages.mode_decision_credit:
            self.decision_tokens = decision_token_counts(self.tokenizer, config.rollout.suffixes)
        self.model = model
        # One process on the plain engine generates with the policy itself; sharded engines and vLLM keep a
        # full copy, synced from the engine whenever the policy has changed.
        self.shares_policy = self.world_size == 1 and config.engine.kind == "single" and config.rollout.engine == "hf"
        self.rollout_stale = not self.shares_policy  # a resumed engine holds other weights than the copy
        rollout_source = self._rollout_source(model)
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if config.policy.beta > 0 else None
        objective = BPOObjective(model.train(), vision_every_step=self.world_size > 1)
        lrs = {"llm": config.optim.lr_llm, "vision": config.optim.lr_vision, "projector": config.optim.lr_projector}
        modules = [m for m in config.model.train if lrs[m] > 0]
        steps = config.train.steps
        self.engine = build_engine(
            objective,
            parameter_groups(objective, lrs, modules),
            warmup_cosine(steps, math.ceil(config.optim.warmup_ratio * steps), config.optim.min_lr_ratio),
            config.engine,
            betas=tuple(config.optim.betas),
            weight_decay=config.optim.weight_decay,
            eps=config.optim.eps,
        )
        if self.reference is not None:
            self.reference.to(self.engine.device)
        self.rollout_engine = self._rollout_engine(rollout_source)
        self.update_config = UpdateConfig.from_policy(config.policy, temperature=config.rollout.temperature or 1.0)

    # -- rollouts ------------------------------------------------------------------------------------

    def _sync_rollout_weights(self) -> None:
        """Copy the engine's current weights into the rollout model on every rank, if they changed or the
        rollout engine lost its own (a vLLM level-2 sleep)."""
        if not self.rollout_stale and not self.rollout_engine.needs_weights:
            return
        self.rollout_stale = False
        sync_rollout_weights(self.engine, self.rollout_engine)  # one tensor at a time, collective

    def _rollout_source(self, model: torch.nn.Module) -> torch.nn.Module | str:
        """What the rollout engine generates from, taken before the training engine shards ``model``: the
        policy itself, a copy of it, or (vLLM) a checkpoint directory."""
        if self.config.rollout.engine == "hf":
            return model if self.shares_policy else copy.deepcopy(model).eval()
        from r4b.models.loading import save_model

        # vLLM loads checkpoints only; r4b's export carries the tokenizer and the processor config it reads
        # (a hub R-4B directory would need trust_remote_code), and the embedded tiny model has no directory.
        path = str(self.run_dir / "rollout-init")
        if self.main:
            save_model(model, path, self.tokenizer, self.processor)
        if self.world_size > 1:
            dist.barrier()
        return path

    def _rollout_engine(self, source: torch.nn.Module | str) -> RolloutEngine:
        """The configured rollout engine on ``source`` (:meth:`_rollout_source`): the policy's copy on the training
        device (hf), or one independent vLLM per rank seeded with the run's seed."""
        rollout = self.config.rollout
        if rollout.engine == "hf":
            return build_rollout_engine(
                source,
                self.tokenizer,
                self.processor,
                batch_size=rollout.batch_size,
                device=self.engine.device,
                suffixes=rollout.suffixes,
            )
        for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if rollout.vllm.get(key, 1) != 1:
                raise ValueError(f"rollout.vllm.{key} must be 1: r4b runs one independent vLLM per rank")
        defaults: dict[str, Any] = {"seed": self.config.train.seed}
        if self.world_size > 1:  # one vLLM per rank inside the torchrun job, as TRL's colocate mode runs it
            defaults["distributed_executor_backend"] = "external_launcher"
        return build_rollout_engine(
            source,
            self.tokenizer,
            self.processor,
            engine="vllm",
            suffixes=rollout.suffixes,
            sleep_level=rollout.vllm_sleep_level,
            vllm_args=defaults | rollout.vllm,
        )

    def _modes(self) -> list[tuple[str, int]]:
        g = self.config.rollout.group_size
        return [("thinking", g), ("non_thinking", g)] if self.config.rollout.strategy == "bpo" else [("auto", 2 * g)]

    def _sampling(self, step: int, chunk: int, salt: int, *, greedy: bool = False, max_new: int | None = None):
        r = self.config.rollout
        seed = (self.config.train.seed * 1_000_003 + step) * 10_007 + chunk * 31 + salt
        return SamplingParams(
            temperature=0.0 if greedy else r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=max_new or r.max_new_tokens,
            seed=seed,
        )

    def generate(self, prompts: Sequence[Any], step: int) -> list[list[Rollout]]:
        """Rollouts for ``prompts`` (:class:`~r4b.rollout.Prompt` objects or the samples they are made of; thinking
        columns first in BPO), identical whatever the world size."""
        per_call = self.config.rollout.prompts_per_call
        chunks = [prompts[i : i + per_call] for i in range(0, len(prompts), per_call)]
        mine = {}
        for c in range(self.rank, len(chunks), self.world_size):
            chunk = [Prompt.from_sample(s) for s in chunks[c]]
            columns = [
                self.rollout_engine.generate(chunk, n=n, mode=mode, sampling=self._sampling(step, c, salt))
                for salt, (mode, n) in enumerate(self._modes())
            ]
            mine[c] = [[r for col in columns for r in col[p]] for p in range(len(chunk))]
        if self.world_size > 1:
            gathered: list[dict] = [None] * self.world_size  # type: ignore[list-item]
            dist.all_gather_object(gathered, mine)
            mine = {c: rows for part in gathered for c, rows in part.items()}
        return [row for c in range(len(chunks)) for row in mine[c]]

    # -- one step -------------------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, Any]:
        """One BPO step: generate, score, advantages, batch, update; returns the step's metrics row."""
        config, clock = self.config, _Stopwatch()
        indices = prompt_indices(step, config.train.prompts_per_step, len(self.prompts), config.train.seed)
        samples = [self.prompts[i] for i in indices]
        self._sync_rollout_weights()
        clock.lap("sync")

        prompts = [Prompt.from_sample(s).decoded() for s in samples]  # images decoded once, for rollouts and update
        rollouts = self.generate(prompts, step)
        self.rollout_engine.sleep()  # a vLLM engine hands its GPU memory to the update
        clock.lap("rollout")

        shaped = shape_rewards(rollouts, [s.answer for s in samples], config.reward)
        advantages = compute_advantages(
            shaped.rewards,
            config.advantages.grouping,
            num_thinking=self._num_thinking(),
            scale_by_std=config.advantages.scale_by_std,
        )
        clock.lap("reward")

        batch = self._batch(rollouts, advantages, prompts)
        ref = self._reference_logprobs(batch)
        clock.lap("logprobs")

        self.rollout_stale = not self.shares_policy
        update = policy_update(
            self.engine, batch, self.update_config, ref_logprobs=ref, rank=self.rank, world_size=self.world_size
        )
        clock.lap("update")
        elapsed = clock.elapsed()

        logged = rollout_metrics(rollouts, shaped.rewards, shaped.scores, shaped.formats, shaped.off)
        metrics = {"step": step + 1, **logged, **update_scalars(update)}
        metrics["time"] = clock.laps
        metrics["tokens_per_s"] = float(batch.response_lengths.sum()) / elapsed
        metrics["lr"] = update.get("lr", self.engine.lrs().get("llm", 0.0))
        return metrics

    def _num_thinking(self) -> int | None:
        """The leading thinking columns of each rewards row (BPO's g; None in the auto-mode baseline)."""
        return self.config.rollout.group_size if self.config.rollout.strategy == "bpo" else None

    def _batch(self, rollouts: list[list[Rollout]], advantages: torch.Tensor, prompts: list[Prompt]) -> RolloutBatch:
        """What the update trains on: one entry per (prompt, mode) with its responses, their decision tokens moved
        into the responses under mode-decision credit (r4b.rl.credit); the prompts' images as decoded for the
        rollouts."""
        trained = rollouts
        if self.decision_tokens is not None:
            positive = self.config.advantages.mode_decision_from == "positive"
            trained = credit_mode_decision(rollouts, advantages, self.decision_tokens, positive=positive)
        return RolloutBatch.from_rollouts(
            trained,
            advantages,
            images=[p.images for p in prompts],
            processor=self.processor,
            pad_id=self.tokenizer.pad_token_id or 0,
        )

    def _reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor | None:
        """The frozen initial policy's log-probs of the batch (policy.beta > 0), else None."""
        if self.reference is None:
            return None
        policy = self.config.policy
        return compute_logprobs(
            self.reference,
            batch,
            max_tokens=policy.max_tokens,
            shared_prefix=policy.shared_prefix,
            temperature=self.update_config.temperature,
        )

    # -- evaluation -------------------------------------------------------------------------------------

    def evaluate_auto(self, step: int) -> dict[str, Any]:
        """Greedy auto-mode answers on the held-out prompts: accuracy and thinking trigger rate."""
        self._sync_rollout_weights()
        prompts = [Prompt.from_sample(s) for s in self.eval_prompts]
        sampling = self._sampling(step, 0, 99, greedy=True, max_new=self.config.train.eval_max_new_tokens)
        rows = self.rollout_engine.generate(prompts, n=1, mode="auto", sampling=sampling)
        self.rollout_engine.sleep()
        correct = [score(row[0], s.answer, self.config.reward) for row, s in zip(rows, self.eval_prompts, strict=True)]
        thinking = [is_thinking(row[0].full_text) for row in rows]
        return {"accuracy": sum(correct) / len(rows), "trigger_rate": sum(thinking) / len(rows)}

    def train(self) -> Path:
        config = self.config
        start = resume(config.train.resume, self.run_dir, self.engine)
        last = min(config.train.steps, config.train.max_steps or config.train.steps)
        logger = RunLogger(
            self.run_dir,
            last,
            start_step=start,
            enabled=self.main,
            tensorboard=config.train.tensorboard,
            progress=config.train.progress,
            description=config.rollout.strategy,
        )
        stop = StopSignal()  # Ctrl-C: stop after this step with a checkpoint; again: at once
        try:
            for step in range(start, last):
                metrics = self.step(step)
                done = step + 1
                if self.eval_prompts and (
                    done == last or (config.train.eval_every and done % config.train.eval_every == 0)
                ):
                    metrics["eval_auto"] = self.evaluate_auto(step)
                logger.log(metrics)
                halt = stop.should_stop(self.engine.device)
                if (config.train.save_every and done % config.train.save_every == 0) or done == last or halt:
                    save_checkpoint(self.run_dir, done, self.engine, {}, keep=config.train.keep_checkpoints)
                if halt:
                    raise stop.interrupted(self.run_dir, done)
        finally:
            stop.restore()
            logger.close()
        if config.train.export:
            export_model(self.engine, self.model, self.tokenizer, self.run_dir / "model", self.main)
            if self.main:
                from r4b.models.model_card import write_model_card

                write_model_card(
                    self.run_dir / "model",
                    stage=config.rollout.strategy,
                    config=config,
                    run_dir=self.run_dir,
                    data_files=config.data.prompts,
                )
        return self.run_dir


def train_bpo(config: BPOConfig) -> Path:
    """Run BPO (or the plain-GRPO baseline); returns the run directory."""
    return BPOTrainer(config).train()


class _Stopwatch:
    """Seconds of each phase of a step (``laps``, in order) and since the start."""

    def __init__(self) -> None:
        self.started = self.clock = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        self.laps[name], self.clock = time.perf_counter() - self.clock, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
