"""The divergence registry: one spec per name, parameter validation, `get_loss` and `get_cross_tokenizer`.

It is the one source of parameter defaults: the divergence classes take every parameter as a required keyword, and
`get_loss` fills in what the caller leaves out from the spec (what `kd losses` shows).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .akl import AdaptiveKL
from .atkd import AdaptiveTeaching
from .cross import AlignedDivergence
from .js import JensenShannon
from .kernel import ChunkedDivergence, LossConfigError
from .kl import ForwardKL, ReverseKL
from .skew import SkewForwardKL, SkewReverseKL
from .tvd import TotalVariation
from .uld import HybridULD, UniversalLogit

_COMMON: dict[str, Any] = {"temperature": 1.0, "chunk_size": None}


@dataclass(frozen=True)
class LossSpec:
    """What `kd losses` shows for a divergence, and how to build it."""

    name: str
    description: str  # one line
    params: Mapping[str, Any]  # name → default, including temperature and chunk_size
    paper: str  # short citation
    cls: type[ChunkedDivergence] = field(repr=False, compare=False)

    def build(self, **params: Any) -> ChunkedDivergence:
        return (get_cross_tokenizer if issubclass(self.cls, AlignedDivergence) else get_loss)(self.name, **params)


def _spec(cls: type[ChunkedDivergence], description: str, paper: str, **own: Any) -> LossSpec:
    return LossSpec(cls.name, description, MappingProxyType({**own, **_COMMON}), paper, cls)


LOSSES: Mapping[str, LossSpec] = MappingProxyType(
    {
        s.name: s
        for s in (
            _spec(
                ForwardKL,
                "forward KL(p‖q): mean-seeking, the classic distillation loss",
                "Hinton et al. 2015 (arXiv 1503.02531)",
            ),
            _spec(ReverseKL, "reverse KL(q‖p): mode-seeking", "Gu et al., ICLR 2024 — MiniLLM (arXiv 2306.08543)"),
            _spec(
                SkewForwardKL,
                "skew forward KL(p ‖ αp + (1−α)q)",
                "Ko et al., ICML 2024 — DistiLLM (arXiv 2402.03898)",
                alpha=0.1,
            ),
            _spec(
                SkewReverseKL,
                "skew reverse KL(q ‖ (1−α)p + αq)",
                "Ko et al., ICML 2024 — DistiLLM (arXiv 2402.03898)",
                alpha=0.1,
            ),
            _spec(
                JensenShannon,
                "generalised Jensen–Shannon β KL(p‖m) + (1−β) KL(q‖m), m = βp + (1−β)q",
                "Agarwal et al., ICLR 2024 — GKD (arXiv 2306.13649)",
                beta=0.5,
            ),
            _spec(
                TotalVariation,
                "total variation ½ Σ|p − q|",
                "Wen et al., ACL 2023 — f-divergence KD (arXiv 2307.15190)",
            ),
            _spec(
                AdaptiveKL,
                "adaptive KL: FKL and RKL weighted by the student's head/tail gap",
                "Wu et al., COLING 2025 (arXiv 2404.02657)",
                mu=0.5,
            ),
            _spec(
                AdaptiveTeaching,
                "adaptive teaching modes: DKD on easy tokens, TKD + DKD on hard ones",
                "Zhong et al., ACL 2024 (arXiv 2402.11890)",
                k=0.5,
                lam=0.2,
                base="fkl",
            ),
        )
    }
)


# Divergences between a student and a teacher of another tokenizer (`loss.cross_tokenizer.method`): they take an
# `AlignedTeacher`, the teacher's top-k at the paired positions (docs/methods.md, "Across tokenizers").
CROSS_TOKENIZER: Mapping[str, LossSpec] = MappingProxyType(
    {
        s.name: s
        for s in (
            _spec(
                UniversalLogit,
                "ULD: L1 between the sorted probabilities of teacher and student (Wasserstein-1), top_k + a tail slot",
                "Boizard et al. 2024 — ULD (arXiv 2402.12030)",
                top_k=64,
            ),
            _spec(
                HybridULD,
                "KL on the tokens both vocabularies share (the rest as one bucket) + ULD on the rest",
                "Boizard et al. (arXiv 2402.12030); TRL's GOLD trainer (hybrid ULD)",
                top_k=64,
            ),
        )
    }
)


def get_loss(name: str, **params: Any) -> ChunkedDivergence:
    """Build the divergence `name` (see LOSSES) with keyword parameters as in docs/methods.md.

    Raises LossConfigError (a ValueError) for an unknown name or parameter, or a value out of range.
    """
    return _build(LOSSES, "divergence", name, params)


def get_cross_tokenizer(method: str, **params: Any) -> ChunkedDivergence:
    """Build the cross-tokenizer divergence `method` (see CROSS_TOKENIZER), as `get_loss` does."""
    return _build(CROSS_TOKENIZER, "cross-tokenizer method", method, params)


def _build(table: Mapping[str, LossSpec], kind: str, name: str, params: dict[str, Any]) -> ChunkedDivergence:
    if not isinstance(name, str) or name not in table:
        valid = ", ".join(table)
        hint = difflib.get_close_matches(str(name), list(table), n=1, cutoff=0.5)
        did = f"; did you mean '{hint[0]}'?" if hint else ";"
        raise LossConfigError(f"unknown {kind} {name!r}{did} valid: {valid}")
    spec = table[name]
    for key in params:
        if key not in spec.params:
            valid = ", ".join(spec.params)
            hint = difflib.get_close_matches(key, list(spec.params), n=1, cutoff=0.6)
            did = f"; did you mean '{hint[0]}'?" if hint else ";"
            raise LossConfigError(f"unknown parameter {key!r} for {name!r}{did} valid: {valid}")
    return spec.cls(**{**spec.params, **params})


def is_tail_sensitive(name: str) -> bool:
    """Whether the divergence `name` trains differently from a top-K cache than online unless K covers most of the
    student's mass (its tail bucket hides what the divergence weighs; docs/cache.md). False for an unknown name."""
    spec = LOSSES.get(name)
    return spec is not None and spec.cls.tail_sensitive
