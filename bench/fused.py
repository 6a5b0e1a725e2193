"""Benchmark the fused head: peak memory and time of whole training steps, fused against plain logits, in one run.

    python bench/fused.py                          # built-in teacher and student, 8 x 1024 tokens, 3 steps a variant
    python bench/fused.py --seq 512 --steps 4 --divergence akl
    python bench/fused.py --teacher /path/to/tiny  # a smoke test of the script on a tiny model
    python bench/fused.py --no-doc                 # print only

A step is the training step of `kd distill` (`Session.step`: the teacher's forward, the student's forward and
backward with the objective, clipping and the AdamW update), on the quickstart recipe's models (built-in
SmolLM2-135M-Instruct teacher, its every-other-layer student, `precision: auto`) and random full-length sequences
(the first eighth of each masked as its prompt). Three variants, each in a process of its own so that its peak
resident memory (ru_maxrss of that child, from `os.wait4`) is measured from outside and nothing of one variant is
left in the next:

- `plain`: `loss.fused: false`, the whole [B·T, V] logits (the reference path);
- `fused`: `loss.fused: true`;
- `no head`: the same models and step with the loss on the hidden states instead of the logits (no output layer,
  no logits): what every variant shares. A variant's peak minus this one's is its logits part.

Variants run in the order plain, fused, no head, `--rounds` times; step times are medians over the steps after each
process's first (warm-up). `kd plan`'s figures for the same shapes are printed alongside. Writes the `## Fused head`
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.losses import write_section  # noqa: E402
from kdcli.host import cpu_model  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Fused head"
VARIANTS = ("plain", "fused", "no head")


def recipe_for(args: argparse.Namespace, variant: str) -> Any:
    from kdcli.recipe import load_recipe

    sets = [
        "data.eval=null",
        f"data.max_length={args.seq}",
        f"train.batch_size={args.batch}",
        f"train.max_steps={args.steps}",
        f"loss.divergence={args.divergence}",
        f"loss.fused={'true' if variant == 'fused' else 'false'}",
    ]
    if args.teacher:
        sets.append(f"teacher.model={args.teacher}")
    return load_recipe(QUICKSTART, sets + list(args.set or []))


def synthetic_batches(args: argparse.Namespace, vocab: int, seed: int) -> Any:
    """Full-length random sequences; labels are the next tokens, the first eighth masked as a prompt."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
        labels = torch.full_like(ids, -100)
        labels[:, args.seq // 8 : -1] = ids[:, args.seq // 8 + 1 :]
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def child(args: argparse.Namespace) -> None:
    """One variant in this process: print its step times and losses as JSON."""
    from kdcli.engine.distributed import world_from_env
    from kdcli.engine.loop import Session
    from kdcli.engine.observer import SilentObserver
    from kdcli.engine.setup import prepare, runtime_for, seed_everything
    from kdcli.engine.state import TrainingState

    variant = args.child
    recipe = recipe_for(args, variant)
    seed_everything(recipe.seed)
    world = world_from_env()
    runtime = runtime_for(recipe, world, None)
    parts = prepare(recipe, runtime, SilentObserver())
    session = Session.start(recipe, parts, runtime, world, None)
    if variant == "no head":
        session.forward = _hidden_only(session)  # type: ignore[method-assign]
    batches = synthetic_batches(args, parts.width, seed=0)
    state = TrainingState()
    steps = []
    session.backend.model.train()
    for _ in range(args.steps):
        started = time.perf_counter()
        record, _, tokens, _ = session.step(batches, False, state)
        state.step += 1
        steps.append({"seconds": time.perf_counter() - started, "loss": record["loss"], "tokens": tokens})
    print("RESULT " + json.dumps({"variant": variant, "steps": steps, "fused_head": session.heads.student is not None}))


def _hidden_only(session: Any) -> Any:
    """A forward that stops before the output layers: both models' decoders, a loss on the student's hidden states."""
    import torch

    from kdcli.engine.objective import ObjectiveTerms
    from kdcli.models import fused_head

    student_head, teacher_head = fused_head(session.parts.student), fused_head(session.parts.teacher.model)
    runtime = session.runtime

    def forward(batch: dict[str, Any], num_valid: int | None = None, *, with_ce: bool = True) -> ObjectiveTerms:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad(), runtime.autocast():
            teacher_head.decoder(**inputs)
        with runtime.autocast():
            hidden = student_head.decoder(**inputs).last_hidden_state
        loss = hidden.float().square().mean()
        return ObjectiveTerms(total=loss, ce=loss.detach(), kd=torch.zeros(()), stats={})

    return forward


def run_variant(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", variant, *_passthrough(args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"variant {variant!r} failed (status {status}); rerun with --child {variant!r} to see why")
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["peak_rss"] = usage.ru_maxrss * 1024  # KiB on Linux
    return result


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    out += ["--divergence", args.divergence]
    if args.teacher:
        out += ["--teacher", args.teacher]
    for item in args.set or []:
        out += ["--set", item]
    return out


def planned(args: argparse.Namespace) -> dict[str, int]:
    """`kd plan`'s logits part of the plain engine for these shapes, plain and fused."""
    from kdcli.plan import plan_recipe

    out = {}
    for variant in ("plain", "fused"):
        plan = plan_recipe(recipe_for(args, variant), world_size=1, device="cpu", memory=None)
        out[variant] = plan.rows[0].logits.total_chunked
        out[f"{variant}_total"] = plan.rows[0].total
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        timed = [s for r in runs for s in r["steps"][1:]] or [s for r in runs for s in r["steps"]]
        out[variant] = {
            "peak_rss": max(r["peak_rss"] for r in runs),
            "step_s": statistics.median(s["seconds"] for s in timed),
            "tokens_per_s": statistics.median(s["tokens"] / s["seconds"] for s in timed),
            "losses": runs[0]["steps"],
            "fused_head": runs[0]["fused_head"],
        }
    return out


def render(summary: dict[str, dict[str, Any]], plan: dict[str, int], args: argparse.Namespace) -> str:
    import torch

    mib = 2**20
    base = summary["no head"]["peak_rss"]
    plain, fused = summary["plain"], summary["fused"]
    part = {v: summary[v]["peak_rss"] - base for v in ("plain", "fused")}
    command = " ".join(["python bench/fused.py", *sys.argv[1:]])
    recipe = recipe_for(args, "plain")
    layers = recipe.student.layers  # as the recipe writes it: every-other, or {keep: N, by: loss}
    layers_shown = f"{{keep: {layers.keep}, by: {layers.by}}}" if hasattr(layers, "keep") else str(layers)
    lines = [
        SECTION,
        "",
        f"`{command}` on {cpu_model()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}. Teacher `{recipe.teacher.model}`, student `init: {recipe.student.init}` "
        f"(`layers: {layers_shown}`), divergence {args.divergence}, kd_ratio {recipe.loss.kd_ratio}, "
        f"precision {recipe.train.precision}, micro-batch {args.batch} × {args.seq} tokens of random ids (the first "
        f"eighth masked), {args.steps} whole training steps a process (teacher forward, student forward and backward, "
        f"AdamW), {args.rounds} round(s); step time: median after each process's first step. Peak RSS of each "
        "variant's process from outside (`os.wait4`); the logits part is a variant's peak minus that of the same step "
        "with the loss on the hidden states (no output layer, no logits).",
        "",
        "| | plain logits | fused head | fused / plain | target |",
        "|---|---|---|---|---|",
        f"| logits part, measured | {part['plain'] / mib:,.0f} MiB | {part['fused'] / mib:,.0f} MiB | "
        f"{part['fused'] / max(1, part['plain']):.3f} | ≤ 0.1 |",
        f"| logits part, `kd plan` | {plan['plain'] / mib:,.0f} MiB | {plan['fused'] / mib:,.0f} MiB | "
        f"{plan['fused'] / plan['plain']:.3f} | ≤ 0.1 |",
        f"| whole-step peak RSS | {plain['peak_rss'] / mib:,.0f} MiB | {fused['peak_rss'] / mib:,.0f} MiB | "
        f"{fused['peak_rss'] / plain['peak_rss']:.3f} | ≤ 0.65 |",
        f"| step time | {plain['step_s']:.2f} s | {fused['step_s']:.2f} s | {fused['step_s'] / plain['step_s']:.3f} | "
        "≤ 1.0 |",
        f"| tokens/s | {plain['tokens_per_s']:,.0f} | {fused['tokens_per_s']:,.0f} | "
        f"{fused['tokens_per_s'] / plain['tokens_per_s']:.3f} | |",
        "",
        f"The same step with no output layer at all peaks at {base / mib:,.0f} MiB ({summary['no head']['step_s']:.2f} "
        f"s). `kd plan` puts the whole plain-engine step at {plan['plain_total'] / mib:,.0f} MiB plain and "
        f"{plan['fused_total'] / mib:,.0f} MiB fused (an upper bound: every part counted alive at once). Losses of "
        "the steps, plain vs fused: "
        + ", ".join(
            f"{a['loss']:.5f} / {b['loss']:.5f}" for a, b in zip(plain["losses"], fused["losses"], strict=False)
        )
        + f" (precision {recipe.train.precision}: the products round alike in both; tests/test_fused_training.py "
        "holds fp32 runs to 1e-5).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="training steps per process (the first is a warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="processes per variant, interleaved")
    parser.add_argument("--divergence", default="fkl", help="loss.divergence")
    parser.add_argument("--teacher", help="another teacher.model (a smoke test of this script on a tiny model)")
    parser.add_argument("--set", action="append", help="a recipe override, as kd distill --set")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    results = [run_variant(args, variant) for _ in range(args.rounds) for variant in VARIANTS]
    summary = summarise(results)
    if not summary["fused"]["fused_head"]:
        raise SystemExit("the fused variant ran without the fused head: nothing to compare")
    section = render(summary, planned(args), args)
    print(section)
    if not args.no_doc:
        write_section(DOC, section)
        print(f"wrote section '{SECTION}' of {DOC}")


if __name__ == "__main__":
    main()
