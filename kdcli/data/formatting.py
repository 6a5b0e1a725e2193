"""Rows -> prompts -> `Examples`: the prompt text the student and teacher see, and the tokenized data sets.

The prompt is rendered the way the model was trained to see it (its chat template, or the user's template
string), because the student and teacher see exactly the text produced here. The columns come from `fields`;
the token ids, labels and truncation from `tokens`.
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, overload

from kdcli.data.alignment import reads_of
from kdcli.data.fields import FieldMap, columns_of, resolve_fields
from kdcli.data.sources import Rows, first_line, load_rows, place_of, source_name
from kdcli.data.tokens import IGNORE_INDEX, assemble, bos_to_add, encode_pairs, eos_id
from kdcli.errors import KdError, KdWarning, did_you_mean
from kdcli.recipe.schema import DataConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_PLACEHOLDERS = ("prompt", "context", "system")

Split = Literal["train", "eval"]
_CHUNK = 512  # rows tokenized per batched tokenizer call: the fast tokenizers parallelise over a batch


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
    n_dropped: int = 0  # rows skipped: an empty response (or a prompt that formats to no tokens)
    n_truncated: int = 0  # examples cut to max_length
    n_prompt_truncated: int = 0  # ... of which the prompt itself had to be cut
    tokens: int = 0
    response_tokens: int = 0  # tokens with a label: the ones the loss is computed on
    rows: list[int] = field(default_factory=list)  # the data row of each example
    # With `build_examples(..., reads=True)`: per example, the response characters each labelled position has read
    # (`kdcli.data.alignment.reads_of`), to pair it with another tokenizer's positions.
    reads: list[list[int]] | None = None

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

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def subset(self, indices: Sequence[int]) -> Examples:
        """These examples only (the counts of rows read, dropped and cut stay those of the whole split)."""
        if len(indices) == len(self):
            return self
        ids = [self.input_ids[i] for i in indices]
        return replace(
            self,
            input_ids=ids,
            labels=[self.labels[i] for i in indices],
            rows=[self.rows[i] for i in indices],
            reads=None if self.reads is None else [self.reads[i] for i in indices],
            tokens=sum(map(len, ids)),
            response_tokens=sum(sum(label != IGNORE_INDEX for label in self.labels[i]) for i in indices),
        )

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
        notes = [f"{self.n_dropped} dropped: empty response"] if self.n_dropped else []
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
    """Resolve the columns, then yield (row index, fields) of every row; a row without a prompt or response
    (missing, null, not text) is a `KdError` naming its line."""
    source = _source_of(cfg, split)
    if not rows:
        raise KdError(f"{key}: {source} has no rows.")
    fmap = resolve_fields(columns_of(rows), cfg.fields, key, source)

    def generate() -> Iterator[tuple[int, dict[str, str]]]:
        for index, row in enumerate(rows):
            yield index, fmap.extract(row, key, f"{source} {place_of(rows, index)}")

    return fmap, generate()


def build_examples(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    split: Split,
    key: str,
    on_warning: Callable[[str], None] | None = None,
    *,
    reads: bool = False,
) -> Examples:
    """Format and tokenize `rows` (see `format_prompt`, `tokenize_example`) into `Examples`; with `reads`, each
    example also records what its labelled positions have read of the response (`alignment.reads_of`).

    Keeps the first `cfg.max_{split}_examples` usable examples. Rows whose response is empty (or whose prompt
    formats to no tokens) are skipped, not used up, and counted in `n_dropped`; `on_warning` (default: a
    `KdWarning`) then gets ONE message that counts them and names their first lines. Raises
    `KdError` naming `key` when columns are missing, a row's prompt or response is missing or not text, or no
    example is left.
    """
    source = _source_of(cfg, split)
    fmap, selected = _selected(rows, cfg, split, key)
    limit = cfg.max_examples(split)
    eos, bos = eos_id(tokenizer), bos_to_add(tokenizer)
    out = Examples(split=split, source=source, fields=fmap, reads=[] if reads else None)
    skipped: dict[str, list[int]] = {"response": [], "prompt": []}  # row indices, by what was empty

    def flush(batch: list[tuple[int, dict[str, str]]]) -> None:
        prompts = [format_prompt(f, tokenizer, cfg) for _, f in batch]
        responses = [f["response"] for _, f in batch]
        prompt_ids, response_ids, offsets = encode_pairs(prompts, responses, tokenizer, bos, offsets=reads)
        for (index, _), p_ids, r_ids, r_text, r_offsets in zip(
            batch, prompt_ids, response_ids, responses, offsets or [()] * len(batch), strict=True
        ):
            if limit is not None and len(out) >= limit:
                return
            out.n_rows += 1
            example = assemble(p_ids, r_ids, eos_token_id=eos, max_length=cfg.max_length, bos_token_id=bos)
            if example is None:
                out.n_dropped += 1
                skipped["response" if not r_ids else "prompt"].append(index)
                continue
            out.input_ids.append(example["input_ids"])
            out.labels.append(example["labels"])
            out.rows.append(index)
            if out.reads is not None:
                labelled = len(example["input_ids"]) - example["prompt_length"]
                out.reads.append(reads_of(r_offsets, len(r_text))[:labelled])
            out.n_truncated += example["truncated"]
            out.n_prompt_truncated += example["prompt_truncated"]
            out.tokens += len(example["input_ids"])
            out.response_tokens += len(example["input_ids"]) - example["prompt_length"]

    batch: list[tuple[int, dict[str, str]]] = []
    for index, row_fields in selected:
        if limit is not None and len(out) >= limit:
            break
        if not row_fields["response"].strip():
            out.n_rows += 1
            out.n_dropped += 1
            skipped["response"].append(index)
            continue
        batch.append((index, row_fields))
        # Never tokenize far past the limit: a 10-example smoke run on a 1M-row file stays instant.
        want = _CHUNK if limit is None else min(_CHUNK, max(1, limit - len(out)))
        if len(batch) >= want:
            flush(batch)
            batch = []
    if batch:
        flush(batch)

    labels = {"response": f"an empty '{fmap.response}'", "prompt": "a prompt that formats to no tokens"}
    kinds = [kind for kind in ("response", "prompt") if skipped[kind]]
    if not out:
        raise KdError(
            f"{key}: no usable examples in {source}: {out.n_rows} row(s) read, all with "
            f"{' or '.join(labels[k] for k in kinds)}. Fill in the responses, or set data.fields.response to the "
            "column that holds them."
        )
    if out.n_dropped:
        reasons = [
            f"{f'{len(skipped[k])} with ' if len(kinds) > 1 else ''}{labels[k]} ({_places(rows, skipped[k])})"
            for k in kinds
        ]
        what = f" with {reasons[0]}" if len(reasons) == 1 else ": " + ", ".join(reasons)
        (on_warning or _warn)(
            f"{key}: skipped {out.n_dropped} of {out.n_rows} rows of {source}{what}. Fill them in or remove them."
        )
    return out


def _places(rows: Sequence[Any], indices: list[int], shown: int = 3) -> str:
    """`line 2, line 4, line 9, ...`: where the first `shown` of these rows are."""
    return ", ".join(place_of(rows, i) for i in indices[:shown]) + (", ..." if len(indices) > shown else "")


def _warn(text: str) -> None:
    warnings.warn(text, KdWarning, stacklevel=3)  # the CLI prints a KdWarning as one `warning:` line


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


# `data.responses: teacher`: the column the generated response is put in, a name no data set uses.
TEACHER_RESPONSE_COLUMN = "__kd_teacher_response__"


def with_teacher_responses(
    rows: Sequence[Mapping[str, Any]], cfg: DataConfig, split: Split, responses: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], DataConfig]:
    """`data.responses: teacher` rows as `build_examples` reads them, and the data config to read them with.

    The first `max_<split>_examples` rows (every row with a prompt is used), each with `responses` (a placeholder
    before they are generated) in `TEACHER_RESPONSE_COLUMN`, which the returned config's `fields.response` names.
    """
    limit = cfg.max_examples(split)
    kept = rows[:limit] if limit else rows
    texts = ["-"] * len(kept) if responses is None else responses
    out: list[dict[str, Any]] = [{**row, TEACHER_RESPONSE_COLUMN: text} for row, text in zip(kept, texts, strict=True)]
    if isinstance(rows, Rows):  # keep each row's line for error messages
        out = Rows(out, name=rows.name, lines=None if rows.lines is None else rows.lines[: len(out)], unit=rows.unit)
    fields = cfg.fields.model_copy(update={"response": TEACHER_RESPONSE_COLUMN})
    data = cfg.model_copy(update={"fields": fields, "max_train_examples": None, "max_eval_examples": None})
    return out, data


def read_split(cfg: DataConfig, split: Split) -> list[dict[str, Any]] | None:
    """The rows of `data.<split>` (None when `data.eval` is null), with their columns and rows checked: what
    `build_examples` would refuse (a missing file, a broken line, no prompt/response column, a missing or
    non-text response) fails here, before any model is loaded. Needs no tokenizer.

    Rows are checked up to the `max_<split>_examples` with a non-empty response, the ones training reads."""
    spec = cfg.spec(split)
    if spec is None:
        return None
    key = f"data.{split}"
    rows = load_rows(spec, split, key)
    checked, checked_cfg = with_teacher_responses(rows, cfg, split) if cfg.responses == "teacher" else (rows, cfg)
    _, selected = _selected(checked, checked_cfg, split, key)
    limit, kept = checked_cfg.max_examples(split), 0
    for _, row_fields in selected:
        kept += bool(row_fields["response"].strip())
        if limit is not None and kept >= limit:
            break
    return rows


def load_examples(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    split: Split,
    on_warning: Callable[[str], None] | None = None,
) -> Examples | None:
    """Read and tokenize `cfg.train` or `cfg.eval` (None when `data.eval` is null). Errors name `data.<split>`."""
    rows = read_split(cfg, split)
    if rows is None:
        return None
    return build_examples(rows, tokenizer, cfg, split, f"data.{split}", on_warning)
