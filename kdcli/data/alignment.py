"""Across tokenizers: which student position and which teacher position have read the same text.

Each model sees the conversation through its own tokenizer and template, and kd tokenizes the response on its own
(`tokens.encode_pairs`), so both tokenizations cover the same response string. A position that predicts response
token j (or, after the last one, EOS) has read the prompt and the response's first characters; how many is
`reads`, from the fast tokenizer's character offsets:

- a token ends where its offsets end, taken as a running maximum (a token that covers no new character, such as the
  2nd and 3rd byte of a character split into bytes, or a zero-width piece, ends where the one before it ended);
  characters its offsets leave out (whitespace a tokenizer trims from its offsets) belong to the token after them;
- position j has read the end of token j − 1 (0 for the first response token; the whole response for EOS);
- it counts only where it is the last position to have read that much: the positions inside a run of tokens that
  covers no new character (the first bytes of a multi-byte character) have read part of a character, and are −1.

A student position and a teacher position are paired when they have read the same number of characters (both
≥ 0): both predict the text after the same prefix, each in its own tokens. Within a stretch where the two
tokenizations break at different characters, only the first positions (which read the common boundary before it)
are paired; the others train on CE alone. EOS is always paired (both have read the whole response) unless a side
cut it off at `max_length`. `pair_reads` computes this once per example; the pairs are stored with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

UNREAD = -1


def reads_of(offsets: Sequence[Sequence[int]], length: int) -> list[int]:
    """The characters read before each prediction of a response whose n tokens have these (start, end) character
    offsets: n + 1 values (the n tokens, then EOS), −1 where a position has read part of a character or token unit
    only (module docstring). `length` is the response's length in characters."""
    before = [0]
    end = 0
    for _, stop in offsets:
        end = max(end, int(stop))
        before.append(end)
    before[-1] = length  # EOS: the whole response, whatever the last token's offsets left out
    last = len(before) - 1
    return [c if j == last or before[j + 1] > c else UNREAD for j, c in enumerate(before)]


def pair_reads(student: Sequence[int], teacher: Sequence[int]) -> list[int]:
    """For each student position, the index of the teacher position that has read as many characters, or −1."""
    where = {c: j for j, c in enumerate(teacher) if c != UNREAD}
    return [where.get(c, UNREAD) if c != UNREAD else UNREAD for c in student]


@dataclass
class PairedExamples(Sequence[dict[str, Any]]):
    """Student examples, each with the teacher's example of the same data row and the pairs of their positions.

    Indexing gives the student's `input_ids` and `labels`, `teacher` (the teacher's example: token ids and labels
    online, its records from a cache) and `pair`: per labelled student position, the index of the teacher's
    labelled position it is paired with, or −1.
    """

    student: Any  # `Examples` of the student's tokenizer
    teacher: Sequence[dict[str, Any]]  # the teacher's examples (or a cache split), indexed by `teacher_of`
    teacher_of: list[int]  # per student example, its teacher example
    pairs: list[list[int]]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def input_ids(self) -> list[list[int]]:
        return self.student.input_ids  # type: ignore[no-any-return]

    @property
    def labels(self) -> list[list[int]]:
        return self.student.labels  # type: ignore[no-any-return]

    def lengths(self) -> list[int]:
        """The student's tokens per example: what its batches pad to (batching by length reads no teacher part)."""
        return [len(ids) for ids in self.input_ids]

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, Any]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        example = self.student[index]
        return {**example, "teacher": self.teacher[self.teacher_of[index]], "pair": self.pairs[index]}

    def aligned_fraction(self) -> float:
        """The share of the student's labelled positions that have a teacher position."""
        total = sum(len(p) for p in self.pairs)
        return sum(j != UNREAD for p in self.pairs for j in p) / total if total else 0.0

    def stats(self) -> dict[str, Any]:
        return {**self.student.stats(), "aligned_fraction": round(self.aligned_fraction(), 6)}

    def summary(self) -> str:
        return f"{self.student.summary()}; {self.aligned_fraction():.1%} of its response positions paired"


def paired_examples(
    student: Any, teacher_rows: Sequence[int], teacher_reads: Sequence[Sequence[int]], teacher: Sequence[dict[str, Any]]
) -> PairedExamples:
    """Join the student's examples (`Examples` with `rows` and `reads`) with the teacher's, row by row: a row the
    teacher dropped (or cut to nothing) drops the student's example too."""
    by_row = {row: index for index, row in enumerate(teacher_rows)}
    keep, teacher_of, pairs = [], [], []
    for index, (row, reads) in enumerate(zip(student.rows, student.reads, strict=True)):
        j = by_row.get(row)
        if j is None:
            continue
        keep.append(index)
        teacher_of.append(j)
        pairs.append(pair_reads(reads, teacher_reads[j]))
    return PairedExamples(student.subset(keep), teacher, teacher_of, pairs)
