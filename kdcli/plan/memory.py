"""The memory formulas of `kd plan`: pure arithmetic on model shapes and recipe settings (see `docs/plan.md`).

Everything is bytes per rank. The plan is a deliberate upper bound: every component is counted as alive at the
same time, although e.g. parameter gradients only grow while activations are freed during backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from kdcli.losses import sizing
from kdcli.models import FUSED_HEAD_MODEL_TYPES
from kdcli.plan.configs import ModelShape

Device = Literal["cpu", "cuda"]

# The naive dense implementations of bench/losses.py keep this many fp32 [B·T, V] tensors alive at their peak
# besides the logit gradient: fkl/rkl/tvd log-softmaxes of both sides, p, the difference and the product; the
# skewed/JS ones a mixture and its log on top; AKL a full sort (values + int64 indices) and masks; ATKD p̂ and
# gathers. Measured: docs/benchmarks.md "Losses (CUDA)", (naive MB − bf16 gradient) / (4 · B·T·V) rounded up.
NAIVE_WORK = {"fkl": 5, "rkl": 5, "tvd": 5, "skl": 8, "srkl": 8, "js": 8, "akl": 11, "atkd": 7}
NAIVE_WORK_DEFAULT = 8

# Activations saved for backward per token and per decoder layer, in bytes, as c_h·h + c_i·i + c_kv·(g·d) for a
# Llama-style layer with SDPA attention (no s² score matrix) and no dropout; measured with saved-tensor hooks on
# HF Llama (tests/test_plan.py re-checks them). "autocast": fp32 weights under bf16 autocast (kd's plain engine:
# the residual stream and norms stay fp32, matmul inputs/outputs are bf16); "fp32": everything fp32; "bf16":
# bf16 weights (DeepSpeed bf16), taken as half the fp32 figure.
ACT_COEF = {"autocast": (32, 8, 2), "fp32": (32, 16, 8), "bf16": (16, 8, 4)}
# Outside the layers, per token: embedding output and final norm input/output (fp32 for autocast/fp32).
ACT_OUTSIDE = {"autocast": 12, "fp32": 12, "bf16": 6}

CACHE_TOKEN_OVERHEAD = 10  # label log-prob, tail mass and row bookkeeping per cached position, bytes
DEFAULT_CACHE_K = 64


@dataclass(frozen=True)
class Settings:
    """Everything besides the two model shapes that the plan depends on (read from the recipe and CLI)."""

    batch_size: int
    seq_len: int
    precision: Literal["bf16", "fp32"] = "bf16"
    divergence: str = "fkl"
    kd_ratio: float = 0.5
    chunk_size: int | None = None
    grad_accum: int = 1
    world_size: int = 1
    device: Device = "cpu"
    device_memory: int | None = None  # bytes per rank; None = do not judge fit
    deepspeed: bool = False  # the recipe has a `deepspeed:` section
    zero_stage: int | None = None  # the recipe's stage, marked in the table
    ds_bf16: bool = True
    offload_optimizer: bool = False
    offload_param: bool = False
    teacher_zero3: bool = False
    cache_k: int | None = None  # top-K of a teacher cache; None = the teacher runs online
    activation_checkpointing: bool = False
    optimizer_state_bytes: int = 4  # per AdamW moment and trained parameter: 4 (fp32), 2 (`optimizer_states: bf16`)
    sampled_tokens: int = 0  # on-policy: tokens the student samples per prompt at most (0: no sampling)
    fused: bool | str = "auto"  # `loss.fused`

    @property
    def tokens(self) -> int:
        """Tokens of a micro-batch as trained: a sampled one is its prompts plus up to `sampled_tokens` each."""
        return self.batch_size * (self.seq_len + self.sampled_tokens)


@dataclass(frozen=True)
class States:
    """Student model states of one rank: on the device, and what offloading moved to host memory."""

    params: int
    grads: int
    optimizer: int
    host: int = 0

    @property
    def device(self) -> int:
        return self.params + self.grads + self.optimizer


def plain_states(psi: int, precision: str, trainable: int | None = None, state_bytes: int = 4) -> States:
    """kd's own single-process engine: fp32 master weights, fp32 gradients, AdamW m and v (`state_bytes` each: 4,
    or 2 with `train.optimizer_states: bf16`).

    Under bf16 autocast every op casts its fp32 weight to bf16 and keeps that copy for backward: 2 B/param more.
    (The foreach AdamW step also allocates a 4 B/param temporary, but only when activations are already freed.)
    `trainable` (LoRA: the adapters, default all Ψ) alone have gradients and AdamW moments.
    """
    params = 4 * psi + (2 * psi if precision == "bf16" else 0)
    t = psi if trainable is None else trainable
    return States(params=params, grads=4 * t, optimizer=2 * state_bytes * t)


def zero_states(
    psi: int,
    stage: int,
    world: int,
    *,
    bf16: bool = True,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    largest_layer: int = 0,
    trainable: int | None = None,
) -> States:
    """DeepSpeed ZeRO model states per rank (the ZeRO paper's (2 + 2 + K)·Ψ with K = 12, plus DeepSpeed's fp32
    gradient partition).

    bf16: 16-bit weights 2Ψ, 16-bit gradients 2Ψ, fp32 master weights 4Ψ, Adam m and v 8Ψ, fp32 gradients for the
    optimizer 4Ψ (stage 0's BF16_Optimizer and stages 1-3 keep them; DeepSpeed's estimators count these in their
    16Ψ/N). fp32: weights 4Ψ (they are the master copy), gradients 4Ψ, Adam 8Ψ.
    Stage 1 shards the optimizer part over the N ranks, stage 2 also the 16-bit gradients, stage 3 also the
    weights, and then gathers one module at a time (its weights and gradients: 2·(2 or 4)·largest_layer).
    offload_optimizer (stages 1-3) moves the optimizer part to host memory; offload_param (stage 3) the weights.
    `trainable` (LoRA: the adapters, default all Ψ) alone have gradients, master weights and Adam moments.
    """
    if not 0 <= stage <= 3:
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    if world < 1:
        raise ValueError(f"world size must be ≥ 1, got {world}")
    p_bytes, g_bytes, opt_bytes = (2, 2, 4 + 8 + 4) if bf16 else (4, 4, 8)
    params = _shard(p_bytes * psi, world if stage >= 3 else 1)
    t = psi if trainable is None else trainable
    grads = _shard(g_bytes * t, world if stage >= 2 else 1)
    optimizer = _shard(opt_bytes * t, world if stage >= 1 else 1)
    gathered_p = gathered_g = 0
    if stage == 3:
        gathered_p, gathered_g = p_bytes * largest_layer, g_bytes * largest_layer
    host = 0
    if offload_optimizer and stage >= 1:
        host += optimizer
        optimizer = 0
    if offload_param and stage == 3:
        host += params
        params = 0
    return States(params=params + gathered_p, grads=grads + gathered_g, optimizer=optimizer, host=host)


def _shard(nbytes: int, world: int) -> int:
    return math.ceil(nbytes / world)


def deepspeed_estimate(psi: int, stage: int, world: int, largest_layer: int = 0) -> int:
    """DeepSpeed's own device estimate without offload (`estimate_zero2_model_states_mem_needs`: 4Ψ + 16Ψ/N;
    `estimate_zero3_model_states_mem_needs`: 4·L + 18Ψ/N), for comparison in tests and docs."""
    if stage == 3:
        return 4 * largest_layer + int(18 * psi / world)
    return 4 * psi + int(16 * psi / world)


def student_activations(shape: ModelShape, tokens: int, mode: str, checkpointing: bool = False) -> int:
    """Saved activations of one micro-batch (tokens = B·T): L·tokens·(c_h·h + c_i·i + c_kv·g·d) + outside layers.

    With activation checkpointing only each layer's input (the residual stream) is kept, plus one layer's full
    set during its recomputation.
    """
    c_h, c_i, c_kv = ACT_COEF[mode]
    per_layer = tokens * (c_h * shape.hidden + c_i * shape.intermediate + c_kv * shape.kv_dim)
    outside = tokens * ACT_OUTSIDE[mode] * shape.hidden
    if checkpointing:
        residual = 2 if mode == "bf16" else 4
        return shape.layers * tokens * residual * shape.hidden + per_layer + outside
    return shape.layers * per_layer + outside


def teacher_activations(shape: ModelShape, tokens: int, elem: int) -> int:
    """No grad: only one layer's tensors are alive at once. The MLP is the peak: residual, the normed input (the
    norm computes in fp32) and gate, up and act(gate) of width i."""
    return tokens * (elem * (2 * shape.hidden + 3 * shape.intermediate) + 4 * shape.hidden)


@dataclass(frozen=True)
class Logits:
    """The [B·T, V] tensors of one micro-batch, and the loss workspace naive vs chunked."""

    student: int  # the student's logits (16-bit under bf16)
    grad: int  # their gradient, same dtype (kd writes it chunk by chunk; autograd would allocate it anyway)
    teacher: int  # the teacher's dense logits (0 with a cache)
    ce: int  # cross-entropy: fp32 copy of the logits and its saved log-softmax (both implementations)
    naive: int  # divergence workspace of a naive dense implementation
    chunked: int  # divergence workspace of kd's chunked loss: one chunk
    chunk_rows: int
    # The fused head (`loss.fused`): what the logits part holds instead of all the above, i.e. one chunk, one block
    # of projected logits, ∂/∂h and the 16-bit copies of the output weights; plus the teacher's whole logits where
    # only the student is fused. None: the plain path.
    fused: int | None = None
    fused_chunk_rows: int = 0

    @property
    def common(self) -> int:
        return self.student + self.grad + self.teacher + self.ce

    @property
    def total_naive(self) -> int:
        return self.common + self.naive

    @property
    def total_chunked(self) -> int:
        """kd's logits part: the fused head's where it applies, else the whole tensors and one chunk."""
        return self.fused if self.fused is not None else self.common + self.chunked


def chunk_rows(rows: int, vocab: int, divergence: str, device: Device, sparse: bool, chunk_size: int | None) -> int:
    """As `ChunkedDivergence.chunk_rows` (fp32 compute): the same rule and figures, from the torch-free
    `kdcli.losses.sizing` (budget // (V · 4 B · work), so one chunk's working set is at most the budget)."""
    return sizing.chunk_rows(rows, vocab, divergence, device_type=device, sparse=sparse, chunk_size=chunk_size)


def fused_applies(s: Settings, shape: ModelShape) -> bool:
    """As the engine decides `loss.fused` for its plain engine (`kdcli.engine.objective.choose_heads`): not `false`,
    and a model type whose output layer kd fuses. The ZeRO rows never ask: under DeepSpeed it is the plain path."""
    return s.fused is not False and shape.model_type in FUSED_HEAD_MODEL_TYPES


def logits_memory(
    vocab: int, s: Settings, student: ModelShape | None = None, teacher: ModelShape | None = None
) -> Logits:
    """The logits part of a micro-batch; with `student` (and an online `teacher`) shapes it is the fused head's."""
    n = s.tokens
    elem = 2 if s.precision == "bf16" else 4
    sparse = s.cache_k is not None
    rows = chunk_rows(n, vocab, s.divergence, s.device, sparse, s.chunk_size)
    work = sizing.work(s.divergence, sparse)
    uses_kd = s.kd_ratio > 0
    fused = fused_rows = None
    if student is not None:
        fused_rows = sizing.chunk_rows(
            n, vocab, s.divergence, device_type=s.device, sparse=sparse, chunk_size=s.chunk_size, fused=True, kd=uses_kd
        )
        teacher_fused = teacher is not None and not sparse and uses_kd
        block = sizing.fused_block_rows(n, fused_rows)
        fused = (
            fused_rows * vocab * 4 * sizing.work(s.divergence, sparse, fused=True, kd=uses_kd)
            + block * vocab * elem * (2 if teacher_fused else 1)  # the student's and a fused teacher's
            + n * student.hidden * 4  # ∂/∂h, fp32 like the residual stream
            # bf16 products need a 16-bit copy of the student's fp32 output weight (the teacher's is bf16 already)
            + (student.hidden * vocab * 2 if s.precision == "bf16" else 0)
            + (n * vocab * elem if uses_kd and not sparse and not teacher_fused else 0)
        )
    return Logits(
        student=n * vocab * elem,
        grad=n * vocab * elem,
        teacher=0 if sparse else n * vocab * elem,
        ce=8 * n * vocab if s.kd_ratio < 1 else 0,
        naive=NAIVE_WORK.get(s.divergence, NAIVE_WORK_DEFAULT) * n * vocab * 4 if uses_kd else 0,
        chunked=rows * vocab * 4 * work if uses_kd else 0,
        chunk_rows=rows,
        fused=fused,
        fused_chunk_rows=fused_rows or 0,
    )


def cache_bytes_per_token(k: int) -> int:
    """A cached position: K ids (2 B, uint16 for V ≤ 65,536) and K log-probs (2 B, 16-bit) plus bookkeeping."""
    return k * (2 + 2) + CACHE_TOKEN_OVERHEAD


@dataclass(frozen=True)
class Teacher:
    weights: int
    activations: int
    cache_io: int = 0  # bytes read from the cache per optimizer step (per rank), when cached
    cached: bool = False

    @property
    def device(self) -> int:
        return self.weights + self.activations


def teacher_memory(shape: ModelShape, s: Settings, *, zero3: bool = False) -> Teacher:
    if s.cache_k is not None:
        per_step = s.tokens * s.grad_accum * cache_bytes_per_token(s.cache_k)
        # The batch's sparse targets in memory: int64 ids and fp32 log-probs once collated.
        in_memory = s.tokens * (s.cache_k * (8 + 4) + 16)
        return Teacher(weights=0, activations=in_memory, cache_io=per_step, cached=True)
    elem = 2 if s.precision == "bf16" else 4
    weights = shape.params * elem
    if zero3 and s.world_size > 1:
        weights = _shard(weights, s.world_size) + elem * shape.largest_layer
    return Teacher(weights=weights, activations=teacher_activations(shape, s.tokens, elem))


def generation_memory(shape: ModelShape, s: Settings, elem: int, vocab: int) -> int:
    """The student sampling an on-policy micro-batch (no grad, before the window's forwards, so it never coexists
    with activations): its KV cache, 2·L·B·(T + n)·g·d·elem, plus the prompt's prefill (one layer alive, as the
    teacher's forward) and the last position's logits with the sampling softmax, B·V·4·2. 0 without sampling."""
    if not s.sampled_tokens:
        return 0
    kv = 2 * shape.layers * s.batch_size * (s.seq_len + s.sampled_tokens) * shape.kv_dim * elem
    prefill = teacher_activations(shape, s.batch_size * s.seq_len, elem)
    return kv + prefill + s.batch_size * vocab * 4 * 2


@dataclass(frozen=True)
class Row:
    """One configuration of the table: a label, the student's states and the per-rank totals."""

    label: str
    stage: int | None  # None: kd's plain PyTorch engine
    states: States
    activations: int
    teacher: Teacher
    logits: Logits
    chosen: bool = False
    generation: int = 0  # on-policy sampling's transient (KV cache, prefill, logits), `generation_memory`

    @property
    def total(self) -> int:
        """Chunked losses. Teacher and student activations never coexist (the teacher runs first, no grad), nor
        does the student's sampling (it runs before the window's forwards)."""
        peak_work = max(self.teacher.activations, self.generation, self.activations + self.logits.total_chunked)
        return self.states.device + self.teacher.weights + peak_work

    @property
    def total_naive(self) -> int:
        peak_work = max(self.teacher.activations, self.generation, self.activations + self.logits.total_naive)
        return self.states.device + self.teacher.weights + peak_work


@dataclass(frozen=True)
class Plan:
    teacher: ModelShape
    student: ModelShape
    settings: Settings
    rows: list[Row] = field(default_factory=list)

    def fits(self, nbytes: int) -> bool | None:
        limit = self.settings.device_memory
        return None if limit is None else nbytes <= limit


def build_plan(teacher: ModelShape, student: ModelShape, s: Settings) -> Plan:
    """The plain engine (one process) and ZeRO stages 0-3 at the chosen world size."""
    vocab = min(teacher.vocab, student.vocab)
    fused = fused_applies(s, student)
    online_fused = fused_applies(s, teacher) and s.cache_k is None
    logits = logits_memory(vocab, s, student if fused else None, teacher if online_fused else None)
    rows: list[Row] = []
    plain_mode = "autocast" if s.precision == "bf16" else "fp32"
    plain_elem = 2 if s.precision == "bf16" else 4  # sampling runs in the precision's autocast
    rows.append(
        Row(
            label="kd 1-proc",
            stage=None,
            states=plain_states(student.params, s.precision, student.trainable, s.optimizer_state_bytes),
            activations=student_activations(student, s.tokens, plain_mode, s.activation_checkpointing),
            teacher=teacher_memory(teacher, s),
            logits=logits,
            chosen=not s.deepspeed,
            generation=generation_memory(student, s, plain_elem, vocab),
        )
    )
    ds_generation = generation_memory(student, s, 2 if s.ds_bf16 else 4, vocab)
    ds_mode = "bf16" if s.ds_bf16 else "fp32"
    ds_settings = s if s.ds_bf16 == (s.precision == "bf16") else _with_precision(s, "bf16" if s.ds_bf16 else "fp32")
    ds_logits = logits_memory(min(teacher.vocab, student.vocab), ds_settings)
    ds_teacher = teacher_memory(teacher, ds_settings, zero3=s.teacher_zero3)
    for stage in range(4):
        rows.append(
            Row(
                label=f"ZeRO-{stage} ×{s.world_size}",
                stage=stage,
                states=zero_states(
                    student.params,
                    stage,
                    s.world_size,
                    bf16=s.ds_bf16,
                    offload_optimizer=s.offload_optimizer and stage >= 1,
                    offload_param=s.offload_param and stage == 3,
                    largest_layer=student.largest_layer,
                    trainable=student.trainable,
                ),
                activations=student_activations(student, s.tokens, ds_mode, s.activation_checkpointing),
                teacher=ds_teacher,
                logits=ds_logits,
                chosen=s.deepspeed and s.zero_stage == stage,
                generation=ds_generation,
            )
        )
    return Plan(teacher=teacher, student=student, settings=s, rows=rows)


def _with_precision(s: Settings, precision: Literal["bf16", "fp32"]) -> Settings:
    from dataclasses import replace

    return replace(s, precision=precision)
