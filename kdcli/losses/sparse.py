"""A cached (sparse) teacher: top-K log-probabilities per position plus the label token and the tail mass.

The cache keeps, per position, the teacher's top-K token ids and log-probabilities, the log-probability of the
label token (whether or not it is in the top K) and the tail mass r = 1 − Σ_topK p. The losses then work on the
coarsened distribution with buckets {top-K tokens, label token if outside the top K, everything else}; see
`kdcli.losses.driver` for how the student is coarsened the same way.

Convention: the stored log-probabilities are those of the *already tempered* teacher, p = softmax(z_t / T), with T
the cache's temperature. The loss applies its temperature to the student only, so a cache must be read with a loss
of the same temperature; `temperature` records it and the loss refuses a mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SparseTeacher:
    """Top-K teacher log-probabilities for a batch; leading dims match the labels ([B, T] usually).

    Attributes:
        topk_ids: [..., K] token ids (any integer dtype: int64, int32 or uint16 as stored on disk). Must be
            distinct within a position.
        topk_logprobs: [..., K] log p of those ids (float32/bf16/fp16), p already at the cache temperature.
        label_logprob: [...] log p of the label token (ignored where the label is -100).
        tail_mass: [...] r = 1 − Σ_topK p (computed without cancellation by the writer).
        temperature: temperature the log-probs were taken at, or None when unknown (then not checked).
    """

    topk_ids: Tensor
    topk_logprobs: Tensor
    label_logprob: Tensor
    tail_mass: Tensor
    temperature: float | None = None

    def __post_init__(self) -> None:
        lead = tuple(self.topk_ids.shape[:-1])
        if self.topk_ids.dim() < 2:
            raise ValueError(f"SparseTeacher.topk_ids must be [..., K], got shape {tuple(self.topk_ids.shape)}")
        if tuple(self.topk_logprobs.shape) != tuple(self.topk_ids.shape):
            raise ValueError(
                f"SparseTeacher.topk_logprobs shape {tuple(self.topk_logprobs.shape)} != topk_ids shape "
                f"{tuple(self.topk_ids.shape)}"
            )
        for name in ("label_logprob", "tail_mass"):
            shape = tuple(getattr(self, name).shape)
            if shape != lead:
                raise ValueError(f"SparseTeacher.{name} shape {shape} != leading shape {lead}")
        if self.topk_ids.is_floating_point() or self.topk_ids.is_complex():
            raise ValueError(f"SparseTeacher.topk_ids must be an integer tensor, got {self.topk_ids.dtype}")

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Leading shape (the labels' shape)."""
        return tuple(self.topk_ids.shape[:-1])

    def to(self, device: torch.device | str) -> SparseTeacher:
        return SparseTeacher(
            self.topk_ids.to(device),
            self.topk_logprobs.to(device),
            self.label_logprob.to(device),
            self.tail_mass.to(device),
            self.temperature,
        )

    def placed(self, labels: Tensor) -> SparseTeacher:
        """These records, one per labelled position of `labels` in row-major order, laid out [..., K] like the
        labels. Unlabelled positions get distinct ids and a uniform record: the loss masks them, but ids must stay
        distinct within a position."""
        valid = labels != -100
        if int(valid.sum()) != self.topk_ids.shape[0]:
            raise ValueError(f"{self.topk_ids.shape[0]} records for {int(valid.sum())} labelled positions")
        k, device = self.k, labels.device
        ids = torch.arange(k, dtype=torch.long, device=device).expand(*labels.shape, k).clone()
        logprobs = torch.full((*labels.shape, k), -math.log(k), dtype=torch.float32, device=device)
        label_lp = torch.zeros(labels.shape, dtype=torch.float32, device=device)
        tail = torch.zeros(labels.shape, dtype=torch.float32, device=device)
        ids[valid] = self.topk_ids.to(device, torch.long)
        logprobs[valid] = self.topk_logprobs.to(device, torch.float32)
        label_lp[valid] = self.label_logprob.to(device, torch.float32)
        tail[valid] = self.tail_mass.to(device, torch.float32)
        return SparseTeacher(ids, logprobs, label_lp, tail, self.temperature)

    @classmethod
    @torch.no_grad()
    def from_logits(
        cls,
        teacher_logits: Tensor,
        labels: Tensor,
        k: int,
        temperature: float = 1.0,
        *,
        chunk_rows: int = 1024,
    ) -> SparseTeacher:
        """Build the cache record from dense teacher logits [..., V] and labels [...].

        Log-probs are taken of softmax(z_t / temperature) in float32 (float64 for float64 logits). Rows are
        processed `chunk_rows` at a time so a cache writer never holds a float32 copy of the whole batch.
        The tail mass is a logsumexp over the non-top-K entries, not 1 − Σ p, so a tiny tail keeps its
        relative precision.
        """
        if teacher_logits.dim() < 2:
            raise ValueError(f"teacher_logits must be [..., V], got shape {tuple(teacher_logits.shape)}")
        vocab = int(teacher_logits.shape[-1])
        if tuple(labels.shape) != tuple(teacher_logits.shape[:-1]):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} != teacher_logits leading shape {tuple(teacher_logits.shape[:-1])}"
            )
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
            raise ValueError(f"k must be an int in [1, {vocab}], got {k!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        cdtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
        flat = teacher_logits.detach().reshape(-1, vocab)
        ys = labels.reshape(-1).to(torch.int64)
        rows = flat.shape[0]
        ids = torch.empty(rows, k, dtype=torch.int64, device=flat.device)
        lps = torch.empty(rows, k, dtype=cdtype, device=flat.device)
        lab = torch.empty(rows, dtype=cdtype, device=flat.device)
        tail = torch.empty(rows, dtype=cdtype, device=flat.device)
        for lo in range(0, rows, max(1, chunk_rows)):
            hi = min(rows, lo + max(1, chunk_rows))
            logp = torch.log_softmax(flat[lo:hi].to(cdtype) / temperature, dim=-1)
            vals, idx = logp.topk(k, dim=-1)
            y = ys[lo:hi]
            lab_lp = logp.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
            lab[lo:hi] = torch.where(y == IGNORE_INDEX, torch.zeros_like(lab_lp), lab_lp)
            logp.scatter_(1, idx, float("-inf"))
            tail[lo:hi] = torch.logsumexp(logp, dim=-1).exp()
            ids[lo:hi] = idx
            lps[lo:hi] = vals
        lead = tuple(labels.shape)
        return cls(
            ids.view(*lead, k),
            lps.view(*lead, k),
            lab.view(lead),
            tail.view(lead),
            float(temperature),
        )
