"""Training data: read rows from a source, render prompts, tokenize with response-only labels, and batch.

    rows = load_rows("train.jsonl", "train", key="data.train")        # or builtin:starter, org/name[:split]
    examples = build_examples(rows, tokenizer, cfg.data, "train", "data.train")
    # or, in one step: examples = load_examples(cfg.data, tokenizer, "train")
    collator = Collator.for_tokenizer(tokenizer)
    for batch in itertools.islice(micro_batches(examples, collator, 8, seed=cfg.seed), steps):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # batch["labels"] is already shifted: labels[b, t] is the target of logits[b, t].

Layout: `sources` (reading rows), `fields` (which column is prompt, context, response), `formatting` (prompt
templates, `Examples`), `tokens` (token ids, response-only labels, truncation), `collate` (batches, torch).

The collate names are imported lazily so that `import kdcli.data` (e.g. for `kd validate`) does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdcli.data.fields import CONTEXT_COLUMNS, PROMPT_COLUMNS, RESPONSE_COLUMNS, FieldMap, resolve_fields
from kdcli.data.formatting import (
    Examples,
    build_examples,
    format_prompt,
    load_examples,
    prompt_and_reference,
    read_split,
)
from kdcli.data.sources import BUILTIN_DATASETS, load_rows, source_name
from kdcli.data.tokens import IGNORE_INDEX, tokenize_example

if TYPE_CHECKING:
    from kdcli.data.collate import Collator, by_length, micro_batches

__all__ = [
    "BUILTIN_DATASETS",
    "CONTEXT_COLUMNS",
    "IGNORE_INDEX",
    "PROMPT_COLUMNS",
    "RESPONSE_COLUMNS",
    "Collator",
    "Examples",
    "FieldMap",
    "build_examples",
    "by_length",
    "format_prompt",
    "load_examples",
    "load_rows",
    "micro_batches",
    "prompt_and_reference",
    "read_split",
    "resolve_fields",
    "source_name",
    "tokenize_example",
]

_LAZY = {"Collator", "by_length", "micro_batches"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from kdcli.data import collate

        return getattr(collate, name)
    raise AttributeError(f"module 'kdcli.data' has no attribute {name!r}")
