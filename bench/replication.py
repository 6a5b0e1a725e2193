"""The replication study, second edition: on students that already write, does AKL beat FKL and RKL, and does ATKD
beat KD?

    python bench/replication.py --data-dir ../shared/data                  # every stage, resuming where it stopped
    python bench/replication.py --data-dir ../shared/data --stage warmup   # the shared starting student
    python bench/replication.py --data-dir ../shared/data --stage train    # the arms x seeds grid
    python bench/replication.py --data-dir ../shared/data --stage eval     # kd eval of every finished model
    python bench/replication.py --stage report                             # tables and curves into the doc
    python bench/replication.py --data-dir DIR --teacher /path/to/tiny --warmup-steps 2 --steps 2 \\
        --train-examples 16 --eval-examples 2 --max-new-tokens 4 --out /tmp/rep --no-doc   # a smoke test

Every stage is kd commands run inside OUT (default study/v2), with every path relative to it, so that the files
committed from there hold no path of the machine the study ran on; OUT/data is a symlink to --data-dir (ignored
by git: users do not have ../shared, and no test reads it).

1. warmup: `kd distill warmup.yaml`, once: the built-in teacher cut to the 15 layers it needs most
   (`student.layers: {keep: 15, by: loss}`), trained with cross-entropy only (`kd_ratio: 0`, so that no divergence
   is favoured) on the study's Alpaca examples. Every arm starts from its student.
2. train: `kd distill study.yaml --grid seed=SEEDS --grid loss.divergence=ARMS`, the teacher online for every arm
   (exact for the tail-sensitive rkl and akl, which a top-K cache would bias), the eval CE logged every
   --eval-every steps for the curves. Finished runs are skipped, killed ones resumed.
3. eval: `kd eval --baselines` of every finished run, the starting student and the teacher on the first
   --eval-examples of Self-Instruct, Vicuna 80 and the starter eval split: --eval-seeds sampling seeds, 128 new
   tokens. Passes already written are reused.
4. report: `kd compare --pool-seeds --adjust holm` (fkl the baseline), a table of eval CE and ROUGE-L side by side
   with the stop rate and the model-free baselines, the eval CE curves, how much of each answer repeats its
   instruction, and what the study cost (from the runs' own records), into the
   `## Results` section of docs/replication.md, from the committed files alone (no --data-dir, no weights), so a
   clean clone re-renders it byte for byte (tests/test_replication_report.py). The verdict, in the doc's own
   `## Verdict` section, is written by a person reading them.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
DOC = REPO / "docs" / "replication.md"
RESULTS = "## Results"
SETS = ("selfinst", "vicuna", "starter")
WARMUP = "warmup"  # the starting student's run folder, under OUT/runs
CURVES = "curves.png"  # the eval CE curves, under OUT


def kd(args: argparse.Namespace, *command: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    """A kd command run in OUT, in its own process."""
    print("$ (cd " + _shown(args.out) + ") kd " + " ".join(command), flush=True)
    return subprocess.run(
        [sys.executable, "-m", "kdcli", *command], cwd=args.out, capture_output=capture, text=True, check=False
    )


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def recipes(args: argparse.Namespace) -> tuple[Path, Path]:
    """OUT/warmup.yaml and OUT/study.yaml: the quickstart with the study's settings, every path relative to OUT."""
    import yaml

    sys.path.insert(0, str(REPO))
    from kdcli.recipe.load import apply_set, parse_set, read_yaml

    common = [
        "output_dir=runs",
        "train.batch_size=8",
        "data.train=data/alpaca-5k/train.jsonl",
        f"data.max_train_examples={args.train_examples}",
        "data.eval=builtin:starter",
        f"train.eval_every={args.eval_every}",
        "train.precision=auto",
        *([f"teacher.model={args.teacher}"] if args.teacher else []),
        *(args.set or []),
    ]
    warmup = [
        f"name={WARMUP}",
        "loss.kd_ratio=0",
        f"train.lr={args.warmup_lr}",
        f"train.max_steps={args.warmup_steps}",
        f"train.save_every={max(1, args.warmup_steps // 4)}",
        f"student.layers={{keep: {args.keep}, by: loss}}",
    ]
    study = [
        "name=rep-{divergence}-s{seed}",
        "student.init=pretrained",
        f"student.model=runs/{WARMUP}/student",
        "student.layers=all",
        f"train.max_steps={args.steps}",
        f"train.save_every={max(1, args.steps // 4)}",
        f"train.lr={args.lr}",
    ]
    paths = []
    for name, items in (("warmup.yaml", warmup), ("study.yaml", study)):
        raw = read_yaml(QUICKSTART)
        for item in [*common, *items]:
            apply_set(raw, *parse_set(item))
        path = args.out / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def warmup(args: argparse.Namespace) -> int:
    """The shared starting student, then its eval and the teacher's. Weights are not committed, so a later session
    that lacks them retrains the warm-up from its recipe (same seed, same data order) and says whether the weights
    came out the same (the fingerprint its eval recorded)."""
    run = args.out / "runs" / WARMUP
    force: list[str] = []
    if (run / "run.json").is_file() and (run / "student" / "config.json").is_file():
        print("warm-up: finished before", flush=True)
    else:
        before = _recorded_weights(run)
        checkpoint = (run / "checkpoints").is_dir() and not (run / "run.json").is_file()
        command = ["distill", "--resume", f"runs/{WARMUP}"] if checkpoint else ["distill", "warmup.yaml", "--overwrite"]
        code = kd(args, *command).returncode
        if code:
            return code
        same = before is None or _weights(run / "student") == before
        if before is not None:
            print(f"warm-up rebuilt: its weights are {'the same as' if same else 'NOT the same as'} before", flush=True)
        if not same:  # its evals no longer describe it: made again (the doc must say the arms' start moved)
            force = ["--force"]
    code = kd(args, "eval", f"runs/{WARMUP}", *eval_args(args), *force).returncode
    return kd(args, "eval", "teacher:study.yaml", *eval_args(args), "--out", "evals/teacher").returncode or code


def _weights(folder: Path) -> str | None:
    sys.path.insert(0, str(REPO))
    from kdcli.models import weights_fingerprint

    return weights_fingerprint(str(folder))


def _recorded_weights(run: Path) -> str | None:
    """The weights fingerprint an earlier eval of this run recorded (kd eval's generation.json), if any."""
    for record in sorted((run / "eval").glob("*/generation.json")):
        weights = (json.loads(record.read_text(encoding="utf-8")).get("inputs") or {}).get("weights")
        if weights:
            return str(weights)
    return None


def train(args: argparse.Namespace) -> int:
    """Each point of the grid in turn, evaluated as soon as it is trained: its weights are not committed, so a run
    is finished only once its evals are (a later session could not evaluate it)."""
    if not (args.out / "runs" / WARMUP / "student" / "config.json").is_file():
        print("the arms start from the warm-up student: run the warmup stage first", flush=True)
        return 1
    code = 0
    # Seeds vary slowest: a study stopped part-way has every arm at its first seeds, not every seed of one arm.
    for seed in args.seeds.split(","):
        for arm in args.arms.split(","):
            name = f"rep-{arm}-s{seed}"
            if _evaluated(args.out / "runs" / name):
                continue
            point = ["--grid", f"seed={seed}", "--grid", f"loss.divergence={arm}"]
            trained = kd(args, "distill", "study.yaml", *point).returncode
            if trained == 130:  # interrupted: stop here, the next invocation resumes it
                return trained
            if trained == 0 and (args.out / "runs" / name / "student" / "config.json").is_file():
                trained = kd(args, "eval", f"runs/{name}", *eval_args(args)).returncode
            code = code or trained
    return code


def _evaluated(run: Path) -> bool:
    results = run / "eval" / "results.json"
    if not results.is_file():
        return False
    sets = json.loads(results.read_text(encoding="utf-8")).get("sets") or {}
    return all("sampling" in (sets.get(name) or {}) for name in SETS)


def eval_args(args: argparse.Namespace) -> list[str]:
    data = ["--data", "selfinst=data/selfinst/eval.jsonl", "--data", "vicuna=data/vicuna/eval.jsonl"]
    data += ["--data", "starter=builtin:starter", "--template", "chat", "--baselines"]
    data += ["--seeds", args.eval_seeds, "--max-new-tokens", str(args.max_new_tokens)]
    data += ["--batch-size", str(args.eval_batch_size)]
    return data + (["--max-examples", str(args.eval_examples)] if args.eval_examples else [])


def finished_runs(args: argparse.Namespace) -> list[str]:
    found = sorted((args.out / "runs").glob("rep-*"), key=lambda p: _arm_order(p.name, args))
    return [f"runs/{p.name}" for p in found if (p / "run.json").is_file()]


def evaluate(args: argparse.Namespace) -> int:
    """kd eval of every run whose weights are here (passes already written are reused), and the teacher's."""
    targets = [
        f"runs/{p.name}" for p in sorted((args.out / "runs").iterdir()) if (p / "student" / "config.json").is_file()
    ]
    if not targets:
        print("no run has its weights here: run the warmup and train stages", flush=True)
        return 1
    code = kd(args, "eval", *targets, *eval_args(args)).returncode
    teacher = kd(args, "eval", "teacher:study.yaml", *eval_args(args), "--out", "evals/teacher").returncode
    return code or teacher


def _arm_order(name: str, args: argparse.Namespace) -> tuple[int, str]:
    """The arms as --arms lists them (the first, fkl by default, is the baseline)."""
    arm = name.split("-")[1] if name.count("-") >= 2 else ""
    arms = args.arms.split(",")
    return (arms.index(arm) if arm in arms else len(arms), name)


def report(args: argparse.Namespace, draw: bool = True) -> str:
    runs = [run for run in finished_runs(args) if (args.out / run / "eval" / "results.json").is_file()]
    if not runs:
        return f"{RESULTS}\n\nNo evaluated runs yet.\n"
    start = f"runs/{WARMUP}"
    done = kd(args, "compare", *runs, start, "--pool-seeds", "--adjust", "holm", "--format", "json", capture=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    data = json.loads(done.stdout)
    markdown = kd(
        args, "compare", *runs, start, "--pool-seeds", "--adjust", "holm", "--format", "markdown", capture=True
    )
    table = "\n".join("#" + line if line.startswith("#") else line for line in markdown.stdout.splitlines())
    plot = curves(args, runs) if draw else args.out / CURVES
    planned = len(args.arms.split(",")) * len(args.seeds.split(","))
    lines = [
        RESULTS,
        "",
        f"Rendered by `python bench/replication.py --stage report` from the committed files. {len(runs)} of "
        f"{planned} runs evaluated"
        + (
            ": the arms' columns pool the seeds finished so far, so this is not yet the study"
            if len(runs) < planned
            else ""
        )
        + f". Arms {args.arms}, training seeds "
        f"{args.seeds}, {args.steps} steps from the warm-up student ({args.warmup_steps} steps of CE), the first "
        f"{args.train_examples} Alpaca examples; eval seeds {args.eval_seeds}, {args.max_new_tokens} new tokens, "
        f"{args.eval_examples or 'all'} examples a set at most. Recipes: `{_shown(args.out / 'warmup.yaml')}`, "
        f"`{_shown(args.out / 'study.yaml')}`. {_cost(args, runs)}",
        "",
        "### Eval CE and ROUGE-L side by side",
        "",
        side_by_side(args, data),
        "",
        "Eval CE: at the end, mean ± the 95% t interval over an arm's training seeds; its Δ against the baseline arm "
        "as kd compare tests it across training seeds (paired by seed where both arms have it, the same data order; "
        "the cell says how), Holm-adjusted over the arms (docs/compare.md). ROUGE-L: mean [95% interval], "
        "from the kd compare below (Holm-adjusted p-values there). ▽: not above the fixed string of frequent words "
        "(its row at the bottom, from the teacher's eval) on ROUGE-L: not yet a model on that set, so not ranked "
        "there. The copied prompt is a reference row, not a bar: it beats the teacher where the references restate "
        "the question.",
        "",
        f"Eval CE curves (mean over each arm's runs; the starter eval split, every {args.eval_every} steps): "
        f"`{_shown(plot)}`.",
        "",
        "### How much of each answer repeats its instruction",
        "",
        echoes(args, data),
        "",
        "Of an answer's words (lower-cased runs of letters and digits, as the frequent-words string counts them), the "
        "share that are words of its instruction, averaged over answers: over every pass of an arm's runs, each "
        "sampling seed's answers. It reads why ROUGE-L can rank students apart from eval CE on these sets, whose "
        "references restate the question (the copied prompt's row of the table above).",
        "",
        correlations(args, runs),
        "",
        table.strip(),
    ]
    return "\n".join(lines) + "\n"


def _cost(args: argparse.Namespace, runs: list[str]) -> str:
    """What the study has cost so far, from the runs' own records (kd distill's run.json, kd eval's generation.json)
    rather than this machine's clock, so that the report re-renders anywhere."""
    places: list[str] = []

    def trained(run: str) -> float:
        record = json.loads((args.out / run / "run.json").read_text(encoding="utf-8"))
        place = f"{record.get('device', 'an unrecorded device')} with {record.get('torch_threads', '?')} torch threads"
        if place not in places:
            places.append(place)
        return float(record.get("wall_seconds") or 0.0)

    def answered(folder: Path) -> float:
        passes = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("eval/*/generation.json"))]
        passes += [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*/generation.json"))]
        return sum(float(x.get("seconds") or 0.0) for record in passes for x in (record.get("passes") or {}).values())

    start = trained(f"runs/{WARMUP}")
    references = answered(args.out / "runs" / WARMUP) + answered(args.out / "evals" / "teacher")
    train = [trained(run) for run in runs]
    answers = [answered(args.out / run) for run in runs]
    per_run = (sum(train) + sum(answers)) / max(1, len(runs)) / 60
    return (
        f"Cost, from the runs' records ({' and '.join(places)}): the warm-up's training {start / 3600:.2f} h (its "
        f"wall time, which counts the hours it shared the machine), the warm-up's and the teacher's answers "
        f"{references / 3600:.2f} h; the {len(runs)} arms' runs {sum(train) / 3600:.2f} h of training and "
        f"{sum(answers) / 3600:.2f} h of answers, {per_run:.0f} minutes a run."
    )


@functools.cache
def answer_echoes(folder: Path, set_name: str) -> tuple[float, ...]:
    """Per sampled answer under `folder` (every pass of `set_name`), the share of its words that are words of its
    instruction; answers without a word are left out. Cached: the echo table and the correlations read the same
    answers."""
    from kdcli.evaluation.baselines import reference_words
    from kdcli.models.passes import read_generations

    shares = []
    for passed in sorted(folder.glob(f"**/{set_name}/seed-*.jsonl")):
        for row in read_generations(passed):
            words = reference_words(row["response"])
            if words:
                asked = set(reference_words(row["instruction"]))
                shares.append(sum(word in asked for word in words) / len(words))
    return tuple(shares)


def echo_share(folders: list[Path], set_name: str) -> float:
    """The mean over the answers of `folders` of the share of an answer's words that are words of its instruction."""
    shares = [share for folder in folders for share in answer_echoes(folder, set_name)]
    return sum(shares) / len(shares) if shares else math.nan


def echoes(args: argparse.Namespace, data: dict[str, Any]) -> str:
    """Per column and set: `echo_share` of its sampled answers, every pass of every run pooled; the teacher's too."""
    rows = [["", *SETS], ["---"] * (len(SETS) + 1)]
    columns = {**_columns(data), "teacher": ["evals/teacher"]}
    for label, paths in columns.items():
        cells = []
        for set_name in SETS:
            share = echo_share([args.out / path for path in paths], set_name)
            cells.append("—" if math.isnan(share) else f"{100 * share:.0f} %")
        rows.append([label, *cells])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def correlations(args: argparse.Namespace, runs: list[str]) -> str:
    """Per set, across the arms' runs (one value a run): Pearson's r of a run's ROUGE-L with its echo share and
    with its eval CE at the end."""
    found: dict[str, tuple[list[float], list[float], list[float]]] = {name: ([], [], []) for name in SETS}
    for run in runs:
        results = json.loads((args.out / run / "eval" / "results.json").read_text(encoding="utf-8"))
        eval_ce = _eval_ce(args.out / run)
        for set_name, (rouge, echo, ce) in found.items():
            score = ((results["sets"].get(set_name) or {}).get("sampling") or {}).get("metrics", {}).get("rougeL")
            if not score or eval_ce is None:
                continue
            rouge.append(float(score["mean"]))
            echo.append(echo_share([args.out / run], set_name))
            ce.append(eval_ce)
    cells = []
    for set_name, (rouge, echo, ce) in found.items():
        if len(rouge) >= 3:
            with_echo, with_ce = statistics.correlation(rouge, echo), statistics.correlation(rouge, ce)
            cells.append(f"{set_name} {with_echo:+.2f} with the echo share and {with_ce:+.2f} with eval CE")
    return (
        f"Across the {len(runs)} arms' runs, one value a run, Pearson's r of a run's ROUGE-L: "
        + "; ".join(cells)
        + ". Eval CE (on the starter eval split's reference answers) is lower for a better student, so a positive "
        "r with it means the runs that predict reference answers worse score higher on ROUGE-L."
    )


def side_by_side(args: argparse.Namespace, data: dict[str, Any]) -> str:
    """Per column: eval CE at the end (mean ± the t interval over training seeds), then per set ROUGE-L [95% CI]
    and the stop rate; the teacher and the two answers written without a model as rows."""
    sys.path.insert(0, str(REPO))
    from kdcli.compare.render import md_stars, seed_text
    from kdcli.compare.seeds import SeedTest
    from kdcli.compare.student_t import mean_ci
    from kdcli.evaluation.baselines import baseline_title

    tests = {t["run"]: SeedTest.from_dict(t) for t in data["training_tests"]}
    header = ["", "eval CE", f"eval CE Δ vs {data['baseline']}"]
    header += [*[f"{s} ROUGE-L" for s in SETS], *[f"{s} stop rate" for s in SETS]]
    rows = [header, ["---"] * len(header)]
    for label, paths in _columns(data).items():
        ces = [_eval_ce(args.out / p) for p in paths]
        ce = mean_ci([v for v in ces if v is not None])
        cells = [f"{ce.mean:.3f}" + (f" ± {ce.half_width:.3f}" if ce.half_width is not None else "")]
        tested = md_stars(seed_text(tests[label])) if label in tests else "—"
        cells.append("baseline" if label == data["baseline"] else tested)
        cells += [_metric(data, s, label, "rougeL", "{:.2f}") for s in SETS]
        cells += [_metric(data, s, label, "stop_rate", "{:.2f}") for s in SETS]
        rows.append([label, *cells])
    teacher = _results(args.out / "evals" / "teacher" / "results.json")
    rows.append(
        [
            "teacher",
            "—",
            "—",
            *[_plain(teacher, s, "rougeL") for s in SETS],
            *[_plain(teacher, s, "stop_rate") for s in SETS],
        ]
    )
    for name in ("frequent_words", "copy_prompt"):
        cells = [_baseline(teacher, s, name) for s in SETS]
        rows.append([baseline_title(name), "—", "—", *cells, *["—"] * len(SETS)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _columns(data: dict[str, Any]) -> dict[str, list[str]]:
    arms = data.get("arms") or {}
    return {label: arms.get(label, [path]) for label, path in zip(data["runs"], data["paths"], strict=True)}


def _eval_ce(run: Path) -> float | None:
    record = json.loads((run / "run.json").read_text(encoding="utf-8"))
    value = (record.get("eval_after") or {}).get("eval_ce")
    return float(value) if value is not None else None


def _metric(data: dict[str, Any], set_name: str, label: str, metric: str, fmt: str) -> str:
    from kdcli.evaluation.baselines import BAR, baseline_title

    for evaluation in data["evaluation"]:
        if evaluation["set"] != set_name or evaluation["mode"] != "sampling":
            continue
        row = next((r for r in evaluation["rows"] if r["metric"] == metric), None)
        cell = (row or {}).get("cells", {}).get(label)
        if not cell:
            return "—"
        text = fmt.format(cell["mean"])
        if cell.get("ci95"):
            text += f" [{fmt.format(cell['ci95'][0])}, {fmt.format(cell['ci95'][1])}]"
        return text + (" ▽" if baseline_title(BAR) in (cell.get("not_above") or []) else "")
    return "—"


def _results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _entry(results: dict[str, Any], set_name: str) -> dict[str, Any]:
    return ((results.get("sets") or {}).get(set_name) or {}).get("sampling") or {}


def _plain(results: dict[str, Any], set_name: str, metric: str) -> str:
    value = (_entry(results, set_name).get("metrics", {}).get(metric) or {}).get("mean")
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _baseline(results: dict[str, Any], set_name: str, name: str) -> str:
    baseline = (_entry(results, set_name).get("baselines") or {}).get(name)
    return "—" if not baseline else f"{baseline['metrics']['rougeL']:.2f}"


def curves(args: argparse.Namespace, runs: list[str]) -> Path:
    """The eval CE over steps: the starting student's point, then each arm's mean over its runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arm: dict[str, list[dict[int, float]]] = {}
    for run in runs:
        arm = run.split("/")[-1].split("-")[1]
        lines = [
            json.loads(x) for x in (args.out / run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if x
        ]
        by_arm.setdefault(arm, []).append({int(x["step"]): float(x["eval_ce"]) for x in lines if "eval_ce" in x})
    figure, axis = plt.subplots(figsize=(7, 4))
    for arm, per_run in by_arm.items():
        steps = sorted(set.intersection(*(set(c) for c in per_run)))
        axis.plot(steps, [sum(c[s] for c in per_run) / len(per_run) for s in steps], marker="o", label=arm)
    axis.set_xlabel("step")
    axis.set_ylabel("eval CE (nats), starter eval split")
    axis.legend()
    figure.tight_layout()
    path = args.out / CURVES
    figure.savefig(path, dpi=110)
    return path


def link_data(args: argparse.Namespace) -> None:
    link = args.out / "data"
    if link.is_symlink() and link.resolve() == args.data_dir:
        return
    if link.is_symlink():
        link.unlink()
    link.symlink_to(args.data_dir, target_is_directory=True)


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", type=Path, help="the folder holding alpaca-5k/, selfinst/, vicuna/ (every stage but report)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "study" / "v2", help="where the study's files go")
    parser.add_argument("--arms", default="fkl,rkl,akl,atkd", help="divergences, comma-separated")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="training seeds")
    parser.add_argument("--keep", type=int, default=15, help="teacher layers the student keeps (by loss)")
    parser.add_argument("--train-examples", type=int, default=2000, help="first N Alpaca examples")
    parser.add_argument("--warmup-steps", type=int, default=150, help="steps of the shared CE warm-up")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of every arm's run")
    parser.add_argument("--lr", type=float, default=1e-4, help="the arms' peak learning rate")
    parser.add_argument("--warmup-lr", type=float, default=5e-4, help="the warm-up's (the quickstart's) learning rate")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between eval CE points of the curves")
    parser.add_argument("--eval-seeds", default="1,2,3", help="sampling seeds of kd eval")
    parser.add_argument("--eval-examples", type=int, default=100, help="first N examples of each eval set (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="kd eval --max-new-tokens")
    parser.add_argument("--eval-batch-size", type=int, default=20, help="kd eval --batch-size")
    parser.add_argument("--teacher", help="another teacher.model (a smoke test on a tiny model)")
    parser.add_argument("--set", action="append", help="a recipe override for every run, as kd distill --set")
    parser.add_argument("--stage", choices=("all", "warmup", "train", "eval", "report"), default="all")
    parser.add_argument("--no-doc", action="store_true", help="print the results, do not write docs/replication.md")
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --stage report: re-render the results from the committed files and exit 1 where the doc differs "
        "(writes nothing, draws no curves)",
    )
    return parser


def main() -> None:
    parser = arguments()
    args = parser.parse_args()
    if args.check and args.stage != "report":
        parser.error("--check re-renders the results only: use it with --stage report")
    args.out = args.out.resolve()
    code = 0
    if args.stage != "report":  # the report reads the committed files alone: no data, no weights
        if args.data_dir is None:
            parser.error(f"--data-dir is needed by --stage {args.stage} (see ../shared/data/README.md)")
        args.data_dir = args.data_dir.resolve()
        missing = [
            p
            for p in ("alpaca-5k/train.jsonl", "selfinst/eval.jsonl", "vicuna/eval.jsonl")
            if not (args.data_dir / p).is_file()
        ]
        if missing:
            raise SystemExit(f"--data-dir {args.data_dir}: missing {', '.join(missing)} (see ../shared/data/README.md)")
        args.out.mkdir(parents=True, exist_ok=True)
        link_data(args)
        recipes(args)
        for stage, work in (("warmup", warmup), ("train", train), ("eval", evaluate)):
            if args.stage in ("all", stage):
                code = work(args) or code
                if code and args.stage == "all":
                    break
    if args.check:
        raise SystemExit(check(args))
    if args.stage in ("all", "report"):
        section = report(args)
        print(section)
        if not args.no_doc:
            from losses import write_section

            write_section(DOC, section)
            print(f"wrote the results into {DOC}")
    raise SystemExit(code)


def check(args: argparse.Namespace) -> int:
    """0 where the doc's results section is what the committed files render, else 1 and the lines that differ."""
    import difflib
    import re

    rendered = report(args, draw=False)
    heading, _, body = rendered.partition("\n")
    expected = f"{heading}\n\n{body.strip()}\n"
    found = re.search(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", DOC.read_text(encoding="utf-8"), re.S | re.M)
    written = found.group(0).rstrip("\n") + "\n" if found else ""
    if written == expected:
        print(f"{_shown(DOC)}: {heading} is what the committed files render", flush=True)
        return 0
    diff = difflib.unified_diff(written.splitlines(), expected.splitlines(), "in the doc", "rendered", lineterm="")
    print("\n".join(diff), flush=True)
    print(f"{_shown(DOC)}: {heading} differs from what the committed files render (above)", flush=True)
    return 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "bench"))
    main()
