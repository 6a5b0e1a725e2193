"""On-policy and mixed-policy distillation (the recipe's `on_policy` section; docs/on-policy.md).

For a micro-batch drawn on-policy the student, as it is at that step, samples a response to each prompt of the
micro-batch; the batch the objective sees is then prompt + sample, labelled on the sampled tokens only, and the
online teacher scores it like any other batch. What lives here:

- `draws_on_policy`: which accumulation slots of a step are sampled, a pure function of (seed, step, slot), the same
  on every process (under ZeRO-3 generation is a collective, so all ranks must generate at the same slots);
- `StudentSampler`: the seam a faster sampler (vLLM, ...) plugs into; `TransformersSampler` is the default, on
  `kdcli.models`' one generation service, each call seeded from (seed, global micro-batch index);
- `prompts_of` / `sampled_examples`: the prompts of a collated micro-batch, and the examples built from samples;
- `next_ratio`: the adaptive schedule (DistiLLM), whose current value `TrainingState.on_policy_ratio` keeps.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kdcli.engine.objective import IGNORE_INDEX
from kdcli.engine.teachers import Batch
from kdcli.hardware import Runtime
from kdcli.models import GenerationSettings, eval_mode, generate_batch, plan_generation
from kdcli.models.generation import batch_seed
from kdcli.recipe.schema import OnPolicyConfig


@dataclass(frozen=True)
class Sample:
    """One prompt and what the student sampled after it."""

    prompt: list[int]  # as the student read it (cut from the left when it would not fit the context)
    response: list[int]  # the sampled tokens, the stop token included when one was sampled


class StudentSampler(Protocol):
    """Samples the student's responses for on-policy micro-batches. A replacement (e.g. a vLLM engine kept in
    sync with the student's weights) must be seeded by `seed` alone, so that a resumed run samples the same."""

    def sample(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], seed: int) -> list[Sample]:
        """A sample per prompt, in prompt order, without gradients; `model` is left in the mode it was in."""
        ...


class TransformersSampler:
    """`model.generate` through `kdcli.models.generate_batch`: one batch, left-padded, KV cache, stopping at EOS,
    in the run's precision. torch's RNG is forked around the call, so training draws the same numbers as
    without sampling. `zero3`: the weights are sharded (DeepSpeed ZeRO-3); then every rank steps until all are
    done (`synced_gpus`, when there are several) and no inference-mode tensors are made (see `generate_batch`).
    `width`: only token ids below it are sampled, the vocabulary teacher and student share (an output layer padded
    wider than the tokenizer would otherwise sample ids the teacher and the loss cannot score)."""

    def __init__(
        self, tokenizer: Any, settings: GenerationSettings, runtime: Runtime, *, zero3: bool, width: int | None = None
    ) -> None:
        self.tokenizer, self.settings, self.runtime, self.zero3, self.width = tokenizer, settings, runtime, zero3, width

    def sample(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], seed: int) -> list[Sample]:
        module: Any = getattr(model, "module", model)  # a DeepSpeed engine wraps the Hugging Face model
        plan = plan_generation(module, self.tokenizer, [list(p) for p in prompts], self.settings, len(prompts))
        vocab = int(module.config.get_text_config().vocab_size)
        if self.width is not None and self.width < vocab:
            plan.config.suppress_tokens = list(range(self.width, vocab))
        devices = [module.device] if module.device.type == "cuda" else []
        with eval_mode(module), torch.random.fork_rng(devices=devices), self.runtime.autocast():
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            synced = self.zero3 and distributed and torch.distributed.get_world_size() > 1
            generations = generate_batch(
                module, self.tokenizer, plan, 0, seed, synced_gpus=synced, inference_mode=not self.zero3
            )
        samples: list[Sample | None] = [None] * len(prompts)
        for index, generation in zip(plan.batches[0], generations, strict=True):
            stop = [] if generation.stop_id is None else [generation.stop_id]
            samples[index] = Sample(plan.prompt_ids[index], generation.ids + stop)
        return [s for s in samples if s is not None]


def draws_on_policy(seed: int, step: int, slot: int, ratio: float) -> bool:
    """Whether accumulation slot `slot` of optimizer step `step` (1-based) is sampled, with probability `ratio`.

    A hash of (seed, step, slot), not torch's RNG: reproducible, exact on resume, identical on every process, and
    ratio 0 draws nothing at all."""
    if ratio <= 0.0:
        return False
    if ratio >= 1.0:
        return True
    digest = hashlib.sha256(f"kd-on-policy:{seed}:{step}:{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < ratio


def prompts_of(batch: Batch) -> list[list[int]]:
    """Each row's tokens before its response: up to the first labelled position (labels are shifted, so label t
    is token t + 1), or the whole row when it has no label (a response cut off by `data.max_length`)."""
    labelled = (batch["labels"] != IGNORE_INDEX).cpu()
    lengths = batch["attention_mask"].sum(dim=1).cpu().tolist()
    ids = batch["input_ids"].cpu().tolist()
    prompts = []
    for row, length in enumerate(lengths):
        first = labelled[row].nonzero()
        end = int(first[0]) + 1 if len(first) else int(length)
        prompts.append(ids[row][:end])
    return prompts


def sampled_examples(samples: Sequence[Sample]) -> list[dict[str, list[int]]]:
    """Examples as `tokenize_example` builds them (unshifted labels): prompt masked, the sampled tokens (their EOS
    included) labelled, ready for the run's collator."""
    return [
        {"input_ids": s.prompt + s.response, "labels": [IGNORE_INDEX] * len(s.prompt) + s.response} for s in samples
    ]


@dataclass
class OnPolicy:
    """The on-policy part of a session: the recipe's settings, the sampler and the collator of sampled batches."""

    cfg: OnPolicyConfig
    seed: int
    sampler: StudentSampler
    collate: Callable[[Sequence[Any]], Batch]

    @classmethod
    def for_recipe(
        cls,
        recipe: Any,
        tokenizer: Any,
        runtime: Runtime,
        collate: Callable[[Sequence[Any]], Batch],
        *,
        zero3: bool,
        width: int | None = None,
    ) -> OnPolicy | None:
        """None when nothing can be sampled (`ratio: 0`, constant): the loop then runs exactly as without it.
        `width`: the vocabulary teacher and student share (see `TransformersSampler`)."""
        cfg: OnPolicyConfig = recipe.on_policy
        if not cfg.active:
            return None
        settings = GenerationSettings(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            precision=runtime.precision,
        )
        sampler = TransformersSampler(tokenizer, settings, runtime, zero3=zero3, width=width)
        return cls(cfg, recipe.seed, sampler, collate)

    def ratio(self, current: float | None) -> float:
        return self.cfg.ratio if current is None else current

    def window(
        self, model: torch.nn.Module, window: list[Batch], step: int, ratio: float, first_index: int
    ) -> tuple[list[Batch], list[bool], int, float]:
        """The window with its sampled slots replaced: (batches, which were sampled, tokens generated, seconds).

        `first_index`: the global micro-batch index of this rank's first slot, which seeds that slot's sampling."""
        sampled = [draws_on_policy(self.seed, step, slot, ratio) for slot in range(len(window))]
        if not any(sampled):
            return window, sampled, 0, 0.0
        started, tokens, out = time.perf_counter(), 0, []
        for slot, (batch, on) in enumerate(zip(window, sampled, strict=True)):
            if not on:
                out.append(batch)
                continue
            samples = self.sampler.sample(model, prompts_of(batch), batch_seed(self.seed, first_index + slot))
            tokens += sum(len(s.response) for s in samples)
            out.append(self.collate(sampled_examples(samples)))
        return out, sampled, tokens, time.perf_counter() - started


def next_ratio(ratio: float, evals: Sequence[Mapping[str, float]], step: int, rise: float) -> float:
    """DistiLLM's adaptive rule, after the eval at `step`: the ratio rises by `rise` (up to 1) when that eval's loss
    is not below the previous eval's (`evals` as `TrainingState.evals`, the first one taken before training)."""
    if len(evals) < 2 or evals[-1].get("step") != step:
        return ratio
    if evals[-1]["eval_loss"] >= evals[-2]["eval_loss"]:
        return min(1.0, round(ratio + rise, 12))
    return ratio
