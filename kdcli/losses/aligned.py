"""A teacher from another tokenizer, laid out on the student's positions: what `uld` and `hybrid` take.

Across tokenizers the teacher's distribution lives over another vocabulary and at other positions. kd pairs a
student position with the teacher position that has read the same text (`kdcli.data.alignment`), and keeps, per
paired position, what the cross-tokenizer losses read of the teacher there:

- its k most likely tokens' log-probabilities, in descending order (at the loss temperature);
- for each of them, the id of the student's token with the same string, or −1 when the student has none (`hybrid`);
- the tail mass r = 1 − Σ_topk p.

The records come from the teacher's own `SparseTeacher` records of its labelled positions (a cache, a served
teacher, or `records_at` on online logits), picked by `pair` and mapped into the student's vocabulary by `shared`.
Unpaired positions get a placeholder record (uniform, no shared token) and `paired` False: the losses weigh them 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .projection import ProjectedLogits
from .sparse import SparseTeacher


@dataclass(frozen=True)
class AlignedTeacher:
    """Teacher records on the student's positions; leading dims match the student's labels ([B, T] usually).

    Attributes:
        logprobs: [..., k] the teacher's top-k log-probabilities at the paired position, descending.
        shared: [..., k] int64, the student's id of each of those tokens (same string), −1 where it has none.
        tail_mass: [...] r = 1 − Σ_topk p.
        paired: [...] bool, whether the position has a teacher position (the loss weighs the others 0).
        temperature: the temperature the log-probs were taken at, or None when unknown (then not checked).
    """

    logprobs: Tensor
    shared: Tensor
    tail_mass: Tensor
    paired: Tensor
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.logprobs.dim() < 2 or tuple(self.shared.shape) != tuple(self.logprobs.shape):
            raise ValueError(
                f"AlignedTeacher.logprobs {tuple(self.logprobs.shape)} and shared {tuple(self.shared.shape)} must be "
                "the same [..., k]"
            )
        lead = self.shape
        for name in ("tail_mass", "paired"):
            shape = tuple(getattr(self, name).shape)
            if shape != lead:
                raise ValueError(f"AlignedTeacher.{name} shape {shape} != leading shape {lead}")

    @property
    def k(self) -> int:
        return int(self.logprobs.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.logprobs.shape[:-1])

    def to(self, device: torch.device | str) -> AlignedTeacher:
        return AlignedTeacher(
            self.logprobs.to(device),
            self.shared.to(device),
            self.tail_mass.to(device),
            self.paired.to(device),
            self.temperature,
        )

    @classmethod
    def from_records(
        cls, records: SparseTeacher, pair: Tensor, shared: Tensor, k: int, temperature: float | None = None
    ) -> AlignedTeacher:
        """Lay the teacher's records out on the student's positions.

        `records`: [P, K] records of the teacher's labelled positions (K ≥ k). `pair`: [...] for each student
        position, the row of `records` it is paired with, or −1. `shared`: [V_t] the student's id of each teacher
        token with the same string, or −1. The top K are cut to the top k, whose tail then holds the rest of them.
        """
        if records.topk_ids.dim() != 2:
            raise ValueError(f"records must be [P, K], got {tuple(records.topk_ids.shape)}")
        if not 1 <= k <= records.k:
            raise ValueError(f"k must be in [1, {records.k}] (the records' K), got {k}")
        device = pair.device
        paired = pair >= 0
        rows = pair[paired].to(records.topk_ids.device)
        dtype = torch.float64 if records.topk_logprobs.dtype == torch.float64 else torch.float32
        lps = records.topk_logprobs[rows].to(dtype)
        lps, order = lps.sort(dim=-1, descending=True, stable=True)  # stored 16-bit values may tie or swap
        ids = records.topk_ids[rows].to(torch.long).gather(1, order)
        tail = records.tail_mass[rows].to(dtype)
        if k < records.k:
            tail = tail + lps[:, k:].exp().sum(dim=-1)
            lps, ids = lps[:, :k], ids[:, :k]
        table = shared.to(ids.device, torch.long)
        n = table.numel()  # ids past the table (a padded output layer's extra rows) have no string: not shared
        sid = table[ids.clamp(max=n - 1)].masked_fill_(ids >= n, -1) if n else torch.full_like(ids, -1)
        lead = tuple(pair.shape)
        out_lps = torch.full((*lead, k), -math.log(k), dtype=dtype, device=device)
        out_sid = torch.full((*lead, k), -1, dtype=torch.long, device=device)
        out_tail = torch.zeros(lead, dtype=dtype, device=device)
        out_lps[paired] = lps.to(device)
        out_sid[paired] = sid.to(device)
        out_tail[paired] = tail.to(device)
        return cls(out_lps, out_sid, out_tail, paired, temperature)


@torch.no_grad()
def records_at(
    logits: Tensor | ProjectedLogits, labels: Tensor, k: int, temperature: float, chunk: int = 256
) -> SparseTeacher:
    """`SparseTeacher` records (top-k, tail) of the labelled positions of a teacher's dense or projected logits
    [..., V], in row-major order, a chunk of rows at a time (no [rows, V] copy of the whole batch)."""
    from .kernel import Rows, logit_rows  # kernel imports this module: import it at call time

    rows = Rows(labels)
    take = logit_rows(rows, logits)
    parts = []
    for c in rows.chunks(chunk):
        z = take(c)
        parts.append(SparseTeacher.from_logits(z, z.new_zeros(z.shape[0], dtype=torch.long), k, temperature))
    if not parts:
        none = torch.zeros(0)
        return SparseTeacher(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), none, none, temperature)
    return SparseTeacher(
        torch.cat([p.topk_ids for p in parts]),
        torch.cat([p.topk_logprobs for p in parts]),
        torch.cat([p.label_logprob for p in parts]),
        torch.cat([p.tail_mass for p in parts]),
        temperature,
    )
