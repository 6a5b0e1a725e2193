"""kd's divergence library: exact, chunked, hand-differentiated distillation losses.

    from kdcli.losses import get_loss, SparseTeacher, LOSSES
    loss_fn = get_loss("akl", mu=0.5)
    loss = loss_fn(student_logits, teacher_logits_or_SparseTeacher, labels)            # mean over valid positions
    loss = loss_fn(student_logits, teacher, labels, num_valid=n_window)                # accumulation window
    loss, stats = loss_fn.compute(student_logits, teacher, labels)                      # with diagnostics (floats)

Definitions follow docs/methods.md exactly; the loss is the true divergence (not × T²).

Layout: `kernel` is what a divergence author reads (the kernel contract, its types and helpers, the base class);
each divergence module (`kl`, `skew`, `js`, `tvd`, `akl`, `atkd`, and across tokenizers `uld`) is only its math;
`driver` owns chunking, sparse bucketing and autograd; `cross` the buckets of a teacher from another tokenizer
(`aligned`: its records on the student's positions); `fused` runs the same chunks from hidden states
(`projection`: the output layer), with the cross-entropy, so that no [B·T, V] tensor exists; `sizing` holds the
chunk-size figures (torch-free, read by `kd plan`); `registry` holds the specs and their defaults. Names are loaded
on first use, so importing this package (or `sizing`) loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdcli.losses.akl import AdaptiveKL
    from kdcli.losses.aligned import AlignedTeacher, records_at
    from kdcli.losses.atkd import AdaptiveTeaching
    from kdcli.losses.fused import FusedTerms, fused_objective
    from kdcli.losses.js import JensenShannon
    from kdcli.losses.kernel import ChunkedDivergence, LossConfigError, LossOutput
    from kdcli.losses.kl import ForwardKL, ReverseKL
    from kdcli.losses.projection import OutputLayer, ProjectedLogits
    from kdcli.losses.registry import (
        CROSS_TOKENIZER,
        LOSSES,
        LossSpec,
        get_cross_tokenizer,
        get_loss,
        is_tail_sensitive,
    )
    from kdcli.losses.skew import SkewForwardKL, SkewReverseKL
    from kdcli.losses.sparse import IGNORE_INDEX, SparseTeacher
    from kdcli.losses.tvd import TotalVariation
    from kdcli.losses.uld import HybridULD, UniversalLogit

__all__ = [
    "CROSS_TOKENIZER",
    "IGNORE_INDEX",
    "LOSSES",
    "AdaptiveKL",
    "AdaptiveTeaching",
    "AlignedTeacher",
    "ChunkedDivergence",
    "ForwardKL",
    "FusedTerms",
    "HybridULD",
    "JensenShannon",
    "LossConfigError",
    "LossOutput",
    "LossSpec",
    "OutputLayer",
    "ProjectedLogits",
    "ReverseKL",
    "SkewForwardKL",
    "SkewReverseKL",
    "SparseTeacher",
    "TotalVariation",
    "UniversalLogit",
    "fused_objective",
    "get_cross_tokenizer",
    "get_loss",
    "is_tail_sensitive",
    "records_at",
]

_WHERE = {
    "AdaptiveKL": "akl",
    "AdaptiveTeaching": "atkd",
    "AlignedTeacher": "aligned",
    "records_at": "aligned",
    "HybridULD": "uld",
    "UniversalLogit": "uld",
    "CROSS_TOKENIZER": "registry",
    "get_cross_tokenizer": "registry",
    "JensenShannon": "js",
    "ChunkedDivergence": "kernel",
    "LossConfigError": "kernel",
    "LossOutput": "kernel",
    "ForwardKL": "kl",
    "FusedTerms": "fused",
    "fused_objective": "fused",
    "OutputLayer": "projection",
    "ProjectedLogits": "projection",
    "ReverseKL": "kl",
    "LOSSES": "registry",
    "LossSpec": "registry",
    "get_loss": "registry",
    "is_tail_sensitive": "registry",
    "SkewForwardKL": "skew",
    "SkewReverseKL": "skew",
    "IGNORE_INDEX": "sparse",
    "SparseTeacher": "sparse",
    "TotalVariation": "tvd",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"kdcli.losses.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'kdcli.losses' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
