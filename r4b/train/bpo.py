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
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# the run config (every key: docs/config.md)
from r4b.config.loading import ConfigError, config_to_dict
from r4b.config.sections import AdvantageSection, BPOConfig, RewardSection, RolloutSection
from r4b.errors import InputError
from r4b.format import is_thinking
from r4b.models.lora import adapters_disabled, apply_lora
from r4b.rl import REWARDS, RolloutBatch, UpdateConfig, compute_advantages, compute_logprobs, policy_update
from r4b.rl.credit import credit_mode_decision, decision_token_counts
from r4b.rl.dynamic_sampling import Draw, concat_draws, empty_groups, refill_indices, refill_size, select_rows
from r4b.rl.metrics import rollout_metrics, update_scalars
from r4b.rl.remote_reward import ServerScoring
from r4b.rl.shaping import kept_rollouts, score, shape_rewards, think_close_token
from r4b.rl.update import BPOObjective
from r4b.rollout import Prompt, Rollout, RolloutEngine, SamplingParams, build_rollout_engine, check_suffixes
from r4b.train.accumulate import NonFiniteGuard
from r4b.train.batches import epoch_order
from r4b.train.checkpoint import save_checkpoint
from r4b.train.engine import build_engine
from r4b.train.logging import RunLogger
from r4b.train.ranks import rank
from r4b.train.run_lock import releases_run_locks
from r4b.train.runtime import export_trained, lora_base_dtype, resume, start_run
from r4b.train.samples import sample_records
from r4b.train.schedule import parameter_groups, warmup_cosine
from r4b.train.signals import StopSignal
from r4b.train.sync_probe import sync_and_verify


def read_prompt_files(paths: list[str], data: Any, images_dir: Path | None = None) -> tuple[list[Any], Any]:
    """RL prompts (no assistant turn, a reference ``answer``) of every file, read as the data section says
    (``on_error``, the column keys; image bytes stored in ``images_dir``), and the report of what was skipped."""
    from r4b.data import DataReport, read_prompts
    from r4b.data.prompt_tables import PromptKeys

    keys = PromptKeys(data.prompt_key, data.answer_key, data.image_key)
    prompts, report = [], DataReport()
    for path in paths:
        samples, read_report = read_prompts(
            path, on_error=data.on_error, what="an RL prompt", keys=keys, images_dir=images_dir
        )
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
    checked with the config: r4b.config.check_values): one-line errors naming the keys."""
    vllm_only = rollout.vllm or rollout.vllm_sleep_level is not None or rollout.vllm_kv_cache_gib is not None
    if rollout.engine != "vllm" and vllm_only:
        raise ConfigError("rollout.vllm, vllm_sleep_level and vllm_kv_cache_gib are for rollout.engine=vllm")
    try:
        check_suffixes(rollout.suffixes)
    except ValueError as error:
        raise ConfigError(f"rollout.suffixes: {error}") from None
    if reward.name == "http":
        if not reward.url:
            raise ConfigError("reward.name=http needs reward.url, the reward server's address")
    elif reward.name not in REWARDS:
        raise ConfigError(f"unknown reward {reward.name!r}; registered: {', '.join(sorted(REWARDS))}, or http")
    if reward.name == "format" and (reward.format_weight or reward.pattern):
        raise ConfigError("reward.name=format is the format reward alone: no reward.format_weight or reward.pattern")
    if reward.overlong == "soft" and reward.overlong_buffer > rollout.max_new_tokens:
        raise ConfigError(
            f"reward.overlong_buffer={reward.overlong_buffer} is over rollout.max_new_tokens={rollout.max_new_tokens}"
        )


class BPOTrainer:
    def __init__(self, config: BPOConfig) -> None:
        from r4b.models.loading import load_model_and_processor

        self.config = config
        _check_rollout_and_reward(config.rollout, config.reward, config.advantages)  # before the run directory
        try:  # policy settings that cannot combine (loss type x importance level, delta under the clip)
            UpdateConfig.from_policy(config.policy)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.rank, self.world_size, self.run_dir = start_run(config, config.output_dir, config.train.seed)
        self.main = self.rank == 0
        images = self.run_dir / "prompt_images"  # image bytes of Parquet / datasets prompts, stored once
        self.prompts, report = read_prompt_files(config.data.prompts, config.data, images)
        self.eval_prompts = []
        if config.data.eval:  # data.on_error applies to the evaluation prompts too, counted in the one report
            self.eval_prompts, eval_report = read_prompt_files([config.data.eval], config.data, images)
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
        self.reward_server = None  # reward.name=http: rank 0 asks the server, in the background
        if config.reward.name == "http":
            world = self.world_size
            self.reward_server = ServerScoring(config.reward, self.tokenizer, main=self.main, world_size=world)
        self.think_close_id = None  # reward.thought_budget counts thought tokens up to </think>'s id
        if config.reward.thought_budget is not None:
            try:
                self.think_close_id = think_close_token(self.tokenizer)
            except ValueError as error:
                raise ConfigError(f"reward.thought_budget: {error}") from None
        self.decision_tokens = None
        if config.advantages.mode_decision_credit:
            self.decision_tokens = decision_token_counts(self.tokenizer, config.rollout.suffixes)
        self.model = model
        # One process on the plain engine generates with the policy itself; sharded engines and vLLM keep a
        # full copy, synced from the engine whenever the policy has changed.
        self.shares_policy = self.world_size == 1 and config.engine.kind == "single" and config.rollout.engine == "hf"
        self.rollout_stale = not self.shares_policy  # a resumed engine holds other weights than the copy
        rollout_source = self._rollout_source(model)
        # LoRA after the rollout copy is taken: it keeps the base's class and names, and the sync merges into them
        self.lora = apply_lora(model, config.model.lora, lora_base_dtype(config.engine), announce=self.main)
        # the reference: a frozen copy of the initial policy; with LoRA, the engine run with the adapters off
        copied = config.policy.beta > 0 and self.lora is None
        self.reference = copy.deepcopy(model).eval().requires_grad_(False) if copied else None
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
        elif config.policy.beta > 0:
            self.reference = self.engine  # (LoRA) its base: _reference_logprobs runs it with adapters_disabled
        self.rollout_engine = self._rollout_engine(rollout_source)
        self.update_config = UpdateConfig.from_policy(config.policy, temperature=config.rollout.temperature or 1.0)
        # every optimizer update of policy_update goes through the guard: no non-finite update, checkpoint or export
        updates = config.policy.ppo_epochs * config.policy.mini_batches
        self.guard = NonFiniteGuard(self.engine, config.train.on_nonfinite, updates_per_step=updates)

    # -- rollouts ------------------------------------------------------------------------------------

    def _sync_rollout_weights(self) -> None:
        """Copy the engine's current weights into the rollout model on every rank, if they changed or the
        rollout engine lost its own (a vLLM level-2 sleep)."""
        if not self.rollout_stale and not self.rollout_engine.needs_weights:
            return
        self.rollout_stale = False
        sync_and_verify(self.engine, self.rollout_engine)  # one tensor at a time, collective; vLLM's probed

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
            kv_cache_gib=rollout.vllm_kv_cache_gib,
            vllm_args=defaults | rollout.vllm,
        )

    def _modes(self) -> list[tuple[str, int]]:
        g = self.config.rollout.group_size
        return [("thinking", g), ("non_thinking", g)] if self.config.rollout.strategy == "bpo" else [("auto", 2 * g)]

    def _sampling(
        self, step: int, chunk: int, salt: int, *, round_: int = 0, greedy: bool = False, max_new: int | None = None
    ) -> SamplingParams:
        r = self.config.rollout
        seed = (self.config.train.seed * 1_000_003 + step) * 10_007 + chunk * 31 + salt + round_ * 7_919_000_003
        return SamplingParams(
            temperature=0.0 if greedy else r.temperature,
            top_p=r.top_p,
            top_k=r.top_k,
            max_new_tokens=max_new or r.max_new_tokens,
            seed=seed,
            logprobs=not greedy and self.config.policy.rollout_correction != "none",  # the correction's weights
        )

    def generate(self, prompts: Sequence[Any], step: int, round_: int = 0) -> list[list[Rollout]]:
        """Rollouts for ``prompts`` (:class:`~r4b.rollout.Prompt` objects or the samples they are made of; thinking
        columns first in BPO) in round ``round_`` of ``step`` (rollout.filter_groups), identical whatever the world
        size."""
        per_call = self.config.rollout.prompts_per_call
        chunks = [prompts[i : i + per_call] for i in range(0, len(prompts), per_call)]
        mine = {}
        for c in range(self.rank, len(chunks), self.world_size):
            chunk = [Prompt.from_sample(s) for s in chunks[c]]
            columns = [
                self.rollout_engine.generate(
                    chunk, n=n, mode=mode, sampling=self._sampling(step, c, salt, round_=round_)
                )
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
        """One BPO step: generate, score, advantages (round after round under rollout.filter_groups), batch,
        update; returns the step's metrics row."""
        config, clock = self.config, _Stopwatch()
        indices = prompt_indices(step, config.train.prompts_per_step, len(self.prompts), config.train.seed)
        self._sync_rollout_weights()
        clock.lap("sync")

        filtering = config.rollout.filter_groups
        drawn, early = self._draw(step, 0, indices, clock, overlap=not filtering)
        trained = drawn
        if filtering:
            trained, drawn, filtered = self._fill_groups(step, drawn, indices, clock)
            self.rollout_engine.sleep()
        self.step_rollouts = (drawn.samples, drawn.rollouts, drawn.shaped)  # what a sample table shows
        keep = trained.shaped.keep
        trains = len(trained) > 0 and (keep is None or bool(keep.any()))
        if early is not None:  # the reference pass ran while the server scored; the advantages are known now
            batch, ref = early
            batch = dataclasses.replace(batch, advantages=trained.advantages[tuple(zip(*batch.source, strict=True))])
        elif trains:
            batch = self._batch(trained.rollouts, trained.advantages, trained.prompts, keep)
            ref = self._reference_logprobs(batch)
        clock.lap("logprobs")

        update = self._update(step, batch, ref) if trains else {}
        clock.lap("update")
        elapsed = clock.elapsed()

        shaped = drawn.shaped  # the metrics describe every rollout the step drew, filtered or not
        logged = rollout_metrics(
            drawn.rollouts, shaped.rewards, shaped.scores, shaped.formats, shaped.off, drawn.advantages,
            shaped.per_mode_metrics(),
        )  # fmt: skip
        metrics = {"step": step + 1, **logged, **update_scalars(update)}
        if filtering:
            metrics["filter"] = filtered
        if not trains and len(trained):  # every rollout was cut at max_new_tokens and masked: no update this step
            metrics["all_masked"] = True
        if self.reward_server is not None:
            metrics["reward_failures"] = drawn.failures  # rollouts scored reward.on_failure
        metrics["skipped_updates"] = self.guard.skipped  # train.on_nonfinite=skip
        metrics["time"] = clock.laps
        metrics["tokens_per_s"] = float(batch.response_lengths.sum()) / elapsed if trains else 0.0
        metrics["lr"] = update.get("lr", self.engine.lrs().get("llm", 0.0))
        return metrics

    def _draw(
        self, step: int, round_: int, indices: list[int], clock: _Stopwatch, *, overlap: bool
    ) -> tuple[Draw, tuple[RolloutBatch, torch.Tensor | None] | None]:
        """Generate and score the prompts ``indices`` (round ``round_`` of the step). With ``overlap`` (no round
        follows) the rollout engine sleeps at once and the reference pass may run while a reward server scores:
        then also that ``(batch, reference log-probs)``, the batch's advantages still 0."""
        config = self.config
        samples = [self.prompts[i] for i in indices]
        prompts = [Prompt.from_sample(s).decoded() for s in samples]  # images decoded once, for rollouts and update
        rollouts = self.generate(prompts, step, round_)
        if overlap:
            self.rollout_engine.sleep()  # a vLLM engine hands its GPU memory to the update
        clock.lap("rollout")

        answers = [s.answer for s in samples]
        keep = kept_rollouts(rollouts, config.reward)  # reward.overlong=mask: the finished rollouts alone train
        pending = self.reward_server.ask(rollouts, prompts, answers) if self.reward_server else None
        early = None
        if overlap and (keep is None or bool(keep.any())) and self._reference_while_scoring():
            batch = self._batch(rollouts, torch.zeros(len(rollouts), len(rollouts[0])), prompts, keep)
            early = batch, self._reference_logprobs(batch)
        scores, failures = self.reward_server.answer(pending) if self.reward_server else (None, 0)
        shaped = shape_rewards(
            rollouts, answers, config.reward, scores,
            max_new_tokens=config.rollout.max_new_tokens, think_close_id=self.think_close_id,
        )  # fmt: skip
        advantages = compute_advantages(
            shaped.rewards,
            config.advantages.grouping,
            num_thinking=self._num_thinking(),
            scale_by_std=config.advantages.scale_by_std,
            valid=keep,
        )
        clock.lap("reward")
        return Draw(samples, prompts, rollouts, shaped, advantages, failures), early

    def _fill_groups(
        self, step: int, first: Draw, indices: list[int], clock: _Stopwatch
    ) -> tuple[Draw, Draw, dict[str, Any]]:
        """rollout.filter_groups: (the prompts to train on, every prompt drawn, the filter's metrics) after as many
        rounds as it takes to keep train.prompts_per_step prompts with a signal (r4b.rl.dynamic_sampling)."""
        config = self.config
        want, rounds = config.train.prompts_per_step, [first]
        used = set(indices)
        signal = lambda draw: int((~empty_groups(draw.advantages)).sum())
        drawn, kept = len(first), signal(first)  # running counts over the rounds
        while kept < want and len(rounds) < config.rollout.max_filter_rounds:
            count = refill_size(want - kept, drawn, kept, want)
            more = refill_indices(step, len(rounds), count, len(self.prompts), config.train.seed, used)
            if not more:  # every prompt was drawn this step
                break
            used.update(more)
            rounds.append(self._draw(step, len(rounds), more, clock, overlap=False)[0])
            drawn, kept = drawn + len(more), kept + signal(rounds[-1])
        everything = concat_draws(rounds)
        rows = (~empty_groups(everything.advantages)).nonzero().flatten().tolist()[:want]
        filtered = {
            "rounds": len(rounds),
            "filtered": 1.0 - kept / len(everything),  # share of the drawn prompts that had no signal
            "prompts": len(rows),
            "full": len(rows) == want,
        }
        return select_rows(everything, rows), everything, filtered

    def _update(self, step: int, batch: RolloutBatch, ref: torch.Tensor | None) -> dict[str, Any]:
        """The policy update on ``batch``; its mini-batches are at most the prompts the batch kept (reward.overlong=
        mask may drop whole prompts)."""
        self.rollout_stale = not self.shares_policy
        self.guard.begin(step + 1)
        kept_prompts = len(set(batch.entry_prompts))
        update_config = self.update_config
        if update_config.mini_batches > kept_prompts:
            update_config = dataclasses.replace(update_config, mini_batches=kept_prompts)
        return policy_update(
            self.guard, batch, update_config, ref_logprobs=ref, rank=self.rank, world_size=self.world_size
        )

    def _reference_while_scoring(self) -> bool:
        """Whether the reference pass runs while the reward server scores: it needs the batch, whose layout does not
        depend on the advantages unless mode-decision credit moves tokens by their sign (mode_decision_from:
        positive)."""
        positive = self.decision_tokens is not None and self.config.advantages.mode_decision_from == "positive"
        return self.reward_server is not None and self.reference is not None and not positive

    def _num_thinking(self) -> int | None:
        """The leading thinking columns of each rewards row (BPO's g; None in the auto-mode baseline)."""
        return self.config.rollout.group_size if self.config.rollout.strategy == "bpo" else None

    def _batch(
        self,
        rollouts: list[list[Rollout]],
        advantages: torch.Tensor,
        prompts: list[Prompt],
        keep: torch.Tensor | None = None,
    ) -> RolloutBatch:
        """What the update trains on: one entry per (prompt, mode) with its responses, their decision tokens moved
        into the responses under mode-decision credit (r4b.rl.credit); the prompts' images as decoded for the
        rollouts; without the rollouts ``keep`` leaves out (reward.overlong=mask)."""
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
            keep=keep,
        )

    def _reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor | None:
        """The frozen initial policy's log-probs of the batch (policy.beta > 0), else None."""
        if self.reference is None:
            return None
        policy = self.config.policy
        with adapters_disabled(self.model):  # LoRA: the base, without a second copy of its weights; else no-op
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
        answers = [s.answer for s in self.eval_prompts]
        scores = self.reward_server.scores(rows, prompts, answers)[0] if self.reward_server else None
        correct = (
            scores[:, 0].tolist()
            if scores is not None
            else [score(row[0], answer, self.config.reward) for row, answer in zip(rows, answers, strict=True)]
        )
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
            settings=config.logging,
            run_config=config_to_dict(config),
            progress=config.train.progress,
            description=config.rollout.strategy,
        )
        stop = StopSignal()  # Ctrl-C: stop after this step with a checkpoint; again: at once
        flat = FlatSteps(config.train.stop_after_flat_steps)
        try:
            for step in range(start, last):
                metrics = self.step(step)
                done = step + 1
                if self.eval_prompts and (
                    done == last or (config.train.eval_every and done % config.train.eval_every == 0)
                ):
                    metrics["eval_auto"] = self.evaluate_auto(step)
                metrics["flat_steps"] = flat.record(done, metrics["flat"])
                logger.log(metrics)
                if logger.samples_due(done):
                    logger.log_samples(done, sample_records(*self.step_rollouts, limit=config.logging.samples_prompts))
                halt = stop.should_stop(self.engine.device)
                flat_stop = flat.exhausted and done < last
                due = (config.train.save_every and done % config.train.save_every == 0) or done == last
                if due or halt or flat_stop:
                    self.guard.check_weights()
                    save_checkpoint(self.run_dir, done, self.engine, {}, keep=config.train.keep_checkpoints)
                if halt:
                    raise stop.interrupted(self.run_dir, done)
                if flat_stop:
                    raise flat.stopped(self.run_dir / f"checkpoint-{done}")
        finally:
            stop.restore()
            logger.close()
        if config.train.export:
            self.guard.check_weights()
            stage, files = config.rollout.strategy, config.data.prompts
            export_trained(self.engine, self.model, self.tokenizer, config, self.run_dir, self.main, stage=stage,
                           data_files=files)  # fmt: skip
        return self.run_dir


@releases_run_locks  # the run directory's lock (r4b.train.run_lock) ends with the run
def train_bpo(config: BPOConfig) -> Path:
    """Run BPO (or the plain-GRPO baseline); returns the run directory."""
    return BPOTrainer(config).train()


class FlatRewards(InputError):
    """BPO stopped after ``train.stop_after_flat_steps`` steps in a row whose rewards taught nothing."""


class FlatSteps:
    """Counts the steps in a row whose advantages were all 0 (every group's rewards equal: no learning signal) and
    says when ``limit`` of them (``train.stop_after_flat_steps``; 0: never) should stop the run. The same on every
    rank: the rewards are."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.last_step = 0

    def record(self, step: int, flat: bool) -> int:
        """Note step ``step`` (1-based) and whether it was flat; returns the flat steps in a row up to it."""
        self.in_a_row, self.last_step = (self.in_a_row + 1 if flat else 0), step
        if self.in_a_row == 1 and rank() == 0:  # once per run of flat steps; the progress line counts them
            print(f"step {step}: every group's rewards were equal: all advantages 0, nothing to learn", file=sys.stderr)
        return self.in_a_row

    @property
    def exhausted(self) -> bool:
        return self.limit > 0 and self.in_a_row >= self.limit

    def stopped(self, checkpoint: Path) -> FlatRewards:
        first = self.last_step - self.in_a_row + 1
        return FlatRewards(
            f"steps {first}-{self.last_step}: every group's rewards were equal, so every advantage was 0 and nothing "
            f"was learned; stopped after {self.in_a_row} such steps in a row ({checkpoint} written). Check that "
            "reward.name can score the answers (their format, the prompts' answer field), or raise "
            "train.stop_after_flat_steps (0: never stop)"
        )


class _Stopwatch:
    """Seconds of each phase of a step (``laps``, in order) and since the start."""

    def __init__(self) -> None:
        self.started = self.clock = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        """Add the seconds since the last lap to phase ``name`` (a phase may come back: rounds of rollouts)."""
        now = time.perf_counter()
        self.laps[name], self.clock = self.laps.get(name, 0.0) + now - self.clock, now

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
