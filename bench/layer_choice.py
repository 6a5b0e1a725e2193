"""Which layers a pruned student of the built-in teacher should keep: kd's two layer scores against each other.

    python bench/layer_choice.py                       # keep 15 and 20 of 30; writes `## Layer choice` of the docs
    python bench/layer_choice.py --examples 8,32 --keep 15,20,24
    python bench/layer_choice.py --no-docs             # print only

For each score (`loss`, `influence`) and number of scored training examples, the teacher's layers are scored with
kd's own `layer_scores` (fp32, on the first examples of `builtin:starter`'s training split, as `kd distill` scores
them), and the student that keeps the top N is cut with kd's `build_student`. Its eval CE on the starter eval split
(no training at all) is what `kd distill` reports as `eval @ step 0`. Every-other layer, today's old quickstart
student, is the reference row. Scoring time is wall time on this machine, fresh (no stored scores).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from losses import machine, write_section  # noqa: E402

SECTION = "Layer choice"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", default="8,32", help="comma list: training examples scored (default 8,32)")
    ap.add_argument("--keep", default="15,20", help="comma list: layers kept (default 15,20)")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--no-docs", action="store_true", help="print only, do not touch the docs")
    args = ap.parse_args()
    from kdcli.data import Collator, build_examples, read_split
    from kdcli.hardware import Runtime
    from kdcli.models import build_student, load_teacher, load_tokenizer, pruning, resolve_model
    from kdcli.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["train.precision=fp32"])
    teacher_dir = resolve_model(recipe.teacher.model)
    tokenizer = load_tokenizer(teacher_dir)
    train = build_examples(read_split(recipe.data, "train"), tokenizer, recipe.data, "train", "data.train")
    evals = build_examples(read_split(recipe.data, "eval"), tokenizer, recipe.data, "eval", "data.eval")
    teacher = load_teacher(recipe.teacher.model_copy(update={"model": teacher_dir}), torch.float32)
    collate = Collator(tokenizer.pad_token_id)
    runtime = Runtime(torch.device("cpu"), "fp32")
    n_layers = teacher.config.num_hidden_layers

    def eval_ce(layers: list[int]) -> float:
        config = recipe.student.model_copy(update={"layers": layers})
        student = build_student(config, teacher_dir, torch.float32, 0, teacher=teacher).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(evals), 8):
                batch = collate(evals[i : i + 8])
                logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                flat = logits.reshape(-1, logits.shape[-1])
                total += float(torch.nn.functional.cross_entropy(flat, batch["labels"].reshape(-1), reduction="sum"))
                count += int((batch["labels"] != -100).sum())
        return total / count

    keeps = [int(k) for k in args.keep.split(",")]
    rows = [("every other layer", "-", "-", 15, list(range(0, n_layers, 2)), eval_ce(list(range(0, n_layers, 2))))]
    rows.append(("teacher (all 30)", "-", "-", n_layers, list(range(n_layers)), eval_ce(list(range(n_layers)))))
    with tempfile.TemporaryDirectory() as home:
        os.environ["KD_HOME"] = home  # fresh scores: a store of its own (the converted teacher is read from above)
        for examples in [int(n) for n in args.examples.split(",")]:
            picked = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in train[:examples]]
            for by in ("loss", "influence"):
                started = time.perf_counter()
                scores = pruning.layer_scores(teacher, teacher_dir, picked, collate, by, runtime)
                seconds = time.perf_counter() - started
                for keep in keeps:
                    kept = scores.top(keep)
                    rows.append((f"`by: {by}`", str(examples), f"{seconds:.0f}", keep, kept, eval_ce(kept)))
                    print(rows[-1], flush=True)

    lines = [
        f"## {SECTION}",
        "",
        f"`python bench/layer_choice.py` on {machine('cpu')}: the built-in teacher (30 layers) in fp32, scored on "
        "the first training examples of `builtin:starter`; each student's eval CE on the starter eval split before "
        "any training (what `kd distill` prints as `eval @ step 0`).",
        "",
        "| layers kept | scored on (examples) | scoring time (s) | N | kept indices | eval CE, untrained |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {examples} | {seconds} | {keep} | {' '.join(map(str, kept))} | {ce:.2f} |"
        for name, examples, seconds, keep, kept, ce in rows
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_docs:
        write_section(args.docs, section)


if __name__ == "__main__":
    main()
