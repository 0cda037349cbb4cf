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
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from r4b.format import MODE_SUFFIX, THINK_CLOSE, THINK_OPEN, is_thinking
from r4b.rl import REWARDS, RolloutBatch, UpdateConfig, compute_advantages, compute_logprobs, policy_update
from r4b.rl.reward import off_mode
from r4b.rl.update import BPOObjective
from r4b.rollout import HFRolloutEngine, Prompt, Rollout, RolloutEngine, SamplingParams, check_suffixes
from r4b.train.checkpoint import save_checkpoint
from r4b.train.engine import EngineConfig, build_engine
from r4b.train.logging import RunLogger
from r4b.train.runtime import StopSignal, export_model, resume, start_run
from r4b.train.schedule import parameter_groups, warmup_cosine
from r4b.train.sft import ModelSection, OptimSection

STRATEGIES = ("bpo", "grpo")
ROLLOUT_ENGINES = ("hf", "vllm")


@dataclass
class BPODataSection:
    prompts: list[str] = field(default_factory=list)  # JSONL prompts with an `answer`
    eval: str | None = None  # held-out prompts for the periodic auto-mode evaluation
    on_error: str = "raise"


@dataclass
class RolloutSection:
    strategy: str = "bpo"  # "bpo": g thinking + g non-thinking per prompt; "grpo": 2g in auto mode
    group_size: int = 8  # g
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    prompts_per_call: int = 8  # prompts generated together (and seeded together)
    batch_size: int = 64  # rows per generate call (engine: hf)
    engine: str = "hf"  # "hf": transformers generate, runs anywhere; "vllm": colocated vLLM (GPU, r4b[vllm])
    vllm: dict[str, Any] = field(default_factory=dict)  # vllm.LLM keyword arguments (engine: vllm)
    vllm_sleep_level: int | None = None  # 1 or 2: vLLM sleeps between rollouts, freeing GPU memory
    # Per-mode prompt suffixes replacing the chat template's, e.g. {thinking: "<think>\nLet me think.\n"};
    # mode-decision credit then trains everything after <think> in them.
    suffixes: dict[str, str] = field(default_factory=dict)


@dataclass
class RewardSection:
    name: str = "answer"  # a registered reward (r4b.rl.register_reward)
    pattern: str | None = None  # regex for the final answer when there is no \boxed{}
    format_weight: float = 0.0  # > 0 adds weight x the format reward (<think> block closed, then an answer)
    # The reward of a forced-mode rollout that leaves its mode (r4b.rl.reward.off_mode), whatever its answer: a
    # thinking rollout whose think block is empty (</think> closed at once) or a non-thinking one that thinks anyway.
    # BPO forces both modes so that both stay explored (the R-4B paper); with the plain answer reward a thinking
    # rollout that answers directly gets the group's advantage when right, the policy learns to close forced thoughts
    # at once and the thinking group stops thinking (issue 16). -1, a penalty below a wrong answer's 0, stopped that
    # in the demo where 0 did not; null: the paper's plain answer reward. Auto rollouts (grpo) are never off-mode.
    off_mode: float | None = -1.0
    # A forced thought shorter than this many characters (its reasoning without tags, stripped) is off-mode too: a
    # one-word "thought" before </think> keeps the form of thinking without its exploration.
    min_thought_chars: int = 1
    # True: a forced thought that ends (stop token) before </think> is off-mode too (no answer, but cheap: seen on
    # demo seed 0, where the thinking mode learned to write 25 characters and stop). A thought cut at
    # rollout.max_new_tokens is not.
    close_thoughts: bool = False


@dataclass
class AdvantageSection:
    grouping: str = "joint"  # "joint" (the paper: over all 2g) | "per_mode" (ablation)
    scale_by_std: bool = True  # False: Dr. GRPO
    mode_decision_credit: bool = False  # beyond the paper: the token after <think> is trained too
    # Which rollouts train it: "all", or "positive": those of the prompt's mode with a positive mean advantage.
    # The decision is a choice between two tokens but the softmax spans the vocabulary: a negative advantage on one
    # mode's decision token moves its mass to the likeliest other token, which need not be the other mode's. On demo
    # seed 0 the annealed model never chose non-thinking after <think> (P(\n\n) 0.001: the paper masks the empty
    # think block in annealing), so pushing \n down on easy prompts fed <|im_end|> (0.43 -> 0.95): auto mode then
    # stopped at once on every easy prompt (issue 16). Positive credit only raises the chosen mode's token.
    mode_decision_from: str = "all"


@dataclass
class PolicySection:
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    beta: float = 0.0  # k3 KL to the frozen initial policy
    loss_agg_mode: str = "token-mean"
    ppo_epochs: int = 1
    mini_batches: int = 1
    max_tokens: int = 16384
    shared_prefix: bool = True


@dataclass
class BPOTrainSection:
    prompts_per_step: int = 32
    steps: int = 300  # the schedule's length (the paper's RL ran about 300 steps)
    max_steps: int | None = None  # stop early (resume later with the same schedule)
    seed: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    allow_config_change: list[str] = field(default_factory=list)  # keys (or sections) a resume may change
    eval_every: int = 0  # steps between auto-mode evaluations on data.eval (0 = only at the end, if set)
    eval_max_new_tokens: int = 512
    tensorboard: bool = True
    progress: bool = True
    export: bool = True


@dataclass
class BPOConfig:
    output_dir: str = "runs/bpo"
    model: ModelSection = field(default_factory=ModelSection)
    data: BPODataSection = field(default_factory=BPODataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardSection = field(default_factory=RewardSection)
    advantages: AdvantageSection = field(default_factory=AdvantageSection)
    policy: PolicySection = field(default_factory=PolicySection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr_llm=1e-6, lr_vision=0.0, lr_projector=0.0))
    train: BPOTrainSection = field(default_factory=BPOTrainSection)
    engine: EngineConfig = field(default_factory=EngineConfig)


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
    """The prompts of ``step``: consecutive positions of per-epoch shuffles (deterministic)."""
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(position, total)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(order[index]))
    return out


def decision_token_counts(tokenizer: Any, suffixes: dict[str, str] | None = None) -> dict[str, int]:
    """Tokens after ``<think>`` in each mode's suffix (``suffixes`` overriding ``MODE_SUFFIX``; with the template's
    suffixes and R-4B's or Qwen3's vocabulary: thinking 1, non-thinking 2, auto 0). Mode-decision credit needs
    ``<think>`` to be one token, so that the decision starts on a token boundary; Qwen2.5-VL's vocabulary has no
    ``<think>`` token, which is an error here."""
    head = tokenizer.encode(THINK_OPEN, add_special_tokens=False)
    counts = {}
    for mode, suffix in (MODE_SUFFIX | (suffixes or {})).items():
        ids = tokenizer.encode(suffix, add_special_tokens=False)
        if len(head) != 1 or ids[:1] != head:
            raise ValueError(
                f"advantages.mode_decision_credit needs {THINK_OPEN!r} to be one token that starts every mode "
                f"suffix; the tokenizer gives {head} for it and {ids} for the {mode} suffix {suffix!r}"
            )
        counts[mode] = len(ids) - 1
    return counts


DECISION_FROM = ("all", "positive")


def _check_rollout_and_reward(rollout: RolloutSection, reward: RewardSection, advantages: AdvantageSection) -> None:
    """Settings that cannot work together, refused before any model loads."""
    if rollout.strategy not in STRATEGIES:
        raise ValueError(f"rollout.strategy must be one of {STRATEGIES}, got {rollout.strategy!r}")
    if rollout.engine not in ROLLOUT_ENGINES:
        raise ValueError(f"rollout.engine must be one of {ROLLOUT_ENGINES}, got {rollout.engine!r}")
    if rollout.engine != "vllm" and (rollout.vllm or rollout.vllm_sleep_level is not None):
        raise ValueError("rollout.vllm and rollout.vllm_sleep_level are for rollout.engine=vllm")
    check_suffixes(rollout.suffixes)
    if advantages.mode_decision_from not in DECISION_FROM:
        raise ValueError(
            f"advantages.mode_decision_from must be one of {DECISION_FROM}, got {advantages.mode_decision_from!r}"
        )
    if reward.name not in REWARDS:
        raise ValueError(f"unknown reward {reward.name!r}; registered: {', '.join(sorted(REWARDS))}")
    if reward.name == "format" and (reward.format_weight or reward.pattern):
        raise ValueError("reward.name=format is the format reward alone: no reward.format_weight or reward.pattern")


def move_decision_tokens(rollout: Rollout, decision: int) -> Rollout:
    """Mode-decision credit: the last ``decision`` prompt tokens (the suffix after ``<think>``) become the
    head of the response, so the loss trains the choice between ``\\n`` and ``\\n\\n``."""
    if decision == 0:
        return rollout
    moved = list(rollout.prompt_ids[-decision:])
    return Rollout(
        prompt_ids=list(rollout.prompt_ids[:-decision]),
        response_ids=moved + list(rollout.response_ids),
        text=rollout.text,
        finished=rollout.finished,
        mode=rollout.mode,
        logprobs=None,
        prompt_suffix=rollout.prompt_suffix,
    )


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
        self.update_config = UpdateConfig(
            clip_eps_low=config.policy.clip_eps_low,
            clip_eps_high=config.policy.clip_eps_high,
            beta=config.policy.beta,
            temperature=config.rollout.temperature or 1.0,
            loss_agg_mode=config.policy.loss_agg_mode,
            ppo_epochs=config.policy.ppo_epochs,
            mini_batches=config.policy.mini_batches,
            max_tokens=config.policy.max_tokens,
            shared_prefix=config.policy.shared_prefix,
        )

    # -- rollouts ------------------------------------------------------------------------------------

    def _sync_rollout_weights(self) -> None:
        """Copy the engine's current weights into the rollout model on every rank, if they changed or the
        rollout engine lost its own (a vLLM level-2 sleep)."""
        if not self.rollout_stale and not self.rollout_engine.needs_weights:
            return
        self.rollout_stale = False
        pairs = self.engine.full_tensors(dtype=_weights_dtype(self.rollout_engine))  # one at a time, collective
        self.rollout_engine.load_weights((name.removeprefix("model."), tensor) for name, tensor in pairs)

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
        rollout = self.config.rollout
        if isinstance(source, torch.nn.Module):
            source.to(self.engine.device)
            return HFRolloutEngine(
                source, self.tokenizer, self.processor, batch_size=rollout.batch_size, suffixes=rollout.suffixes
            )
        from r4b.rollout.vllm import VLLMRolloutEngine

        for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if rollout.vllm.get(key, 1) != 1:
                raise ValueError(f"rollout.vllm.{key} must be 1: r4b runs one independent vLLM per rank")
        defaults: dict[str, Any] = {"seed": self.config.train.seed}
        if self.world_size > 1:  # one vLLM per rank inside the torchrun job, as TRL's colocate mode runs it
            defaults["distributed_executor_backend"] = "external_launcher"
        return VLLMRolloutEngine.from_pretrained(
            source,
            self.tokenizer,
            self.processor,
            sleep_level=rollout.vllm_sleep_level,
            suffixes=rollout.suffixes,
            **(defaults | rollout.vllm),
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

    def generate(self, samples: list[Any], step: int) -> list[list[Rollout]]:
        """Rollouts for ``samples`` (thinking columns first in BPO), identical whatever the world size."""
        per_call = self.config.rollout.prompts_per_call
        chunks = [samples[i : i + per_call] for i in range(0, len(samples), per_call)]
        mine = {}
        for c in range(self.rank, len(chunks), self.world_size):
            prompts = [Prompt.from_sample(s) for s in chunks[c]]
            columns = [
                self.rollout_engine.generate(prompts, n=n, mode=mode, sampling=self._sampling(step, c, salt))
                for salt, (mode, n) in enumerate(self._modes())
            ]
            mine[c] = [[r for col in columns for r in col[p]] for p in range(len(prompts))]
        if self.world_size > 1:
            gathered: list[dict] = [None] * self.world_size  # type: ignore[list-item]
            dist.all_gather_object(gathered, mine)
            mine = {c: rows for part in gathered for c, rows in part.items()}
        return [row for c in range(len(chunks)) for row in mine[c]]

    # -- one step -------------------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, Any]:
        config = self.config
        timings: dict[str, float] = {}
        started = clock = time.perf_counter()
        indices = prompt_indices(step, config.train.prompts_per_step, len(self.prompts), config.train.seed)
        samples = [self.prompts[i] for i in indices]
        self._sync_rollout_weights()
        timings["sync"], clock = time.perf_counter() - clock, time.perf_counter()
        rollouts = self.generate(samples, step)
        self.rollout_engine.sleep()  # a vLLM engine hands its GPU memory to the update
        timings["rollout"], clock = time.perf_counter() - clock, time.perf_counter()

        scores = torch.tensor(
            [[self._score(r, s.answer) for r in row] for row, s in zip(rollouts, samples, strict=True)]
        )
        formats = None
        if config.reward.format_weight:
            formats = torch.tensor([[REWARDS["format"](r.full_text, s.answer) for r in row] for row, s in
                                    zip(rollouts, samples, strict=True)])  # fmt: skip
        rewards = scores if formats is None else scores + config.reward.format_weight * formats
        least = config.reward.min_thought_chars
        off = [[off_mode(r.full_text, r.mode, min_thought_chars=least) for r in row] for row in rollouts]
        if config.reward.close_thoughts:
            stopped = lambda r: r.mode == "thinking" and r.finished and THINK_CLOSE not in r.full_text
            off = [
                [o or stopped(r) for o, r in zip(offs, row, strict=True)]
                for offs, row in zip(off, rollouts, strict=True)
            ]
        off = torch.tensor(off, dtype=torch.bool)
        if config.reward.off_mode is not None:
            rewards = torch.where(off, torch.tensor(config.reward.off_mode, dtype=rewards.dtype), rewards)
        num_thinking = config.rollout.group_size if config.rollout.strategy == "bpo" else None
        advantages = compute_advantages(
            rewards, config.advantages.grouping, num_thinking=num_thinking, scale_by_std=config.advantages.scale_by_std
        )
        timings["reward"], clock = time.perf_counter() - clock, time.perf_counter()

        trained = rollouts
        if self.decision_tokens is not None:
            trained = [
                [move_decision_tokens(r, n) for r, n in zip(row, self._decision_tokens(row, adv), strict=True)]
                for row, adv in zip(rollouts, advantages, strict=True)
            ]
        batch = RolloutBatch.from_rollouts(
            trained,
            advantages,
            images=[s.images for s in samples],
            processor=self.processor,
            pad_id=self.tokenizer.pad_token_id or 0,
        )
        ref = None
        if self.reference is not None:
            ref = compute_logprobs(
                self.reference,
                batch,
                max_tokens=config.policy.max_tokens,
                shared_prefix=config.policy.shared_prefix,
                temperature=self.update_config.temperature,
            )
        timings["logprobs"], clock = time.perf_counter() - clock, time.perf_counter()

        self.rollout_stale = not self.shares_policy
        update = policy_update(
            self.engine, batch, self.update_config, ref_logprobs=ref, rank=self.rank, world_size=self.world_size
        )
        timings["update"] = time.perf_counter() - clock
        elapsed = time.perf_counter() - started
        metrics = {"step": step + 1, **_rollout_metrics(rollouts, rewards, scores, formats, off), **_scalars(update)}
        metrics["time"] = timings
        metrics["tokens_per_s"] = float(batch.response_lengths.sum()) / elapsed
        metrics["lr"] = update.get("lr", self.engine.lrs().get("llm", 0.0))
        return metrics

    def _decision_tokens(self, row: Sequence[Rollout], advantages: torch.Tensor) -> list[int]:
        """How many suffix tokens after ``<think>`` each of one prompt's rollouts trains: its mode's, or with
        ``advantages.mode_decision_from=positive`` only in the mode whose mean advantage is positive (a mode's
        rollouts share their prompt ids; its decision token's net push is its advantages' sum)."""
        positive = self.config.advantages.mode_decision_from == "positive"
        modes = [r.mode for r in row]
        mean = {m: float(advantages[torch.tensor([x == m for x in modes])].mean()) for m in set(modes)}
        return [0 if positive and mean[r.mode] <= 0 else self.decision_tokens[r.mode] for r in row]

    # -- evaluation -------------------------------------------------------------------------------------

    def _score(self, rollout: Rollout, answer: str) -> float:
        """The configured reward of one rollout (its mode suffix included), in training and evaluation alike."""
        reward = self.config.reward
        kwargs = {"pattern": reward.pattern} if reward.pattern else {}
        return REWARDS[reward.name](rollout.full_text, answer, **kwargs)

    def evaluate_auto(self, step: int) -> dict[str, Any]:
        """Greedy auto-mode answers on the held-out prompts: accuracy and thinking trigger rate."""
        self._sync_rollout_weights()
        prompts = [Prompt.from_sample(s) for s in self.eval_prompts]
        sampling = self._sampling(step, 0, 99, greedy=True, max_new=self.config.train.eval_max_new_tokens)
        rows = self.rollout_engine.generate(prompts, n=1, mode="auto", sampling=sampling)
        self.rollout_engine.sleep()
        correct = [self._score(row[0], s.answer) for row, s in zip(rows, self.eval_prompts, strict=True)]
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


def _weights_dtype(engine: RolloutEngine) -> torch.dtype | None:
    """The dtype the rollout engine keeps its weights in (the synced tensors are cast to it on the training
    device, never gathered in fp32 to one rank's CPU): its ``weights_dtype`` if it says, a transformers engine's
    model's, else None (the training dtype; the engine's loader casts)."""
    dtype = getattr(engine, "weights_dtype", None)
    model = getattr(engine, "model", None)
    if dtype is None and isinstance(model, torch.nn.Module):
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return dtype


def train_bpo(config: BPOConfig) -> Path:
    """Run BPO (or the plain-GRPO baseline); returns the run directory."""
    return BPOTrainer(config).train()


def _rollout_metrics(
    rollouts: list[list[Rollout]],
    rewards: torch.Tensor,
    scores: torch.Tensor,
    formats: torch.Tensor | None,
    off: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Per mode: reward, accuracy (the configured reward alone), response length, the share of prompts whose
    responses in that mode all got one reward and, with a format reward, the share of well-formed responses;
    the thinking trigger rate (r4b.eval.metrics.is_thinking, as in evaluation) and, in the forced modes,
    ``off_mode``: the share of rollouts that left their mode (``off``, r4b.rl.reward.off_mode: thinking rollouts
    with an empty think block, non-thinking ones that think); overall, the share of prompts whose 2g rewards are
    all equal (zero advantage: no learning signal)."""
    if off is None:
        off = torch.tensor([[off_mode(r.full_text, r.mode) for r in row] for row in rollouts], dtype=torch.bool)
    out: dict[str, Any] = {"reward": float(rewards.mean())}
    columns = [rewards, scores] + ([formats] if formats is not None else [])
    by_mode: dict[str, list[tuple[float, ...]]] = {}
    for p, row in enumerate(rollouts):
        for k, rollout in enumerate(row):
            values = (*(float(c[p, k]) for c in columns), len(rollout.response_ids))
            by_mode.setdefault(rollout.mode, []).append(values)
    for mode, rows in by_mode.items():
        mean = lambda i, rows=rows: sum(r[i] for r in rows) / len(rows)
        out[mode] = {
            "reward": mean(0),
            "accuracy": sum(r[1] >= 1.0 for r in rows) / len(rows),
            "response_len": mean(-1),
        }
        mine = [(p, k) for p, row in enumerate(rollouts) for k, r in enumerate(row) if r.mode == mode]
        out[mode]["trigger_rate"] = sum(is_thinking(rollouts[p][k].full_text) for p, k in mine) / len(mine)
        if mode != "auto":
            out[mode]["off_mode"] = sum(bool(off[p, k]) for p, k in mine) / len(mine)
        if formats is not None:
            out[mode]["format"] = mean(2)
        # prompts whose responses in this mode all got one reward (under joint grouping they may still
        # get advantages, from the other mode's rewards)
        groups = [{float(rewards[p, k]) for k, r in enumerate(row) if r.mode == mode} for p, row in enumerate(rollouts)]
        groups = [values for values in groups if values]
        out[mode]["uniform_reward_groups"] = sum(len(values) == 1 for values in groups) / len(groups)
    out["zero_adv_groups"] = float((rewards.max(dim=1).values == rewards.min(dim=1).values).float().mean())
    return out


def _scalars(update: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in update.items() if isinstance(v, int | float) and not isinstance(v, bool)}
