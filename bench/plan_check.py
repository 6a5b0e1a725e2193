"""Check `kd plan` against the measured peak memory of a few quickstart steps on CPU.

    python bench/plan_check.py                      # 3 steps of recipes/quickstart.yaml, writes docs/benchmarks.md
    python bench/plan_check.py --steps 2 --no-docs --set train.batch_size=4
    python bench/plan_check.py --measured m.json   # re-render a measurement: {"baseline": bytes, "peak": bytes}

The training runs in a fresh subprocess (kd's own CLI, in-process there) that reports its peak RSS (VmHWM) and its
RSS after importing torch, transformers and kd, before anything loads: the "runtime" baseline that the plan does not
model. The built-in teacher is converted first in a separate process, so the one-off GGUF conversion is not in the
peak. The comparison is planned total (kd's engine row) vs measured peak − runtime; the plan is meant as an upper
bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

if TYPE_CHECKING:
    from kdcli.recipe import Recipe

SECTION = "kd plan vs measured (CPU)"


def worker(cli_args: list[str]) -> None:
    """Run `kd CLI_ARGS` in this process and print one JSON line with the memory figures."""
    import torch  # noqa: F401  (imported before the baseline: the runtime every kd process pays)
    import transformers  # noqa: F401

    import kdcli.engine  # noqa: F401
    from kdcli.cli import app
    from kdcli.host import process_memory

    baseline = process_memory("VmRSS") or 0
    started = time.time()
    try:
        app(cli_args, standalone_mode=False)
        rc = 0
    except SystemExit as err:  # typer.Exit inside the command
        rc = int(err.code or 0)
    peak = process_memory("VmHWM") or 0
    print(json.dumps({"baseline": baseline, "peak": peak, "rc": rc, "s": time.time() - started}))


def batch_lengths(recipe: Recipe, steps: int) -> list[int]:
    """T of the first training micro-batches, rebuilt as kd does (same tokenizer, data, seeded order, padding to
    the longest example): the plan's max_length is only their upper bound."""
    from kdcli.data import Collator, build_examples, load_rows, micro_batches
    from kdcli.models import load_tokenizer

    tokenizer = load_tokenizer(recipe.teacher.model)
    examples = build_examples(
        load_rows(recipe.data.train, "train", "data.train"), tokenizer, recipe.data, "train", "data.train"
    )
    batches = micro_batches(examples, Collator(tokenizer.pad_token_id), recipe.train.batch_size, recipe.seed)
    return [int(next(batches)["input_ids"].shape[1]) for _ in range(steps * recipe.train.grad_accum)]


def measure(recipe: str, sets: list[str], out_dir: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(  # convert the built-in teacher outside the measured process (no-op when already converted)
        [sys.executable, "-c", "from kdcli.models import builtin_model_dir as d; d('builtin:smollm2-135m-instruct')"],
        check=True,
        env=env,
        cwd=REPO,
    )
    args = ["distill", recipe, *[x for s in sets for x in ("--set", s)], "--set", f"output_dir={out_dir}"]
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", "--", *args], env=env, cwd=REPO, capture_output=True, text=True
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the measured run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    result = json.loads(lines[-1])
    # Cross-check: the kernel's own maximum over waited-for children (KiB on Linux).
    result["ru_maxrss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe overrides")
    ap.add_argument("--with-eval", action="store_true", help="keep the eval passes (slower; training is the peak)")
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument(
        "--measured",
        type=Path,
        help="reuse a measurement: a JSON file with the worker's baseline and peak (bytes) instead of training",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker([a for a in args.rest if a != "--"])
        return

    from bench.losses import machine, write_docs
    from kdcli.plan import build_plan, format_bytes, plan_recipe
    from kdcli.recipe import load_recipe

    sets = [f"train.max_steps={args.steps}", "name=plan-check", *args.sets]
    if not args.with_eval:
        sets.append("data.eval=null")
    recipe = load_recipe(REPO / args.recipe, sets)
    plan = plan_recipe(recipe, world_size=1, device="cpu")
    row = plan.rows[0]
    t0 = time.time()
    if args.measured:
        m = json.loads(args.measured.read_text(encoding="utf-8"))
    else:
        with tempfile.TemporaryDirectory(prefix="kd-plan-check-") as tmp:
            m = measure(args.recipe, sets, tmp)
    used = m["peak"] - m["baseline"]
    s_len = plan.settings.seq_len
    parts = [
        ("student params + bf16 autocast copy", row.states.params),
        ("student grads", row.states.grads),
        ("AdamW states", row.states.optimizer),
        ("student activations", row.activations),
        ("teacher weights + activations", row.teacher.weights + row.teacher.activations),
        ("logits, CE and loss workspace (kd)", row.logits.total_chunked),
        ("**planned total (kd engine)**", row.total),
        ("planned total with a naive loss", row.total_naive),
        ("measured: runtime (RSS after imports)", m["baseline"]),
        ("measured: peak RSS (VmHWM)", m["peak"]),
        ("**measured: peak − runtime**", used),
    ]
    # The same plan at the length the batches really had (the bound above assumes max_length everywhere).
    seq = max(batch_lengths(recipe, args.steps))
    real = build_plan(plan.teacher, plan.student, replace(plan.settings, seq_len=seq)).rows[0]
    parts.insert(8, (f"planned total at the longest batch seen (T = {seq})", real.total))
    table = "| | MiB |\n|---|---:|\n" + "\n".join(f"| {name} | {n / 2**20:,.0f} |" for name, n in parts)
    ratio, ratio_real = row.total / used, real.total / used
    print(table)
    children = format_bytes(m.get("ru_maxrss_children", 0))
    print(f"planned / measured = {ratio:.2f} at max_length, {ratio_real:.2f} at T = {seq} (maxrss {children})")
    if args.no_docs:
        return
    s = plan.settings
    body = "\n".join(
        [
            f"Machine: {machine('cpu')}.",
            f"Command: `python bench/plan_check.py {' '.join(sys.argv[1:])}`".rstrip() + f" ({time.time() - t0:.0f} s, "
            f"{time.strftime('%Y-%m-%d')}): `kd distill {args.recipe}` with `{' '.join(sets)}`, in a fresh process.",
            "",
            f"Teacher {plan.teacher.params / 1e6:.1f}M, student {plan.student.params / 1e6:.1f}M params; micro-batch "
            f"{s.batch_size} × max_length {s.seq_len}, {s.precision}, {s.divergence}. The plan assumes every batch is "
            "max_length long and every part alive at once; batches are padded only to their longest example, so it "
            "is an upper bound. Runtime = RSS after importing torch, transformers and kd (not modelled by the plan).",
            "",
            table,
            "",
            f"Planned / measured (peak − runtime) = **{ratio:.2f}** at max_length {s_len}, **{ratio_real:.2f}** at "
            f"the longest batch the run saw (T = {seq}).",
        ]
    )
    write_docs(args.docs, SECTION, body)
    print(f"wrote section '{SECTION}' of {args.docs}")


if __name__ == "__main__":
    main()
