"""Set-up across tokenizers (`loss.cross_tokenizer`): the checks that need no weights, the paired examples, their
collator and the teacher's targets on the student's positions. `setup.prepare` calls these on each of its paths
(an online teacher, a served one, a cache); the loop and the objective then run unchanged.

Each model sees each data row through its own tokenizer and template (`build_examples`, with what each labelled
position has read of the response); the positions are paired once per example (`kdcli.data.alignment`) and the
pairs stored with it. A cache holds the teacher's side (its records and offsets), so one cache serves students of
any tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdcli.data import Collator, build_examples
from kdcli.data.alignment import PairedExamples, paired_examples
from kdcli.data.collate import PairCollator, teacher_tokens
from kdcli.engine.teachers import AlignedSource, RecordSource
from kdcli.errors import KdError
from kdcli.models import shared_vocabulary
from kdcli.recipe import Recipe


@dataclass
class CrossTokenizer:
    """What a run across tokenizers knows before any weight is read."""

    recipe: Recipe
    teacher_tokenizer: Any
    tokenizer: Any  # the student's
    teacher_rows: int  # the teacher's output layer: its logits' width and the shared map's length
    k: int
    temperature: float

    @classmethod
    def of(cls, recipe: Recipe, teacher_tokenizer: Any, tokenizer: Any, teacher_rows: int) -> CrossTokenizer:
        """Refuse, in one line each, what would fail later: a tokenizer without character offsets, and a chat
        template the student (or the teacher) lacks when `data.template` is `chat`, and teacher-written responses."""
        if recipe.data.responses == "teacher":
            raise KdError(
                "data.responses: `teacher` with loss.cross_tokenizer is not supported yet (the student would need the "
                "cache's generated responses in its own tokens); use data.responses: dataset."
            )
        for field, tok in (("teacher.model", teacher_tokenizer), ("student.model", tokenizer)):
            if not getattr(tok, "is_fast", False):
                raise KdError(
                    f"{field}: its tokenizer is a slow (Python) one; loss.cross_tokenizer pairs positions by the "
                    "character offsets only fast tokenizers give. Use a model folder with a tokenizer.json."
                )
            if recipe.data.template == "chat" and not getattr(tok, "chat_template", None):
                raise KdError(
                    f"{field}: its tokenizer has no chat template, and data.template is `chat`: across tokenizers "
                    "each model reads the conversation through its own template. Give it one, or set data.template "
                    'to a string, e.g. "### Instruction:\\n{prompt}\\n\\n### Response:\\n".'
                )
        divergence = recipe.loss.build()
        return cls(recipe, teacher_tokenizer, tokenizer, teacher_rows, divergence.top_k, divergence.temperature)

    def check_k(self, available: int, where: str) -> None:
        """The method's top_k against the K a cache or a server gives."""
        if self.k > available:
            raise KdError(
                f"loss.cross_tokenizer.params.top_k: {self.k} is more than the {available} log-probs {where} gives "
                f"per position; set top_k to {available} or less."
            )

    def examples(self, rows: Sequence[Any], split: str, teacher: Any = None) -> PairedExamples:
        """The student's examples of `rows`, paired with the teacher's: its own tokenization (online, served), or
        a cache split (`teacher`) with the rows and offsets it holds."""
        key = f"data.{split}"
        student = build_examples(rows, self.tokenizer, self.recipe.data, split, key, reads=True)  # type: ignore[arg-type]
        if teacher is None:
            teacher = build_examples(rows, self.teacher_tokenizer, self.recipe.data, split, key, reads=True)  # type: ignore[arg-type]
            teacher_rows, teacher_reads = teacher.rows, teacher.reads
        else:
            teacher_rows, teacher_reads = teacher.alignment()
        return paired_examples(student, teacher_rows, teacher_reads, teacher)

    def collator(self, teacher_part: Any = None) -> PairCollator:
        """Student batches with the teacher's part: its padded tokens, or (`teacher_part`) a cache's records."""
        part = teacher_part or teacher_tokens(Collator(self.teacher_tokenizer.pad_token_id))
        return PairCollator(Collator(self.tokenizer.pad_token_id), part)

    def source(self, inner: RecordSource) -> AlignedSource:
        """The teacher's targets on the student's positions, from `inner`'s records of its own positions."""
        shared = shared_vocabulary(self.teacher_tokenizer, self.tokenizer, self.teacher_rows)
        return AlignedSource(inner, shared, self.k, self.temperature)
