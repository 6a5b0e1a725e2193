"""Benchmark LoRA students against full fine-tuning: peak memory, step time and the eval loss both reach.

    python bench/lora.py                          # the quickstart, 20 steps each; writes `## LoRA students` of the docs
    python bench/lora.py --steps 40 --max-length 256
    python bench/lora.py --no-doc                 # print only

Each run is `kd distill` in its own process under `/usr/bin/time -v`, so the peak RSS is measured from outside
(the kernel's high-water mark of the whole process: Python, torch, both models, activations, optimizer states).
Step time is run.json's training seconds over the steps (the first step included); the eval loss is the run's own
final eval (`eval_after`), on the same eval examples, after the same number of steps. LoRA uses a 10x higher
learning rate by default, the usual practice (adapters start at zero and have far fewer parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from losses import machine, write_docs  # noqa: E402

QUICKSTART = REPO / "recipes" / "quickstart.yaml"
SECTION = "LoRA students"
TIME = "/usr/bin/time"


def run(recipe: dict[str, Any], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [TIME, "-v", sys.executable, "-m", "kdcli", "distill", str(path), "--overwrite"]
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kd distill failed:\n{done.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    record = json.loads((Path(recipe["output_dir"]) / recipe["name"] / "run.json").read_text(encoding="utf-8"))
    return {
        "peak_rss_mib": peak_kib / 1024,
        "step_s": record["train_seconds"] / record["steps"],
        "eval_before": (record["eval_before"] or {}).get("eval_loss"),
        "eval_after": (record["eval_after"] or {}).get("eval_loss"),
        "student": record["parameters"]["student"],
        "trainable": record["parameters"]["student_trainable"],
        "steps": record["steps"],
    }


def render(full: dict[str, Any], lora: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"`python bench/lora.py --steps {args.steps} --max-length {args.max_length}` on {machine('cpu')}: the "
        f"quickstart recipe (built-in SmolLM2-135M teacher, every-other-layer student, `precision: auto`), "
        f"{args.steps} steps of batch {args.batch_size}, {args.eval_examples} eval examples. LoRA: r {args.r}, "
        f"alpha {2 * args.r}, on {', '.join(args.targets)}, lr {args.lora_lr:g} (full: {args.lr:g}). Peak RSS of "
        "the whole `kd distill` process, measured from outside with `/usr/bin/time -v`.",
        "",
        "| student | trainable params | peak RSS | step time | eval loss before → after |",
        "|---|---|---|---|---|",
    ]
    for label, r in (("full fine-tuning", full), ("LoRA", lora)):
        lines.append(
            f"| {label} | {r['trainable'] / 1e6:,.2f}M of {r['student'] / 1e6:,.1f}M | {r['peak_rss_mib']:,.0f} MiB "
            f"| {r['step_s']:.2f} s | {r['eval_before']:.4f} → {r['eval_after']:.4f} |"
        )
    saved = full["peak_rss_mib"] - lora["peak_rss_mib"]
    lines += [
        "",
        f"LoRA saves {saved:,.0f} MiB of peak memory ({saved / full['peak_rss_mib']:.0%}) and runs a step in "
        f"{lora['step_s'] / full['step_s']:.2f}× the time of full fine-tuning. Most of what remains is the frozen "
        "student and teacher weights, the activations and the logits, which LoRA does not change; what it removes "
        "is the gradients and the AdamW moments of the base weights (12 bytes per frozen parameter, see `kd plan`).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=QUICKSTART)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--eval-examples", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4, help="full fine-tuning's learning rate")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args()
    base = yaml.safe_load(args.recipe.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory(prefix="kd-bench-lora-") as tmp:
        results = {}
        for label in ("full", "lora"):
            recipe = json.loads(json.dumps(base))
            recipe.update(name=label, output_dir=str(Path(tmp) / "runs"))
            recipe["data"].update(max_length=args.max_length, max_eval_examples=args.eval_examples)
            recipe["train"].update(max_steps=args.steps, batch_size=args.batch_size, warmup_steps=2, lr=args.lr)
            recipe["train"].pop("epochs", None)
            recipe["train"]["eval_every"] = None
            recipe["train"]["save_every"] = None
            if label == "lora":
                recipe["student"]["lora"] = {"r": args.r, "alpha": 2 * args.r, "target_modules": args.targets}
                recipe["train"]["lr"] = args.lora_lr
            results[label] = run(recipe, Path(tmp) / label)
            print(label, json.dumps(results[label]), flush=True)
    body = render(results["full"], results["lora"], args)
    print(body)
    if not args.no_doc:
        write_docs(REPO / "docs" / "benchmarks.md", SECTION, body)


if __name__ == "__main__":
    main()
