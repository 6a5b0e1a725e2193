"""The training objective: (1 - kd_ratio) * CE + kd_ratio * scale * D, normalised over valid positions.

scale is T² when `scale_by_t2` is set and the divergence's temperature T differs from 1, else 1. CE is taken at
T = 1 on the labels; D is the divergence at temperature T (see docs/methods.md). Both are sums over valid positions
divided by `num_valid`, and an all-masked batch gives zeros that still back-propagate (zero gradients).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kdcli.errors import KdError
from kdcli.losses import ProjectedLogits, fused_objective
from kdcli.models import FusedHead, fused_head
from kdcli.recipe import LossConfig

IGNORE_INDEX = -100


@dataclass
class ObjectiveTerms:
    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)


class Objective:
    """Combines the student's cross-entropy on the labels with the chosen divergence to the teacher."""

    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg
        self.divergence = cfg.build()
        temperature = self.divergence.temperature  # as validated, defaults from the registry
        # Hinton's T^2 keeps the divergence's gradient scale independent of the temperature.
        self.kd_scale = temperature**2 if cfg.scale_by_t2 else 1.0

    def __call__(
        self,
        student_logits: torch.Tensor | ProjectedLogits,
        teacher: object,
        labels: torch.Tensor,
        num_valid: int | None = None,
        *,
        with_ce: bool = True,
    ) -> ObjectiveTerms:
        """`num_valid` is the valid-position count of the whole accumulation window, so that the summed
        micro-batch losses equal the loss of the full batch, however it is split. Default: this batch's count.

        `with_ce=False` (a micro-batch the student sampled: its labels are not the data's) drops the CE term, so
        the batch adds kd_ratio * scale * D only, still over the window's `num_valid` (see docs/on-policy.md)."""
        count = int(num_valid if num_valid is not None else (labels != IGNORE_INDEX).sum())
        if count < 0:
            raise ValueError(f"num_valid must be >= 0, got {num_valid}")
        if count == 0 and num_valid is not None and bool((labels != IGNORE_INDEX).any()):
            raise ValueError("num_valid=0 but this batch has valid positions; pass the accumulation window's count")
        kd_ratio = self.cfg.kd_ratio
        ce_weight = 1.0 - kd_ratio if with_ce else 0.0
        if isinstance(student_logits, ProjectedLogits):  # the fused head: the same terms, from hidden states
            fused = fused_objective(
                self.divergence,
                student_logits,
                teacher,  # type: ignore[arg-type]
                labels,
                ce_weight=ce_weight,
                kd_weight=kd_ratio * self.kd_scale,
                num_valid=count if count > 0 else None,
            )
            return ObjectiveTerms(total=fused.total, ce=fused.ce, kd=fused.kd, stats=fused.stats)
        # Without gradients (eval) the cross-entropy is measured whatever its weight: it is what runs are compared by.
        measure_ce = ce_weight > 0.0 or not torch.is_grad_enabled()
        ce = cross_entropy(student_logits, labels, count) if measure_ce else _zero(student_logits)
        if kd_ratio > 0.0:
            # An empty window has no count to divide by; the divergence then falls back to this call's own N = 0,
            # which gives its zero loss, zero gradient and zero stats instead of refusing num_valid = 0.
            out = self.divergence.compute(student_logits, teacher, labels, num_valid=count if count > 0 else None)
            kd, stats = out.loss, dict(out.stats)
        else:
            kd, stats = _zero(student_logits), {}
        total = ce_weight * ce + kd_ratio * self.kd_scale * kd
        return ObjectiveTerms(total=total, ce=ce, kd=kd, stats=stats)


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A constant 0 in the dtype the terms are reported in (float64 for float64 logits, else float32)."""
    return logits.new_zeros((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """Sum of token cross-entropies over valid positions, divided by `count`; 0 when nothing is valid."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if count == 0:
        # An empty slice keeps the zero on the autograd graph; logits.sum() * 0 would be NaN for −inf logits.
        return logits[..., :0].sum(dtype=dtype)
    valid = labels != IGNORE_INDEX
    # Boolean indexing over the leading dims gathers the valid rows without reshaping, which would copy caller-sliced
    # (non-viewable) logits in full.
    rows = logits[valid]
    return F.cross_entropy(rows.to(dtype), labels[valid], reduction="sum") / count


@dataclass(frozen=True)
class Heads:
    """Where the objective takes the logits from: the fused head of the student (and of an online teacher), or
    None for the plain path; `note` says why the fused head is off under `loss.fused: auto`."""

    student: FusedHead | None = None
    teacher: FusedHead | None = None
    note: str | None = None


def choose_heads(
    setting: bool | str, student: torch.nn.Module, teacher: torch.nn.Module | None, why_not: str | None
) -> Heads:
    """The one rule for `loss.fused`: `auto` takes the fused head wherever it applies, `true` requires it (a one-line
    error naming the reason otherwise), `false` keeps the plain path. `why_not` is a reason of the run's own (e.g.
    DeepSpeed), `teacher` the online teacher's model (None with a cache, or a sharded teacher)."""
    if setting is False:
        return Heads()
    head = fused_head(student) if why_not is None else why_not
    if isinstance(head, str):
        if setting is True:
            raise KdError(
                f"loss.fused: true, but the fused head does not apply: {head}. Set loss.fused: auto or false."
            )
        return Heads(note=head)
    teacher_head = fused_head(teacher) if teacher is not None else None
    return Heads(head, teacher_head if isinstance(teacher_head, FusedHead) else None)
