"""Batches: padding, next-token label alignment, and the seeded, resumable order training reads them in."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from kdcli.data.tokens import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Example = Mapping[str, Sequence[int]]


class Collator:
    """Pad examples (`input_ids`, unshifted `labels` as built by `tokenize_example`) into tensors.

    Returns a dict of `torch.long` tensors, right-padded to the longest example of the batch (or a multiple of
    `pad_to_multiple_of`):

    - `input_ids` [B, T]: padding positions hold `pad_token_id`.
    - `attention_mask` [B, T]: 1 on real tokens, 0 on padding.
    - `labels` [B, T]: ALREADY SHIFTED for next-token prediction. `labels[b, t]` is the target of
      `logits[b, t]` (the model's prediction after reading `input_ids[b, :t+1]`):
      `labels[b, t] == input_ids[b, t + 1]` when position t+1 is a response token (EOS included), and -100
      otherwise: where t+1 is a prompt or padding position, and always at t = T-1.
      So a loss uses `logits` [B, T, V] as they come, with no `logits[:, :-1]` slice (which would copy a
      B*T*V tensor), and the same mask `labels != -100` selects the positions of teacher and student logits.
      Do not pass these labels to a Hugging Face model's `labels=` argument: it shifts again.
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None) -> None:
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be positive")
        # Padding is masked out of attention and labels, so any valid id works when a tokenizer has no pad token
        # (Llama): 0 rather than failing. `for_tokenizer` prefers EOS, which is what `generate` pads with.
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None) -> Collator:
        """Use the tokenizer's pad token, else its EOS: padding is masked out, so any valid id works."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            pad = 0  # masked everywhere; only needs to be a valid embedding index
        return cls(int(pad), pad_to_multiple_of)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        width = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(examples)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(examples):
            ids, raw = example["input_ids"], example["labels"]
            if len(ids) != len(raw):
                raise ValueError(f"example {row}: {len(ids)} input_ids but {len(raw)} labels")
            n = len(ids)
            input_ids[row, :n] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, :n] = 1
            # Shift left by one: the label of position t is the (response) token at t+1.
            if n > 1:
                labels[row, : n - 1] = torch.as_tensor(raw[1:], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class PairCollator:
    """Batches of `PairedExamples` (a student and a teacher of different tokenizers).

    The student's tensors are `student`'s (`Collator`), the teacher's part is `teacher`'s, a function of the teacher
    examples: its own padded `teacher_input_ids`, `teacher_attention_mask` and `teacher_labels` (`teacher_tokens`),
    or a cache's records. `pair` [B, T]: for each student position, the row of the batch's teacher positions it is
    paired with, counted over the teacher examples' labelled positions in order (the rows of
    `teacher_labels != -100`), or -1.
    """

    def __init__(self, student: Collator, teacher: Callable[[Sequence[Example]], dict[str, torch.Tensor]]) -> None:
        self.student, self.teacher = student, teacher

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.student(examples)
        pair = torch.full_like(batch["labels"], -1)
        base = 0
        for row, example in enumerate(examples):
            pairs = torch.as_tensor(example["pair"], dtype=torch.long)
            start = len(example["input_ids"]) - len(pairs) - 1  # the position predicting the first response token
            pair[row, start : start + len(pairs)] = torch.where(pairs >= 0, pairs + base, -1)
            base += sum(label != IGNORE_INDEX for label in example["teacher"]["labels"])
        return {**batch, **self.teacher([example["teacher"] for example in examples]), "pair": pair}


def teacher_tokens(collate: Collator) -> Callable[[Sequence[Example]], dict[str, torch.Tensor]]:
    """The teacher part of a `PairCollator` batch for a teacher that runs: its own tokens, padded by `collate`."""

    def part(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        return {f"teacher_{key}": value for key, value in collate(examples).items()}

    return part


# Optimizer steps whose examples are sorted together by length when batches are grouped by length: enough to put
# examples of like length side by side, few enough that every step still draws from a random stretch of the epoch.
LENGTH_GROUP_STEPS = 16


def micro_batches(
    examples: Sequence[Example],
    collate: Callable[[Sequence[Example]], dict[str, torch.Tensor]],
    batch_size: int,
    seed: int,
    *,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    grad_accum: int = 1,
    group_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches: each epoch a fresh seeded permutation, so a run is reproducible from its seed.

    The stream is indexed (micro-batch k is chunk k mod n of epoch k div n), so a resumed run starts at `start`
    without replaying the data. With several processes each optimizer step takes grad_accum x world_size
    consecutive micro-batches and rank r gets the r-th run of grad_accum of them: the same global batches as
    one process with `grad_accum` x world_size. `group_by_length`: see `epoch_batches`.
    """
    per_epoch = math.ceil(len(examples) / batch_size)
    lengths = example_lengths(examples) if group_by_length else None
    batches: list[list[int]] = []
    loaded_epoch = -1
    index = start
    while True:
        if (index // grad_accum) % world_size == rank:
            epoch, chunk = divmod(index, per_epoch)
            if epoch != loaded_epoch:
                per_step = grad_accum * world_size
                batches = epoch_batches(len(examples), batch_size, seed, epoch, lengths, per_step)
                loaded_epoch = epoch
            yield collate([examples[i] for i in batches[chunk]])
        index += 1


def epoch_batches(
    count: int,
    batch_size: int,
    seed: int,
    epoch: int,
    lengths: Sequence[int] | None = None,
    per_step: int = 1,
) -> list[list[int]]:
    """The micro-batches of one epoch, as example indices: a seeded permutation cut into batches.

    With `lengths`, the unit is the optimizer step's global batch (`per_step` micro-batches): each stretch of
    LENGTH_GROUP_STEPS of them is sorted by length and cut into global batches, the full ones are shuffled (a
    short one stays last, as without), and each is cut into micro-batches. A batch pads to its longest example,
    so like lengths waste less compute on padding (28 % of a random batch of 4 starter examples is padding). Every
    example still comes once per epoch, and a step holds the same examples whether it is one micro-batch, several
    accumulated, or one per process."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(count, generator=generator).tolist()
    if lengths is None:
        return _cut(order, batch_size)
    window = batch_size * per_step
    span = window * LENGTH_GROUP_STEPS
    steps: list[list[int]] = []
    for lo in range(0, count, span):
        steps += _cut(sorted(order[lo : lo + span], key=lambda i: lengths[i], reverse=True), window)
    short = 1 if steps and len(steps[-1]) < window else 0  # only the epoch's last step can be short
    full = len(steps) - short
    shuffled = [steps[k] for k in torch.randperm(full, generator=generator).tolist()] + steps[full:]
    return [batch for step in shuffled for batch in _cut(step, batch_size)]


def _cut(indices: list[int], size: int) -> list[list[int]]:
    return [indices[lo : lo + size] for lo in range(0, len(indices), size)]


def example_lengths(examples: Sequence[Example]) -> list[int]:
    """Tokens of each example. A split that knows them without building its examples (a teacher cache, whose
    examples carry the teacher's records) says so with a `lengths()` method."""
    known = getattr(examples, "lengths", None)
    return known() if callable(known) else [len(example["input_ids"]) for example in examples]


def by_length(examples: Sequence[Example]) -> list[int]:
    """The indices of `examples` from the shortest to the longest: the batches of a pass whose order does not
    matter (eval) pad least this way."""
    lengths = example_lengths(examples)
    return sorted(range(len(lengths)), key=lambda i: lengths[i])
