"""Formatted prompt + response -> token ids with response-only labels.

Special tokens are never added twice (a chat template that writes BOS already has it), and truncation cuts the
response before the prompt, and the prompt only from the left, where it is least informative: its end holds the
generation prompt (`<|im_start|>assistant\\n`) that the response must follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kdcli.errors import KdError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the `ignore_index` of torch's cross-entropy: positions that carry no loss


def bos_to_add(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id this tokenizer prepends by default (Llama, Gemma), or None (GPT-2, Qwen, SmolLM).

    Prompts are tokenized with `add_special_tokens=False` so a chat template's own BOS is not doubled; this tells
    whether a BOS must be added back for text that does not start with one (template strings).
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = len(with_special) > len(without) and with_special[0] == bos
    return bos if added else None


def eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise KdError(
            "the tokenizer has no EOS token, so responses cannot be taught to end. Use a model whose tokenizer sets "
            "eos_token."
        )
    return int(eos)


def assemble(
    prompt_ids: Sequence[int],
    response_ids: Sequence[int],
    *,
    eos_token_id: int,
    max_length: int,
    bos_token_id: int | None = None,
) -> dict[str, Any] | None:
    """Join token ids into one example; see `tokenize_example`.

    `bos_token_id`: a BOS that opens `prompt_ids` and is kept first on left truncation. Pass it only for tokenizers
    that add BOS by default (`bos_to_add`): there it is the sequence start the model always saw. Where BOS is
    just a chat marker (SmolLM2's `<|im_start|>`), keeping it would leave an orphan marker.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2 (one prompt token and one response token)")
    if not response_ids or not prompt_ids:
        # No response: nothing to learn. No prompt: the first response token has no position predicting it.
        return None
    prompt = list(prompt_ids)
    target = [*response_ids, eos_token_id]
    truncated = prompt_truncated = False
    if len(prompt) + len(target) > max_length:
        truncated = True
        # Keep at least a quarter of the window for the response; a shorter response needs only its length.
        need = min(len(target), max(1, max_length // 4))
        if len(prompt) + need > max_length:
            prompt_truncated = True
            keep = max_length - need
            head = prompt[:1] if bos_token_id is not None and prompt[0] == bos_token_id and keep > 1 else []
            prompt = head + prompt[len(prompt) - (keep - len(head)) :]
        # A cut response loses its EOS too: teaching the model to stop mid-answer would be wrong.
        target = target[: max_length - len(prompt)]
    return {
        "input_ids": prompt + target,
        "labels": [IGNORE_INDEX] * len(prompt) + target,
        "prompt_length": len(prompt),
        "truncated": truncated,
        "prompt_truncated": prompt_truncated,
    }


def tokenize_example(
    prompt: str, response: str, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, Any] | None:
    """Tokenize one (formatted prompt, response) pair into `input_ids` and `labels`, or None to drop it.

    `input_ids` = prompt tokens (exactly what the template wrote, plus BOS only if the tokenizer adds one by
    default and the text lacks it) + response tokens + EOS. `labels` is -100 on prompt positions and equals
    `input_ids` on response positions, EOS included; labels are NOT shifted here (the collator shifts them).
    Longer than `max_length`: the response is cut first; when the prompt alone leaves fewer than
    `max(1, max_length // 4)` response tokens, the prompt is cut from the left (its BOS kept) to make room.
    Returns None when the response is empty. Also returns `prompt_length`, `truncated`, `prompt_truncated`.
    """
    bos = bos_to_add(tokenizer)
    prompt_ids, response_ids, _ = encode_pairs([prompt], [response], tokenizer, bos)
    return assemble(
        prompt_ids[0], response_ids[0], eos_token_id=eos_id(tokenizer), max_length=max_length, bos_token_id=bos
    )


def encode_pairs(
    prompts: list[str],
    responses: list[str],
    tokenizer: PreTrainedTokenizerBase,
    bos: int | None,
    *,
    offsets: bool = False,
) -> tuple[list[list[int]], list[list[int]], list[list[tuple[int, int]]] | None]:
    """Prompt and response token ids, each tokenized on its own; with `offsets`, also each response token's
    (start, end) characters in its response (a fast tokenizer's offset mapping)."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    encoded = tokenizer(responses, add_special_tokens=False, return_offsets_mapping=offsets)
    if bos is not None:
        prompt_ids = [ids if ids and ids[0] == bos else [bos, *ids] for ids in prompt_ids]
    return prompt_ids, encoded["input_ids"], encoded["offset_mapping"] if offsets else None
