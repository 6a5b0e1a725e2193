"""`teacher.cache` in a recipe: what training reads from a cache, checked against the recipe before it starts.

Two steps around the student, which the engine builds (once, as for an online teacher): `read_manifest_for`
before it, `open_for_training` after it, since checking the cache needs the student's tokenizer and vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcli.cache import format as fmt
from kdcli.cache.fingerprint import data_fingerprint, differences, mismatch_error, setup_of
from kdcli.cache.reader import CacheCollator, CachedSplit, CachedTeacher, open_split
from kdcli.data import load_rows
from kdcli.errors import KdError
from kdcli.recipe import Recipe


@dataclass
class CacheForTraining:
    root: Path
    teacher: CachedTeacher
    width: int  # teacher logits the cache covers: the vocabulary the loss compares
    train_set: CachedSplit
    eval_set: CachedSplit | None
    collate: CacheCollator


def splits_distill_reads(recipe: Recipe) -> tuple[str, ...]:
    """The splits `kd distill` scores from a cache: what `kd cache-teacher` writes by default."""
    return ("train", "eval") if recipe.data.eval else ("train",)


def read_manifest_for(recipe: Recipe, on_message: Any) -> tuple[Path, dict[str, Any]]:
    """The cache's folder and manifest (refused in one line when it is not a cache), with the notes for the user."""
    from kdcli.losses import is_tail_sensitive

    assert recipe.teacher.cache is not None
    root = Path(recipe.teacher.cache).expanduser()
    manifest = fmt.read_manifest(root, "teacher.cache")
    on_message(f"Training from the teacher cache {root}")
    if is_tail_sensitive(recipe.loss.divergence) and recipe.loss.kd_ratio > 0:
        # The tail bucket hides the student's spread inside the teacher's tail, which reverse KL weights heavily.
        on_message(
            f"Note: {recipe.loss.divergence} from a top-K cache trains a different objective than online unless K "
            "covers most of the student's mass, trained students included (docs/cache.md, 'Which divergences suit "
            "a cache'); prefer the online teacher for it."
        )
    return root, manifest


def open_for_training(
    recipe: Recipe, root: Path, manifest: dict[str, Any], tokenizer: Any, student_vocab: int | None
) -> CacheForTraining:
    """Check the cache against the recipe and the student, and open the splits the recipe reads.

    A recipe with `data.eval` needs the cache's eval split (refused otherwise, with the command that writes it), so
    eval losses stay comparable to an online run's. `tokenizer` is the one the cache was written with: the
    student's, or across tokenizers (`student_vocab` None) the teacher's, and the cache must then hold the
    teacher's character offsets.
    """
    if student_vocab is None and not manifest.get("writer", {}).get("reads"):
        raise KdError(
            f"teacher.cache: {root} was written without the teacher's character offsets, which pair its positions "
            f"with a student of another tokenizer; rebuild it with `kd cache-teacher RECIPE --out {root} --overwrite`."
        )
    rows = differences(manifest.get("setup", {}), setup_of(recipe, tokenizer))
    for split in splits_distill_reads(recipe):
        spec = recipe.data.spec(split)
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
    if student_vocab is not None and student_vocab < vocab:
        raise KdError(
            f"teacher.cache: the cache covers {vocab} teacher logits but the student's output layer has only "
            f"{student_vocab} rows; pick a student with the teacher's vocabulary."
        )
    return CacheForTraining(
        root,
        CachedTeacher(manifest, root),
        vocab,
        open_split(root, manifest, "train"),
        open_split(root, manifest, "eval") if recipe.data.eval else None,
        CacheCollator(tokenizer.pad_token_id, int(manifest["writer"]["top_k"])),
    )
