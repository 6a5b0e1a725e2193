"""`teacher.cache` in a recipe: everything `kd distill` needs from a cache, checked before training starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcli.cache import format as fmt
from kdcli.cache.fingerprint import data_fingerprint, differences, mismatch_error, setup_of
from kdcli.cache.reader import CacheCollator, CachedSplit, CachedTeacher, open_split
from kdcli.data import load_rows
from kdcli.errors import KdError
from kdcli.recipe import Recipe


@dataclass
class CachedParts:
    teacher: CachedTeacher
    student: torch.nn.Module
    tokenizer: Any
    width: int
    train_set: CachedSplit
    eval_set: CachedSplit | None
    collate: CacheCollator


TAIL_SENSITIVE = ("rkl", "akl")


def prepare_cached(recipe: Recipe, on_message: Any) -> CachedParts:
    """Build the student without keeping a teacher, check the cache against the recipe, and open its splits.

    With `student.init: teacher` the teacher's weights are read once to cut the student from them and dropped at
    once; nothing of the teacher runs. Eval: a recipe with `data.eval` needs the cache's eval split (refused
    otherwise, with the command that writes it), so eval losses stay comparable to an online run's.
    """
    from kdcli.models import build_student

    assert recipe.teacher.cache is not None
    root = Path(recipe.teacher.cache).expanduser()
    manifest = fmt.read_manifest(root, "teacher.cache")
    on_message(f"Training from the teacher cache {root}")
    if recipe.loss.divergence in TAIL_SENSITIVE and recipe.loss.kd_ratio > 0:
        # The tail bucket hides the student's spread inside the teacher's tail, which reverse KL weights heavily.
        on_message(
            f"Note: {recipe.loss.divergence} from a top-K cache differs from online training while the student is far "
            "from its teacher (docs/cache.md, 'Which divergences suit a cache')."
        )
    on_message(f"Building student ({recipe.student.init})")
    student, tokenizer = build_student(recipe.student, recipe.teacher.model, torch.float32, recipe.seed)

    rows = differences(manifest.get("setup", {}), setup_of(recipe, tokenizer))
    splits = ["train", "eval"] if recipe.data.eval else ["train"]
    for split in splits:
        spec = recipe.data.train if split == "train" else recipe.data.eval
        assert spec is not None
        entry = manifest["splits"].get(split)
        if entry is None:
            raise KdError(
                f"teacher.cache: {root} has no '{split}' split, but the recipe sets data.{split}. Cache it with "
                f"`kd cache-teacher RECIPE --out {root} --split {split}`"
                + (", or set data.eval: null to train without eval." if split == "eval" else ".")
            )
        fingerprint = data_fingerprint(recipe, split, load_rows(spec, split, f"data.{split}"))  # type: ignore[arg-type]
        rows += differences(entry["data"], fingerprint, f"data.{split}.")
    if rows:
        raise mismatch_error(
            f"teacher.cache: {root} was written for another setup than this recipe's:",
            rows,
            f"Rebuild it with `kd cache-teacher RECIPE --out {root} --overwrite`, or change the recipe back.",
        )

    vocab = int(manifest["writer"]["vocab"])
    student_rows = int(student.config.get_text_config().vocab_size)
    if student_rows < vocab:
        raise KdError(
            f"teacher.cache: the cache covers {vocab} teacher logits but the student's output layer has only "
            f"{student_rows} rows; pick a student with the teacher's vocabulary."
        )
    train_set = open_split(root, manifest, "train")
    eval_set = open_split(root, manifest, "eval") if recipe.data.eval else None
    collate = CacheCollator(tokenizer.pad_token_id, int(manifest["writer"]["top_k"]))
    return CachedParts(CachedTeacher(manifest, root), student, tokenizer, vocab, train_set, eval_set, collate)
