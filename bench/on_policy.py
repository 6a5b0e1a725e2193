"""Benchmark on-policy training: step time at on_policy.ratio 0, 0.5 and 1, the share spent sampling, and the
sampler's tokens/s against a bare `generate` call of the same model.

    python bench/on_policy.py                               # the quickstart's models, 2 x 5 steps a ratio
    python bench/on_policy.py --steps 20 --max-new-tokens 128
    python bench/on_policy.py --teacher /path/to/tiny       # a smoke test of the script on a tiny model
    python bench/on_policy.py --no-doc                      # print only
    python bench/on_policy.py --eval-run 20                 # eval loss after 20 steps at ratio 0 and 0.5

`--eval-run N` trains the quickstart recipe with its eval split for N steps at each of `--ratios` (default here
0 and 0.5), one after the other, and reports the eval loss, CE and KD before and after: whether on-policy batches
help the student on the data's responses at this length. It writes its own section, `## On-policy training: eval
loss`, and skips the speed runs.

Each ratio trains the quickstart recipe (no eval set) for `--steps` steps in this process, `--rounds` times with
the ratios interleaved (0, 0.5, 1, 0, 0.5, 1, ...), so that load from other processes falls on all of them; the
first step of each run is a warm-up and is left out, and step times are medians over the rest. Then, with the
ratio-1 run's student, the same prompts (the first training micro-batches) are sampled by kd's sampler
(`TransformersSampler`, what training calls) and by a bare `model.generate` with the same settings and seeds,
alternating, `--repeats` times each: both generate the same tokens, so their tokens/s compare the machinery
around `generate`, not luck. Writes the `## On-policy training` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
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
from kdcli.data import Collator, micro_batches  # noqa: E402
from kdcli.engine import distill  # noqa: E402
from kdcli.engine.on_policy import TransformersSampler, prompts_of  # noqa: E402
from kdcli.hardware import Runtime  # noqa: E402
from kdcli.host import cpu_model  # noqa: E402
from kdcli.models import GenerationSettings, load_tokenizer  # noqa: E402
from kdcli.models.generation import batch_seed, eos_ids  # noqa: E402
from kdcli.recipe import Recipe, load_recipe  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## On-policy training"
EVAL_SECTION = "## On-policy training: eval loss"


def recipe_for(args: argparse.Namespace, ratio: float, out: Path, *, with_eval: bool = False) -> Recipe:
    sets = [
        f"name=bench-on-policy-{ratio:g}",
        f"output_dir={out}",
        *([] if with_eval else ["data.eval=null"]),
        f"train.max_steps={args.steps}",
        f"on_policy.ratio={ratio}",
        f"on_policy.max_new_tokens={args.max_new_tokens}",
    ]
    if args.teacher:
        sets.append(f"teacher.model={args.teacher}")
    return load_recipe(QUICKSTART, sets + list(args.set or []))


def train(args: argparse.Namespace, ratio: float, out: Path) -> dict[str, Any]:
    """One run: per timed step (the first is the warm-up), its seconds, seconds sampling and tokens sampled."""
    recipe = recipe_for(args, ratio, out)
    distill(recipe, overwrite=True)
    rows = [json.loads(line) for line in (out / recipe.name / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    steps = [(b["elapsed_s"] - a["elapsed_s"], b["gen_s"], b["gen_tokens"]) for a, b in itertools.pairwise(rows)]
    return {"ratio": ratio, "steps": steps, "student": out / recipe.name / "student", "recipe": recipe}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one ratio together: median step time, and the sampling share and rate of the median steps."""
    steps = [step for run in runs for step in run["steps"]]
    seconds, gen_s, gen_tokens = (sum(s[i] for s in steps) for i in range(3))
    return {
        **runs[-1],
        "step_s": statistics.median(s[0] for s in steps),
        "gen_share": statistics.median(s[1] / s[0] for s in steps),
        "gen_tokens_per_step": gen_tokens / len(steps),
        "gen_tokens_per_s": gen_tokens / gen_s if gen_s else None,
        "timed_steps": len(steps),
        "total_s": seconds,
    }


def bare_generate(model: Any, tokenizer: Any, prompts: list[list[int]], settings: GenerationSettings, seed: int) -> int:
    """`model.generate` as a user would call it: left-padded prompts, the same config and seed; new tokens up to and
    including the first stop token."""
    stops = eos_ids(model, tokenizer)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[stops[0]] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(batch_seed(seed, 0))
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=settings.max_new_tokens,
            do_sample=True,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            eos_token_id=stops,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0],
        )
    tokens = 0
    for row in out[:, width:].tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), None)
        tokens += len(row) if cut is None else cut + 1
    return tokens


def sampler_against_bare(args: argparse.Namespace, run: dict[str, Any]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    recipe: Recipe = run["recipe"]
    tokenizer = load_tokenizer(str(run["student"]))
    model = AutoModelForCausalLM.from_pretrained(run["student"], dtype=torch.float32).eval()
    runtime = Runtime.of("cpu", "fp32")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, precision="fp32")
    sampler = TransformersSampler(tokenizer, settings, runtime, zero3=False)
    from kdcli.data import load_examples

    examples = load_examples(recipe.data, tokenizer, "train")
    assert examples is not None
    stream = micro_batches(examples, Collator.for_tokenizer(tokenizer), recipe.train.batch_size, recipe.seed)
    batches = [prompts_of(next(stream)) for _ in range(args.batches)]
    kd_s = bare_s = 0.0
    kd_tokens = bare_tokens = 0
    for repeat in range(args.repeats):
        for index, prompts in enumerate(batches):
            seed = repeat * 1000 + index
            started = time.perf_counter()
            kd_tokens += sum(len(s.response) for s in sampler.sample(model, prompts, seed))
            kd_s += time.perf_counter() - started
            started = time.perf_counter()
            bare_tokens += bare_generate(model, tokenizer, prompts, settings, seed)
            bare_s += time.perf_counter() - started
    return {
        "kd_tokens_per_s": kd_tokens / kd_s,
        "bare_tokens_per_s": bare_tokens / bare_s,
        "same_tokens": float(kd_tokens == bare_tokens),
    }


def render(runs: list[dict[str, Any]], versus: dict[str, float], args: argparse.Namespace) -> str:
    recipe: Recipe = runs[0]["recipe"]
    command = " ".join(["python bench/on_policy.py", *sys.argv[1:]])
    machine = cpu_model()
    lines = [
        SECTION,
        "",
        f"`{command}` on {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}. Teacher "
        f"`{recipe.teacher.model}`, student `init: {recipe.student.init}`, micro-batch {recipe.train.batch_size} × "
        f"≤ {recipe.data.max_length} tokens, precision {recipe.train.precision}, `max_new_tokens` "
        f"{args.max_new_tokens}; {args.rounds} runs of {args.steps} steps a ratio, interleaved, the first step of each "
        "left out (warm-up); step time and share are medians over steps. Load average (1 min) at the start and end: "
        f"{args.load[0]:.1f} and {args.load[1]:.1f} on {os.cpu_count()} cores; above the core count other jobs "
        "shared the machine, and the seconds (and the kd/bare ratio) are noise-bound.",
        "",
        "| on_policy.ratio | step time (s) | × ratio 0 | share sampling | tokens sampled / step | sampling tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    base = runs[0]["step_s"]
    for run in runs:
        tps = run["gen_tokens_per_s"]
        lines.append(
            f"| {run['ratio']:g} | {run['step_s']:.2f} | {run['step_s'] / base:.2f} | {run['gen_share']:.0%} | "
            f"{run['gen_tokens_per_step']:.0f} | {'-' if tps is None else f'{tps:.0f}'} |"
        )
    ratio = versus["kd_tokens_per_s"] / versus["bare_tokens_per_s"]
    lines += [
        "",
        f"kd's sampler against a bare `generate` on the same {args.batches} micro-batches of prompts, same seeds "
        f"({'the same' if versus['same_tokens'] else 'different'} tokens), {args.repeats} rounds, fp32: "
        f"{versus['kd_tokens_per_s']:.0f} against {versus['bare_tokens_per_s']:.0f} tokens/s ({ratio:.0%}; the "
        "target is within 10 %).",
        "",
        "Eval loss with and without on-policy batches: the next section (`--eval-run`). Not measured: GPU numbers.",
    ]
    return "\n".join(lines) + "\n"


def eval_run(args: argparse.Namespace, ratio: float, out: Path) -> dict[str, Any]:
    """One run with the quickstart's eval split: its eval scores before and after, and its seconds."""
    recipe = recipe_for(args, ratio, out, with_eval=True)
    record = distill(recipe, overwrite=True)
    return {
        "ratio": ratio,
        "before": record["eval_before"],
        "after": record["eval_after"],
        "train_s": record["train_seconds"],
        "gen_tokens": record["gen_tokens"],
        "recipe": recipe,
    }


def render_eval(runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    recipe: Recipe = runs[0]["recipe"]
    command = " ".join(["python bench/on_policy.py", *sys.argv[1:]])
    lines = [
        EVAL_SECTION,
        "",
        f"`{command}`, {torch.get_num_threads()} threads, torch {torch.__version__}: the quickstart recipe "
        f"(teacher `{recipe.teacher.model}`, `divergence: {recipe.loss.divergence}`, `kd_ratio` "
        f"{recipe.loss.kd_ratio}, precision {recipe.train.precision}) for {args.steps} steps of batch "
        f"{recipe.train.batch_size}, `max_new_tokens` {args.max_new_tokens}, scored on its eval split "
        f"({recipe.data.eval}) by the same objective on the data's responses. One run a ratio, seed {recipe.seed}.",
        "",
        "| on_policy.ratio | eval loss before → after | eval CE after | eval KD after | tokens sampled | train time |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        before, after = run["before"], run["after"]
        lines.append(
            f"| {run['ratio']:g} | {before['eval_loss']:.4f} → {after['eval_loss']:.4f} | {after['eval_ce']:.4f} | "
            f"{after['eval_kd']:.4f} | {run['gen_tokens']:,} | {run['train_s']:.0f} s |"
        )
    base = runs[0]["after"]["eval_loss"]
    deltas = ", ".join(f"ratio {r['ratio']:g}: {r['after']['eval_loss'] - base:+.4f}" for r in runs[1:])
    lines += [
        "",
        f"Eval loss after training, against ratio {runs[0]['ratio']:g}: {deltas}. One seed each: a difference "
        "smaller than the seed-to-seed spread (not measured here) says nothing either way. The eval set holds the "
        "data's responses, which on-policy batches do not train on (their CE term is dropped, docs/on-policy.md), "
        "so this measures transfer to fixed responses, not the generation quality GKD reports.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="training steps per run (the first is a warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per ratio, interleaved with the other ratios")
    parser.add_argument("--ratios", help="comma list of on_policy.ratio values (default 0,0.5,1; --eval-run: 0,0.5)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="on_policy.max_new_tokens")
    parser.add_argument("--batches", type=int, default=2, help="micro-batches of prompts for the bare comparison")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the bare comparison")
    parser.add_argument("--teacher", help="another teacher.model (a smoke test of this script on a tiny model)")
    parser.add_argument("--set", action="append", help="a recipe override, as kd distill --set")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--eval-run", type=int, metavar="STEPS", help="only the eval-loss runs, of STEPS steps each")
    args = parser.parse_args()
    if args.eval_run:
        args.steps = args.eval_run
        ratios = [float(r) for r in (args.ratios or "0,0.5").split(",")]
        with tempfile.TemporaryDirectory(prefix="kd-bench-on-policy-") as work:
            runs = [eval_run(args, ratio, Path(work)) for ratio in ratios]
        section = render_eval(runs, args)
        print(section)
        if not args.no_doc:
            write_section(DOC, section)
            print(f"wrote section '{EVAL_SECTION}' of {DOC}")
        return
    started_load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kd-bench-on-policy-") as work:
        ratios = [float(r) for r in (args.ratios or "0,0.5,1").split(",")]
        rounds = [[train(args, ratio, Path(work)) for ratio in ratios] for _ in range(args.rounds)]
        runs = [summarise([round_[i] for round_ in rounds]) for i in range(len(ratios))]
        last = next((r for r in runs if r["ratio"] == max(x["ratio"] for x in runs)), runs[-1])
        versus = sampler_against_bare(args, last)
    args.load = (started_load, os.getloadavg()[0])
    section = render(runs, versus, args)
    print(section)
    if not args.no_doc:
        write_section(DOC, section)
        print(f"wrote section '{SECTION}' of {DOC}")


if __name__ == "__main__":
    main()
