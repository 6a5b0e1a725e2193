"""How far a top-K sparse teacher is from the dense teacher, per divergence, on the built-in teacher's real outputs.

    python bench/sparse_error.py                    # K = 16, 64, 256; 32 starter examples; untrained student
    python bench/sparse_error.py --student runs/quickstart-fkl/student --examples 16

The teacher is the built-in SmolLM2-135M-Instruct on `builtin:starter` training examples (chat template, max_length
256). The student is the quickstart's starting point, the teacher's every-other-layer copy, untrained (the two
distributions are far apart, which is where coarsening the tail matters most), or a trained student given with
--student. For each divergence the loss and the gradient with respect to the student logits are computed twice in
float32: with the dense teacher logits and with `SparseTeacher.from_logits(teacher_logits, labels, K)` (the record
`kd cache-teacher` stores). Reported: the relative error of the loss value, and of the gradient (‖g_sparse −
g_dense‖ / ‖g_dense‖) with the cosine between the two gradients. The section "Sparse teacher error" of
docs/benchmarks.md is rewritten.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.losses import machine, write_docs  # noqa: E402
from kdcli.data import Collator, build_examples, load_rows  # noqa: E402
from kdcli.losses import LOSSES, SparseTeacher, get_loss  # noqa: E402
from kdcli.models import build_student, load_teacher, load_tokenizer  # noqa: E402
from kdcli.recipe import load_recipe  # noqa: E402

SECTION = "Sparse teacher error (built-in teacher, real distributions, {student} student)"


def real_logits(examples: int, student_dir: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher and student logits (float32) and shifted labels on the first `examples` starter rows."""
    overrides = ["student.init=pretrained", f"student.model={student_dir}"] if student_dir else []
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", overrides)
    tokenizer = load_tokenizer(recipe.teacher.model)
    teacher = load_teacher(recipe.teacher, torch.float32)
    student, _ = build_student(recipe.student, recipe.teacher.model, torch.float32, recipe.seed, teacher=teacher)
    rows = load_rows(recipe.data.train, "train", "data.train")[:examples]
    batch = Collator(tokenizer.pad_token_id)(build_examples(rows, tokenizer, recipe.data, "train", "data.train")[:])
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return teacher(**inputs).logits.float(), student(**inputs).logits.float(), batch["labels"]


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
    return float(loss.detach()), logits.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", default="16,64,256", help="comma list of K (default 16,64,256)")
    ap.add_argument("--examples", type=int, default=32, help="starter training examples (default 32)")
    ap.add_argument(
        "--student", default=None, help="a trained student folder (default: the untrained every-other-layer copy)"
    )
    ap.add_argument("--no-docs", action="store_true", help="print only, do not touch docs/benchmarks.md")
    args = ap.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    started = time.perf_counter()
    teacher, student, labels = real_logits(args.examples, args.student)
    valid = labels != -100
    rows: list[list[str]] = []
    covered: dict[int, float] = {}
    student_tail: dict[int, float] = {}
    student_probs = torch.softmax(student[valid], dim=-1)
    for k in ks:
        sparse = SparseTeacher.from_logits(teacher, labels, k)
        covered[k] = float((1 - sparse.tail_mass)[valid].mean())
        in_topk = student_probs.gather(1, sparse.topk_ids[valid]).sum(-1)
        student_tail[k] = float((1 - in_topk).mean())
        for name in LOSSES:
            dense_value, dense_grad = loss_and_grad(name, student, teacher, labels)
            sparse_value, sparse_grad = loss_and_grad(name, student, sparse, labels)
            rel = abs(sparse_value - dense_value) / max(abs(dense_value), 1e-12)
            grad_rel = float((sparse_grad - dense_grad).norm() / dense_grad.norm().clamp_min(1e-30))
            cosine = float(torch.nn.functional.cosine_similarity(sparse_grad.flatten(), dense_grad.flatten(), dim=0))
            values = [f"{dense_value:.4f}", f"{sparse_value:.4f}", f"{rel:.1e}", f"{grad_rel:.1e}", f"{cosine:.5f}"]
            rows.append([str(k), name, *values])
            print("  ".join(rows[-1]), flush=True)
    header = ["K", "divergence", "dense loss", "sparse loss", "rel. error", "grad rel. error", "grad cosine"]
    table = markdown_table([header, *rows])
    positions = int(valid.sum())
    student_text = (
        f"`{args.student}` (trained)"
        if args.student
        else "its untrained every-other-layer copy (the quickstart's starting point)"
    )
    body = (
        f"Machine: {machine('cpu')}. Command: `python bench/sparse_error.py {' '.join(sys.argv[1:])}` "
        f"({time.perf_counter() - started:.0f} s).\n\n"
        f"Teacher: built-in SmolLM2-135M-Instruct (V = {teacher.shape[-1]}); student: {student_text}; "
        f"{args.examples} `builtin:starter` training examples, "
        f"{positions} valid (response) positions; float32; default parameters. Teacher mass covered by the top-K, "
        "mean over valid positions: "
        + ", ".join(f"K = {k}: {covered[k]:.4f}" for k in ks)
        + "; student mass outside the teacher's top-K: "
        + ", ".join(f"K = {k}: {student_tail[k]:.4f}" for k in ks)
        + ".\n\n"
        + table
        + "\nThe sparse teacher keeps the top-K log-probs, the label's log-prob and the tail mass (methods.md, "
        "tail-bucket rule); the student is coarsened onto the same buckets, so divergences are computed on "
        "K + 2 buckets instead of V tokens. K = V gives the dense result exactly (tests/test_losses.py). "
        "What the tail bucket loses is the divergence *within* the tail. Forward-KL-like divergences weight it by "
        "the teacher's tail mass, which is small; reverse KL (rkl, and AKL's tail term) weights it by the "
        "student's mass outside the teacher's top-K, which is large for a student far from its teacher. Use a "
        "larger K, or online teacher logits, for rkl and akl early in training.\n"
    )
    print(table)
    if not args.no_docs:
        write_docs(
            REPO / "docs" / "benchmarks.md", SECTION.format(student="trained" if args.student else "untrained"), body
        )


if __name__ == "__main__":
    main()
