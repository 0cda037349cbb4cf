"""Every section of the run configs of ``r4b sft`` (:class:`SFTConfig`) and ``r4b bpo`` (:class:`BPOConfig`).

One home for the configuration: each field has its type (``Literal[...]`` where it is a choice), its default, its
range and resume marker (``Annotated`` metadata, :mod:`r4b.config.fields`) and its docstring, the string right under
it. ``docs/config.md`` is generated from this file (``python -m r4b.config.docs > docs/config.md``). Standard
library only: the stages import their configs from here, and so do the pieces that take one section
(:class:`EngineConfig` for :func:`r4b.train.engine.build_engine`, :class:`PolicyUpdate` under
:class:`r4b.rl.UpdateConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from r4b.config.fields import BELOW_ONE, FRACTION, NON_EMPTY, NON_NEGATIVE, PAIR, POSITIVE, RESUME_MAY_CHANGE

__all__ = [
    "STAGES",
    "AdvantageSection",
    "AttentionBackend",
    "BPOConfig",
    "BPODataSection",
    "BPOTrainSection",
    "DataSection",
    "EngineConfig",
    "ExportSection",
    "FusedLossMethod",
    "LoggingSection",
    "LoraSection",
    "LossAggMode",
    "ModelSection",
    "OptimSection",
    "PolicySection",
    "PolicyUpdate",
    "RewardSection",
    "RolloutSection",
    "SFTConfig",
    "SinkName",
    "TrainBase",
    "TrainSection",
    "TrainableModule",
]

# The choices shared by several fields (and by the code that reads them).
TrainableModule = Literal["vision", "projector", "llm"]
OnError = Literal["raise", "skip"]
AttentionBackend = Literal["auto", "r4b", "flex", "fa2", "r4b-schedule"]  # r4b.models.attention_backends.BACKENDS
FusedLossMethod = Literal["recompute", "cublas", "cublas-fast"]  # r4b.kernels.fused_grad.METHODS (tested equal)
SinkName = Literal["tensorboard", "wandb", "mlflow"]  # r4b.train.sinks.SINKS
LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo", "luspo", "cispo", "sapo", "vespo"]  # r4b.kernels.LOSS_TYPES


# ---------------------------------------------------------------------------------------------------------------
# shared by both stages


@dataclass
class LoraSection:
    """LoRA adapters (peft) instead of full weights (r4b.models.lora): the base stays frozen in the training dtype
    and only the adapters train (in model.train's modules, at their learning rates). The rollouts and the merged
    export see base + alpha/rank x BA under the base names."""

    rank: Annotated[int, NON_NEGATIVE] = 0
    """The adapters' rank; 0: no LoRA, the full weights train."""

    alpha: Annotated[float, POSITIVE] = 16.0
    """The adapters' scale is alpha / rank."""

    dropout: Annotated[float, NON_NEGATIVE, FRACTION] = 0.0
    """Dropout on the adapters' input while training."""

    targets: Annotated[list[str], NON_EMPTY] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """The linear layers that get adapters. A name without a dot (a regular expression over a layer's own name)
    names the language model's layers only; a pattern with a dot, a regular expression over the whole dotted name
    (.*vision_tower.*fc1), may reach the vision tower and the projector. lm_head is refused: the fused loss reads
    the base lm_head; so is a layer in a module that does not train (model.train, optim.lr_*), whose adapters would
    never move."""


@dataclass
class ModelSection:
    """The model to train and the kernels it runs on."""

    path: str | None = None
    """A Hugging Face directory (R-4B, Qwen2.5-VL or Qwen3-VL) or hub id; null: the embedded tiny R-4B and its
    tokenizer (no download)."""

    tokenizer: str | None = None
    """Tokenizer directory; null: the model directory's, or the tiny tokenizer."""

    seed: int = 0
    """Initialises the tiny model's weights (model.path: null)."""

    train: Annotated[list[TrainableModule], NON_EMPTY] = field(default_factory=lambda: ["vision", "projector", "llm"])
    """Which modules train; the others are frozen."""

    liger: bool = True
    """liger-kernel's RMSNorm / RoPE / SwiGLU on a GPU (never on a CPU, never liger's fused cross-entropy)."""

    attention_backend: Annotated[AttentionBackend | None, RESUME_MAY_CHANGE] = None
    """Which kernel runs the packed attention (r4b.models.attention_backends): auto picks per mask and device; r4b
    is r4b's Triton kernel, flex FlexAttention, fa2 torch's FA2 varlen (plain masks), r4b-schedule r4b's
    tile-schedule kernels. The environment variable R4B_ATTENTION_BACKEND, when set, overrides this key; null: the
    variable, else auto."""

    fused_loss_method: Annotated[FusedLossMethod | None, RESUME_MAY_CHANGE] = None
    """How the fused lm_head losses compute (r4b.kernels): recompute (Triton logits recomputed in the backward),
    cublas (cuBLAS logits, fp32) or cublas-fast (logits in the compute dtype). The environment variable
    R4B_FUSED_LOSS_METHOD, when set, overrides this key; null: the variable, else recompute."""

    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class OptimSection:
    """AdamW with one learning rate per module, linear warmup then cosine decay."""

    lr_llm: Annotated[float, NON_NEGATIVE] = 4e-5
    """Learning rate of the language model (the paper: 4e-5)."""

    lr_vision: Annotated[float, NON_NEGATIVE] = 4e-6
    """Learning rate of the vision tower (the paper: 4e-6); 0 freezes it."""

    lr_projector: Annotated[float, NON_NEGATIVE] = 4e-6
    """Learning rate of the projector (the paper: 4e-6); 0 freezes it."""

    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0
    """AdamW's decoupled weight decay."""

    betas: Annotated[list[float], PAIR, BELOW_ONE] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's beta1, beta2."""

    eps: Annotated[float, NON_NEGATIVE] = 1e-8
    """AdamW's epsilon."""

    warmup_ratio: Annotated[float, NON_NEGATIVE, FRACTION] = 0.03
    """Share of the schedule's steps spent in linear warmup."""

    min_lr_ratio: Annotated[float, NON_NEGATIVE, FRACTION] = 0.0
    """Where the cosine decay ends, as a share of each learning rate."""


@dataclass
class TrainBase:
    """The keys of the ``train`` section that both stages share: stopping, saving, resuming, logging, export."""

    max_steps: Annotated[int | None, POSITIVE, RESUME_MAY_CHANGE] = None
    """Stop after this many optimizer steps (--max-steps); the schedule keeps its full length, so a later run
    resumes on it. null: run the whole schedule."""

    seed: int = 0
    """Seeds the data order (a per-epoch shuffle), sampling and initialisation; a resumed run repeats it."""

    save_every: Annotated[int, NON_NEGATIVE, RESUME_MAY_CHANGE] = 0
    """Steps between checkpoints; 0: only at the end."""

    keep_checkpoints: Annotated[int, NON_NEGATIVE, RESUME_MAY_CHANGE] = 2
    """How many of the newest checkpoints to keep."""

    resume: Annotated[str, RESUME_MAY_CHANGE] = "auto"
    """auto: the newest complete checkpoint in output_dir (if any); none: start afresh (refused over an earlier
    run's checkpoints); or a checkpoint directory."""

    allow_config_change: Annotated[list[str], RESUME_MAY_CHANGE] = field(default_factory=list)
    """Keys (or whole sections) a resume may change although they alter the run."""

    tensorboard: Annotated[bool | None, RESUME_MAY_CHANGE] = None
    """TensorBoard logs in output_dir/tensorboard: true / false turns them on / off whatever logging.sinks lists (the
    older key, kept for existing configs); null: as logging.sinks says (on by default)."""

    progress: Annotated[bool, RESUME_MAY_CHANGE] = True
    """Show a progress line on the terminal."""

    export: Annotated[bool, RESUME_MAY_CHANGE] = True
    """Write output_dir/model (a Hugging Face directory, R-4B's layout) at the end."""

    on_nonfinite: Annotated[Literal["stop", "skip"], RESUME_MAY_CHANGE] = "stop"
    """An optimizer update whose loss or gradient norm is not finite (nan, inf) on any rank. stop: the run stops
    before applying it, with one line naming the step (nothing of it is applied or saved). skip: its gradients are
    dropped (the weights and AdamW's moments stay; the learning-rate schedule and the data move on as for a taken
    step), the step's skipped_updates counts it in metrics.jsonl and a line says so."""


@dataclass
class ExportSection:
    """What output_dir holds at the end (train.export)."""

    lora: Annotated[Literal["merged", "adapter", "both"], RESUME_MAY_CHANGE] = "merged"
    """A model.lora run: merged writes output_dir/model with the adapters merged into the base (loads without r4b
    and without peft, as a full run's export does); adapter writes output_dir/adapter, peft's adapter directory
    (PeftModel.from_pretrained on the base); both writes the two."""


@dataclass
class LoggingSection:
    """Where a run's metrics and BPO's sample tables go besides metrics.jsonl; only rank 0 logs."""

    sinks: Annotated[list[SinkName], RESUME_MAY_CHANGE] = field(default_factory=lambda: ["tensorboard"])
    """Trackers that get each step's metrics, the keys of metrics.jsonl (nested ones joined by /, e.g.
    thinking/off_mode; true / false as 1 / 0): tensorboard (output_dir/tensorboard), wandb (pip install
    'r4b[wandb]'; its files in $WANDB_DIR, else output_dir/wandb; WANDB_MODE=offline needs no account) and mlflow
    (pip install 'r4b[mlflow]'). A sink that fails to start is named in one line and the run goes on with the others.
    A resumed run continues the same W&B and MLflow runs (their ids: output_dir/sink_runs.json)."""

    samples_every: Annotated[int, NON_NEGATIVE, RESUME_MAY_CHANGE] = 0
    """BPO: every this many steps, a table of the step's first logging.samples_prompts prompts (text, image, answer)
    with each mode's responses, their rewards and off-mode flags goes to output_dir/samples.jsonl and the sinks; 0:
    never."""

    samples_prompts: Annotated[int, POSITIVE, RESUME_MAY_CHANGE] = 4
    """How many prompts such a table holds, each with all its responses."""

    project: Annotated[str | None, RESUME_MAY_CHANGE] = None
    """The W&B project and the MLflow experiment; null: $WANDB_PROJECT / $MLFLOW_EXPERIMENT_NAME, else r4b."""

    run_name: Annotated[str | None, RESUME_MAY_CHANGE] = None
    """The run's name in W&B and MLflow; null: the name of output_dir."""

    mlflow_uri: Annotated[str | None, RESUME_MAY_CHANGE] = None
    """The MLflow tracking URI (a server, sqlite:///..., file:...); null: $MLFLOW_TRACKING_URI, else a file store in
    output_dir/mlruns (no server needed)."""


@dataclass
class EngineConfig:
    """How to train: which engine, clipping, precision, activation checkpointing."""

    kind: Literal["single", "fsdp2", "deepspeed"] = "single"
    """single: one process; fsdp2: each decoder layer sharded with FSDP2; deepspeed: ZeRO (pip install
    -e '.[deepspeed]'). Several processes are launched with torchrun."""

    zero_stage: int = 2
    """DeepSpeed's ZeRO stage (engine.kind: deepspeed): 2 or 3 (1 works too)."""

    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0
    """Gradient-norm clipping; 0: off."""

    mixed_precision: Literal["no", "bf16"] = "no"
    """bf16: bf16 parameters and compute with fp32 master weights and fp32 gradient reduction (autocast on the
    single engine)."""

    activation_checkpointing: bool = False
    """Non-reentrant activation checkpointing of the decoder layers (for long packs)."""

    timeout_minutes: Annotated[float, POSITIVE, RESUME_MAY_CHANGE] = 120.0
    """How long a rank may wait in one collective (the process-group timeout): other ranks wait in a barrier while
    rank 0 exports the model or writes a checkpoint, far longer than NCCL's default of 10 minutes allows."""


# ---------------------------------------------------------------------------------------------------------------
# r4b sft


@dataclass
class DataSection:
    """The annealing data (docs/data.md)."""

    train: list[str] = field(default_factory=list)
    """JSONL files or prepared directories (r4b data prepare)."""

    max_tokens: Annotated[int, POSITIVE] = 16384
    """Token budget of a packed micro-batch (the paper: 16,384); a longer sample is never cut (see on_error)."""

    on_error: OnError = "raise"
    """raise: a bad or over-long sample stops the run, naming file, line and field; skip: it is counted in
    data_report.json."""

    mask_empty_think: bool = True
    """The paper's non-thinking loss masking: the empty think block of a direct answer is not trained."""

    workers: int | None = None
    """DataLoader processes per rank that read, pack and preprocess images ahead of the step (r4b.train.loader);
    null: 0 on a CPU, else up to 4 per rank. The batches do not depend on it."""


@dataclass
class TrainSection(TrainBase):
    """Steps, epochs and checkpoints of bi-mode annealing."""

    global_batch_samples: Annotated[int, POSITIVE] = 1024
    """Samples per optimizer step, split over the ranks and packed per rank (the paper: 1,024)."""

    epochs: Annotated[int, POSITIVE] = 1
    """Passes over the data, each in its own shuffle."""

    schedule_steps: Annotated[int | None, POSITIVE] = None
    """Length of the warmup+cosine schedule; null: all steps of all epochs."""

    attention_cost_weight: Annotated[float, NON_NEGATIVE] = 0.0
    """Weight of a quadratic (attention) term in a sample's cost when balancing ranks (verl's seqlen balancing);
    0: tokens only."""


@dataclass
class SFTConfig:
    """``r4b sft``: bi-mode annealing, packed SFT over thinking and non-thinking samples."""

    output_dir: Annotated[str, RESUME_MAY_CHANGE] = "runs/sft"
    """The run directory (--output-dir): config.yaml, metrics.jsonl, checkpoints, model/."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingSection = field(default_factory=LoggingSection)
    export: ExportSection = field(default_factory=ExportSection)


# ---------------------------------------------------------------------------------------------------------------
# r4b bpo


@dataclass
class BPODataSection:
    """The RL prompts."""

    prompts: list[str] = field(default_factory=list)
    """Prompt files, each prompt with a reference answer and no assistant turn: r4b's JSONL, or Parquet files,
    ``datasets`` save_to_disk directories, JSON lists and JSONL read through the three keys below (verl's and
    EasyR1's layouts as they are; docs/data.md)."""

    eval: str | None = None
    """Held-out prompts for the periodic greedy auto-mode evaluation (train.eval_every); null: none."""

    on_error: OnError = "raise"
    """raise: a bad prompt stops the run, naming file, line and field; skip: it is counted in data_report.json
    (the evaluation prompts too)."""

    prompt_key: str = "messages"
    """The column holding the prompt: a chat list of {role, content} or one string (the user's turn). verl:
    prompt; EasyR1: problem."""

    answer_key: str = "answer"
    """The column holding the reference answer (a dotted key reads into a struct). verl:
    reward_model.ground_truth; EasyR1: answer."""

    image_key: str = "images"
    """The column holding the images: paths, bytes or datasets.Image structs (one or a list)."""


@dataclass
class RolloutSection:
    """How rollouts are generated."""

    strategy: Literal["bpo", "grpo"] = "bpo"
    """bpo: g thinking and g non-thinking rollouts per prompt; grpo: 2g in auto mode (the paper's baseline)."""

    group_size: Annotated[int, POSITIVE] = 8
    """g, the rollouts per prompt and mode."""

    temperature: Annotated[float, NON_NEGATIVE] = 1.0
    """Sampling temperature; the update's log-probs use it too."""

    top_p: Annotated[float, FRACTION] = 1.0
    """Nucleus sampling's probability mass; 1: off."""

    top_k: Annotated[int, NON_NEGATIVE] = 0
    """Sample among the k likeliest tokens; 0: off."""

    max_new_tokens: Annotated[int, POSITIVE] = 1024
    """The longest response; a longer one is cut (and is not off-mode for it)."""

    prompts_per_call: Annotated[int, POSITIVE] = 8
    """Prompts generated together and seeded together: the seed depends only on (seed, step, chunk), so 1 and N
    processes and a resumed run see the same rollouts."""

    batch_size: Annotated[int, POSITIVE] = 64
    """Rows per generate call (rollout.engine: hf)."""

    engine: Literal["hf", "vllm"] = "hf"
    """hf: transformers generate, runs anywhere; vllm: a colocated vLLM per rank (GPU, pip install -e
    '.[vllm]')."""

    vllm: dict[str, Any] = field(default_factory=dict)
    """vllm.LLM keyword arguments (rollout.engine: vllm), e.g. {gpu_memory_utilization: 0.5}."""

    vllm_sleep_level: int | None = None
    """1 or 2: vLLM sleeps between rollouts, freeing GPU memory for the update (rollout.engine: vllm)."""

    vllm_kv_cache_gib: Annotated[float | None, POSITIVE] = None
    """vLLM's KV-cache budget in GiB, on the GPU and the CPU (rollout.engine: vllm; vllm.LLM's kv_cache_memory_bytes);
    null: 40% of the GPU's memory on a GPU, 1 GiB on a CPU (where vLLM's own default reserves a share of the
    machine's RAM)."""

    suffixes: dict[str, str] = field(default_factory=dict)
    """Per-mode prompt suffixes replacing the chat template's, e.g. {thinking: "<think>\\nLet me think.\\n"};
    mode-decision credit then trains everything after <think> in them."""

    filter_groups: bool = False
    """DAPO's dynamic sampling: drop the prompts whose advantages are all 0 (under BPO's joint grouping: whose 2g
    rewards, both modes together, are all equal) and draw more prompts until the step holds train.prompts_per_step
    with a signal or max_filter_rounds have run (r4b.rl.dynamic_sampling). metrics.jsonl: filter."""

    max_filter_rounds: Annotated[int, POSITIVE] = 3
    """rollout.filter_groups: the most generation rounds of a step, the first included; when they run out the step
    trains on the prompts it kept (filter.full: false)."""


@dataclass
class RewardSection:
    """Rule-based rewards (r4b.rl.reward)."""

    name: str = "answer"
    """A registered reward (r4b.rl.register_reward): answer, or format alone; or http: a reward server (url)."""

    url: str | None = None
    """reward.name=http: the server's URL, which takes OpenRLHF's remote reward requests (POST {"query", "prompts",
    "labels", "mode"} -> {"rewards"}; r4b.rl.remote_reward). Rank 0 asks; every rank gets the rewards."""

    timeout_s: Annotated[float, POSITIVE] = 60.0
    """reward.name=http: seconds one request may take before it is retried."""

    retries: Annotated[int, NON_NEGATIVE] = 3
    """reward.name=http: tries after the first for a request that times out, fails or gets a bad answer."""

    batch_size: Annotated[int, POSITIVE] = 64
    """reward.name=http: queries per request."""

    concurrency: Annotated[int, POSITIVE] = 4
    """reward.name=http: requests in flight at once."""

    on_failure: float | None = None
    """reward.name=http: the reward of a rollout whose request still fails after the retries (counted in the
    metrics as reward_failures); null: the run stops with one line naming the server and the error."""

    pattern: str | None = None
    """Regular expression for the final answer where there is no \\boxed{}."""

    format_weight: float = 0.0
    """> 0 adds this weight times the format reward (<think> first, one closed block, then an answer)."""

    off_mode: float | None = -1.0
    """The reward of a forced-mode rollout that leaves its mode, whatever its answer: a thinking rollout whose
    think block is empty or a non-thinking one that thinks anyway (r4b.rl.reward.off_mode). Without it the
    thinking group learns to close forced thoughts at once (issue 16); -1, below a wrong answer's 0, stopped that
    in the demo. null: the paper's plain answer reward. Auto rollouts (grpo) are never off-mode."""

    min_thought_chars: int = 1
    """A forced thought shorter than this many characters (tags removed, stripped) is off-mode too: a one-word
    "thought" keeps the form of thinking without its exploration."""

    close_thoughts: bool = False
    """true: a forced thought that stops (stop token) before </think> is off-mode too; one cut at
    rollout.max_new_tokens is not."""

    overlong: Literal["none", "mask", "soft"] = "none"
    """Rollouts cut at rollout.max_new_tokens: none (scored like the rest); mask: dropped from the loss and from
    their group's mean and std (DAPO's overlong filtering); soft: DAPO's linear penalty, 0 up to
    max_new_tokens - overlong_buffer tokens, falling to -1 at max_new_tokens, added before the group normalisation."""

    overlong_buffer: Annotated[int, POSITIVE] = 64
    """reward.overlong=soft: the last this many tokens before rollout.max_new_tokens, over which the penalty grows."""

    thought_budget: Annotated[int | None, POSITIVE] = None
    """Thinking rollouts whose thought (response tokens before </think>) is longer than this many tokens lose
    reward linearly (thought_budget_penalty), before the group normalisation; non-thinking and auto rollouts never.
    null: no budget."""

    thought_budget_penalty: Annotated[float, NON_NEGATIVE] = 0.5
    """reward.thought_budget: the most reward a thought over the budget loses, reached at twice the budget (linear
    from the budget up). Keep it below a wrong answer's reward minus reward.off_mode, so that a long thought never
    scores below leaving the mode."""


@dataclass
class AdvantageSection:
    """Advantages of the rollouts' rewards (r4b.rl.advantages)."""

    grouping: Literal["joint", "per_mode"] = "joint"
    """joint: normalised over all 2g rollouts of a prompt (the paper); per_mode: over each mode's g (ablation)."""

    scale_by_std: bool = True
    """Divide by the group's standard deviation; false: Dr. GRPO."""

    mode_decision_credit: bool = False
    """Beyond the paper: the suffix tokens after <think>, where the mode is decided, are trained too."""

    mode_decision_from: Literal["all", "positive"] = "all"
    """Which rollouts train the mode decision: all, or positive: those of the prompt's mode with a positive mean
    advantage. The softmax spans the vocabulary, so a negative push on one mode's token feeds the likeliest other
    token, not the other mode's (issue 16, docs/demo.md)."""


@dataclass
class PolicyUpdate:
    """The policy update's clipped surrogate and batching (verl's names), shared by the ``policy`` section and
    :class:`r4b.rl.UpdateConfig`."""

    clip_eps_low: float = 0.2
    """PPO's lower clip: the ratio is clipped to at least 1 - clip_eps_low."""

    clip_eps_high: float = 0.2
    """PPO's upper clip: the ratio is clipped to at most 1 + clip_eps_high; above clip_eps_low: DAPO's
    clip-higher."""

    beta: Annotated[float, NON_NEGATIVE] = 0.0
    """Weight of the KL to the reference (policy.kl_estimator), the frozen initial policy (the paper's beta KL);
    > 0 costs the reference's forward pass each step."""

    loss_type: LossType = "dapo"
    """The per-token policy loss, by liger-kernel's and TRL's names (r4b.kernels.LOSS_TYPES): grpo, bnpo, dapo,
    dr_grpo, luspo: PPO's clipped surrogate (each with its aggregation); cispo: the clipped ratio (capped at
    clip_eps_high, detached) times the log-prob; sapo: a sigmoid gate (sapo_temperature_*) instead of the clip;
    vespo: a detached gamma weight of the response's ratio (vespo_*) times the log-prob."""

    loss_agg_mode: LossAggMode | None = None
    """verl's loss aggregation: token-mean over all loss tokens, or a mean over responses (seq-mean-*); null: the
    loss type's own (token-mean for dapo, bnpo, cispo, vespo; seq-mean-token-mean for grpo, sapo;
    seq-mean-token-sum-norm for dr_grpo; seq-mean-token-sum for luspo)."""

    importance_level: Literal["token", "sequence"] = "token"
    """The ratio per token, or per response (GSPO: exp of the mean log-ratio over its tokens, shared by them; the
    clipped loss types only, and luspo's intended setting)."""

    sapo_temperature_pos: Annotated[float, POSITIVE] = 1.0
    """SAPO's gate temperature where the advantage is positive."""

    sapo_temperature_neg: Annotated[float, POSITIVE] = 1.05
    """SAPO's gate temperature where the advantage is not positive."""

    vespo_k_pos: float = 2.0
    """VESPO's gamma shape k where the advantage is not negative."""

    vespo_lambda_pos: float = 3.0
    """VESPO's gamma rate lambda where the advantage is not negative."""

    vespo_k_neg: float = 3.0
    """VESPO's gamma shape k where the advantage is negative."""

    vespo_lambda_neg: float = 2.0
    """VESPO's gamma rate lambda where the advantage is negative."""

    ppo_epochs: Annotated[int, POSITIVE] = 1
    """Passes over each step's rollouts."""

    mini_batches: Annotated[int, POSITIVE] = 1
    """Optimizer steps per pass; the rollouts are split by prompt. One update step in all is on-policy (no old
    log-probs)."""

    max_tokens: Annotated[int, POSITIVE] = 16384
    """Token budget of a packed micro-batch of the update."""

    shared_prefix: bool = True
    """Pack each (prompt, mode) once with its responses, so the prompt and its image tokens are computed once."""

    rollout_correction: Literal["none", "tis", "mis"] = "none"
    """Rollout/training mismatch correction (r4b.rl.rollout_correction): importance weights pi_old / pi_rollout
    from the rollout engine's own log-probs, on each token's surrogate inside the fused loss; tis truncates them at
    rollout_correction_cap, mis drops the tokens (or responses) above it. Costs a log-prob pass when the update is
    one step. metrics.jsonl: is_weight_mean, is_weight_max, is_capped."""

    rollout_correction_level: Literal["token", "sequence"] = "token"
    """One weight per token, or per response (the product of its tokens' ratios)."""

    rollout_correction_cap: Annotated[float, POSITIVE] = 2.0
    """The cap C of the importance weights (verl's and TRL's default, 2)."""

    kl_estimator: Literal["k1", "k2", "k3", "low_var_kl"] = "k3"
    """The per-token estimator of the KL to the reference (policy.beta > 0): k1 log(pi/ref), k2 its square / 2,
    k3 ref/pi - log(ref/pi) - 1 (TRL's, liger's), low_var_kl k3 clamped to [-10, 10] (verl's)."""

    delta: Annotated[float | None, POSITIVE] = None
    """INTELLECT-2's two-sided clipping: the unclipped ratio is capped at delta (> 1 + clip_eps_high), bounding a
    negative advantage's push on a token the policy already made much likelier; null: off."""

    entropy_coeff: Annotated[float, NON_NEGATIVE] = 0.0
    """verl's entropy bonus: - entropy_coeff x each loss token's entropy (fused, from the kernel's entropy; no
    logits), aggregated like the loss. 0: none (the entropy is still logged)."""


@dataclass
class PolicySection(PolicyUpdate):
    """The policy update (r4b.rl.policy_update) and its fused BPO loss."""

    clip_eps_high: float = 0.28  # DAPO's clip-higher by default (r4b.rl.UpdateConfig's default stays 0.2)


@dataclass
class BPOTrainSection(TrainBase):
    """Steps, evaluation and checkpoints of BPO."""

    prompts_per_step: Annotated[int, POSITIVE] = 32
    """Prompts per step, consecutive positions of a per-epoch shuffle."""

    steps: Annotated[int, POSITIVE] = 300
    """The schedule's length (the paper's RL ran about 300 steps)."""

    eval_every: Annotated[int, NON_NEGATIVE] = 0
    """Steps between greedy auto-mode evaluations on data.eval; 0: only at the end (if data.eval is set)."""

    eval_max_new_tokens: int = 512
    """The longest response of those evaluations."""

    stop_after_flat_steps: Annotated[int, NON_NEGATIVE, RESUME_MAY_CHANGE] = 20
    """Stop, with a checkpoint and one line, after this many steps in a row in which every advantage was 0 (each
    group's rewards all equal: the rewards teach nothing, often a reward that cannot score the answers). Each such
    step is flagged (metrics.jsonl: flat, flat_steps, zero_adv_groups = 1; the progress line). 0: never stop."""


@dataclass
class BPOConfig:
    """``r4b bpo``: GRPO with g thinking and g non-thinking rollouts per prompt and joint advantages."""

    output_dir: Annotated[str, RESUME_MAY_CHANGE] = "runs/bpo"
    """The run directory (--output-dir): config.yaml, metrics.jsonl, checkpoints, model/."""

    model: ModelSection = field(default_factory=ModelSection)
    data: BPODataSection = field(default_factory=BPODataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardSection = field(default_factory=RewardSection)
    advantages: AdvantageSection = field(default_factory=AdvantageSection)
    policy: PolicySection = field(default_factory=PolicySection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr_llm=1e-6, lr_vision=0.0, lr_projector=0.0))
    train: BPOTrainSection = field(default_factory=BPOTrainSection)
    engine: EngineConfig = field(default_factory=EngineConfig)
    logging: LoggingSection = field(default_factory=LoggingSection)
    export: ExportSection = field(default_factory=ExportSection)


STAGES: dict[str, type] = {"sft": SFTConfig, "bpo": BPOConfig}
"""The run config of each ``r4b`` stage that takes ``--config``."""
