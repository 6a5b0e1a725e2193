"""Set-up: everything the training loop needs, built from the recipe before the run folder is touched.

One path for both teachers: the student is built once, here, and the teacher is a `TeacherSource`, either the
model run online or the stored top-K of `kd cache-teacher` (`kdcli.cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcli.data import Collator, Examples, build_examples, read_split
from kdcli.durable import disk_errors
from kdcli.engine.cross import CrossTokenizer
from kdcli.engine.distributed import World, check_nodes_agree, init_deepspeed, on_main_then_shared
from kdcli.engine.observer import Observer
from kdcli.engine.teachers import Batch, OnlineTeacher, ServedTeacherSource, TeacherSource
from kdcli.errors import KdError
from kdcli.hardware import Runtime
from kdcli.models import (
    apply_lora,
    build_student,
    check_tokenizers,
    is_lora,
    load_config,
    load_teacher,
    load_tokenizer,
    merged_state_dict,
    parameters_of,
    save_adapter,
    student_config,
    student_tokenizer,
    trainable_for,
)
from kdcli.models.pruning import SCORE_MEANING, LayerScores, layer_scores
from kdcli.recipe import Recipe
from kdcli.recipe.student import LayerChoice
from kdcli.runs import recipe_yaml


@dataclass
class Prepared:
    recipe: Recipe  # as given, with what set-up resolved: the kept layers of `student.layers: {keep: N, by: ...}`
    teacher: TeacherSource
    student: torch.nn.Module
    tokenizer: Any
    width: int  # logit columns compared: the vocabulary teacher and student share
    train_set: Sequence[Any]
    eval_set: Sequence[Any] | None
    collate: Callable[[Sequence[Any]], Batch]
    layer_choice: dict[str, Any] | None = None  # run.json's record of a scored layer choice


def runtime_for(recipe: Recipe, world: World, ds_config: dict[str, Any] | None) -> Runtime:
    """Where this process trains: the launcher gives each process its own GPU under DeepSpeed (or the CPU with
    `train.device: cpu`); otherwise `train.device` decides."""
    if ds_config:
        return Runtime(init_deepspeed(world, cpu=recipe.train.device == "cpu"), recipe.train.precision)
    return Runtime.of(recipe.train.device, recipe.train.precision)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def prepare(recipe: Recipe, runtime: Runtime, observer: Observer) -> Prepared:
    """Check the data, the tokenizers and the cache, then load the teacher (or open its cache) and build the student.

    Everything that can be checked without weights is checked first, so a typo in a path or a column fails in
    seconds, not after a large teacher has loaded. With `teacher.cache` the teacher never runs: examples and targets
    stream from the cache. With `student.init: teacher` the teacher's weights are then read once to cut the student
    and dropped at once."""
    if recipe.teacher.cache:
        return _prepare_cached(recipe, runtime, observer)
    if recipe.teacher.server is not None:
        return _prepare_served(recipe, runtime, observer)
    if recipe.data.responses == "teacher":
        raise KdError(
            "data.responses: `teacher` trains on responses the teacher generated, which `kd cache-teacher` writes. "
            "Run `kd cache-teacher RECIPE --out DIR`, then set teacher.cache: DIR."
        )
    train_rows, eval_rows = read_split(recipe.data, "train"), read_split(recipe.data, "eval")
    assert train_rows is not None  # data.train is required
    teacher_tokenizer = load_tokenizer(recipe.teacher.model)
    tokenizer = student_tokenizer(recipe.student, recipe.teacher.model)
    teacher_config = load_config(recipe.teacher.model)
    config = student_config(recipe.student, teacher_config)
    width, cross = _tokenizers(recipe, teacher_tokenizer, tokenizer, teacher_config, config)
    if recipe.student.lora:  # a mistyped target module fails here, before the teacher loads
        trainable_for(config, recipe.student.lora)
    train_set, eval_set = _examples(recipe, cross, tokenizer, train_rows, eval_rows)
    check_nodes_agree(agreed_settings(recipe, examples_fingerprint(train_set, eval_set)))  # before any weights load

    observer.message(f"Loading teacher {recipe.teacher.model}")
    teacher_model = load_teacher(recipe.teacher, runtime.inference_dtype)
    collate = cross.collator() if cross else Collator(tokenizer.pad_token_id)
    recipe, choice = choose_layers(recipe, teacher_model, train_set, runtime, observer)
    student = _student(recipe, observer, teacher_model)
    online = OnlineTeacher(teacher_model, runtime, cross.teacher_rows if cross else width, recipe.teacher.model)
    teacher = cross.source(online) if cross else online
    return Prepared(recipe, teacher, student, tokenizer, width, train_set, eval_set, collate, choice)


def _prepare_cached(recipe: Recipe, runtime: Runtime, observer: Observer) -> Prepared:
    from kdcli.cache import open_for_training, read_manifest_for

    root, manifest = read_manifest_for(recipe, observer.message)
    tokenizer = student_tokenizer(recipe.student, recipe.teacher.model)
    config = student_config(recipe.student, lambda: load_config(recipe.teacher.model))
    if recipe.student.lora:
        trainable_for(config, recipe.student.lora)
    width, cross, cache_tokenizer = int(config.get_text_config().vocab_size), None, tokenizer
    if recipe.loss.cross_tokenizer is not None:  # the cache is the teacher's: checked against its tokenizer
        cache_tokenizer = load_tokenizer(recipe.teacher.model)
        width, cross = _tokenizers(recipe, cache_tokenizer, tokenizer, load_config(recipe.teacher.model), config)
        assert cross is not None
        cross.check_k(int(manifest["writer"]["top_k"]), f"the cache {root}")
    cache = open_for_training(recipe, root, manifest, cache_tokenizer, None if cross else width)
    # The manifest lists every shard's sha256 and what the cache was computed from.
    check_nodes_agree(agreed_settings(recipe, _sha256_json([manifest.get("setup"), manifest.get("splits")])))
    if cross is not None:  # the student's own examples, paired with the cached ones of the same rows
        from kdcli.cache.reader import cache_records

        train_rows, eval_rows = read_split(recipe.data, "train"), read_split(recipe.data, "eval")
        assert train_rows is not None
        train_set = cross.examples(train_rows, "train", cache.train_set)
        eval_set = None if eval_rows is None else cross.examples(eval_rows, "eval", cache.eval_set)
        top_k = int(manifest["writer"]["top_k"])
        collate = cross.collator(lambda examples: cache_records(examples, top_k))
        student = _student(recipe, observer, None)
        return Prepared(recipe, cross.source(cache.teacher), student, tokenizer, width, train_set, eval_set, collate)
    teacher_model, choice = None, None
    if _unscored(recipe):  # the teacher is read anyway to cut the student: it scores its layers first
        observer.message(f"Loading teacher {recipe.teacher.model} to choose the student's layers")
        # In the precision an online run loads it in: the same scores (stored under one key), the same student.
        teacher_model = load_teacher(recipe.teacher, runtime.inference_dtype)
        recipe, choice = choose_layers(recipe, teacher_model, cache.train_set, runtime, observer)
    student = _student(recipe, observer, teacher_model)
    del teacher_model
    return Prepared(
        recipe, cache.teacher, student, tokenizer, cache.width, cache.train_set, cache.eval_set, cache.collate, choice
    )


def _prepare_served(recipe: Recipe, runtime: Runtime, observer: Observer) -> Prepared:
    """The teacher behind `teacher.server`: checked (it answers, serves that model with the recipe's tokenizer, at
    that K) before any weight is read; its weights are read only where the student is cut from them."""
    from kdcli.models.served import ServedTeacher, public_url

    server = recipe.teacher.server
    assert server is not None
    if recipe.data.responses == "teacher":
        raise KdError(
            "data.responses: `teacher` trains on responses the teacher generated, which `kd cache-teacher` writes "
            "(through the server too). Run `kd cache-teacher RECIPE --out DIR`, then set teacher.cache: DIR."
        )
    train_rows, eval_rows = read_split(recipe.data, "train"), read_split(recipe.data, "eval")
    assert train_rows is not None
    teacher_tokenizer = load_tokenizer(recipe.teacher.model)
    tokenizer = student_tokenizer(recipe.student, recipe.teacher.model)
    teacher_config = load_config(recipe.teacher.model)
    config = student_config(recipe.student, teacher_config)
    width, cross = _tokenizers(recipe, teacher_tokenizer, tokenizer, teacher_config, config)
    if cross is not None:
        cross.check_k(server.top_k, "teacher.server.top_k")
    if recipe.student.lora:
        trainable_for(config, recipe.student.lora)
    observer.message(f"Checking the teacher served at {public_url(server.url)} ({server.model})")
    served = ServedTeacher(server)
    served.check(teacher_tokenizer, server.top_k)
    train_set, eval_set = _examples(recipe, cross, tokenizer, train_rows, eval_rows)
    check_nodes_agree(agreed_settings(recipe, examples_fingerprint(train_set, eval_set)))
    teacher_model, choice = None, None
    if recipe.student.init == "teacher":  # the student is cut from the teacher's weights: read once, then dropped
        observer.message(f"Loading teacher {recipe.teacher.model} to cut the student from")
        teacher_model = load_teacher(recipe.teacher, runtime.inference_dtype)
        recipe, choice = choose_layers(recipe, teacher_model, train_set, runtime, observer)
    student = _student(recipe, observer, teacher_model)
    del teacher_model
    source = ServedTeacherSource(served, server.top_k, f"{server.model} served at {public_url(server.url)}")
    source.num_parameters = parameters_of(teacher_config)
    collate = cross.collator() if cross else Collator(tokenizer.pad_token_id)
    teacher = cross.source(source) if cross else source
    return Prepared(recipe, teacher, student, tokenizer, width, train_set, eval_set, collate, choice)


def _tokenizers(
    recipe: Recipe, teacher_tokenizer: Any, tokenizer: Any, teacher_config: Any, config: Any
) -> tuple[int, CrossTokenizer | None]:
    """The student's logit width (`check_tokenizers`) and, with `loss.cross_tokenizer`, what pairs the two
    tokenizations, checked before any weight is read."""
    cross = recipe.loss.cross_tokenizer is not None
    width = check_tokenizers(teacher_tokenizer, tokenizer, teacher_config, config, cross_tokenizer=cross)
    if not cross:
        return width, None
    rows = int(teacher_config.get_text_config().vocab_size)
    return width, CrossTokenizer.of(recipe, teacher_tokenizer, tokenizer, rows)


def _examples(
    recipe: Recipe, cross: CrossTokenizer | None, tokenizer: Any, train_rows: Any, eval_rows: Any
) -> tuple[Any, Any]:
    """The train and eval examples in the student's tokens: paired with the teacher's across tokenizers."""
    if cross is not None:
        return cross.examples(train_rows, "train"), None if eval_rows is None else cross.examples(eval_rows, "eval")
    train_set = build_examples(train_rows, tokenizer, recipe.data, "train", "data.train")
    eval_set = None if eval_rows is None else build_examples(eval_rows, tokenizer, recipe.data, "eval", "data.eval")
    return train_set, eval_set


def agreed_settings(recipe: Recipe, data_fingerprint: str) -> dict[str, str]:
    """What every node of a job must share (`distributed.AGREED`): kd's version, the recipe, the data it trains on."""
    from kdcli import __version__

    return {"kd": __version__, "recipe": _sha256_json(recipe_yaml(recipe)), "data": data_fingerprint}


def examples_fingerprint(train_set: Examples, eval_set: Examples | None) -> str:
    """The token ids training reads: the data, its template, the tokenizer and the length limit in one hash."""
    digest = hashlib.sha256()
    for examples in (train_set, eval_set):
        digest.update(b"none" if examples is None else len(examples).to_bytes(8, "little"))
        for ids, labels in zip(examples.input_ids, examples.labels, strict=True) if examples is not None else ():
            for tokens in (ids, labels):  # each list behind its length, so no two splits of one stream hash alike
                digest.update(len(tokens).to_bytes(8, "little") + array("q", tokens).tobytes())
    return digest.hexdigest()


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _unscored(recipe: Recipe) -> bool:
    layers = recipe.student.layers
    return recipe.student.init == "teacher" and isinstance(layers, LayerChoice) and layers.indices is None


def choose_layers(
    recipe: Recipe, teacher: Any, train_set: Sequence[Any], runtime: Runtime, observer: Observer
) -> tuple[Recipe, dict[str, Any] | None]:
    """Resolve `student.layers: {keep: N, by: ...}`: score the teacher's layers on the first training examples
    (or read the scores a run with the same teacher and data stored), print them, and return the recipe with the
    kept indices filled in, and run.json's record of the choice. Other recipes come back as they are.

    Under a launcher, rank 0 scores and every rank takes its indices, so that no two ranks build different
    students."""
    if not _unscored(recipe):
        return recipe, None
    choice = recipe.student.layers
    assert isinstance(choice, LayerChoice)
    examples = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in train_set[: choice.examples]]

    def score() -> LayerScores:
        where = runtime.device
        if where.type != "cpu":
            teacher.to(where)  # `place_teacher` puts it there anyway (ZeRO-3 inference excepted)
        try:
            return layer_scores(
                teacher,
                recipe.teacher.model,
                examples,
                Collator(0),
                choice.by,
                runtime,
            )
        finally:
            if recipe.deepspeed and recipe.deepspeed.teacher_zero3:
                teacher.to("cpu")  # ZeRO-3 partitions it from the host

    observer.message(f"Choosing {choice.keep} teacher layers by {choice.by}, on the first {len(examples)} examples")
    scores = on_main_then_shared(score)
    kept = scores.top(choice.keep)
    for line in score_lines(scores, kept):
        observer.message(line)
    resolved = recipe.model_copy(deep=True)
    resolved.student.layers = choice.model_copy(update={"indices": kept})
    return resolved, scores.record(choice.keep)


def score_lines(scores: LayerScores, kept: list[int], per_line: int = 5) -> list[str]:
    """The scores as kd prints them: a header, the layers five to a line (a kept one starred: 75 columns, so an
    80-column terminal or log does not wrap them), the kept indices."""
    where = "read from an earlier run" if scores.reused else f"computed in {scores.seconds:.0f} s"
    lines = [
        f"Layer scores ({scores.by}: {SCORE_MEANING[scores.by]}; higher matters more), over {scores.positions} "
        f"positions of {scores.examples} examples, {where}:"
    ]
    cells = [f"{i:>3}{'*' if i in kept else ' '} {value:8.4f}" for i, value in enumerate(scores.scores)]
    lines += ["  " + "  ".join(cells[i : i + per_line]) for i in range(0, len(cells), per_line)]
    lines.append(f"Keeping {len(kept)} of {len(scores.scores)} layers (*): {kept}")
    return lines


def _student(recipe: Recipe, observer: Observer, teacher: Any) -> torch.nn.Module:
    observer.message(f"Building student ({recipe.student.init})")
    # The student keeps fp32 master weights; bf16 runs it under autocast so small updates are not rounded away.
    student = build_student(recipe.student, recipe.teacher.model, torch.float32, recipe.seed, teacher=teacher)
    if recipe.train.activation_checkpointing:
        # Non-reentrant: it needs no input that requires a gradient (a LoRA student's embeddings do not), and the
        # decoder layers recompute whether the caller runs the whole model or only its decoder (the fused head).
        # transformers renamed the method (the old name warns); kd allows versions from before the new one.
        enable = getattr(student, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe.student.lora:  # only the adapters train: the optimizer is built from what requires grad
        return apply_lora(student, recipe.student.lora, recipe.seed)
    return student


def save_student(
    student: torch.nn.Module,
    tokenizer: Any,
    path: Path,
    runtime: Runtime,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter: Path | None = None,
) -> None:
    """Save with `save_pretrained` (safetensors) into a temporary folder, then rename it into place.

    `state_dict`: the full weights when the module itself holds only a shard (ZeRO-3), gathered on this rank.
    A LoRA student is saved merged into its base model (plain Hugging Face), and its adapter into `adapter`.
    """
    if adapter is not None and is_lora(student):
        full = state_dict if state_dict is not None else student.state_dict()
        _save_adapter(student, adapter, full)
        student, state_dict = student.get_base_model(), merged_state_dict(student, full)
    if not torch.cuda.is_available():
        # save_pretrained imports DeepSpeed when it is installed (accelerate's unwrap); spare it the GPU probe.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if state_dict is not None:
        state_dict = {key: value.to(runtime.inference_dtype) for key, value in state_dict.items()}
    elif runtime.precision == "bf16":
        student = student.to(torch.bfloat16)
    weights = (state_dict if state_dict is not None else student.state_dict()).values()
    with disk_errors(path, sum(t.numel() * t.element_size() for t in weights)):
        try:
            student.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk keeps no half-written student
            raise


def _save_adapter(student: Any, path: Path, state_dict: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with disk_errors(path, sum(t.numel() * t.element_size() for k, t in state_dict.items() if ".lora_" in k)):
        try:
            save_adapter(student, str(tmp), state_dict)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
