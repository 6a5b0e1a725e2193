"""Generation: batched, left-padded, seeded sampling (or greedy decoding) from a causal LM, for plain prompts.

The one generation service of kd: `kd eval` passes, sequence-level KD (the teacher writes the responses) and
on-policy training all call it. `generate` returns the responses in memory; `kdcli.models.passes` builds the
resumable pass written to a file on top of the same plan and batches, so both give the same responses.

Reproducibility: each batch reseeds torch from (seed, batch index), so a resumed pass gives the same responses as
one that ran through, and a pass does not depend on what ran before it in the process. Prompts are sorted by
length (longest first) before batching, which keeps padding small and makes an out-of-memory batch show up at once
rather than at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from kdcli.data.tokens import bos_to_add

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

# A prompt is text (formatted as training formats it: template or chat turn) or its token ids, taken as given.
Prompt = str | Sequence[int]
Stop = Literal["eos", "max_new_tokens"]  # how an answer ended: by itself, or cut at max_new_tokens
STOPPED_AT_EOS: Stop = "eos"


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that changes what a pass generates. Generations are reused only when all of it matches."""

    max_new_tokens: int = 256
    greedy: bool = False
    # The papers' protocol: plain sampling from the model's distribution, no truncation.
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    precision: str = "fp32"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.greedy:
            for key in ("temperature", "top_p", "top_k"):
                data.pop(key)
        return data


@dataclass(frozen=True)
class Generation:
    """One prompt's response."""

    ids: list[int]  # the new tokens, up to (not including) the first stop token
    text: str  # `ids` decoded, special tokens skipped, stripped
    stopped: Stop
    stop_id: int | None = None  # the stop token the model produced (one of several EOS ids), None at the length cap

    @property
    def generated(self) -> int:
        """Tokens the model produced for this response: the stop token counts, it was generated too."""
        return len(self.ids) + (self.stopped == STOPPED_AT_EOS)


@dataclass(frozen=True)
class GenerationPlan:
    """What a pass will run, fixed before its first batch: the prompts' ids, the batches, the decoding config."""

    prompt_ids: list[list[int]]
    batches: list[list[int]]  # prompt indices of each batch, longest prompts first
    stops: list[int]
    pad: int
    config: GenerationConfig

    def __len__(self) -> int:
        return len(self.batches)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int | None
) -> list[list[int]]:
    """Token ids exactly as training built them (no special tokens added twice), cut from the left when a prompt
    would leave no room for `max_new_tokens` in the model's context; a leading BOS is kept."""
    bos = bos_to_add(tokenizer)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    out: list[list[int]] = []
    for ids in encoded:
        ids = list(ids)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        out.append(_cut(ids, max_prompt_tokens, bos))
    return out


def _cut(ids: list[int], max_prompt_tokens: int | None, bos: int | None) -> list[int]:
    """Drop tokens from the left (the end of a prompt is what the response follows), keeping a leading BOS."""
    if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
        return ids
    head = ids[:1] if bos is not None and ids[0] == bos else []
    return head + ids[len(ids) - (max_prompt_tokens - len(head)) :]


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], max_prompt_tokens: int | None
) -> list[list[int]]:
    """Texts are encoded with `encode_prompts`; token ids are used as given (no BOS added), cut the same way."""
    if all(isinstance(p, str) for p in prompts):
        return encode_prompts(tokenizer, prompts, max_prompt_tokens)  # type: ignore[arg-type]
    if any(isinstance(p, str) for p in prompts):
        raise TypeError("prompts: give all texts or all token ids, not a mix")
    bos = bos_to_add(tokenizer)
    return [_cut([int(t) for t in p], max_prompt_tokens, bos) for p in prompts]


def max_prompt_tokens(model: PreTrainedModel, max_new_tokens: int) -> int | None:
    """How long a prompt may be so that `max_new_tokens` still fit in the model's context (None: no limit)."""
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return context - max_new_tokens if context and context > max_new_tokens else None


def batch_plan(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_seed(seed: int, batch: int) -> int:
    # The "kd-eval" salt dates from when generation lived in `kd eval`; changing it would change every response.
    digest = hashlib.sha256(f"kd-eval:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's EOS (what training taught the student to end with) and any the model's config adds."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    return sorted(ids)


def plan_generation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: GenerationSettings,
    batch_size: int,
) -> GenerationPlan:
    """The prompts encoded and cut to the context, sorted into batches, and the decoding config of `settings`."""
    from transformers import GenerationConfig

    prompt_ids = prompt_token_ids(tokenizer, prompts, max_prompt_tokens(model, settings.max_new_tokens))
    stops = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config_args: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "eos_token_id": stops,
        "pad_token_id": pad,
        "do_sample": not settings.greedy,
    }
    if not settings.greedy:
        config_args.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    return GenerationPlan(prompt_ids, batch_plan(prompt_ids, batch_size), stops, pad, GenerationConfig(**config_args))


def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: GenerationPlan,
    batch: int,
    seed: int | None,
    *,
    synced_gpus: bool = False,
    inference_mode: bool = True,
) -> list[Generation]:
    """The responses of batch number `batch` of `plan`, in that batch's order. `seed` None leaves torch's RNG as
    it is (greedy decoding needs none). The model should be in eval mode (see `eval_mode`).

    `synced_gpus`: every process keeps stepping until all are done, as DeepSpeed ZeRO-3 needs (each forward
    gathers the sharded weights, a collective every rank must join); every process must then call this together.
    `inference_mode=False` runs under `no_grad` instead: ZeRO-3 gathers weights into tensors that training goes on
    using, which inference mode would leave unusable for autograd."""
    import torch

    if seed is not None:
        torch.manual_seed(batch_seed(seed, batch))
    input_ids, attention_mask = _left_pad([plan.prompt_ids[i] for i in plan.batches[batch]], plan.pad, model.device)
    extra = {"synced_gpus": True} if synced_gpus else {}
    with torch.inference_mode() if inference_mode else torch.no_grad():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=plan.config, **extra
        )
    return [cut_at_stop(tokenizer, ids, plan.stops) for ids in output[:, input_ids.shape[1] :].tolist()]


class Generator(Protocol):
    """What writes a pass (`kdcli.models.generate_file`): a local model (`LocalGenerator`) or a served one
    (`kdcli.models.served.ServedTeacher`)."""

    def plan(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Prompt],
        settings: GenerationSettings,
        batch_size: int,
    ) -> GenerationPlan: ...

    def batch(
        self, tokenizer: PreTrainedTokenizerBase, plan: GenerationPlan, batch: int, seed: int | None
    ) -> list[Generation]: ...

    def session(self) -> contextlib.AbstractContextManager[None]: ...


@dataclass(frozen=True)
class LocalGenerator:
    """A model in this process: `plan_generation`, `generate_batch`, in eval mode."""

    model: PreTrainedModel

    def plan(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Prompt],
        settings: GenerationSettings,
        batch_size: int,
    ) -> GenerationPlan:
        return plan_generation(self.model, tokenizer, prompts, settings, batch_size)

    def batch(
        self, tokenizer: PreTrainedTokenizerBase, plan: GenerationPlan, batch: int, seed: int | None
    ) -> list[Generation]:
        return generate_batch(self.model, tokenizer, plan, batch, seed)

    def session(self) -> contextlib.AbstractContextManager[None]:
        return eval_mode(self.model)


def cut_at_stop(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stops: Sequence[int]) -> Generation:
    """A response's new tokens as a `Generation`: up to the first stop token, decoded without special tokens."""
    cut = next((k for k, t in enumerate(ids) if t in stops), None)
    kept = list(ids) if cut is None else list(ids[:cut])
    text = tokenizer.decode(kept, skip_special_tokens=True).strip()
    stopped: Stop = STOPPED_AT_EOS if cut is not None else "max_new_tokens"
    return Generation(kept, text, stopped, None if cut is None else int(ids[cut]))


@contextlib.contextmanager
def eval_mode(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode (no dropout) for generating, and the model's own mode back afterwards: a student generating
    on-policy goes on training."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    settings: GenerationSettings,
    seed: int | None = None,
    *,
    batch_size: int = 8,
) -> list[Generation]:
    """A response to each prompt, in prompt order; nothing is written.

    With the same `seed` and `batch_size` the responses equal those of a pass written to a file
    (`kdcli.models.generate_file`).
    """
    plan = plan_generation(model, tokenizer, prompts, settings, batch_size)
    results: list[Generation | None] = [None] * len(prompts)
    with eval_mode(model):
        for b, indices in enumerate(plan.batches):
            for index, generation in zip(indices, generate_batch(model, tokenizer, plan, b, seed), strict=True):
                results[index] = generation
    return [r for r in results if r is not None]


def _left_pad(sequences: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)
