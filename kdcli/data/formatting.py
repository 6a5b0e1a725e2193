"""Rows -> prompts -> token ids with response-only labels.

The student and teacher see exactly the text produced here, so three rules matter more than speed:
the prompt is rendered the way the model was trained to see it (its chat template, or the user's template string);
special tokens are never added twice (a chat template that writes BOS already has it); and truncation cuts the
response before the prompt, and the prompt only from the left, where it is least informative: its end holds the
generation prompt (`<|im_start|>assistant\\n`) that the response must follow.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, overload

from kdcli.data.sources import first_line, load_rows, source_name
from kdcli.errors import KdError, did_you_mean
from kdcli.recipe.schema import DataConfig, DataFields

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the `ignore_index` of torch's cross-entropy: positions that carry no loss

PROMPT_COLUMNS = ("instruction", "prompt", "question", "query")
CONTEXT_COLUMNS = ("context", "input")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")
TEMPLATE_PLACEHOLDERS = ("prompt", "context", "system")

Split = Literal["train", "eval"]
_CHUNK = 512  # rows tokenized per batched tokenizer call: the fast tokenizers parallelise over a batch


@dataclass(frozen=True)
class FieldMap:
    """Which column of the rows holds the prompt, the optional context and the response."""

    prompt: str
    context: str | None
    response: str

    def extract(self, row: Mapping[str, Any], key: str = "data", index: int = 0) -> dict[str, str]:
        """`{"prompt", "context", "response"}` of one row as text; missing or null cells become ""."""
        return {
            "prompt": _text(row.get(self.prompt), self.prompt, key, index),
            "context": _text(row.get(self.context), self.context, key, index) if self.context else "",
            "response": _text(row.get(self.response), self.response, key, index),
        }


def _text(value: Any, column: str, key: str, index: int) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)  # e.g. a numeric answer column read from Parquet
    raise KdError(
        f"{key}: column '{column}' holds a {type(value).__name__} in row {index}, not text. "
        f"Point data.fields at a text column."
    )


def columns_of(rows: Sequence[Mapping[str, Any]], sample: int = 1000) -> list[str]:
    """Column names in order of first appearance over the first `sample` rows (JSON rows may differ in keys)."""
    seen: dict[str, None] = {}
    for row in rows[:sample]:
        seen.update(dict.fromkeys(row))
    return list(seen)


def resolve_fields(columns: Sequence[str], fields: DataFields, key: str, source: str) -> FieldMap:
    """Map prompt/context/response to columns: explicit `data.fields` first, then the usual names.

    Dolly (instruction/context/response), Alpaca (instruction/input/output) and MiniLLM-style (prompt/output)
    data need no settings. `data.fields.context: ""` turns an auto-detected context column off.
    """
    listed = ", ".join(columns) if columns else "none"
    taken: set[str] = set()

    def pick(role: str, explicit: str | None, candidates: tuple[str, ...], required: bool) -> str | None:
        if explicit == "" and not required:
            return None
        if explicit:
            if explicit not in columns:
                raise KdError(
                    f"{key}: column '{explicit}' (data.fields.{role}) is not in {source} (columns: {listed})."
                    f"{did_you_mean(explicit, columns)}"
                )
            taken.add(explicit)
            return explicit
        # Exact names first, then case-insensitive ("Instruction", "OUTPUT"), never a column already used.
        free = [c for c in columns if c not in taken]
        by_lower = {c.lower(): c for c in reversed(free)}
        for name in candidates:
            found = name if name in free else by_lower.get(name)
            if found is not None:
                taken.add(found)
                return found
        if required:
            raise KdError(
                f"{key}: no {role} column in {source} (columns: {listed}). Set data.fields.{role} "
                f"(auto-detected names: {', '.join(candidates)})."
            )
        return None

    # Explicit settings are claimed before any auto-detection so that e.g. `fields.prompt: input` is not
    # also picked up as the context column.
    taken.update(c for c in (fields.prompt, fields.context, fields.response) if c and c in columns)

    prompt = pick("prompt", fields.prompt, PROMPT_COLUMNS, required=True)
    response = pick("response", fields.response, RESPONSE_COLUMNS, required=True)
    context = pick("context", fields.context, CONTEXT_COLUMNS, required=False)
    assert prompt is not None and response is not None  # required=True raised otherwise
    if prompt == response:
        raise KdError(f"{key}: data.fields use column '{prompt}' as both prompt and response. Set them apart.")
    return FieldMap(prompt=prompt, context=context, response=response)


# --- prompts -------------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def check_template(template: str) -> frozenset[str]:
    """Validate a template string once; return the placeholders it uses. Errors name `data.template`."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise KdError(
            f"data.template: {err}. Write literal braces as {{{{ and }}}}; placeholders are "
            f"{', '.join('{' + p + '}' for p in TEMPLATE_PLACEHOLDERS)}."
        ) from err
    for name in names:
        if name not in TEMPLATE_PLACEHOLDERS:
            shown = "{" + name + "}"
            hint = did_you_mean(name, TEMPLATE_PLACEHOLDERS)
            raise KdError(
                f"data.template: unknown placeholder {shown}.{hint} Use "
                f"{', '.join('{' + p + '}' for p in TEMPLATE_PLACEHOLDERS)}; write literal braces as {{{{ and }}}}."
            )
    if "prompt" not in names:
        raise KdError("data.template: a template string must contain {prompt} (or use `chat`).")
    return frozenset(names)


def user_message(prompt: str, context: str) -> str:
    """The instruction, followed by the context after a blank line when there is one."""
    return f"{prompt}\n\n{context}" if context.strip() else prompt


def format_prompt(row_fields: Mapping[str, str], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> str:
    """Render the model input that precedes the response (`row_fields` has "prompt" and optional "context").

    `template: chat`: one user message (instruction + "\\n\\n" + context), after `cfg.system_prompt` as a system
    message when set, rendered by the tokenizer's chat template with the generation prompt. Otherwise
    `cfg.template` is formatted with `{prompt}`, `{context}` and `{system}`. A template without `{context}` gets
    the context appended to `{prompt}` as in the chat case, so context columns are never silently dropped.
    """
    prompt = row_fields.get("prompt", "") or ""
    context = row_fields.get("context", "") or ""
    if cfg.template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise KdError(
                "data.template: the tokenizer has no chat template, so `template: chat` cannot work. "
                'Set data.template to a string, e.g. "### Instruction:\\n{prompt}\\n\\n### Response:\\n".'
            )
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": user_message(prompt, context)})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja's TemplateError and whatever a template raises ("system role not supported")
            extra = ""
            if cfg.system_prompt:
                extra = " Remove data.system_prompt: this template may not accept a system message."
            raise KdError(f"data.template: the tokenizer's chat template failed: {first_line(err)}.{extra}") from err
        if not isinstance(text, str):  # pragma: no cover - tokenize=False returns str in every transformers we support
            raise KdError("data.template: the tokenizer's chat template did not return text.")
        return text

    names = check_template(cfg.template)
    if cfg.system_prompt and "system" not in names:
        raise KdError(
            "data.system_prompt is set but data.template has no {system} placeholder. "
            "Add {system} to the template, or remove data.system_prompt."
        )
    if "context" not in names:
        prompt = user_message(prompt, context)
    return cfg.template.format(prompt=prompt, context=context, system=cfg.system_prompt or "")


# --- tokens --------------------------------------------------------------------------------------------------


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


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
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
    prompt_ids, response_ids = _encode_pairs([prompt], [response], tokenizer, bos)
    return assemble(
        prompt_ids[0], response_ids[0], eos_token_id=_eos_id(tokenizer), max_length=max_length, bos_token_id=bos
    )


def _encode_pairs(
    prompts: list[str], responses: list[str], tokenizer: PreTrainedTokenizerBase, bos: int | None
) -> tuple[list[list[int]], list[list[int]]]:
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    if bos is not None:
        prompt_ids = [ids if ids and ids[0] == bos else [bos, *ids] for ids in prompt_ids]
    return prompt_ids, response_ids


# --- data sets -----------------------------------------------------------------------------------------------


@dataclass
class Examples(Sequence[dict[str, list[int]]]):
    """Tokenized examples of one split, with the counts that `kd` reports. Indexing gives collator inputs."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    split: Split = "train"
    source: str = ""
    fields: FieldMap | None = None
    n_rows: int = 0  # rows read (stops early once max_*_examples examples are kept)
    n_dropped: int = 0  # rows without a response
    n_truncated: int = 0  # examples cut to max_length
    n_prompt_truncated: int = 0  # ... of which the prompt itself had to be cut
    tokens: int = 0
    response_tokens: int = 0  # tokens with a label: the ones the loss is computed on

    def __len__(self) -> int:
        return len(self.input_ids)

    @overload
    def __getitem__(self, index: int) -> dict[str, list[int]]: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict[str, list[int]]]: ...
    def __getitem__(self, index: int | slice) -> dict[str, list[int]] | list[dict[str, list[int]]]:
        # A slice gives a list of examples, ready for the collator: `collate(examples[i : i + batch_size])`.
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        return (self[i] for i in range(len(self)))

    def stats(self) -> dict[str, Any]:
        """The counts as a JSON-ready dict, for run records."""
        return {
            "source": self.source,
            "examples": len(self),
            "rows": self.n_rows,
            "dropped": self.n_dropped,
            "truncated": self.n_truncated,
            "prompt_truncated": self.n_prompt_truncated,
            "tokens": self.tokens,
            "response_tokens": self.response_tokens,
            "fields": None
            if self.fields is None
            else {"prompt": self.fields.prompt, "context": self.fields.context, "response": self.fields.response},
        }

    def summary(self) -> str:
        """One line for the console, e.g. `train: 900 examples from train.jsonl (1 dropped, 12 truncated) ...`."""
        notes = [f"{self.n_dropped} dropped: no response"] if self.n_dropped else []
        if self.n_truncated:
            notes.append(f"{self.n_truncated} truncated")
        note = f" ({', '.join(notes)})" if notes else ""
        mean = self.tokens / len(self) if len(self) else 0.0
        return (
            f"{self.split}: {len(self)} examples from {self.source}{note}, {self.tokens} tokens "
            f"({self.response_tokens} in responses), {mean:.0f} tokens/example"
        )


def _source_of(cfg: DataConfig, split: Split) -> str:
    spec = cfg.spec(split)
    return source_name(spec) if spec else split


def _selected(
    rows: Sequence[Mapping[str, Any]], cfg: DataConfig, split: Split, key: str
) -> tuple[FieldMap, Iterator[tuple[int, dict[str, str]]]]:
    """Resolve the columns, then yield (row index, fields) of rows that have a response."""
    source = _source_of(cfg, split)
    if not rows:
        raise KdError(f"{key}: {source} has no rows.")
    fmap = resolve_fields(columns_of(rows), cfg.fields, key, source)

    def generate() -> Iterator[tuple[int, dict[str, str]]]:
        for index, row in enumerate(rows):
            yield index, fmap.extract(row, key, index)

    return fmap, generate()


def build_examples(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    split: Split,
    key: str,
) -> Examples:
    """Format and tokenize `rows` (see `format_prompt`, `tokenize_example`) into `Examples`.

    Keeps the first `cfg.max_{split}_examples` usable examples (rows without a response are dropped and counted,
    not used up). Raises `KdError` naming `key` when columns are missing or no example is left.
    """
    source = _source_of(cfg, split)
    fmap, selected = _selected(rows, cfg, split, key)
    limit = cfg.max_examples(split)
    eos, bos = _eos_id(tokenizer), bos_to_add(tokenizer)
    out = Examples(split=split, source=source, fields=fmap)

    def flush(batch: list[dict[str, str]]) -> None:
        prompts = [format_prompt(f, tokenizer, cfg) for f in batch]
        prompt_ids, response_ids = _encode_pairs(prompts, [f["response"] for f in batch], tokenizer, bos)
        for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
            if limit is not None and len(out) >= limit:
                return
            out.n_rows += 1
            example = assemble(p_ids, r_ids, eos_token_id=eos, max_length=cfg.max_length, bos_token_id=bos)
            if example is None:
                out.n_dropped += 1
                continue
            out.input_ids.append(example["input_ids"])
            out.labels.append(example["labels"])
            out.n_truncated += example["truncated"]
            out.n_prompt_truncated += example["prompt_truncated"]
            out.tokens += len(example["input_ids"])
            out.response_tokens += len(example["input_ids"]) - example["prompt_length"]

    batch: list[dict[str, str]] = []
    for _, row_fields in selected:
        if limit is not None and len(out) >= limit:
            break
        if not row_fields["response"].strip():
            out.n_rows += 1
            out.n_dropped += 1
            continue
        batch.append(row_fields)
        # Never tokenize far past the limit: a 10-example smoke run on a 1M-row file stays instant.
        want = _CHUNK if limit is None else min(_CHUNK, max(1, limit - len(out)))
        if len(batch) >= want:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    if not out:
        raise KdError(
            f"{key}: no usable examples in {source}: {out.n_rows} row(s) read, all without a "
            f"'{fmap.response}' response. Check data.fields.response."
        )
    return out


def prompt_and_reference(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    split: Split = "eval",
    key: str | None = None,
) -> list[tuple[str, str]]:
    """(formatted prompt, reference response) pairs for generation, e.g. by `kd eval`.

    Selects the same rows as `build_examples` for that split (rows with a response, first
    `cfg.max_{split}_examples`), so generated answers line up with the examples the loss was measured on.
    """
    key = key or f"data.{split}"
    _, selected = _selected(rows, cfg, split, key)
    limit = cfg.max_examples(split)
    pairs: list[tuple[str, str]] = []
    for _, row_fields in selected:
        if limit is not None and len(pairs) >= limit:
            break
        if row_fields["response"].strip():
            pairs.append((format_prompt(row_fields, tokenizer, cfg), row_fields["response"]))
    return pairs


def load_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: Split) -> Examples | None:
    """Read and tokenize `cfg.train` or `cfg.eval` (None when `data.eval` is null). Errors name `data.<split>`."""
    spec = cfg.spec(split)
    if spec is None:
        return None
    key = f"data.{split}"
    return build_examples(load_rows(spec, split, key), tokenizer, cfg, split, key)
