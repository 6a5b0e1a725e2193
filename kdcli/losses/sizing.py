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
# What the fused head adds per chunk (`kdcli.losses.fused`): the student's projected logits, the teacher's (dense
# only) and the cross-entropy's softmax-minus-one-hot.
FUSED_EXTRA_WORK = 3


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
