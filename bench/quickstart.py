"""The quickstart against its targets: wall time, eval CE, stop rate and ROUGE-L, before and after training.

    python bench/quickstart.py                        # the shipped recipe in fp32; writes `## Quickstart` of the docs
    python bench/quickstart.py --old                  # also today's predecessor (every other layer, 70 steps)
    python bench/quickstart.py --set train.lr=3e-4    # a variant (the docs are not written for one)
    python bench/quickstart.py --no-docs
    python bench/quickstart.py --old --keep DIR       # keep the folders; a rerun reuses finished runs and evals
    python bench/quickstart.py --old --keep DIR --retime   # ... and times the quickstart again, quietly

1. `kd distill recipes/quickstart.yaml --set train.precision=fp32`, timed from outside as one process, with a fresh
   store of layer scores (a private KD_HOME whose `models/` is the usual converted teacher: the one-time GGUF
   conversion is excluded, the layer scoring is not), as a user's first run.
2. The undistilled student: the teacher cut to the same layers (the run's recipe.yaml) and saved, untrained.
3. `kd eval --baselines` of the run, the undistilled student and the teacher on the starter eval split: --seeds
   sampling seeds, --max-new-tokens new tokens.
4. `kd compare RUN evals/undistilled evals/teacher --baseline evals/undistilled`: the run's ROUGE-L against the
   undistilled student's and against the fixed string of frequent words, with their 95 % intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from losses import write_section  # noqa: E402

from kdcli.evaluation.baselines import BAR, baseline_title  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
SECTION = "Quickstart"
FREQUENT_WORDS = baseline_title(BAR)  # kd compare's title of the bar's reference column
# The predecessor of today's quickstart, for the "before" column: every other teacher layer, 70 steps at 1e-4.
OLD = [
    "student.layers=every-other",
    "train.lr=1e-4",
    "train.epochs=2",
    "train.max_steps=null",
    "train.batch_size=8",
    "train.warmup_steps=5",
]


def kd(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    print("$ kd " + " ".join(args), flush=True)
    done = subprocess.run([sys.executable, "-m", "kdcli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kd {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return done


def private_home(root: Path) -> Path:
    """A KD_HOME with the converted teacher of the usual one and no stored layer scores."""
    sys.path.insert(0, str(REPO))
    from kdcli.models import builtin_model_dir

    converted = builtin_model_dir("smollm2-135m-instruct")  # converts once if needed: not timed
    home = root / "kd-home"
    (home / "models").mkdir(parents=True)
    (home / "models" / converted.name).symlink_to(converted, target_is_directory=True)
    return home


def distill(name: str, sets: list[str], work: Path, env: dict[str, str]) -> dict[str, Any]:
    """Train (or, in a --keep folder where it finished with its wall time recorded, reuse) one run."""
    args = ["distill", str(QUICKSTART), "--set", "output_dir=runs", "--set", f"name={name}"]
    args += [item for s in ["train.precision=fp32", *sets] for item in ("--set", s)]
    record_file, timings_file = work / "runs" / name / "run.json", work / "timings.json"
    timings = json.loads(timings_file.read_text(encoding="utf-8")) if timings_file.is_file() else {}
    if not (record_file.is_file() and name in timings):
        started = time.perf_counter()
        kd(*args, "--overwrite", cwd=work, env=env)
        timings[name] = time.perf_counter() - started
        timings_file.write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
    else:
        print(f"reusing {record_file.parent} ({wall_time(timings[name])})", flush=True)
    return {"wall_s": timings[name], "record": json.loads(record_file.read_text(encoding="utf-8"))}


def retime(sets: list[str], work: Path, env: dict[str, str], record: dict[str, Any], scratch: Path) -> float:
    """Time the quickstart again, as a fresh first run (scores not stored), into a folder of its own, and check that
    it trained the same student (its eval CE equal to the evaluated run's): on a machine that was busy while the
    evaluated run trained, this is the wall time to quote. Recorded in timings.json as the quickstart's."""
    timed = distill("quickstart-retimed", sets, work, {**env, "KD_HOME": str(private_home(scratch))})
    ours, theirs = record["eval_after"]["eval_ce"], timed["record"]["eval_after"]["eval_ce"]
    if abs(ours - theirs) > 1e-6:
        raise SystemExit(f"the retimed run ended at eval CE {theirs}, the evaluated one at {ours}: not the same run")
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text(encoding="utf-8"))
    timings["quickstart"] = timed["wall_s"]
    timings_file.write_text(json.dumps(timings, indent=1) + "\n", encoding="utf-8")
    return float(timed["wall_s"])


def undistilled(run: Path, out: Path) -> Path:
    """The teacher cut to the run's layers, untrained, saved as a model folder."""
    import torch

    from kdcli.models import build_student, student_tokenizer
    from kdcli.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    student = build_student(recipe.student, recipe.teacher.model, torch.float32, recipe.seed)
    student.save_pretrained(out, safe_serialization=True)
    student_tokenizer(recipe.student, recipe.teacher.model).save_pretrained(out)
    return out


def evaluate(target: str, out: str | None, args: argparse.Namespace, work: Path, env: dict[str, str]) -> None:
    command = ["eval", target, "--baselines", "--seeds", args.seeds, "--max-new-tokens", str(args.max_new_tokens)]
    command += ["--batch-size", str(args.eval_batch_size), *(["--out", out] if out else [])]
    kd(*command, cwd=work, env=env)


def rouge(comparison: dict[str, Any], label: str) -> dict[str, Any]:
    row = next(r for r in comparison["evaluation"][0]["rows"] if r["metric"] == "rougeL")
    return row["cells"].get(label) or {}


def metric(comparison: dict[str, Any], label: str, key: str) -> dict[str, Any]:
    row = next((r for r in comparison["evaluation"][0]["rows"] if r["metric"] == key), None)
    return (row or {}).get("cells", {}).get(label) or {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1,2,3", help="kd eval's sampling seeds")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--eval-batch-size", type=int, default=20)
    ap.add_argument("--old", action="store_true", help="also run today's predecessor recipe (the 'before' column)")
    ap.add_argument("--set", action="append", default=[], help="a recipe override, as kd distill --set")
    ap.add_argument("--retime", action="store_true", help="time the quickstart again on a quiet machine (see `retime`)")
    ap.add_argument("--keep", type=Path, help="keep the run folders and evals here instead of a temporary folder")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    from losses import machine

    with tempfile.TemporaryDirectory(prefix="kd-bench-quickstart-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env["KD_HOME"] = str(private_home(Path(tmp)))
        runs = {"new": distill("quickstart", args.set, work, env)}
        if args.retime:
            runs["new"]["wall_s"] = retime(args.set, work, env, runs["new"]["record"], Path(tmp) / "retime")
        if args.old:
            runs["old"] = distill("quickstart-old", OLD, work, env)
        for name in runs:
            run = work / "runs" / ("quickstart" if name == "new" else "quickstart-old")
            evaluate(str(run), None, args, work, env)
        cut = work / "undistilled"
        if not cut.exists():
            undistilled(work / "runs" / "quickstart", cut)
        evaluate(str(cut), "evals/undistilled", args, work, env)
        evaluate(f"teacher:{QUICKSTART}", "evals/teacher", args, work, env)
        columns = ["runs/quickstart", *(["runs/quickstart-old"] if args.old else []), "evals/undistilled"]
        columns.append("evals/teacher")
        compared = kd("compare", *columns, "--baseline", "evals/undistilled", "-f", "json", cwd=work, env=env)
        data = json.loads(compared.stdout)
        table = kd("compare", *columns, "--baseline", "evals/undistilled", "-f", "markdown", cwd=work, env=env)
        (work / "compare.md").write_text(table.stdout, encoding="utf-8")
        samples = first_answers(work / "runs" / "quickstart", args.seeds.split(",")[0])
        section = render(args, runs, data, machine("cpu"), samples)
        print(section)
        if not args.no_docs and not args.set:
            write_section(args.docs, section)


def render(
    args: argparse.Namespace, runs: dict[str, Any], data: dict[str, Any], where: str, samples: list[dict[str, Any]]
) -> str:
    from kdcli.hardware import native_bf16

    lines = [
        f"## {SECTION}",
        "",
        f"`python bench/quickstart.py{' --old' if args.old else ''}` on {where} (native bf16: "
        f"{'yes' if native_bf16('cpu') else 'no'}; the runs forced to fp32, what a CPU without it runs). Wall time "
        "of `kd distill recipes/quickstart.yaml` as one process, the first run of a fresh store of layer scores (the "
        "one-time GGUF conversion excluded). kd eval on the starter eval split (40 prompts), seeds "
        f"{args.seeds}, {args.max_new_tokens} new tokens; ROUGE-L with its 95 % interval over prompts, and the "
        "difference against the undistilled student from kd compare's paired bootstrap.",
        "",
        "| | wall time | steps | eval CE before → after | stop rate | ROUGE-L [95% CI] "
        "| Δ ROUGE-L vs undistilled [95% CI] | Δ ROUGE-L vs frequent words [95% CI] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, title in (("old", "before: every other layer, 70 steps"), ("new", "quickstart: 15 layers by loss")):
        if name not in runs:
            continue
        record, label = runs[name]["record"], "quickstart" if name == "new" else "quickstart-old"
        before, after = record["eval_before"]["eval_ce"], record["eval_after"]["eval_ce"]
        cell, stop = rouge(data, label), metric(data, label, "stop_rate")
        delta = cell.get("delta_ci95") or [float("nan")] * 2
        versus, versus_ci = (cell.get("versus_references") or {}).get(FREQUENT_WORDS) or (float("nan"), None)
        versus_ci = versus_ci or [float("nan")] * 2
        words = f"{versus:+.2f} [{versus_ci[0]:+.2f}, {versus_ci[1]:+.2f}]"
        lines.append(
            f"| {title} | {wall_time(runs[name]['wall_s'])} | {record['steps']} | {before:.2f} → {after:.2f} | "
            f"{stop.get('mean', float('nan')):.2f} | {cell['mean']:.2f} [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}]"
            + (" (not above frequent words)" if FREQUENT_WORDS in (cell.get("not_above") or []) else "")
            + f" | {cell.get('delta', float('nan')):+.2f} [{delta[0]:+.2f}, {delta[1]:+.2f}] | {words} |"
        )
    for label, title in (("undistilled", "undistilled student (no training)"), ("teacher", "teacher")):
        cell, stop = rouge(data, label), metric(data, label, "stop_rate")
        lines.append(
            f"| {title} | | | | {stop.get('mean', float('nan')):.2f} | {cell['mean']:.2f} "
            f"[{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}] | | |"
        )
    for title in (FREQUENT_WORDS, baseline_title("copy_prompt")):
        cell = rouge(data, title)
        if cell:
            lines.append(f"| {title} | | | | | {cell['mean']:.2f} [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}] | | |")
    new = runs["new"]["record"]
    layers = (new.get("student_layers") or {}).get("indices")
    lines += ["", f"The quickstart kept teacher layers {layers}; its stop rate is its share of answers ended at EOS."]
    lines += ["", f"Its first {len(samples)} answers (sampling seed {args.seeds.split(',')[0]}), as written:", ""]
    for row in samples:
        answer = " ".join(row["response"].split())
        lines += [
            f"- **{' '.join(row['instruction'].split())[:160]}** → {answer[:400]}{' …' if len(answer) > 400 else ''}"
            f" *({row['stopped']})*"
        ]
    return "\n".join(lines) + "\n"


def wall_time(seconds: float | None) -> str:
    """A timed run's seconds; a run kept from a shared machine records none (null in timings.json)."""
    return "not timed" if seconds is None else f"{seconds:.0f} s"


def first_answers(run: Path, seed: str, count: int = 3) -> list[dict[str, Any]]:
    """The first answers of a kd eval pass on the starter set, to read beside the scores."""
    path = run / "eval" / "starter" / f"seed-{seed}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:count]]


if __name__ == "__main__":
    main()
