"""Sequence-level KD (`data.responses: teacher`): the teacher writes the responses the student is trained on.

Generation is the models layer's batched, seeded, resumable file pass (`kdcli.models.generate_file`), the one `kd
eval` uses too: every batch is reseeded from (generation.seed, batch index) and finished batches survive an
interruption, so a resumed cache gets the same responses as an uninterrupted one. The data needs prompts only; a
response column, if any, is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.data import build_examples
from kdcli.data.formatting import Examples, Split, prompt_and_reference, with_teacher_responses
from kdcli.models import GenerationSettings, generate_file, read_generations

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kdcli.recipe import Recipe


def teacher_examples(
    recipe: Recipe,
    split: Split,
    rows: Sequence[Mapping[str, Any]],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> Examples:
    """Generate (or reuse from `path`) a response for each selected row, then tokenize prompt + response."""
    placeholders, data = with_teacher_responses(rows, recipe.data, split)
    key = f"data.{split}"
    pairs = prompt_and_reference(placeholders, tokenizer, data, split, key)
    gen = recipe.generation
    settings = GenerationSettings(
        max_new_tokens=gen.max_new_tokens,
        greedy=not gen.do_sample,
        temperature=gen.temperature,
        top_p=gen.top_p,
        top_k=gen.top_k,
        precision=recipe.train.precision,
    )
    if not path.is_file():  # a finished pass is only ever written whole (atomic rename)
        prompts = [prompt for prompt, _ in pairs]
        generate_file(
            model,
            tokenizer,
            prompts,
            settings,
            gen.seed if gen.do_sample else None,
            path,
            batch_size=gen.batch_size,
            # The columns responses.jsonl has always had (it once went through eval's rows), so the file does not
            # change with the kd version that wrote it.
            fields=[{"instruction": prompt, "prompt": prompt, "reference": ""} for prompt in prompts],
            on_progress=on_progress,
        )
    responses = [row["response"] for row in read_generations(path)]
    generated, _ = with_teacher_responses(rows, recipe.data, split, responses)
    return build_examples(generated, tokenizer, data, split, key, reads=True)
