"""Memory per GPU and time of an ``r4b sft`` / ``r4b bpo`` run, from the model's shapes and the run config alone.

Every figure is arithmetic on :class:`~r4b.plan.shapes.Shapes` and the config; what the config cannot say (mean
sample length, the image share of a pack, the MFU) is an :class:`Assumptions` field, printed with the plan.
The rules follow what the engines do (r4b.train.engine): the model loads in fp32; ``single`` keeps fp32 weights
(bf16: autocast, which caches a bf16 copy of each weight for the forward); FSDP2 shards fp32 weights, gradients and
AdamW's moments over the ranks and gathers bf16 layers one at a time (the next one prefetched); DeepSpeed's figures
are its own estimator's (``estimate_zero{2,3}_model_states_mem_needs``: 16-bit weights, whole under ZeRO-2; 16-bit
gradients and 16 bytes of fp32 master, moments and gradient per trained parameter, partitioned), plus the reduce
bucket.

With ``model.lora`` (:attr:`Shapes.adapters`) the adapters alone train: gradients and AdamW's state are the
adapters', the frozen base is kept in the training dtype (bf16 under ``engine.mixed_precision: bf16``, beside fp32
adapters; r4b.train.runtime.lora_base_dtype), BPO's reference is the policy with its adapters off (no copy), and the
backward computes no weight gradients of the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from r4b.config.sections import BPOConfig, SFTConfig
from r4b.plan.gpus import GPU, RESERVED_BYTES
from r4b.plan.shapes import Shapes, Tower

MODULE_ORDER = ("vision", "projector", "llm")  # the forward's order: gradients flow back through it
ADAMW_STATE = 8  # exp_avg and exp_avg_sq in fp32
DEEPSPEED_STATE = 16  # fp32 master, AdamW's two moments, the fp32 gradient partition (DeepSpeed's estimator)
DEEPSPEED_BUCKET = 500_000_000  # reduce_bucket_size's default, in elements
LOSS_CHUNK_ELEMENTS = 1 << 27  # r4b.kernels.linear_logprobs.DEFAULT_CHUNK_ELEMENTS: the backward's d_logits
VISION_CONTEXT = 1024  # patches one image patch attends to (SigLIP tiles: 729)


@dataclass(frozen=True)
class Assumptions:
    """What the config does not say, stated in every plan."""

    gpus: int = 8
    sample_tokens: int = 2048  # sft: mean tokens per sample (prompt, image and answer)
    image_share: float = 0.5  # share of a pack's tokens that are image tokens
    prompt_tokens: int = 1024  # bpo: mean prompt tokens (image included)
    response_tokens: int | None = None  # bpo: mean response tokens; None: half of rollout.max_new_tokens
    mfu: float = 0.4  # model FLOPs utilisation of the training passes
    samples: int | None = None  # sft: the data set's size (for the run time)


@dataclass
class Item:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Plan:
    stage: str
    gpu: GPU
    assumptions: Assumptions
    shapes: Shapes
    trained: list[str]
    memory: list[Item]  # the peak phase's items, per GPU
    activations: dict[str, float]  # with and without activation checkpointing, at the pack size
    tokens_per_step: float
    step_seconds: float
    steps: int | None
    timing: dict[str, float] = field(default_factory=dict)  # seconds per step by part
    phase: str = "update"  # which phase peaks (bpo: update or rollout)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> float:
        return sum(item.bytes for item in self.memory)

    @property
    def budget_bytes(self) -> float:
        return self.gpu.memory_bytes - RESERVED_BYTES

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    @property
    def run_seconds(self) -> float | None:
        return None if self.steps is None else self.steps * self.step_seconds


# ------------------------------------------------------------------------------------------------------------
# memory


def model_state(shapes: Shapes, trained: list[str], engine: Any, world: int) -> list[Item]:
    """Weights, gradients, optimizer state and the engine's gathered / bucketed copies on one GPU."""
    bf16 = engine.mixed_precision == "bf16"
    e = 2 if bf16 else 4
    if shapes.lora:  # the adapters train; the frozen base is in the training dtype, the adapters in fp32
        p_train = sum(shapes.adapters[m] for m in trained)
        steps = 4 * sum(shapes.adapter_tensors[m] for m in trained)
        p_all = shapes.total + sum(shapes.adapters.values())
        held = e * shapes.total + 4 * sum(shapes.adapters.values())
        what = f"{'bf16' if bf16 else 'fp32'} frozen base + fp32 LoRA adapters"
        cached = 2 * sum(shapes.adapters.values())  # autocast casts the fp32 adapters only: the base is bf16
    else:
        p_train = sum(shapes.params[m] for m in trained)
        steps = 4 * sum(shapes.tensors[m] for m in trained)  # AdamW's fp32 step counter per parameter tensor
        p_all = shapes.total
        held, what, cached = 4 * p_all, "fp32", 2 * p_all
    if engine.kind == "single":
        items = [
            Item("weights", held, what),
            Item("gradients", 4 * p_train, "fp32"),
            Item("optimizer", ADAMW_STATE * p_train + steps, "AdamW moments, fp32"),
        ]
        if bf16:
            items.append(Item("bf16 weight copies", cached, "autocast's cache during the forward"))
        return items
    if engine.kind == "fsdp2":
        items = [
            Item("weights", held / world, f"{what}, sharded over {world}"),
            Item("gradients", 4 * p_train / world, f"fp32, sharded over {world}"),
            Item("optimizer", ADAMW_STATE * p_train / world + steps, f"AdamW moments, sharded over {world}"),
        ]
        if world > 1 or bf16:  # two layers gathered (one prefetched) and the root unit (embeddings, lm_head)
            gathered = (2 * shapes.largest_layer + shapes.outside_layers) * e
            items.append(Item("gathered layers", gathered, "2 layers + the root, unsharded"))
        return items
    if engine.zero_stage < 3:  # the weights whole on every rank, gradients and the fp32 state partitioned
        items = [
            Item("weights", e * p_all, "bf16" if bf16 else "fp32"),
            Item("gradients", e * p_train / world, f"16-bit, partitioned over {world}"),
        ]
    else:  # everything partitioned; the largest layer's parameters and gradients live while it runs
        items = [
            Item("weights", e * p_all / world, f"sharded over {world}"),
            Item("gathered layer", 2 * e * shapes.largest_layer, "the largest layer, parameters and gradients"),
        ]
    return [
        *items,
        Item("optimizer", DEEPSPEED_STATE * p_train / world, f"fp32 master, moments, grad partition over {world}"),
        Item("reduce bucket", min(p_train, DEEPSPEED_BUCKET) * e, "reduce_bucket_size"),
    ]


def activation_bytes(shapes: Shapes, trained: list[str], tokens: int, image_share: float, e: int, ckpt: bool) -> float:
    """What the forward keeps for the backward over one packed micro-batch of ``tokens``: every layer's saved
    tensors, or with checkpointing each layer's input plus one layer's recomputed tensors."""
    image_tokens = tokens * image_share
    patches = image_tokens * shapes.patches_per_image_token
    llm = _layer_saved(shapes.llm, e, attention_stats=True)
    vision = _layer_saved(shapes.vision, e, attention_stats=True)
    keeps_vision = "vision" in trained  # a frozen tower before any trained module keeps nothing
    edges = 3 * e * shapes.llm.hidden * tokens  # embeddings, the final norm's input and output
    if ckpt:
        total = shapes.llm.layers * e * shapes.llm.hidden * tokens + max(llm * tokens, vision * patches)
        if keeps_vision:
            total += shapes.vision.layers * e * shapes.vision.hidden * patches
        return total + edges
    total = shapes.llm.layers * llm * tokens + edges
    if keeps_vision:
        total += shapes.vision.layers * vision * patches
    return total


def _layer_saved(tower: Tower, e: int, attention_stats: bool) -> float:
    """Bytes one transformer layer saves per token: both norms' inputs and outputs, q/k/v (raw, normed, rotated),
    the attention's output and log-sum-exp, and the MLP's four intermediate tensors (gate, act, up, product)."""
    qk = tower.heads * tower.head_dim
    kv = tower.kv_heads * tower.head_dim
    per_token = e * (4 * tower.hidden + 4 * qk + 4 * kv + 4 * tower.intermediate)
    return per_token + (4 * tower.heads if attention_stats else 0)


def loss_workspace(shapes: Shapes, tokens: int, e: int) -> float:
    """The fused loss's backward beyond the gradients: its d_logits chunk buffer, the fp32 d_hidden accumulator and
    d_hidden itself (r4b.kernels.linear_logprobs; the H100 benchmark's peak matches it, tests/e2e/test_plan.py)."""
    columns = max(1, min(shapes.vocab, LOSS_CHUNK_ELEMENTS // max(tokens, 1)))
    return tokens * columns * e + tokens * shapes.llm.hidden * (4 + e)


def attention_workspace(tower: Tower, tokens: int, e: int) -> float:
    """One varlen attention call's output and log-sum-exp (bench/attention.py's peak on the H100)."""
    return tokens * tower.heads * (tower.head_dim * e + 4)


# ------------------------------------------------------------------------------------------------------------
# FLOPs and time


def forward_flops_per_token(shapes: Shapes, context: float) -> float:
    """The language model's forward per token: 2 per matmul weight (the input embedding is a lookup; a tied
    lm_head still multiplies) plus causal attention over ``context`` keys on average."""
    matmul = shapes.params["llm"] - shapes.embedding + (shapes.vocab * shapes.llm.hidden if shapes.tied else 0)
    return 2 * matmul + 4 * shapes.llm.layers * shapes.llm.heads * shapes.llm.head_dim * context


def image_flops_per_token(shapes: Shapes) -> tuple[float, float]:
    """(vision tower, projector) forward FLOPs per LLM image token."""
    v = shapes.vision
    per_patch = 2 * shapes.params["vision"] + 4 * v.layers * v.heads * v.head_dim * VISION_CONTEXT
    return per_patch * shapes.patches_per_image_token, 2 * shapes.params["projector"]


def pass_multipliers(trained: list[str], ckpt: bool, lora: bool = False) -> dict[str, float]:
    """Forward-equivalents per module for one training pass: 3 for a trained module (forward, two backward matmuls),
    2 for a frozen one that gradients cross on their way to a trained one, 1 for a frozen one before any trained
    one; activation checkpointing adds a forward where the backward runs. ``lora``: the trained modules' base is
    frozen too (2: the input gradients reach their lower layers' adapters; the adapters' own FLOPs are apart)."""
    out = {}
    for i, module in enumerate(MODULE_ORDER):
        upstream = any(m in trained for m in MODULE_ORDER[:i])
        backward = (1 if lora else 2) if module in trained else (1 if upstream else 0)
        out[module] = 1 + backward + (1 if ckpt and backward else 0)
    return out


def training_flops(shapes: Shapes, trained: list[str], tokens: float, context: float, image_share: float, ckpt: bool):
    mult = pass_multipliers(trained, ckpt, shapes.lora)
    vision, projector = image_flops_per_token(shapes)
    image_tokens = tokens * image_share
    flops = tokens * forward_flops_per_token(shapes, context) * mult["llm"] + image_tokens * (
        vision * mult["vision"] + projector * mult["projector"]
    )
    if shapes.lora:  # the adapters' forward, input and weight gradients: 6 FLOPs per parameter a token
        a = shapes.adapters
        per_image_token = a["vision"] * shapes.patches_per_image_token + a["projector"]
        flops += 6 * (tokens * a["llm"] + image_tokens * per_image_token)
    return flops


def forward_flops(shapes: Shapes, tokens: float, context: float, image_share: float) -> float:
    vision, projector = image_flops_per_token(shapes)
    return tokens * forward_flops_per_token(shapes, context) + tokens * image_share * (vision + projector)


# ------------------------------------------------------------------------------------------------------------
# the plan


def trained_modules(config: SFTConfig | BPOConfig, shapes: Shapes | None = None) -> list[str]:
    """``model.train``, less modules whose learning rate is 0 (the stages freeze those too) and, with LoRA
    (``shapes.adapters``), modules without adapters (their base is frozen)."""
    lrs = {"llm": config.optim.lr_llm, "vision": config.optim.lr_vision, "projector": config.optim.lr_projector}
    trains = [m for m in MODULE_ORDER if m in config.model.train and lrs[m] > 0]
    if shapes is None or not shapes.lora:
        return trains
    from r4b.models.lora import frozen_targets_error

    for module in MODULE_ORDER:  # the stages refuse adapters that would never train (r4b.train.schedule)
        if shapes.adapter_layers.get(module) and module not in trains:
            raise frozen_targets_error(module, shapes.adapter_layers[module])
    return [m for m in trains if shapes.adapters[m] > 0]


def plan(config: SFTConfig | BPOConfig, shapes: Shapes, gpu: GPU, assume: Assumptions) -> Plan:
    """The plan of ``config`` on ``assume.gpus`` GPUs of kind ``gpu``."""
    if isinstance(config, BPOConfig):
        return _plan_bpo(config, shapes, gpu, assume)
    return _plan_sft(config, shapes, gpu, assume)


def _common(config, shapes: Shapes, trained: list[str], tokens: int, assume: Assumptions) -> tuple[list[Item], dict]:
    engine = config.engine
    e = 2 if engine.mixed_precision == "bf16" else 4
    act = {ckpt: activation_bytes(shapes, trained, tokens, assume.image_share, e, ckpt) for ckpt in (False, True)}
    items = model_state(shapes, trained, engine, assume.gpus)
    ckpt = engine.activation_checkpointing
    items += [
        Item("activations", act[ckpt], f"{tokens:,}-token pack, checkpointing {'on' if ckpt else 'off'}"),
        Item("fused loss workspace", loss_workspace(shapes, tokens, e), "d_logits chunk, d_hidden"),
        Item("attention workspace", attention_workspace(shapes.llm, tokens, e), "one layer's output and lse"),
    ]
    return items, {"without checkpointing": act[False], "with checkpointing": act[True]}


def _seconds(flops: float, gpu: GPU, config, assume: Assumptions) -> float:
    peak = gpu.bf16_tflops if config.engine.mixed_precision == "bf16" else gpu.fp32_tflops
    return flops / (assume.gpus * peak * 1e12 * assume.mfu)


def _plan_sft(config: SFTConfig, shapes: Shapes, gpu: GPU, assume: Assumptions) -> Plan:
    trained = trained_modules(config, shapes)
    tokens = config.data.max_tokens
    memory, activations = _common(config, shapes, trained, tokens, assume)
    step_tokens = config.train.global_batch_samples * assume.sample_tokens
    context = (assume.sample_tokens + 1) / 2
    ckpt = config.engine.activation_checkpointing
    flops = training_flops(shapes, trained, step_tokens, context, assume.image_share, ckpt)
    seconds = _seconds(flops, gpu, config, assume)
    steps = config.train.max_steps or config.train.schedule_steps
    if steps is None and assume.samples is not None:
        steps = config.train.epochs * math.ceil(assume.samples / config.train.global_batch_samples)
    return Plan("sft", gpu, assume, shapes, trained, memory, activations, step_tokens, seconds, steps,
                timing={"update": seconds})  # fmt: skip


def _plan_bpo(config: BPOConfig, shapes: Shapes, gpu: GPU, assume: Assumptions) -> Plan:
    trained = trained_modules(config, shapes)
    tokens = config.policy.max_tokens
    update, activations = _common(config, shapes, trained, tokens, assume)
    rollout, g = config.rollout, config.rollout.group_size
    response = assume.response_tokens or rollout.max_new_tokens // 2
    prompts = config.train.prompts_per_step
    rollouts = prompts * 2 * g
    per_prompt = 2 * (assume.prompt_tokens + g * response) if config.policy.shared_prefix else None
    step_tokens = prompts * per_prompt if per_prompt else rollouts * (assume.prompt_tokens + response)
    context = (assume.prompt_tokens + response) / 2
    share = assume.image_share * assume.prompt_tokens / (assume.prompt_tokens + response)  # images are prompts'
    ckpt = config.engine.activation_checkpointing
    passes = config.policy.ppo_epochs
    extra_forwards = (config.policy.beta > 0) + (passes * config.policy.mini_batches > 1)
    update_flops = passes * training_flops(shapes, trained, step_tokens, context, share, ckpt)
    update_flops += extra_forwards * forward_flops(shapes, step_tokens, context, share)
    update_s = _seconds(update_flops, gpu, config, assume)
    prefill_s = _seconds(forward_flops(shapes, rollouts * assume.prompt_tokens, assume.prompt_tokens / 2,
                                       assume.image_share), gpu, config, assume)  # fmt: skip
    decode_s = _decode_seconds(config, shapes, gpu, assume, rollouts, response)
    e = 2 if config.engine.mixed_precision == "bf16" else 4
    resident = [i for i in update if i.name in ("weights", "optimizer")]
    shared: list[Item] = []
    if config.policy.beta > 0 and not shapes.lora:  # with LoRA the reference is the policy, its adapters off
        shared.append(Item("reference model", 4 * shapes.total, "fp32 copy of the initial policy (policy.beta > 0)"))
    engine_share, engine_idle = _rollout_memory(config, shapes, gpu, assume, rollouts, response)
    update_items = update + shared + ([Item("rollout engine (idle)", engine_idle[0], engine_idle[1])] * bool(
        engine_idle[0]))  # fmt: skip
    rollout_items = resident + shared + [Item("rollout engine", engine_share[0], engine_share[1])]
    peak_update = sum(i.bytes for i in update_items)
    peak_rollout = sum(i.bytes for i in rollout_items)
    phase, memory = ("update", update_items) if peak_update >= peak_rollout else ("rollout", rollout_items)
    notes = [f"{rollouts} rollouts a step ({prompts} prompts x 2 x {g}), responses of {response} tokens on average"]
    if e == 4 and rollout.engine == "vllm":
        notes.append("vLLM generates in bf16 whatever engine.mixed_precision says")
    if config.policy.beta > 0 and shapes.lora:
        notes.append("the KL reference is the policy with its LoRA adapters off: no copy of the weights")
    return Plan("bpo", gpu, assume, shapes, trained, memory, activations, step_tokens,
                update_s + prefill_s + decode_s, config.train.max_steps or config.train.steps,
                timing={"update": update_s, "prefill": prefill_s, "decode": decode_s}, phase=phase,
                notes=notes)  # fmt: skip


def _kv_bytes_per_token(shapes: Shapes, e: int) -> float:
    return 2 * shapes.llm.layers * shapes.llm.kv_heads * shapes.llm.head_dim * e


def _rollout_memory(config: BPOConfig, shapes, gpu: GPU, assume: Assumptions, rollouts: int, response: int):
    """((bytes, note) while generating, (bytes, note) while the update runs) of the rollout engine on one GPU."""
    rollout = config.rollout
    if rollout.engine == "vllm":
        share = float(rollout.vllm.get("gpu_memory_utilization", 0.4)) * gpu.memory_bytes
        note = f"vLLM's gpu_memory_utilization {share / gpu.memory_bytes:g}"
        idle = 0.0 if rollout.vllm_sleep_level else share
        idle_note = "asleep" if rollout.vllm_sleep_level else "awake: set rollout.vllm_sleep_level to free it"
        return (share, note), (idle, idle_note)
    shares_policy = assume.gpus == 1 and config.engine.kind == "single"
    copy = 0 if shares_policy else 4 * shapes.total
    rows = min(rollout.batch_size, rollout.prompts_per_call * 2 * rollout.group_size)
    kv = rows * (assume.prompt_tokens + rollout.max_new_tokens) * _kv_bytes_per_token(shapes, 4)
    note = ("the policy itself" if shares_policy else "fp32 copy") + f" + KV cache of {rows} rows"
    return (copy + kv, note), (copy, "fp32 copy")


def _decode_seconds(config: BPOConfig, shapes: Shapes, gpu: GPU, assume: Assumptions, rollouts: int, response: int):
    """Decoding, bandwidth-bound: every token step reads the weights and the rows' KV cache once (a lower bound)."""
    rollout = config.rollout
    per_rank = math.ceil(rollouts / assume.gpus)
    if rollout.engine == "vllm":  # one continuous batch per rank: as many steps as the longest response
        calls, rows, e = 1, per_rank, 2
    else:
        chunks = math.ceil(config.train.prompts_per_step / rollout.prompts_per_call)
        rows_per_chunk = rollout.prompts_per_call * 2 * rollout.group_size
        calls = math.ceil(chunks / assume.gpus) * math.ceil(rows_per_chunk / rollout.batch_size)
        rows, e = min(rollout.batch_size, rows_per_chunk), 4
    context = assume.prompt_tokens + response / 2  # the responses' mean length while they grow
    step_bytes = e * shapes.total + rows * context * _kv_bytes_per_token(shapes, e)
    return calls * rollout.max_new_tokens * step_bytes / (gpu.bandwidth_tbs * 1e12)
