"""The built-in teacher into a student of another tokenizer: CE only against `uld` and `hybrid`.

    python bench/cross_tokenizer.py                  # writes `## Cross-tokenizer` of docs/benchmarks.md
    python bench/cross_tokenizer.py --work runs/ct-smoke --steps 2 --max-new-tokens 16 --max-examples 8 --no-docs

On 2 CPU cores shared with other jobs (load average 7 to 13) it took about 52 min: 16 for the student and the
teacher cache (once: later calls reuse them from --work), 19 for the three arms' training side by side, 14 for the
sampled evals, 3 for bits per character and kd compare.

Teacher: `builtin:smollm2-135m-instruct` (30 layers, 49,152-token byte-level BPE). Student: that teacher cut to the
15 layers kd's layer score keeps (`by: loss`, on 8 training examples), with its vocabulary replaced by a 4,096-token
SentencePiece-style BPE (`▁` for spaces, byte fallback: Llama 2's scheme) trained on the starter training split;
each new token's embedding (tied with the output layer) is the mean of the teacher's embeddings of the teacher tokens
that spell it (FVT, Gee et al. 2022). Why this student: it already knows the language, so a short CPU run measures
what the teacher's distributions add over the data alone; and its tokenizer shares neither ids, nor vocabulary size,
nor merges, nor the way of writing a space with the teacher's.

Arms, one seed, the same steps, batches, learning rate and schedule: CE only (`kd_ratio` 0: the teacher's records
are read and unused), `uld` and `hybrid` (`kd_ratio` 0.5, `top_k` 64). All three train from one teacher cache
written once (K = 64) with the teacher's tokenizer: what a student of any tokenizer reads.

Scores on the starter eval split (40 examples, not seen by the tokenizer): bits per character of the responses
(the responses' NLL, EOS included, over their characters, so tokenizers compare), eval CE per token (each model's
own tokens), `kd eval --baselines` (ROUGE-L and stop rate of sampled answers) and `kd compare`. Step time: median
of the steps after the first (metrics.jsonl), as a ratio to the CE-only arm's (the machine is shared: ratios taken
within one run, not seconds); peak memory: the maximum resident set of each `kd distill` process, read from outside
it by `/usr/bin/time -v`. Every kd command runs inside --work with paths relative to it, so no machine path reaches
the docs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from losses import machine, write_section  # noqa: E402

from kdcli.host import load_average  # noqa: E402

SECTION = "Cross-tokenizer"
TEACHER = "builtin:smollm2-135m-instruct"
ARMS = {"ce": None, "uld": "uld", "hybrid": "hybrid"}


# --------------------------------------------------------------------------------------------- the student


def train_tokenizer(vocab_size: int, chat_template: str) -> Any:
    """A SentencePiece-style BPE trained on the starter training split (instructions, contexts, responses)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = [json.loads(line) for line in (REPO / "kdcli/data/starter/train.jsonl").read_text().splitlines()]
    corpus = [row[key] for row in rows for key in ("instruction", "context", "response") if row.get(key)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    fast.chat_template = chat_template
    return fast


def make_student(out: Path, vocab_size: int, keep: int) -> dict[str, Any]:
    """The pruned teacher with a transplanted vocabulary, saved as a model folder; what was done, for the docs."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from kdcli.data import Collator, build_examples, read_split
    from kdcli.hardware import Runtime
    from kdcli.models import build_student, load_teacher, load_tokenizer, pruning, resolve_model, token_bytes
    from kdcli.recipe import load_recipe
    from kdcli.recipe.student import StudentConfig

    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["train.precision=fp32"])
    teacher_dir = resolve_model(TEACHER)
    teacher_tok = load_tokenizer(teacher_dir)
    teacher = load_teacher(recipe.teacher.model_copy(update={"model": teacher_dir}), torch.float32)
    train = build_examples(read_split(recipe.data, "train"), teacher_tok, recipe.data, "train", "data.train")
    picked = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in train[:8]]
    scores = pruning.layer_scores(
        teacher, teacher_dir, picked, Collator(0), "loss", Runtime(torch.device("cpu"), "fp32")
    )
    kept = scores.top(keep)
    student = build_student(StudentConfig(init="teacher", layers=kept), teacher_dir, torch.float32, 0, teacher=teacher)

    tok = train_tokenizer(vocab_size, teacher_tok.chat_template)
    old = teacher.get_input_embeddings().weight.detach()
    byte_token = {b: teacher_tok.convert_tokens_to_ids(c) for b, c in bytes_to_unicode().items()}
    table = torch.empty(len(tok), old.shape[1])
    for index, text in token_bytes(tok).items():
        special = tok.convert_ids_to_tokens(index)
        if special in teacher_tok.get_vocab() and index in tok.added_tokens_decoder and len(text) > 1:
            ids = [teacher_tok.convert_tokens_to_ids(special)]  # <|im_start|>, <|im_end|>, <|endoftext|>
        else:
            try:
                ids = teacher_tok(text.decode("utf-8"), add_special_tokens=False)["input_ids"]
            except UnicodeDecodeError:  # a byte-fallback piece: the teacher's byte tokens
                ids = [byte_token[b] for b in text]
        table[index] = old[ids].mean(dim=0) if ids else old.mean(dim=0)
    student.resize_token_embeddings(len(tok))
    student.get_input_embeddings().weight.data.copy_(table)
    student.tie_weights()
    for name in ("eos", "bos", "pad"):
        setattr(student.config, f"{name}_token_id", getattr(tok, f"{name}_token_id"))
        if student.generation_config is not None:
            setattr(student.generation_config, f"{name}_token_id", getattr(tok, f"{name}_token_id"))
    student.save_pretrained(out)
    tok.save_pretrained(out)
    return {"kept_layers": kept, "vocab": len(tok), "parameters": sum(p.numel() for p in student.parameters())}


# --------------------------------------------------------------------------------------------- measures


def bits_per_char(model_dir: Path, rows: list[dict[str, Any]], limit: int | None) -> float:
    """Σ NLL of the responses' tokens and EOS / ln 2 / Σ characters of the responses, each model through its own
    tokenizer and chat template, nothing cut: the one score that does not depend on the tokenizer."""
    from kdcli.data import Collator, build_examples
    from kdcli.models import load_model, load_tokenizer
    from kdcli.recipe.schema import DataConfig

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), torch.float32).eval()
    examples = build_examples(rows, tok, DataConfig(max_length=4096, max_eval_examples=limit), "eval", "data.eval")  # type: ignore[arg-type]
    assert examples.n_truncated == 0 and len(examples) == (limit or len(rows))
    collate, nll = Collator(tok.pad_token_id), 0.0
    with torch.no_grad():
        for lo in range(0, len(examples), 4):
            batch = collate(examples[lo : lo + 4])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Collator's labels are already shifted (position t predicts token t + 1): the logits as they come.
            flat = batch["labels"].flatten()
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), flat, reduction="sum"))
    return nll / math.log(2) / sum(len(rows[r]["response"]) for r in examples.rows)


def bits_per_char_together(models: list[Path], limit: int | None) -> list[float]:
    """`bits_per_char` of each model, each in a process of its own (one torch thread), all at once."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    extra = ["--eval-examples", str(limit)] if limit else []
    running = [
        subprocess.Popen(
            [sys.executable, __file__, "--bpc", str(model), *extra], env=env, stdout=subprocess.PIPE, text=True
        )
        for model in models
    ]
    out = []
    for model, process in zip(models, running, strict=True):
        stdout, _ = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"bits per character of {model} failed")
        out.append(float(stdout.strip().splitlines()[-1]))
    return out


def kd(args: list[str], cwd: Path, *, timed: bool = False) -> tuple[float, float, str]:
    """`kd ARGS` in `cwd` (under `/usr/bin/time -v` when `timed`): (wall s, peak RSS GiB or nan, stdout)."""
    return kd_together([args], cwd, timed=timed)[0]


def kd_together(commands: list[list[str]], cwd: Path, *, timed: bool = False) -> list[tuple[float, float, str]]:
    """Several kd commands at once, each its own process: on a machine shared with other jobs, arms that run side
    by side see the same load, so the ratio of their step times is the ratio of their work. Per command: (wall s,
    peak RSS GiB of that process or nan, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    running = []
    for args in commands:
        command = [*(["/usr/bin/time", "-v"] if timed else []), sys.executable, "-m", "kdcli", *args]
        running.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    out = []
    for args, process in zip(commands, running, strict=True):
        stdout, stderr = (part.decode(errors="replace") for part in process.communicate())
        if process.returncode != 0:
            raise SystemExit(f"kd {' '.join(args)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
        out.append((time.perf_counter() - started, int(peak.group(1)) / 2**20 if peak else float("nan"), stdout))
    return out


def step_seconds(run: Path) -> float:
    """The median step, the first (warm-up, allocation) left out; from the training clock in metrics.jsonl."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = [line["elapsed_s"] for line in lines if "loss" in line and "elapsed_s" in line]
    return statistics.median(b - a for a, b in pairwise(elapsed)) if len(elapsed) > 1 else elapsed[0]


def recipe_for(work: Path, arm: str, method: str | None, args: argparse.Namespace) -> Path:
    """The arm's recipe in --work; its paths are relative to it, where every kd command runs."""
    raw = {
        "name": arm,
        "seed": 0,
        "output_dir": "runs",
        "teacher": {"model": TEACHER, "cache": "cache"},
        "student": {"init": "pretrained", "model": "./student"},
        "data": {
            "train": "builtin:starter",
            "eval": "builtin:starter",
            "template": "chat",
            "max_length": 256,
            "max_eval_examples": args.eval_examples,
        },
        # CE only still names a method: the student's vocabulary differs, and kd refuses it without one.
        "loss": {
            "cross_tokenizer": {"method": method or "uld", "params": {"top_k": 64}},
            "kd_ratio": 0.5 if method else 0.0,
        },
        "cache": {"top_k": 64},
        "train": {
            "max_steps": args.steps,
            "batch_size": 8,
            "lr": args.lr,
            "warmup_steps": min(3, args.steps - 1),
            "schedule": "cosine",
            "precision": "fp32",
            "device": "cpu",
            "threads": args.threads,
            "save_every": None,
        },
    }
    path = work / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train_arms(work: Path, recipes: dict[str, Path]) -> tuple[dict[str, dict[str, Any]], str]:
    """Train the arms side by side; per arm what run.json, metrics.jsonl and `/usr/bin/time` say, and the load."""
    print(f"training {', '.join(ARMS)} side by side", flush=True)
    before = load_average()
    trained = kd_together([["distill", recipes[arm].name, "--overwrite"] for arm in ARMS], work, timed=True)
    load = f"{before}–{load_average()}"
    results: dict[str, dict[str, Any]] = {}
    for arm, (wall, peak, _) in zip(ARMS, trained, strict=True):
        run = work / "runs" / arm
        record = json.loads((run / "run.json").read_text())
        results[arm] = {
            "wall": wall,
            "peak": peak,
            "step": step_seconds(run),
            "eval_ce": record["eval_after"]["eval_ce"],
            "eval_ce_before": record["eval_before"]["eval_ce"],
            "aligned": record["data"]["train"]["aligned_fraction"],
            "steps": record["steps"],
        }
        print(f"  {arm}: {results[arm]}", flush=True)
    return results, load


def answers(work: Path, folder: str, seed: int, n: int) -> list[str]:
    """The first n sampled answers of an eval pass (kd eval writes one JSONL per set and pass)."""
    found = sorted((work / folder / "eval").glob(f"*/*{seed}.jsonl"))
    if not found:
        return []
    rows = [json.loads(line) for line in found[0].read_text().splitlines()[:n]]
    return [str(row["response"]) for row in rows]


# --------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-cross-tokenizer")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of 8 examples (35: one epoch)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--vocab", type=int, default=4096, help="the student's BPE vocabulary")
    ap.add_argument("--keep", type=int, default=15, help="teacher layers the student keeps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each kd process (three run at once)")
    ap.add_argument("--eval-seeds", default="1")
    ap.add_argument("--eval-examples", type=int, default=None, help="first N of the eval split (default: all 40)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--max-examples", type=int, default=16, help="kd eval samples the first N eval prompts (generation is slow)"
    )
    ap.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--no-docs", action="store_true")
    ap.add_argument("--reuse-training", action="store_true", help="score the runs an earlier call trained")
    ap.add_argument("--bpc", type=Path, help=argparse.SUPPRESS)  # worker: print one model's bits per character
    args = ap.parse_args()
    if args.bpc:
        from kdcli.data import read_split
        from kdcli.recipe.schema import DataConfig

        torch.set_num_threads(1)
        rows = read_split(DataConfig(), "eval")
        assert rows is not None
        print(bits_per_char(args.bpc, rows, args.eval_examples))
        return
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    info_file = work / "student.json"  # the student is built once; later runs of the script reuse it
    if not info_file.exists():
        print("building the student: layer scores, tokenizer, embedding transplant", flush=True)
        info_file.write_text(json.dumps(make_student(work / "student", args.vocab, args.keep)))
    student = json.loads(info_file.read_text())
    recipes = {arm: recipe_for(work, arm, method, args) for arm, method in ARMS.items()}

    cache_file = work / "cache.json"  # so is the teacher cache
    if not cache_file.exists():
        print("writing the teacher cache (train and eval, K = 64)", flush=True)
        wall, peak, _ = kd(["cache-teacher", recipes["uld"].name, "--split", "all", "--overwrite"], work, timed=True)
        cache_file.write_text(json.dumps({"wall": wall, "peak": peak}))
    cache = json.loads(cache_file.read_text())

    trained_file = work / "trained.json"  # --reuse-training: score the arms of an earlier run again
    if args.reuse_training and trained_file.exists():
        results, load = json.loads(trained_file.read_text()).values()
    else:
        results, load = train_arms(work, recipes)
        trained_file.write_text(json.dumps({"results": results, "load": load}))

    from kdcli.data import read_split
    from kdcli.models import resolve_model
    from kdcli.recipe import load_recipe

    rows = read_split(load_recipe(recipes["ce"]).data, "eval")
    assert rows is not None
    # --force: every call samples afresh, with this call's settings, whatever an earlier call left in the runs.
    evals = ["--baselines", "--force", "--seeds", args.eval_seeds, "--max-new-tokens", str(args.max_new_tokens)]
    sampled = min(args.max_examples, args.eval_examples or args.max_examples)
    evals += ["--max-examples", str(sampled)]
    print("kd eval of each arm, side by side", flush=True)
    kd_together([["eval", f"runs/{arm}", *evals] for arm in ARMS], work)
    print("bits per character", flush=True)
    models = [Path(resolve_model(TEACHER)), work / "student", *(work / "runs" / arm / "student" for arm in ARMS)]
    bpc = bits_per_char_together(models, args.eval_examples)
    reference = {"teacher": bpc[0], "student, untrained": bpc[1]}
    for arm, value in zip(ARMS, bpc[2:], strict=True):
        results[arm]["bpc"] = value
    runs = [f"runs/{arm}" for arm in ARMS]
    _, _, compare_md = kd(["compare", *runs, "--format", "markdown", "--resamples", "2000"], work)
    _, _, compare_json = kd(["compare", *runs, "--format", "json", "--resamples", "2000"], work)
    scores = eval_scores(json.loads(compare_json))
    seed = int(args.eval_seeds.split(",")[0])
    samples = {arm: answers(work, f"runs/{arm}", seed, 3) for arm in ARMS}
    section = render(
        args, student, results, reference, scores, compare_md, cache, samples, rows, started, load, sampled
    )
    print(section)
    if not args.no_docs:
        write_section(args.docs, section)


def eval_scores(data: dict[str, Any]) -> dict[str, dict[str, str]]:
    """ROUGE-L and the stop rate per arm, mean [95% interval] of the sampled passes, from `kd compare`'s JSON; ▽
    where ROUGE-L is not above an answer written without a model."""
    out: dict[str, dict[str, str]] = {}
    for evaluation in data.get("evaluation", []):
        if evaluation.get("mode") != "sampling":
            continue
        for row in evaluation["rows"]:
            if row["metric"] not in ("rougeL", "stop_rate"):
                continue
            for label, arm in zip(data["runs"], ARMS, strict=True):
                cell = (row.get("cells") or {}).get(label)
                if not cell or cell.get("mean") is None:
                    continue
                text = f"{cell['mean']:.2f}"
                if cell.get("ci95"):
                    text += f" [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}]"
                out.setdefault(arm, {})[row["metric"]] = text + (" ▽" if cell.get("not_above") else "")
    return out


def render(  # type: ignore[no-untyped-def]
    args, student, results, reference, scores, compare_md, cache, samples, rows, started, load, sampled
) -> str:
    total = (time.perf_counter() - started) / 60
    training = max(r["wall"] for r in results.values()) / 60
    shown = [a for a in sys.argv[1:] if a != "--reuse-training"]  # the same numbers as one call that trains
    ce_step = results["ce"]["step"]
    lines = [
        f"## {SECTION}",
        "",
        f"`{' '.join(['python bench/cross_tokenizer.py', *shown])}` on {machine('cpu')}, shared with other jobs: "
        f"{training:.0f} min for the three arms' training side by side and "
        f"{total:.0f} min for the evals and scores (the student and the teacher cache were built before, once). "
        f"Teacher `{TEACHER}` (30 layers, 49,152 tokens, byte-level BPE). Student: the teacher cut to the "
        f"{len(student['kept_layers'])} layers kd's layer score keeps (`by: loss`: {student['kept_layers']}), its "
        f"vocabulary replaced by a {student['vocab']:,}-token SentencePiece-style BPE (`▁` for spaces, byte fallback) "
        "trained on the starter training split, each new token's (tied) embedding the mean of the teacher's "
        f"embeddings of the tokens that spell it ({student['parameters'] / 1e6:.1f}M parameters). Why this student: "
        "it knows the language, so a short run measures what the teacher's distributions add over the data, and its "
        "tokenizer shares no ids, merges, vocabulary size or space convention with the teacher's (a student of "
        "another family would cost a download and more CPU than this bench has). "
        f"Scale: {args.steps} steps of 8 examples (at most 256 tokens) of `builtin:starter` "
        f"({args.steps * 8 / 280:.2g} epoch), lr {args.lr:g}, cosine, fp32, training seed 0, one run per arm: a "
        "short run on a small set, which can show the methods train and what they cost, not rank them. All three "
        "arms read one teacher cache (K = 64, written once with the teacher's tokenizer: "
        f"{cache['wall'] / 60:.1f} min, peak RSS {cache['peak']:.2f} GiB). CE only is `kd_ratio` 0; `uld` and "
        "`hybrid` are `kd_ratio` 0.5, `top_k` 64.",
        "",
        "| arm | eval CE before → after (nats/token, own tokens) | bits/char (eval responses) | ROUGE-L [95% CI] "
        "| stop rate | step time (× CE only) | peak RSS | positions paired |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, r in results.items():
        s = scores.get(arm, {})
        name = "CE only" if arm == "ce" else arm
        lines.append(
            f"| {name} | {r['eval_ce_before']:.3f} → {r['eval_ce']:.3f} | {r['bpc']:.3f} | "
            f"{s.get('rougeL', '—')} | {s.get('stop_rate', '—')} | {r['step'] / ce_step:.2f} | {r['peak']:.2f} GiB | "
            f"{r['aligned']:.1%} |"
        )
    eval_n = args.eval_examples or len(rows)
    lines += [
        "",
        f"Bits per character on the {eval_n} eval responses (each model through its own tokenizer and template, EOS "
        "included, nothing cut): "
        + ", ".join(f"{name} {value:.3f}" for name, value in reference.items())
        + f". ROUGE-L and the stop rate: `kd eval --baselines` on the first {sampled} eval prompts (generation is "
        f"the slow part on this machine), sampled with seeds {args.eval_seeds}, at most {args.max_new_tokens} new "
        "tokens; ▽ marks a score not above an answer written "
        "without a model. Step time: the median training step after the first, as a ratio to CE only's; the three "
        f"arms train side by side, each a process of {args.threads} torch thread(s), so that they share one load "
        f"(the 1-minute load average went from {load.replace('–', ' to ')} over their training). "
        "Peak RSS: the whole `kd distill` process (model, optimizer, data, the teacher records of a batch), "
        "from `/usr/bin/time -v`. Positions paired: the share of the student's response positions that have a "
        "teacher position (docs/methods.md, 'Which positions are compared').",
        "",
        "<details><summary>The first eval prompts' answers (seed "
        f"{args.eval_seeds.split(',')[0]}), cut to 200 characters</summary>",
        "",
    ]
    for i in range(min(3, min((len(v) for v in samples.values()), default=0))):
        lines.append(f"- prompt {i + 1}: {json.dumps(rows[i]['instruction'][:120], ensure_ascii=False)}")
        for arm in ARMS:
            lines.append(f"  - {arm}: {json.dumps(samples[arm][i][:200], ensure_ascii=False)}")
    # kd compare's headings one level down: a `## ` line would end this section for `write_section`.
    table = "\n".join("#" + line if line.startswith("#") else line for line in compare_md.strip().splitlines())
    lines += ["", "</details>", "", "<details><summary>kd compare</summary>", "", table, "", "</details>"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
