"""Benchmark the teacher cache on the quickstart (built-in SmolLM2-135M teacher, CPU).

    python bench/cache.py                         # everything; writes the `## Teacher cache` section of the docs
    python bench/cache.py --max-steps 20          # shorter training runs (stated in the doc)
    python bench/cache.py --no-doc                # print only

Measures, each ratio within one process so that load on a shared machine hits both sides alike:
1. bytes per labelled position at K = 16, 64, 256 against dense fp16 (2·V bytes), on the same examples;
2. cache-writing time (forward + top-K + shard writes + manifest) against a bare teacher forward over the same
   batches; the bare forward is timed before and after the writer and averaged;
3. training tokens/s from the K = 64 cache against the online teacher, quickstart recipe;
4. final eval loss of both students, re-scored with the same dense online objective, paired per eval example
   (mean difference ± 2 standard errors).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.losses import write_section  # noqa: E402
from kdcli.cache import write_cache  # noqa: E402
from kdcli.data import Collator, load_examples  # noqa: E402
from kdcli.engine import distill  # noqa: E402
from kdcli.engine.loop import evaluate  # noqa: E402
from kdcli.engine.objective import Objective  # noqa: E402
from kdcli.engine.teachers import OnlineTeacher  # noqa: E402
from kdcli.hardware import Runtime  # noqa: E402
from kdcli.host import cpu_model  # noqa: E402
from kdcli.models import load_teacher, load_tokenizer  # noqa: E402
from kdcli.recipe import Recipe, load_recipe  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Teacher cache"


def recipe_with(base: list[str], *extra: str) -> Recipe:
    return load_recipe(QUICKSTART, [*base, *extra])


def bare_forward_seconds(recipe: Recipe, model: torch.nn.Module, tokenizer: Any) -> float:
    """The writer's batches (same examples, order, batch size, precision) through the teacher, nothing else."""
    examples = load_examples(recipe.data, tokenizer, "train")
    assert examples is not None
    collate, runtime, size = (
        Collator.for_tokenizer(tokenizer),
        Runtime.of(recipe.train.device, recipe.train.precision),
        recipe.cache.batch_size,
    )
    started = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(examples), size):
            batch = runtime.to_device(collate(examples[lo : lo + size]))
            with runtime.autocast():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return time.perf_counter() - started


def per_example_eval(
    recipe: Recipe, student_dir: Path, teacher: OnlineTeacher, tokenizer: Any
) -> list[tuple[float, int]]:
    """(dense eval loss, tokens) per eval example, with the online teacher: the same yardstick for both students."""
    from transformers import AutoModelForCausalLM

    runtime = teacher.runtime
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(runtime.device)
    examples = load_examples(recipe.data, tokenizer, "eval")
    assert examples is not None
    collate, objective = Collator.for_tokenizer(tokenizer), Objective(recipe.loss)
    out = []
    for example in examples:
        batch = runtime.to_device(collate([example]))
        scores = evaluate(student, teacher, [batch], objective, runtime, teacher.width)
        out.append((scores["eval_loss"], int(scores["eval_tokens"])))
    return out


def eval_noise(rows: list[tuple[float, int]]) -> float:
    """2 standard errors of a token-weighted eval loss over these examples: how far two equally good students'
    losses may differ by the luck of the eval set alone."""
    tokens = sum(t for _, t in rows)
    mean = sum(loss * t for loss, t in rows) / tokens
    variance = sum(t * t * (loss - mean) ** 2 for loss, t in rows) / tokens**2
    return 2 * variance**0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    work = Path(tempfile.gettempdir()) / "kd-bench-cache"
    parser.add_argument("--work", type=Path, default=work, help="caches and runs go here (default: %(default)s)")
    parser.add_argument("--subset", type=int, default=64, help="train examples for the size and writer timings")
    parser.add_argument("--max-steps", type=int, default=None, help="shorten the training runs")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--teacher", help="another teacher.model (a smoke test of this script on a tiny model)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="recipe override for every run, e.g. shorter data"
    )
    parser.add_argument("--from-json", type=Path, help="only render a saved result.json into the doc")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        saved["sizes"] = {int(k): v for k, v in saved["sizes"].items()}
        finish(saved, args)
        return
    started = time.perf_counter()
    work = args.work
    base = [f"output_dir={work / 'runs'}", "name=bench-{divergence}"]
    if args.max_steps:
        base.append(f"train.max_steps={args.max_steps}")
    if args.teacher:
        base.append(f"teacher.model={args.teacher}")
    base += args.overrides
    subset = [f"data.max_train_examples={args.subset}", "data.eval=null"]

    # 1. Bytes per position at K = 16, 64, 256 (same examples).
    sizes: dict[int, dict[str, Any]] = {}
    for k in (16, 64, 256):
        manifest = write_cache(recipe_with(base, *subset, f"cache.top_k={k}"), work / f"size-k{k}", overwrite=True)
        sizes[k] = manifest["stats"]
        print(f"K={k}: {sizes[k]['bytes_per_position']} bytes/position", flush=True)

    # 2. Writer against a bare forward over the same batches.
    small = recipe_with(base, *subset)
    tokenizer = load_tokenizer(small.teacher.model)
    runtime = Runtime.of(small.train.device, small.train.precision)
    model = load_teacher(small.teacher, runtime.inference_dtype).to(runtime.device)
    bare_forward_seconds(small, model, tokenizer)  # warm-up: first-call allocations and kernel selection
    bare = [bare_forward_seconds(small, model, tokenizer)]
    writer = write_cache(small, work / "writer-k64", overwrite=True)["stats"]
    bare.append(bare_forward_seconds(small, model, tokenizer))
    writer_s = writer["shard_seconds_this_run"]
    print(f"writer {writer_s:.1f} s vs bare forward {bare} s", flush=True)

    # 3 + 4. The quickstart, online and from the K = 64 cache.
    cache_dir = work / "quickstart-k64"
    online_recipe = recipe_with(base, "name=bench-online")
    cached_recipe = recipe_with(base, "name=bench-cached", f"teacher.cache={cache_dir}")
    full = write_cache(online_recipe, cache_dir, ("train", "eval"), overwrite=True)["stats"]
    print(f"quickstart cache: {full['positions']} positions, {full['wall_seconds']} s", flush=True)
    runs = {}
    for label, recipe in (("online", online_recipe), ("cached", cached_recipe)):
        runs[label] = distill(recipe, overwrite=True)
        print(f"{label}: {runs[label]['tokens_per_s']:.0f} tok/s, eval {runs[label]['eval_after']}", flush=True)
    teacher = OnlineTeacher(model, runtime, int(model.config.vocab_size), "teacher")
    scored = {
        label: per_example_eval(online_recipe, Path(runs[label]["run_dir"]) / "student", teacher, tokenizer)
        for label in runs
    }
    diffs = [c - o for (o, _), (c, _) in zip(scored["online"], scored["cached"], strict=True)]
    tokens = [t for _, t in scored["online"]]
    dense = {label: sum(loss * t for loss, t in rows) / sum(tokens) for label, rows in scored.items()}
    mean_diff = statistics.mean(diffs)
    two_se = 2 * statistics.stdev(diffs) / len(diffs) ** 0.5

    result = {
        "sizes": sizes,
        "writer_seconds": writer_s,
        "bare_seconds": bare,
        "quickstart_cache": full,
        "runs": {
            k: {key: v[key] for key in ("tokens_per_s", "steps", "train_seconds", "eval_after")}
            for k, v in runs.items()
        },
        "dense_eval_loss": dense,
        "paired_diff": [mean_diff, two_se],
        "eval_noise_2se": eval_noise(scored["online"]),
        "teacher": online_recipe.teacher.model,
        "precision": online_recipe.train.precision,
        "eval_examples": len(diffs),
        "cache_batch_size": small.cache.batch_size,
        "seconds": time.perf_counter() - started,
    }
    (work / "result.json").write_text(json.dumps(result, indent=2, default=str))
    finish(result, args)


def finish(result: dict[str, Any], args: argparse.Namespace) -> None:
    section = render(result, args)
    print(section)
    if not args.no_doc:
        write_section(DOC, section)


def render(r: dict[str, Any], args: argparse.Namespace) -> str:
    sizes, runs = r["sizes"], r["runs"]
    dense_bytes = sizes[64]["dense_fp16_bytes_per_position"]
    bare = statistics.mean(r["bare_seconds"])
    overhead = r["writer_seconds"] / bare - 1
    online, cached = runs["online"], runs["cached"]
    steps = f"`--max-steps {args.max_steps}`" if args.max_steps else "the full recipe (2 epochs)"
    command = " ".join(
        ["python bench/cache.py", f"--subset {args.subset}"]
        + ([f"--max-steps {args.max_steps}"] if args.max_steps else [])
        + [f"--set {o}" for o in args.overrides]
    )
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores shared with other jobs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Command: `{command}` "
        f"({r['seconds'] / 60:.0f} min, {time.strftime('%Y-%m-%d')}).",
        "",
        f"Teacher: `{r['teacher']}` (V = {dense_bytes // 2:,}), {r['precision']} on CPU, quickstart data "
        f"(`builtin:starter`, max_length 256). Sizes and writer timing on the first {args.subset} training examples.",
        "",
        "**Bytes per labelled position** (all shard bytes, input ids and masks of prompt tokens included, divided by "
        "the positions that carry a teacher record) against the dense fp16 distribution, 2·V bytes:",
        "",
        "| K | bytes / position | dense fp16 | fraction of dense | mean top-K teacher mass |",
        "|---|---|---|---|---|",
    ]
    for k, stats in sizes.items():
        lines.append(
            f"| {k} | {stats['bytes_per_position']:.1f} | {dense_bytes:,} | {stats['fraction_of_dense']:.3%} | "
            f"{stats['topk_mass_mean']:.4f} |"
        )
    lines += [
        "",
        f"Target (K = 64 at most 300 bytes): {'met' if sizes[64]['bytes_per_position'] <= 300 else 'missed'}.",
        "",
        "**Cache writing against a bare teacher forward** over the same batches (batch size "
        f"{r['cache_batch_size']}, {r['precision']}): writer {r['writer_seconds']:.1f} s (forward, top-K over the "
        "labelled positions, "
        f"shard writes with fsync, manifest) vs bare forward {bare:.1f} s (mean of "
        f"{', '.join(f'{s:.1f}' for s in r['bare_seconds'])} s, timed before and after the writer): "
        f"**{overhead:+.1%} overhead**. Target ≤ 15%: {'met' if overhead <= 0.15 else 'missed'}.",
        "",
        f"**Training from the cache** (quickstart, {steps}, K = 64 cache of train and eval, "
        f"{r['quickstart_cache']['bytes'] / 1e6:.1f} MB written in {r['quickstart_cache']['wall_seconds']:.0f} s):",
        "",
        "| teacher | steps | train s | tokens/s | eval loss (own objective) | eval loss (dense, online teacher) |",
        "|---|---|---|---|---|---|",
    ]
    for label, run in (("online", online), ("K = 64 cache", cached)):
        key = "online" if label == "online" else "cached"
        lines.append(
            f"| {label} | {run['steps']} | {run['train_seconds']:.0f} | {run['tokens_per_s']:.0f} | "
            f"{run['eval_after']['eval_loss']:.4f} | {r['dense_eval_loss'][key]:.4f} |"
        )
    diff, two_se = r["paired_diff"]
    lines += [
        "",
        f"Training tokens/s, cache / online: **{cached['tokens_per_s'] / online['tokens_per_s']:.2f}×** (the two runs "
        "ran one after the other in one process).",
        "",
        "The cached run's own eval loss uses the coarsened (top-K + label + tail) divergence, which is smaller than "
        "the dense one by construction; the last column re-scores both final students with the same dense objective "
        f"and the online teacher. Per eval example, cached − online averages {diff:+.4f} (paired over the "
        f"{r['eval_examples']} examples; 2 standard errors ±{two_se:.4f}), and the eval loss itself is only known to "
        f"±{r['eval_noise_2se']:.4f} "
        f"(2 standard errors over the eval examples): "
        f"**{'the same within noise' if abs(diff) <= r['eval_noise_2se'] else 'different beyond the eval noise'}**.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
