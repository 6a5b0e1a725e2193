"""How far a `kd cache-teacher` record is from the dense teacher, per divergence, on the built-in teacher's outputs.

Measured for an untrained and (with --student) a trained student.

    python bench/sparse_error.py                        # untrained student; K = 16, 64, 256, 4096, 16384, V
    python bench/sparse_error.py --student runs/quickstart-fkl/student --examples 8

The teacher is the built-in SmolLM2-135M-Instruct on the first `builtin:starter` training examples (the quickstart
recipe: chat template, max_length 256), run in float32. Students: always the quickstart's starting point, the
teacher's every-other-layer copy, untrained (the two distributions are far apart, which is where coarsening the
tail matters most); with --student also a trained student folder (e.g. the quickstart's end,
runs/quickstart-fkl/student), loaded as `student.init: pretrained`.

Per K the teacher record is built as the cache writer builds it (`kdcli/cache/writer.py`): `SparseTeacher.from_logits`
over the labelled positions at the loss temperature, then ids cast to the id dtype, the top-K log-probs to
`cache.logprob_dtype` (fp16 by default) and the label log-prob and tail mass to float32, and read back as training
reads it (ids as int64, log-probs as float32). Two records per K, so the two error sources can be told apart:
"bucketing only" (the float32 record, before the cast: the top-K/label/tail coarsening alone) and "as cached" (the
stored record: coarsening plus the log-prob quantisation). K = V is the exact case: its buckets are the V tokens, so
the bucketing-only error is rounding and the as-cached error is the quantisation alone.

For each divergence (default parameters) the loss and its gradient with respect to the student logits are computed
in float32 with the dense teacher logits and with each record. Reported: the signed relative error of the loss,
(sparse − dense) / |dense|, the relative error of the gradient ‖g_sparse − g_dense‖ / ‖g_dense‖ and the cosine
between the two gradients. The section "Sparse teacher error" of docs/benchmarks.md is rewritten (one table per
student; a run without --student writes the untrained table only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.losses import machine, write_docs  # noqa: E402
from kdcli.cache import format as fmt  # noqa: E402
from kdcli.cache.fingerprint import loss_temperature  # noqa: E402
from kdcli.data import Collator, build_examples, load_rows  # noqa: E402
from kdcli.losses import LOSSES, SparseTeacher, get_loss  # noqa: E402
from kdcli.models import build_student, load_teacher, load_tokenizer  # noqa: E402
from kdcli.recipe import load_recipe  # noqa: E402

SECTION = "Sparse teacher error (built-in teacher, real distributions)"
RECIPE = REPO / "recipes" / "quickstart.yaml"


def cached_records(
    teacher_rows: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, lp_dtype: str
) -> tuple[SparseTeacher, SparseTeacher]:
    """(bucketing only, as cached): the record of the labelled rows [P, V] before and after the writer's casts.

    The same steps as `kdcli.cache.writer._shard_tensors` (from_logits, then ids → id dtype, top-K log-probs →
    `cache.logprob_dtype`, label log-prob and tail mass → float32), read back as `CacheCollator` does.
    """
    vocab = int(teacher_rows.shape[-1])
    record = SparseTeacher.from_logits(teacher_rows, labels, k, temperature)
    stored = {
        "topk_ids": record.topk_ids.to(fmt.torch_dtype(fmt.id_dtype_name(vocab))),
        "topk_logprobs": record.topk_logprobs.to(fmt.torch_dtype(lp_dtype)),
        "label_logprob": record.label_logprob.float(),
        "tail_mass": record.tail_mass.float(),
    }
    read = SparseTeacher(
        stored["topk_ids"].to(torch.long),
        stored["topk_logprobs"].float(),
        stored["label_logprob"].float(),
        stored["tail_mass"].float(),
        temperature,
    )
    return record, read


def labelled_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits [P, V] of the labelled positions (the rows a cache keeps a record for)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[batch["labels"] != fmt.IGNORE_INDEX].float()


def markdown_table(rows: list[list[str]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def loss_and_grad(
    name: str, student: torch.Tensor, teacher: torch.Tensor | SparseTeacher, labels: torch.Tensor
) -> tuple[float, torch.Tensor]:
    logits = student.clone().requires_grad_(True)
    loss = get_loss(name)(logits, teacher, labels)
    loss.backward()
    assert logits.grad is not None
    return float(loss.detach()), logits.grad


def errors(dense: tuple[float, torch.Tensor], sparse: tuple[float, torch.Tensor]) -> list[str]:
    """Signed relative loss error, gradient relative error, gradient cosine."""
    (dense_value, dense_grad), (sparse_value, sparse_grad) = dense, sparse
    rel = (sparse_value - dense_value) / max(abs(dense_value), 1e-12)
    a, b = sparse_grad.flatten().double(), dense_grad.flatten().double()  # float64: a cosine of 1 prints as 1
    grad_rel = float((a - b).norm() / b.norm().clamp_min(1e-300))
    cosine = float(a.dot(b) / (a.norm() * b.norm()).clamp_min(1e-300))
    return [f"{rel:+.1e}", f"{grad_rel:.1e}", f"{cosine:.5f}"]


def trained_text(folder: str) -> str:
    """`folder`, with what its run folder's run.json says about the run that wrote it (when there is one)."""
    run = Path(folder).expanduser().resolve().parent / "run.json"
    try:
        record = json.loads(run.read_text(encoding="utf-8"))
        done = f"{record['divergence']}, {record['steps']} steps on {record['train_examples']} training examples"
        source = record["data"]["train"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"`{folder}`"
    seen = ", these among them" if source == "builtin:starter" else f" of {source}"
    return f"`{folder}`, run {record.get('name', '?')}: {done}{seen}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--k", default="16,64,256,4096,16384,V", help="comma list of K; V: the vocabulary (default %(default)s)"
    )
    ap.add_argument("--examples", type=int, default=16, help="starter training examples (default 16)")
    ap.add_argument("--student", default=None, help="a trained student folder, measured besides the untrained copy")
    ap.add_argument("--logprob-dtype", choices=["fp16", "bf16"], default=None, help="default: the recipe's cache.")
    ap.add_argument("--only", default=None, help="comma list of divergences (default: all)")
    ap.add_argument("--no-docs", action="store_true", help="print only, do not touch docs/benchmarks.md")
    args = ap.parse_args()
    started = time.perf_counter()
    names = args.only.split(",") if args.only else list(LOSSES)

    recipe = load_recipe(RECIPE, [])
    lp_dtype = args.logprob_dtype or recipe.cache.logprob_dtype
    temperature = loss_temperature(recipe)
    tokenizer = load_tokenizer(recipe.teacher.model)
    teacher_model = load_teacher(recipe.teacher, torch.float32).eval()
    rows = load_rows(recipe.data.train, "train", "data.train")[: args.examples]
    batch = Collator(tokenizer.pad_token_id)(build_examples(rows, tokenizer, recipe.data, "train", "data.train")[:])
    labels = batch["labels"][batch["labels"] != fmt.IGNORE_INDEX]
    teacher = labelled_logits(teacher_model, batch)
    positions, vocab = teacher.shape
    ks = [vocab if k.strip().upper() == "V" else int(k) for k in args.k.split(",")]
    students: list[tuple[str, str, torch.Tensor]] = []
    for label, overrides in [("untrained", [])] + (
        [("trained", ["student.init=pretrained", f"student.model={args.student}"])] if args.student else []
    ):
        student_recipe = load_recipe(RECIPE, overrides)
        model = build_student(
            student_recipe.student, recipe.teacher.model, torch.float32, recipe.seed, teacher=teacher_model
        )
        students.append((label, args.student if label == "trained" else "", labelled_logits(model.eval(), batch)))
        del model
    del teacher_model
    gc.collect()
    print(f"{positions} labelled positions, V = {vocab}; models: {time.perf_counter() - started:.0f} s", flush=True)

    records = {k: cached_records(teacher, labels, k, temperature, lp_dtype) for k in ks}
    covered = {k: float((1 - records[k][0].tail_mass).mean()) for k in ks}
    k_name = {k: "V" if k == vocab else str(k) for k in ks}
    sections: list[str] = []
    for label, source, student in students:
        student_started = time.perf_counter()
        probs = torch.softmax(student, dim=-1)
        outside = {k: float((1 - probs.gather(1, records[k][0].topk_ids).sum(-1)).mean()) for k in ks}
        del probs
        table: list[list[str]] = []
        for name in names:
            dense = loss_and_grad(name, student, teacher, labels)
            for k in ks:
                exact, stored = records[k]
                cells = errors(dense, loss_and_grad(name, student, exact, labels))
                cells += errors(dense, loss_and_grad(name, student, stored, labels))
                table.append([name, k_name[k], f"{dense[0]:.4f}", *cells])
                print(label, "  ".join(table[-1]), flush=True)
            del dense
            gc.collect()
        header = ["divergence", "K", "dense loss"]
        header += [f"{what}: {col}" for what in ("bucketing", lp_dtype) for col in ("loss err.", "grad err.", "cos")]
        rendered = markdown_table([header, *table])
        print(rendered, flush=True)
        what = (
            trained_text(source)
            if label == "trained"
            else "the quickstart's start, the teacher's every-other-layer copy"
        )
        sections.append(
            f"**{label.capitalize()} student** ({what}; {time.perf_counter() - student_started:.0f} s). Student mass "
            "outside the teacher's top K, mean over positions: "
            + ", ".join(f"K = {k_name[k]}: {max(0.0, outside[k]):.4f}" for k in ks)
            + ".\n\n"
            + rendered
        )
    elapsed = time.perf_counter() - started
    print(f"total {elapsed:.0f} s", flush=True)
    body = (
        f"Machine: {machine('cpu')}. Command: `python bench/sparse_error.py {' '.join(sys.argv[1:])}` "
        f"({elapsed:.0f} s).\n\n"
        f"Teacher: built-in SmolLM2-135M-Instruct (V = {vocab}), float32, on the first {args.examples} "
        f"`builtin:starter` training examples (quickstart recipe), {positions} labelled (response) positions; every "
        f"divergence at its default parameters, temperature {temperature:g}. Teacher mass covered by the top K, mean "
        "over positions: " + ", ".join(f"K = {k_name[k]}: {covered[k]:.4f}" for k in ks) + ".\n\n"
        "Each row compares the loss and its gradient (w.r.t. the student logits) against the dense teacher logits: "
        "*bucketing* uses the float32 record (`SparseTeacher.from_logits`, the top-K/label/tail coarsening alone), "
        f"*{lp_dtype}* the record as `kd cache-teacher` stores it (top-K log-probs in {lp_dtype}, label log-prob and "
        "tail mass in float32). Loss err. is (sparse − dense) / |dense|, grad err. ‖g_sparse − g_dense‖ / "
        "‖g_dense‖, cos the cosine between the two gradients. At K = V the buckets are the V tokens: the bucketing "
        f"column is rounding, the {lp_dtype} column the quantisation alone. What the numbers mean for choosing K and "
        "the divergence: docs/cache.md, 'Which divergences suit a cache'.\n\n" + "\n\n".join(sections) + "\n"
    )
    if not args.no_docs:
        write_docs(REPO / "docs" / "benchmarks.md", SECTION, body)


if __name__ == "__main__":
    main()
