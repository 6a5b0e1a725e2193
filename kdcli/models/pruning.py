"""Which teacher layers a pruned student keeps (`student.layers: {keep: N, by: loss}`): each layer scored on the
teacher itself, before the student exists.

Two scores, both over the positions the loss is taken at (those that predict a response token) of the first
training examples:

- `loss`, Minitron's depth score (Muralidharan et al. 2024): the teacher's cross-entropy with that one layer
  skipped, minus its cross-entropy whole. A layer the teacher cannot do without raises it most.
- `influence`, ShortGPT's block influence (Men et al. 2024): 1 − cos(h_in, h_out) of the layer, averaged over the
  positions. A layer that barely turns the residual stream scores near 0.

`influence` costs one forward pass; `loss` costs one per layer, which `loss_scores` halves by replaying the layers
before the skipped one from the full pass's outputs instead of running them again. Scores are stored under
`kd_home()/layer-scores/`, keyed by the teacher's weights, the scored token ids and the dtype, so a second run with
the same teacher and data reads them instead of scoring again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcli.data import by_length
from kdcli.durable import write_json
from kdcli.losses import ProjectedLogits
from kdcli.models.builtin import kd_home
from kdcli.models.forward import FusedHead, fused_head, logits_of, projected_logits_of
from kdcli.models.layers import decoder_layers
from kdcli.models.loading import resolve_model, weights_fingerprint

if TYPE_CHECKING:
    import torch

    from kdcli.hardware import Runtime

SCORES_DIR = "layer-scores"
FORMAT = 1
Batch = dict[str, "torch.Tensor"]
# What each score means, for the line kd prints above them.
SCORE_MEANING = {
    "loss": "the teacher's CE increase when that one layer is skipped",
    "influence": "block influence, 1 - cos(h_in, h_out)",
}


@dataclass(frozen=True)
class LayerScores:
    """One score per teacher layer (higher: the layer matters more), and what they were computed on."""

    by: str
    scores: list[float]
    examples: int  # training examples scored
    positions: int  # positions averaged over (those predicting a response token)
    seconds: float  # time the scoring took when it ran
    dtype: str
    reused: bool = False  # read from the store, not computed in this run

    def top(self, keep: int) -> list[int]:
        """The `keep` highest-scoring layers, in model order (a tie goes to the lower index)."""
        ranked = sorted(range(len(self.scores)), key=lambda i: (-self.scores[i], i))
        return sorted(ranked[:keep])

    def record(self, keep: int) -> dict[str, Any]:
        """What run.json keeps of the choice."""
        return {"keep": keep, "indices": self.top(keep), **asdict(self)}


def layer_scores(
    model: torch.nn.Module,
    spec: str,
    examples: Sequence[dict[str, Any]],
    collate: Callable[[Sequence[dict[str, Any]]], Batch],
    by: str,
    runtime: Runtime,
    *,
    batch_size: int = 2,
) -> LayerScores:
    """The scores of the teacher `model` (loaded from `spec`) on `examples`, read from the store when a run with
    the same teacher weights, token ids, score and dtype computed them before, else computed and stored."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    key = _store_key(spec, examples, by, dtype)
    path = kd_home() / SCORES_DIR / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]}.json"
    stored = _read(path, key)
    if stored is not None:
        return stored
    started = time.perf_counter()
    # Shortest first, `batch_size` at a time: a batch pads to its longest example (the first 8 starter examples in
    # one batch are 21% padding, by twos 5%), and the scores are sums over positions, whatever the batches.
    order = by_length(examples)
    batches = [collate([examples[i] for i in order[lo : lo + batch_size]]) for lo in range(0, len(order), batch_size)]
    batches = [{k: v.to(runtime.device) for k, v in batch.items()} for batch in batches]
    score = influence_scores if by == "influence" else loss_scores
    scores, positions = score(model, batches, runtime)
    result = LayerScores(by, scores, len(examples), positions, round(time.perf_counter() - started, 2), dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "scores": asdict(result)})
    return result


def influence_scores(model: torch.nn.Module, batches: Sequence[Batch], runtime: Runtime) -> tuple[list[float], int]:
    """ShortGPT's block influence of each decoder layer: mean over scored positions of 1 − cos(h_in, h_out)."""
    import torch

    layers = decoder_layers(model)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    positions = 0
    mask: torch.Tensor | None = None

    def measure(index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            assert mask is not None
            h_in, h_out = _hidden_in(args, kwargs).double(), _hidden_out(output).double()
            cosine = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)
            totals[index] += (1.0 - cosine)[mask].sum().cpu()

        return hook

    with torch.no_grad(), _hooks(layers, measure):
        for batch in batches:
            mask = batch["labels"] != -100
            positions += int(mask.sum())
            logits_of(model, batch, runtime)
    return (totals / max(1, positions)).tolist(), positions


def loss_scores(model: torch.nn.Module, batches: Sequence[Batch], runtime: Runtime) -> tuple[list[float], int]:
    """Minitron's depth score of each decoder layer: the mean CE over scored positions with the layer skipped,
    minus the mean CE of the whole teacher.

    Per batch, one full pass keeps every layer's output; the pass that skips layer i then replays layers 0..i-1
    from those outputs (they would compute the same) and makes layer i the identity, so only layers i+1.. run.
    The result equals a forward of the model built without layer i (a test checks it).
    """
    import torch

    layers = decoder_layers(model)
    skipped = torch.zeros(len(layers), dtype=torch.float64)
    whole = 0.0
    positions = 0
    outputs: dict[int, Any] = {}  # layer → its output in the full pass of the current batch

    def keep(index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            outputs[index] = output

        return hook

    with torch.no_grad():
        for batch in batches:
            labels = batch["labels"]
            positions += int((labels != -100).sum())
            outputs.clear()
            with _hooks(layers, keep):
                whole += _ce_sum(model, batch, runtime)
            for index in range(len(layers)):
                with _replayed(layers, outputs, index):
                    skipped[index] += _ce_sum(model, batch, runtime)
    n = max(1, positions)
    return [value / n - whole / n for value in skipped.tolist()], positions


def _ce_sum(model: torch.nn.Module, batch: Batch, runtime: Runtime) -> float:
    """The summed CE over the batch's labelled positions. Where the fused head knows the model, only those
    positions are projected onto the vocabulary (a third of the tokens on the starter data, and the output layer
    is a third of a small model's forward); elsewhere from the model's whole logits."""
    import torch

    labels = batch["labels"]
    head = fused_head(model)
    if isinstance(head, FusedHead):
        projected = projected_logits_of(head, batch, runtime, int(head.weight.shape[0]))
        mask = labels != -100
        logits = ProjectedLogits(projected.hidden[mask], projected.head).materialise()
        targets = labels[mask]
    else:
        logits, targets = logits_of(model, batch, runtime), labels
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return float(torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=-100, reduction="sum"))


def _hidden_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output: Any) -> torch.Tensor:
    """A decoder layer returns its hidden states, or (older transformers) a tuple that starts with them."""
    return output[0] if isinstance(output, tuple) else output


def _as_output(like: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *like[1:]) if isinstance(like, tuple) else hidden


@contextlib.contextmanager
def _hooks(layers: Sequence[Any], make: Callable[[int], Callable[..., None]]) -> Iterator[None]:
    handles = [layer.register_forward_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _replayed(layers: Sequence[Any], outputs: dict[int, Any], skip: int) -> Iterator[None]:
    """Layers before `skip` return their recorded outputs without computing; layer `skip` returns its input."""

    def recorded(index: int) -> Callable[..., Any]:
        return lambda *args, **kwargs: outputs[index]

    def identity(*args: Any, **kwargs: Any) -> Any:
        return _as_output(outputs[skip], _hidden_in(args, kwargs))

    try:
        for index in range(skip):
            layers[index].forward = recorded(index)
        layers[skip].forward = identity
        yield
    finally:
        for index in range(skip + 1):
            # The instance attribute shadowed the class's forward; deleting it brings that back.
            with contextlib.suppress(AttributeError):
                del layers[index].forward


def _store_key(spec: str, examples: Sequence[dict[str, Any]], by: str, dtype: str) -> dict[str, Any]:
    """What the scores depend on: the teacher's weights (a Hub id, whose files kd does not own, by its name), the
    scored token ids and loss positions, the score and the dtype the teacher ran in."""
    tokens = hashlib.sha256()
    for example in examples:
        tokens.update(json.dumps([list(example["input_ids"]), list(example["labels"])]).encode())
    resolved = resolve_model(spec)
    return {
        "format": FORMAT,
        "teacher": spec,
        "weights": weights_fingerprint(resolved) or resolved,
        "tokens": tokens.hexdigest(),
        "examples": len(examples),
        "by": by,
        "dtype": dtype,
    }


def _read(path: Path, key: dict[str, Any]) -> LayerScores | None:
    """Stored scores for exactly `key`; a damaged or foreign file is ignored (it is rewritten after scoring)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != key:
            return None
        stored = LayerScores(**{**data["scores"], "reused": True})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not all(isinstance(s, int | float) and math.isfinite(s) for s in stored.scores):
        return None
    return stored
