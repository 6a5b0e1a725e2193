"""How many rows a chunked loss takes at once: the one home of the figures behind `ChunkedDivergence.chunk_rows`
and `kd plan`'s loss workspace (docs/plan.md).

Rows per chunk = `chunk_size` when set, else budget // (V · element bytes · work), so one chunk's working set is at
most the device's budget; `work` is the number of live [rows, V] compute-dtype tensors at a chunk's peak (a slight
overestimate), per divergence against a dense teacher and one figure for a cached (sparse) one.

This module imports no torch, so that planning stays light: `kd plan` reads it without loading the losses.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# Working-set budget per chunk. CPU: small enough to stay cache- and page-friendly; CUDA: big enough that kernel
# launch overhead per chunk is amortised, still far below one full [B·T, V] float32 tensor at LLM vocabularies.
CPU_CHUNK_BUDGET_BYTES = 128 * 2**20
CUDA_CHUNK_BUDGET_BYTES = 1024 * 2**20

# Live [rows, V] compute-dtype tensors at a chunk's peak against dense teacher logits, per divergence name; a name
# not listed (a divergence defined outside kd) counts DEFAULT_DENSE_WORK.
DEFAULT_DENSE_WORK = 8
DENSE_WORK: Mapping[str, int] = MappingProxyType(
    {"fkl": 8, "rkl": 8, "skl": 9, "srkl": 9, "js": 8, "tvd": 7, "akl": 8, "atkd": 8, "uld": 5, "hybrid": 5}
)  # uld and hybrid against a teacher of another tokenizer: the student's row, its softmax and their temporaries
# The same against a cached teacher (buckets {top-K, label, tail}: the student's row and its gradient dominate).
SPARSE_WORK = 4
# What the fused head adds per chunk (`kdcli.losses.fused`): the cross-entropy's softmax-minus-one-hot, where it is
# not taken from the divergence's own softmax (a temperature other than 1, a cached teacher, ATKD's row weights).
FUSED_EXTRA_WORK = 1
# Rows the fused head projects at once (its block), whatever the divergence's chunk: the output-layer products
# [rows, d] x [d, V] and back run at a fraction of a CPU's speed below a few hundred rows (2 cores, V = 49,152,
# d = 576: 41 GFLOP/s at 64 rows, 58 at 256, 73 at 1,024; V = 128,256, d = 2,048: 32, 66 and 81), and ∂/∂W's
# product, whose inner dimension is the block's rows, reads and writes the whole [V, d] gradient once a block. A
# block of 1,024 is what Liger-Kernel's fused losses take as one chunk; its projected logits (the student's and an
# online teacher's) live while its chunks are taken (docs/benchmarks.md, Side by side with Liger-Kernel).
FUSED_BLOCK_ROWS = 1024


def chunk_budget(device_type: str) -> int:
    """Working-set bytes per chunk on a device type ('cuda', else the CPU budget)."""
    return CUDA_CHUNK_BUDGET_BYTES if device_type == "cuda" else CPU_CHUNK_BUDGET_BYTES


def dense_work(divergence: str) -> int:
    """Live [rows, V] tensors of `divergence`'s chunk against dense teacher logits."""
    return DENSE_WORK.get(divergence, DEFAULT_DENSE_WORK)


def work(divergence: str, sparse: bool, fused: bool = False, kd: bool = True) -> int:
    """Live [rows, V] tensors of one chunk: SPARSE_WORK for a cached teacher, else `dense_work(divergence)`, plus
    FUSED_EXTRA_WORK on the fused head. `kd=False` is the fused head's cross-entropy alone (`loss.kd_ratio` 0): no
    teacher row, so its working set is that of a cached teacher's chunk whatever the teacher."""
    base = SPARSE_WORK if sparse or not kd else dense_work(divergence)
    return base + (FUSED_EXTRA_WORK if fused else 0)


def fused_block_rows(rows: int, chunk: int) -> int:
    """Rows the fused head projects at once for `rows` valid rows taken `chunk` rows at a time: at most
    max(FUSED_BLOCK_ROWS, chunk), the rows shared evenly between the blocks (no short last block, whose products
    would run slowly)."""
    most = max(FUSED_BLOCK_ROWS, chunk)
    blocks = -(-rows // most)
    return -(-rows // blocks) if rows else most


def chunk_rows(
    rows: int,
    vocab: int,
    divergence: str,
    *,
    device_type: str,
    sparse: bool,
    chunk_size: int | None,
    elem_bytes: int = 4,
    fused: bool = False,
    kd: bool = True,
) -> int:
    """Rows per chunk for `rows` valid rows: `chunk_size` if given, else as many as fit the device's budget.

    `elem_bytes` is the compute dtype's size: 4 for float32 (fp32, bf16 and fp16 inputs), 8 for float64; `fused`
    and `kd` as in `work`.
    """
    if chunk_size is not None:
        return max(1, min(rows, chunk_size))
    per_row = vocab * elem_bytes * work(divergence, sparse, fused, kd)
    return max(1, min(rows, chunk_budget(device_type) // per_row))
