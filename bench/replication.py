"""The replication study: does AKL beat FKL and RKL, does ATKD beat KD, with this teacher and student?

    python bench/replication.py --data-dir ../shared/data                 # everything, resuming where it stopped
    python bench/replication.py --data-dir ../shared/data --stage train   # only the training grid
    python bench/replication.py --data-dir ../shared/data --stage eval    # only the evals (finished runs)
    python bench/replication.py --data-dir ../shared/data --stage report  # tables into docs/replication.md
    python bench/replication.py --data-dir DIR --teacher /path/to/tiny --steps 2 --train-examples 16 \\
        --eval-examples 2 --max-new-tokens 4 --out /tmp/rep --no-doc      # a smoke test of the script

Every stage is a kd command, so the study is what a user would run and each stage resumes by itself:

1. train: `kd distill RECIPE --grid seed=SEEDS --grid loss.divergence=ARMS` on the Alpaca training set
   (`alpaca-5k/train.jsonl` under --data-dir, its first --train-examples), the teacher online for every arm (exact
   for all divergences, including the tail-sensitive rkl and akl that a top-K cache would bias). Finished runs
   are skipped, killed ones resumed.
2. eval: `kd eval` of every finished run, the teacher (`teacher:RECIPE`) and the undistilled pruned student (cut
   once into OUT/undistilled) on Self-Instruct 252, Vicuna 80 and the starter eval split, with --eval-seeds
   sampling seeds; passes already written are reused.
3. report: `kd compare` of the runs (fkl as the baseline: means with 95% CIs over prompts, deltas with paired
   bootstrap p-values), a table of the reference rows (their evals are in OUT/evals/), the plot, and the time
   taken, into the `## Results` part of docs/replication.md (the verdict there is written by a person reading
   them).

The data paths are arguments: users do not have ../shared, and no test reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
DOC = REPO / "docs" / "replication.md"
RESULTS = "## Results"


def kd(*args: str) -> int:
    """A kd command in its own process, output to this terminal; its exit code."""
    print("$ kd " + " ".join(args), flush=True)
    return subprocess.call([sys.executable, "-m", "kdcli", *args], cwd=REPO)


def study_sets(args: argparse.Namespace) -> list[str]:
    sets = [
        "name=rep-{divergence}-s{seed}",
        f"output_dir={args.out / 'runs'}",
        f"data.train={args.data_dir / 'alpaca-5k' / 'train.jsonl'}",
        f"data.max_train_examples={args.train_examples}",
        f"train.max_steps={args.steps}",
        f"train.save_every={max(1, args.steps // 5)}",
        "train.eval_every=null",
    ]
    if args.teacher:
        sets.append(f"teacher.model={args.teacher}")
    return sets + list(args.set or [])


def write_study_recipe(args: argparse.Namespace) -> Path:
    """OUT/study.yaml: the quickstart with the study's settings, the recipe `teacher:` evaluates and the record."""
    import yaml

    sys.path.insert(0, str(REPO))
    from kdcli.recipe.load import apply_set, parse_set, read_yaml

    raw = read_yaml(QUICKSTART)
    for item in study_sets(args):
        apply_set(raw, *parse_set(item))
    path = args.out / "study.yaml"
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def train(args: argparse.Namespace, recipe: Path) -> int:
    # Seeds vary slowest: a study stopped part-way has every arm at its first seeds, not every seed of one arm.
    grid = ["--grid", f"seed={args.seeds}", "--grid", f"loss.divergence={args.arms}"]
    code = kd("distill", str(recipe), *grid)
    if args.on_policy_arms:
        # The same recipe with the student's own samples on a share of the micro-batches, named apart.
        mixed = ["--set", f"on_policy.ratio={args.on_policy_ratio}", "--set", "name=rep-{divergence}-onpolicy-s{seed}"]
        mixed += ["--set", f"on_policy.max_new_tokens={args.max_new_tokens}"]
        grid = ["--grid", f"seed={args.seeds}", "--grid", f"loss.divergence={args.on_policy_arms}"]
        code = kd("distill", str(recipe), *grid, *mixed) or code
    return code


def undistilled_student(args: argparse.Namespace, recipe: Path) -> Path:
    """The pruned student before any training, cut once by kd's own builder (the reference row)."""
    out = args.out / "undistilled"
    if (out / "config.json").is_file():
        return out
    sys.path.insert(0, str(REPO))
    import torch

    from kdcli.models import build_student, student_tokenizer
    from kdcli.recipe import load_recipe

    loaded = load_recipe(recipe)
    student = build_student(loaded.student, loaded.teacher.model, torch.float32, loaded.seed)
    partial = out.with_name(out.name + ".partial")
    student.save_pretrained(partial, safe_serialization=True)
    student_tokenizer(loaded.student, loaded.teacher.model).save_pretrained(partial)
    partial.rename(out)
    return out


def eval_sets(args: argparse.Namespace) -> list[str]:
    data = ["--data", f"selfinst={args.data_dir / 'selfinst' / 'eval.jsonl'}"]
    data += ["--data", f"vicuna={args.data_dir / 'vicuna' / 'eval.jsonl'}", "--data", "starter=builtin:starter"]
    settings = ["--seeds", args.eval_seeds, "--max-new-tokens", str(args.max_new_tokens), "--template", "chat"]
    settings += ["--batch-size", str(args.eval_batch_size)]
    if args.eval_examples:
        settings += ["--max-examples", str(args.eval_examples)]
    return data + settings


def evaluate(args: argparse.Namespace, recipe: Path) -> int:
    """The finished runs in one `kd eval`, then each reference into its own folder under OUT/evals."""
    runs = sorted(str(p) for p in (args.out / "runs").glob("rep-*") if (p / "run.json").is_file())
    if not runs:
        print("no finished runs to evaluate yet: run the train stage first", flush=True)
        return 1
    code = kd("eval", *runs, *eval_sets(args))
    references = {"teacher": f"teacher:{recipe}", "undistilled": str(undistilled_student(args, recipe))}
    for name, target in references.items():
        code = kd("eval", target, *eval_sets(args), "--out", str(args.out / "evals" / name)) or code
    return code


def report(args: argparse.Namespace, recipe: Path, seconds: dict[str, float]) -> str:
    runs = sorted((args.out / "runs").glob("rep-*"), key=lambda p: _column_order(p.name, args))
    finished = [str(p) for p in runs if (p / "eval" / "results.json").is_file()]
    if not finished:
        return "No evaluated runs yet."
    plot = args.out / "replication.png"
    # The seeds of an arm are pooled: the question is fkl against akl, not one seed's run against another's.
    table = compare(*finished, "--format", "markdown", "--plot", str(plot))
    # One level down, so that the table's headings stay inside this section of the doc.
    table = "\n".join("#" + line if line.startswith("#") else line for line in table.splitlines())
    lines = [
        RESULTS,
        "",
        f"`{' '.join(['python bench/replication.py', *sys.argv[1:]])}`: arms {args.arms}"
        + (f" and on-policy {args.on_policy_arms} (ratio {args.on_policy_ratio:g})" if args.on_policy_arms else "")
        + f", seeds {args.seeds}, "
        f"{args.steps} steps on the first {args.train_examples} Alpaca examples; eval seeds {args.eval_seeds}, "
        f"`max_new_tokens` {args.max_new_tokens}, {args.eval_examples or 'all'} examples a set. "
        f"Recipe: `{_shown(recipe)}`. Wall time, all invocations together, on "
        f"{os.cpu_count()} CPU cores: "
        + (", ".join(f"{stage} {value / 3600:.2f} h" for stage, value in seconds.items()) or "not recorded")
        + ".",
        "",
        table.strip(),
        "",
        "Reference rows (ROUGE-L mean over seeds, per set):",
        "",
        reference_table(args),
        "",
        against_rkl(finished),
        "",
        f"Plot: `{_shown(plot)}`.",
    ]
    return "\n".join(lines) + "\n"


def _column_order(name: str, args: argparse.Namespace) -> tuple[int, int, str]:
    """The arms as --arms lists them (the first, fkl by default, is the baseline), then the on-policy ones."""
    divergence = name.split("-")[1]
    arms = args.arms.split(",")
    return ("-onpolicy-" in name, arms.index(divergence) if divergence in arms else len(arms), name)


def compare(*args: str) -> str:
    """`kd compare --pool-seeds ARGS`' output."""
    command = [sys.executable, "-m", "kdcli", "compare", "--pool-seeds", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout


def against_rkl(finished: list[str]) -> str:
    """ROUGE-L deltas against the rkl arm (the table above takes them against fkl): AKL's claim is over both, and
    the on-policy arm's question is what sampling adds to the same divergence."""
    rkl = [run for run in finished if Path(run).name.startswith("rep-rkl-s")]
    others = [run for run in finished if Path(run).name.startswith(("rep-akl-s", "rep-rkl-onpolicy-s"))]
    if not rkl or not others:
        return ""
    data = json.loads(compare(*rkl, *others, "--format", "json", "--resamples", "10000"))
    arms = [label for label in data["runs"] if label != data["baseline"]]
    lines = [
        f"ROUGE-L against the rkl arm ({data['baseline']}): Δ [95% CI] p, from `kd compare --pool-seeds "
        "--format json` with rkl as the baseline:",
        "",
        "| arm | " + " | ".join(s["set"] for s in data["evaluation"]) + " |",
        "|---" * (len(data["evaluation"]) + 1) + "|",
    ]
    for arm in arms:
        cells = []
        for evaluation in data["evaluation"]:
            cell = next(r for r in evaluation["rows"] if r["metric"] == "rougeL")["cells"].get(arm) or {}
            if cell.get("delta") is None:
                cells.append("-")
                continue
            low, high = cell["delta_ci95"]
            p = cell["p_value"]
            cells.append(
                f"{cell['delta']:+.2f} [{low:+.2f}, {high:+.2f}] "
                + ("p<0.001" if p < 0.001 else f"p={p:.3f}")
                + (" \\*" if p < 0.05 else " n.s.")
            )
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shown(path: Path) -> str:
    """A path as the doc shows it: relative to the repository where it is inside it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def reference_table(args: argparse.Namespace) -> str:
    sets = ("selfinst", "vicuna", "starter")
    rows = ["| model | " + " | ".join(f"{name} ROUGE-L" for name in sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for label, name in (("teacher", "teacher"), ("undistilled student", "undistilled")):
        path = args.out / "evals" / name / "results.json"
        results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        rows.append(f"| {label} | " + " | ".join(_rouge(results, s) for s in sets) + " |")
    return "\n".join(rows)


def _rouge(results: dict[str, Any], name: str) -> str:
    """ROUGE-L mean ± std over the sampling seeds of one set, or - before it is evaluated."""
    entry = (results.get("sets", {}).get(name) or {}).get("sampling") or {}
    rouge = entry.get("metrics", {}).get("rougeL", {})
    return f"{rouge['mean']:.2f} ± {rouge['std']:.2f}" if "mean" in rouge else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", type=Path, required=True, help="the folder holding alpaca-5k/, selfinst/, vicuna/"
    )
    parser.add_argument("--out", type=Path, default=REPO / "study", help="runs, references and the study recipe")
    parser.add_argument("--arms", default="fkl,rkl,akl,atkd", help="divergences, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--train-examples", type=int, default=2000, help="first N Alpaca examples")
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps of every run")
    parser.add_argument(
        "--on-policy-arms", default="", help="divergences also trained on-policy (rep-DIV-onpolicy-sSEED); empty: none"
    )
    parser.add_argument("--on-policy-ratio", type=float, default=0.5, help="on_policy.ratio of the on-policy arms")
    parser.add_argument("--eval-seeds", default="1,2,3", help="sampling seeds of kd eval")
    parser.add_argument("--eval-examples", type=int, default=0, help="first N examples of each eval set (0: all)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="kd eval --max-new-tokens, and the on-policy arms' samples"
    )
    parser.add_argument(
        "--eval-batch-size", type=int, default=20, help="kd eval --batch-size (20 samples ~3x faster than 8 on CPU)"
    )
    parser.add_argument("--teacher", help="another teacher.model (a smoke test on a tiny model)")
    parser.add_argument("--set", action="append", help="a recipe override for every run, as kd distill --set")
    parser.add_argument("--stage", choices=("all", "train", "eval", "report"), default="all")
    parser.add_argument("--no-doc", action="store_true", help="print the results, do not write docs/replication.md")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.data_dir = args.data_dir.resolve()
    missing = [
        p
        for p in ("alpaca-5k/train.jsonl", "selfinst/eval.jsonl", "vicuna/eval.jsonl")
        if not (args.data_dir / p).is_file()
    ]
    if missing:
        raise SystemExit(f"--data-dir {args.data_dir}: missing {', '.join(missing)} (see ../shared/data/README.md)")
    recipe = write_study_recipe(args)
    timings = args.out / "timings.json"  # wall seconds per stage, summed over every invocation (the budget)
    seconds: dict[str, float] = json.loads(timings.read_text()) if timings.is_file() else {}
    code = 0
    for stage, work in (("train", train), ("eval", evaluate)):
        if args.stage in ("all", stage):
            started = time.perf_counter()
            code = work(args, recipe) or code
            seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started
            timings.write_text(json.dumps(seconds, indent=1) + "\n", encoding="utf-8")
    if args.stage in ("all", "report"):
        section = report(args, recipe, seconds)
        print(section)
        if not args.no_doc:
            sys.path.insert(0, str(REPO))
            from bench.losses import write_section

            write_section(DOC, section)
            print(f"wrote the results of {DOC}")
    raise SystemExit(code)


if __name__ == "__main__":
    main()
