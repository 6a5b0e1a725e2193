"""kd against TRL's GKDTrainer and DistillationTrainer: the same teacher, student, data, batches, steps, schedule and
precision, one after the other, each trainer in its own process; tokens/s, peak RSS and the eval loss of each student.

    python bench/versus_trl.py                       # 20 steps of each, then docs/benchmarks.md
    python bench/versus_trl.py --steps 3 --no-doc    # a quick check of the script
    python bench/versus_trl.py --precision bf16 --trl-data messages --trainers kd,trl
    python bench/versus_trl.py --trainers kd,kd-ckpt,kd-bf16-states,kd-both,trl,distillation

TRL lives in its own virtual environment (its transformers pin is its own), made once, beside kd's `.venv`, with:

    python -m venv .trl-env
    .trl-env/bin/pip install torch==2.13.0 trl

(elsewhere: pass `--trl-python`, or set $KD_TRL_PYTHON). DistillationTrainer needs TRL 1.11 or later.

Stages, each a child process (this file runs itself with a hidden first argument):

1. prepare (kd's python): converts the built-in teacher if needed, cuts kd's every-other-layer student from it
   and saves it once, so that every trainer starts from the same weights on disk; tokenizes the starter train split
   the way the recipe does and writes the examples of the first `steps` batches in kd's seeded order, and kd's
   learning-rate multipliers for every step.
2. kd: `python -m kdcli distill recipes/quickstart.yaml --set ...` on the saved student, `fkl`, `kd_ratio` 1; and,
   where `--trainers` names them, the same run with kd's memory options (`KD_VARIANTS`: kd-ckpt with
   `train.activation_checkpointing`, kd-bf16-states with `train.optimizer_states: bf16`, kd-both), so that what
   each option saves of kd's peak and costs in tokens/s is measured in the same run.
3. TRL (`--trl-python`): GKDTrainer with lmbda 0 (no student sampling: off-policy on the data's responses), beta 0
   (its generalized JSD is then KL(teacher || student), kd's fkl), temperature 1, seq_kd off, on the exported
   examples read in order, with the same AdamW and LambdaLR as kd.
4. TRL's DistillationTrainer (`--trl-python`), beta 0, temperature 1, the same AdamW and LambdaLR: on-policy only,
   so its sampling step hands back the exported responses instead (`distillation_stage`).
5. score (kd's python): kd's `evaluate` on the starter eval split, teacher online, for the initial student and each
   trained one.

Peak memory is each trainer process's `ru_maxrss` as `os.wait4` reports it to this parent, loading included.
tokens/s is the same count for all: non-pad tokens of the training batches over the seconds of the training loop
(model loading and saving left out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Only the standard library at module level: the TRL stage runs this file in an environment without kdcli, and the
# parent needs neither torch nor kdcli.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
DOC = REPO / "docs" / "benchmarks.md"
SECTION = "## Side by side with TRL"
DEFAULT_TEACHER = "builtin:smollm2-135m-instruct"
DEFAULT_TRL_PYTHON = os.environ.get("KD_TRL_PYTHON") or str(REPO / ".trl-env" / "bin" / "python")
# kd's runs, each a recipe's `--set` overrides on top of the common ones: kd as the quickstart has it, and with each
# of its memory options (what holds kd's peak at batch 8, and what each option costs).
KD_VARIANTS: dict[str, list[str]] = {
    "kd": [],
    "kd-ckpt": ["train.activation_checkpointing=true"],
    "kd-bf16-states": ["train.optimizer_states=bf16"],
    "kd-both": ["train.activation_checkpointing=true", "train.optimizer_states=bf16"],
}
PEERS = ("trl", "distillation")  # TRL's GKDTrainer, TRL's DistillationTrainer
TRAINERS = (*KD_VARIANTS, *PEERS)
DEFAULT_TRAINERS = ("kd", "trl", "distillation")
IGNORE_INDEX = -100


# --- shared by the stages ------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def recipe_sets(cfg: dict[str, Any]) -> list[str]:
    """The `--set` overrides of quickstart.yaml that every stage reads the recipe with."""
    return [
        f"seed={cfg['seed']}",
        f"teacher.model={cfg['teacher']}",
        # A fixed cut, built once without scoring layers (the quickstart's `by: loss` scores them inside kd distill):
        # every trainer starts from the same student, and which layers it kept changes no trainer's speed or memory.
        "student.layers=every-other",
        # kd's plain seeded order, the one this bench hands TRL (grouping by length would batch other examples)
        "train.group_by_length=false",
        "data.train=builtin:starter",
        "data.template=chat",
        f"data.max_length={cfg['max_length']}",
        "loss.divergence=fkl",
        "loss.params={temperature: 1.0}",
        "loss.kd_ratio=1.0",
        f"train.max_steps={cfg['steps']}",
        f"train.batch_size={cfg['batch_size']}",
        "train.grad_accum=1",
        f"train.lr={cfg['lr']}",
        f"train.schedule={cfg['schedule']}",
        f"train.warmup_steps={cfg['warmup_steps']}",
        "train.weight_decay=0.0",
        "train.max_grad_norm=1.0",
        f"train.precision={cfg['precision']}",
        f"train.threads={cfg['threads']}",
        "train.device=cpu",
        "train.eval_every=null",
        "train.save_every=null",
    ]


def paths(work: Path) -> dict[str, Path]:
    return {
        "config": work / "config.json",
        "prepared": work / "prepared.json",
        "student_init": work / "student-init",
        "train": work / "train.jsonl",
        "runs": work / "runs",
        "trl_out": work / "trl",
        "trl_record": work / "trl" / "record.json",
        "distill_out": work / "distillation",
        "distill_record": work / "distillation" / "record.json",
        "scores": work / "scores.json",
    }


# --- stage 1: prepare (kd's environment) ---------------------------------------------------------------------


def prepare_stage(work: Path) -> None:
    import torch

    from kdcli.data import Collator, micro_batches, read_split
    from kdcli.data.formatting import build_examples, user_message
    from kdcli.engine.optim import lr_factor
    from kdcli.models import build_student, load_config, parameters_of, resolve_model, student_tokenizer
    from kdcli.recipe import load_recipe

    p = paths(work)
    cfg = read_json(p["config"])
    torch.set_num_threads(cfg["threads"])
    # The recipe's own student section (init: teacher, layers: every-other) builds the student here, once.
    recipe = load_recipe(QUICKSTART, recipe_sets(cfg))
    teacher_dir = resolve_model(recipe.teacher.model)
    tokenizer = student_tokenizer(recipe.student, recipe.teacher.model)
    student = build_student(recipe.student, recipe.teacher.model, torch.float32, recipe.seed)
    student.save_pretrained(p["student_init"], safe_serialization=True)
    tokenizer.save_pretrained(p["student_init"])

    rows = read_split(recipe.data, "train")
    assert rows is not None
    examples = build_examples(rows, tokenizer, recipe.data, "train", "data.train")
    # The chat messages of the same rows, for `--trl-data messages`: the rows build_examples keeps are those with a
    # non-empty response, in order.
    fmap = examples.fields
    assert fmap is not None
    fields = [fmap.extract(row, "data.train", str(i)) for i, row in enumerate(rows)]
    fields = [f for f in fields if f["response"].strip()]
    if len(fields) != len(examples):
        raise SystemExit(f"prepare: {len(examples)} examples but {len(fields)} rows with a response")

    # kd's own batch stream, as indices: micro_batches over the positions themselves, "collated" by `list`.
    batch_size, steps = cfg["batch_size"], cfg["steps"]
    stream = micro_batches(list(range(len(examples))), list, batch_size, recipe.seed)
    batches = [next(stream) for _ in range(steps)]
    uneven = [i for i, b in enumerate(batches) if len(b) != batch_size]
    with p["train"].open("w", encoding="utf-8") as fh:
        for index in (i for b in batches for i in b):
            ids, labels = examples.input_ids[index], examples.labels[index]
            row = fields[index]
            user = user_message(row["prompt"], row.get("context", "") or "")
            record = {
                "kd_index": index,
                "input_ids": ids,
                # TRL's ChatML collator takes the prompt/response boundary from this mask, with no re-tokenization.
                "completion_mask": [int(label != IGNORE_INDEX) for label in labels],
                "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}],
            }
            fh.write(json.dumps(record) + "\n")
    collate = Collator.for_tokenizer(tokenizer)
    tokens = sum(int(collate([examples[i] for i in b])["attention_mask"].sum()) for b in batches)
    total = recipe.train.max_steps or steps
    factors = [lr_factor(step, total, recipe.train.warmup_steps, recipe.train.schedule) for step in range(steps)]
    write_json(
        p["prepared"],
        {
            "teacher_dir": teacher_dir,
            "student_dir": str(p["student_init"]),
            "student_layers": int(student.config.num_hidden_layers),
            "student_parameters": sum(t.numel() for t in student.parameters()),
            "teacher_parameters": parameters_of(load_config(recipe.teacher.model)),
            "train_examples": len(examples),
            "stream_examples": sum(len(b) for b in batches),
            "stream_tokens": tokens,
            "uneven_batches": uneven,
            "lr_factors": factors,
        },
    )


# --- stage 3: TRL (TRL's environment) -------------------------------------------------------------------------


class TrlRun:
    """What both TRL trainers share: the exported rows, the tokenizer, the student and teacher, kd's AdamW and
    schedule, the training arguments they have in common, and a clock of the training loop."""

    def __init__(self, work: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

        self.p = p = paths(work)
        self.cfg = cfg = read_json(p["config"])
        self.prepared = prepared = read_json(p["prepared"])
        torch.set_num_threads(cfg["threads"])
        self.rows = [json.loads(line) for line in p["train"].read_text(encoding="utf-8").splitlines()]
        bf16 = cfg["precision"] == "bf16"
        self.tokenizer = AutoTokenizer.from_pretrained(prepared["student_dir"])
        self.student = AutoModelForCausalLM.from_pretrained(prepared["student_dir"], dtype=torch.float32)
        # As kd does: an inference-only teacher holds bf16 weights in a bf16 run; the student keeps fp32 masters.
        self.teacher = AutoModelForCausalLM.from_pretrained(
            prepared["teacher_dir"], dtype=torch.bfloat16 if bf16 else torch.float32
        )
        self.common = {
            "per_device_train_batch_size": cfg["batch_size"],
            "gradient_accumulation_steps": 1,
            "max_steps": cfg["steps"],
            "learning_rate": cfg["lr"],
            "max_grad_norm": 1.0,
            # TRL's defaults are bf16 and gradient checkpointing on; kd has neither unless asked.
            "bf16": bf16,
            "fp16": False,
            "gradient_checkpointing": False,
            "use_cpu": True,
            "seed": cfg["seed"],
            "dataloader_num_workers": 0,
            "logging_steps": 1,
            "eval_strategy": "no",
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
        }
        # kd's optimizer and schedule, so that only the trainers differ: AdamW without weight decay (torch's default
        # is 0.01), and the per-step multipliers kd's lr_factor gave in the prepare stage.
        self.optimizer = torch.optim.AdamW(
            self.student.parameters(), lr=cfg["lr"], betas=(0.9, 0.999), weight_decay=0.0, foreach=True
        )
        factors = prepared["lr_factors"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: factors[min(step, len(factors) - 1)]
        )
        run = self

        class Clock(TrainerCallback):
            """The training loop's seconds, as kd's run.json counts them: before the first batch to the last step."""

            def on_train_begin(self, *_: Any, **__: Any) -> None:
                run.started = time.perf_counter()

            def on_train_end(self, *_: Any, **__: Any) -> None:
                run.ended = time.perf_counter()

        self.clock = Clock()
        self.started = self.ended = 0.0
        self.tokens_seen = 0  # non-pad tokens trained on, as kd counts them (attention_mask.sum() per batch)

    def finish(self, trainer: Any, out: Path, record: Path) -> None:
        """Save the student and write the run's record."""
        from importlib import metadata

        import torch

        trainer.save_model(str(out / "student"))
        history = [h for h in trainer.state.log_history if "loss" in h]
        names = ("trl", "transformers", "torch", "accelerate", "datasets")
        write_json(
            record,
            {
                "versions": {name: metadata.version(name) for name in names},
                "steps": trainer.state.global_step,
                "tokens_seen": self.tokens_seen,
                "train_seconds": self.ended - self.started,
                "torch_threads": torch.get_num_threads(),
                "loss": [h["loss"] for h in history],
                "grad_norm": [h.get("grad_norm") for h in history],
                "lr": [h.get("learning_rate") for h in history],
            },
        )


def trl_stage(work: Path) -> None:
    """GKDTrainer, off-policy (lmbda 0) on the exported rows."""
    from datasets import Dataset

    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:  # TRL before GKD moved to experimental
        from trl import GKDConfig, GKDTrainer

    run = TrlRun(work)
    if run.cfg["trl_data"] == "messages":
        # TRL renders and tokenizes the chat itself (its collator: chat template on the whole conversation).
        rows = [{"messages": row["messages"]} for row in run.rows]
    else:
        # kd's token ids; `messages` stays only because the collator formats the prompt from it before it looks
        # for input_ids (the text is then unused).
        rows = [{k: row[k] for k in ("input_ids", "completion_mask", "messages")} for row in run.rows]
    args = GKDConfig(
        output_dir=str(run.p["trl_out"] / "trainer"),
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        seq_kd=False,
        max_length=run.cfg["max_length"],
        train_sampling_strategy="sequential",  # the exported rows already are kd's batches, in kd's order
        **run.common,
    )

    class CountingGKD(GKDTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            run.tokens_seen += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = CountingGKD(
        model=run.student,
        teacher_model=run.teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=run.tokenizer,
        optimizers=(run.optimizer, run.scheduler),
        callbacks=[run.clock],
    )
    trainer.train()
    run.finish(trainer, run.p["trl_out"], run.p["trl_record"])


def split_prompt(row: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """kd's tokens of a row as (prompt ids, completion ids, loss mask of the completion): the completion starts at
    the first labelled position; unlabelled tokens after it (none in a single-turn chat) stay out of the loss."""
    mask = row["completion_mask"]
    first = mask.index(1)
    return row["input_ids"][:first], row["input_ids"][first:], mask[first:]


def distillation_stage(work: Path) -> None:
    """DistillationTrainer (TRL's stable distillation API) on the exported rows. It is on-policy only: it samples the
    completions from the student. Here its sampling (`_generate`) hands back the data's own responses instead, kd's
    tokens, so that it trains off-policy on the same batches as kd and GKD; its loss (its chunked generalised JSD
    from hidden states, beta 0: forward KL), forward, padding and optimizer path are its own."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    run = TrlRun(work)
    by_index = {row["kd_index"]: split_prompt(row) for row in run.rows}
    # The prompt column DistillationTrainer requires: the chat's user turn (the ids come from `by_index`).
    rows = [{"prompt": row["messages"][:1], "kd_index": row["kd_index"]} for row in run.rows]
    args = DistillationConfig(
        output_dir=str(run.p["distill_out"] / "trainer"),
        beta=0.0,
        temperature=1.0,
        shuffle_dataset=False,  # the exported rows already are kd's batches, in kd's order
        max_completion_length=run.cfg["max_length"],
        **run.common,
    )

    class OnTheData(DistillationTrainer):
        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            self._kd_rows = [by_index[row["kd_index"]] for row in inputs]
            return super()._generate_and_score_completions(inputs)

        def _generate(self, prompts: list[Any]) -> tuple[Any, ...]:
            chosen = self._kd_rows
            run.tokens_seen += sum(len(prompt) + len(completion) for prompt, completion, _ in chosen)
            masks = [mask for _, _, mask in chosen]
            loss_masks = None if all(all(mask) for mask in masks) else masks
            return [r[0] for r in chosen], [r[1] for r in chosen], loss_masks, None, None

    trainer = OnTheData(
        model=run.student,
        teacher_model=run.teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=run.tokenizer,
        optimizers=(run.optimizer, run.scheduler),
        callbacks=[run.clock],
    )
    trainer.train()
    run.finish(trainer, run.p["distill_out"], run.p["distill_record"])


# --- stage 4: score (kd's environment) -----------------------------------------------------------------------


def score_stage(work: Path) -> None:
    import torch

    from kdcli.data import Collator, load_examples
    from kdcli.engine.loop import evaluate
    from kdcli.engine.objective import Objective
    from kdcli.engine.teachers import OnlineTeacher
    from kdcli.hardware import Runtime
    from kdcli.models import check_tokenizers, load_config, load_model, load_teacher, load_tokenizer
    from kdcli.recipe import load_recipe
    from kdcli.recipe.schema import LossConfig

    p = paths(work)
    cfg = read_json(p["config"])
    torch.set_num_threads(cfg["threads"])
    students = {
        "initial": p["student_init"],
        **{name: p["runs"] / name / "student" for name in KD_VARIANTS},
        "trl": p["trl_out"] / "student",
        "distillation": p["distill_out"] / "student",
    }
    students = {name: path for name, path in students.items() if (path / "config.json").is_file()}
    sets = [
        *recipe_sets(cfg),
        "data.eval=builtin:starter",
        "student.init=pretrained",
        f"student.model={p['student_init']}",
    ]
    if cfg["max_eval_examples"]:
        sets.append(f"data.max_eval_examples={cfg['max_eval_examples']}")
    recipe = load_recipe(QUICKSTART, sets)
    runtime = Runtime.of("cpu", recipe.train.precision)
    tokenizer = load_tokenizer(str(p["student_init"]), field="student.model")
    eval_set = load_examples(recipe.data, tokenizer, "eval")
    assert eval_set is not None
    teacher_model = load_teacher(recipe.teacher, runtime.inference_dtype)
    width = check_tokenizers(
        load_tokenizer(recipe.teacher.model),
        tokenizer,
        load_config(recipe.teacher.model),
        load_config(str(p["student_init"])),
    )
    teacher = OnlineTeacher(teacher_model, runtime, width, recipe.teacher.model)
    # kd_ratio 0.5 rather than 1: with 1 the objective skips CE (reports 0). Its `eval_kd` is the divergence alone,
    # which is exactly the kd_ratio 1 objective here (T = 1, so no T² scale), and `eval_ce` comes with it.
    objective = Objective(LossConfig(divergence="fkl", params={"temperature": 1.0}, kd_ratio=0.5))
    collate = Collator.for_tokenizer(tokenizer)
    size = recipe.train.eval_batch_size
    batches = [collate(eval_set[lo : lo + size]) for lo in range(0, len(eval_set), size)]
    scores: dict[str, Any] = {"eval_examples": len(eval_set), "students": {}}
    for name, path in students.items():
        model = load_model(str(path), torch.float32, field="student.model")
        result = evaluate(model, teacher, batches, objective, runtime, width)
        scores["students"][name] = {"fkl": result["eval_kd"], "ce": result["eval_ce"], "tokens": result["eval_tokens"]}
        del model
    write_json(p["scores"], scores)


STAGES = {"_prepare": prepare_stage, "_trl": trl_stage, "_distillation": distillation_stage, "_score": score_stage}


# --- the parent ----------------------------------------------------------------------------------------------


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        TRL_EXPERIMENTAL_SILENCE="1",  # GKDTrainer lives in trl.experimental; its import warning is expected
    )
    return env


def run_child(name: str, command: Sequence[str], log: Path, env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Run one stage to its end; its peak RSS (MiB) as the kernel reports it for this child, and its wall seconds.

    `os.wait4` reaps the child itself, so its rusage is the child's own (with any children it waited for), never
    this parent's or another stage's."""
    print(f"[{name}] {shlex.join(command)}  (log: {log})", flush=True)
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:])
        raise SystemExit(f"[{name}] failed with exit status {proc.returncode}; last lines of {log}:\n{tail}")
    print(f"[{name}] done in {seconds:.0f} s, peak RSS {usage.ru_maxrss / 1024:,.0f} MiB", flush=True)
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "process_seconds": seconds}  # ru_maxrss is KiB on Linux


def kd_command(args: argparse.Namespace, cfg: dict[str, Any], work: Path, name: str) -> list[str]:
    p = paths(work)
    sets = [
        *recipe_sets(cfg),
        *KD_VARIANTS[name],
        f"name={name}",
        f"output_dir={p['runs']}",
        "student.init=pretrained",
        f"student.model={p['student_init']}",
        "data.eval=null",
        *(args.set or []),
    ]
    flags = [item for pair in (("--set", s) for s in sets) for item in pair]
    return [args.kd_python, "-m", "kdcli", "distill", str(QUICKSTART), *flags, "--overwrite"]


def output_of(command: Sequence[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def kd_versions(kd_python: str) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m, kdcli; "
        "print(json.dumps({'kd': kdcli.__version__, "
        "**{n: m.version(n) for n in ('torch', 'transformers', 'accelerate')}}))"
    )
    versions = json.loads(output_of([kd_python, "-c", code]) or "{}")
    versions["commit"] = output_of(["git", "describe", "--always", "--dirty"])
    return versions


def machine() -> str:
    from kdcli.host import machine_summary

    return machine_summary()


def kd_result(work: Path, name: str) -> dict[str, Any]:
    run = paths(work)["runs"] / name
    record = read_json(run / "run.json")
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    losses = [row["loss"] for row in steps if "loss" in row]
    return {
        "steps": record["steps"],
        "tokens_seen": record["tokens_seen"],
        "train_seconds": record["train_seconds"],
        "torch_threads": record.get("torch_threads"),
        "precision": record.get("precision"),
        "loss": losses,
        "fused_head": record.get("fused_head"),  # absent in kd versions without `loss.fused`
    }


def fused_note(fused_head: bool | None) -> str:
    """How kd computed the loss, where its run.json says: the fused head never builds the [tokens, vocab] logits."""
    if fused_head is None:
        return ""
    return ", fused head (no full logits)" if fused_head else ", full logits (fused head off)"


def memory_lines(runs: dict[str, Any], prepared: dict[str, Any], precision: str) -> list[str]:
    """What holds kd's peak, from the parameter counts (the states every trainer here holds alike), and what each
    of kd's memory options changes, against kd's plain run."""
    if "kd" not in runs or "teacher_parameters" not in prepared:
        return []
    mib, psi = 2**20, prepared["student_parameters"]
    parts = {
        f"teacher weights ({precision})": prepared["teacher_parameters"] * (2 if precision == "bf16" else 4),
        "student weights (fp32)": 4 * psi,
        "gradients (fp32)": 4 * psi,
        "AdamW's two moments (fp32)": 8 * psi,
    }
    kd = runs["kd"]
    rest = kd["peak_rss_mib"] - sum(parts.values()) / mib
    lines = [
        "",
        f"What holds kd's peak of {kd['peak_rss_mib']:,.0f} MiB: "
        + ", ".join(f"{name} {size / mib:,.0f} MiB" for name, size in parts.items())
        + f", and {rest:,.0f} MiB besides: the student's activations, the fused head's block of logits, Python, "
        "torch and transformers themselves, and the allocator's slack. Every trainer here holds the four states "
        "alike. Activation checkpointing takes from the activations, bf16 states from AdamW's moments; the "
        "tokens/s ratios below come from runs one after the other, not interleaved.",
    ]
    speed = kd["tokens_seen"] / kd["train_seconds"]
    for name, label in (
        ("kd-ckpt", "`train.activation_checkpointing: true`"),
        ("kd-bf16-states", "`train.optimizer_states: bf16`"),
        ("kd-both", "both"),
    ):
        if name not in runs:
            continue
        run = runs[name]
        lines.append(
            f"- {label}: peak {run['peak_rss_mib']:,.0f} MiB ({run['peak_rss_mib'] - kd['peak_rss_mib']:+,.0f} MiB, "
            f"{run['peak_rss_mib'] / kd['peak_rss_mib']:.2f}× kd's), "
            f"{(run['tokens_seen'] / run['train_seconds']) / speed:.2f}× kd's tokens/s, loss at the last step "
            f"{run['loss'][-1]:.4f} against {kd['loss'][-1]:.4f}."
        )
    return lines


def render(results: dict[str, Any]) -> str:
    cfg, prepared, scores, versions = results["config"], results["prepared"], results["scores"], results["versions"]
    kd_v, trl_v = versions["kd"], versions.get("trl", {})
    students = scores["students"]
    runs = results["runs"]
    trl_ver = trl_v.get("trl", "?")
    names = {
        "kd": f"kd {kd_v.get('kd', '?')}",
        "kd-ckpt": "kd, `activation_checkpointing`",
        "kd-bf16-states": "kd, `optimizer_states: bf16`",
        "kd-both": "kd, both",
        "trl": f"TRL GKDTrainer {trl_ver}",
        "distillation": f"TRL DistillationTrainer {trl_ver}",
    }
    lines = [
        SECTION,
        "",
        f"`{results['command']}` on {results['machine']}, {cfg['threads']} torch threads per run, "
        f"{results['date']}. Load average (1 min) at the start and end: {results['load'][0]:.1f} and "
        f"{results['load'][1]:.1f}; above the core count other jobs shared the machine and the seconds are "
        "noise-bound.",
        "",
        f"Versions: kd {kd_v.get('kd', '?')} (commit {kd_v.get('commit', '?')}) with torch {kd_v.get('torch', '?')}, "
        f"transformers {kd_v.get('transformers', '?')}; TRL {trl_ver} in its own venv with transformers "
        f"{trl_v.get('transformers', '?')}, torch {trl_v.get('torch', '?')}, accelerate "
        f"{trl_v.get('accelerate', '?')}, datasets {trl_v.get('datasets', '?')}.",
        "",
        f"Setup: teacher `{cfg['teacher']}` (safetensors, {'bf16' if cfg['precision'] == 'bf16' else 'fp32'}); "
        f"student kd's every-other-layer copy ({prepared['student_layers']} layers, "
        f"{prepared['student_parameters'] / 1e6:.1f}M parameters), cut once and saved, and every trainer starts from "
        f"that folder. Data: `builtin:starter` train, `template: chat`, max_length {cfg['max_length']}, the "
        f"{prepared['stream_examples']} examples of the first {cfg['steps']} batches in kd's seeded order "
        "(`group_by_length: false`, so that the batches are the plain shuffle's) "
        f"({prepared['stream_tokens']:,} non-pad tokens as kd tokenizes them), given to TRL "
        + (
            "as kd's token ids with the prompt masked by `completion_mask`"
            if cfg["trl_data"] == "kd-tokens"
            else "as chat `messages` (TRL renders and tokenizes them itself)"
        )
        + " and read in order (GKD: `train_sampling_strategy: sequential`; DistillationTrainer: "
        "`shuffle_dataset=False`, its prompt/completion split of kd's token ids at the first labelled token). "
        f"Batch {cfg['batch_size']}, grad_accum 1, "
        f"{cfg['steps']} steps, AdamW lr {cfg['lr']:g} with kd's {cfg['schedule']} schedule "
        f"({cfg['warmup_steps']} warmup steps; TRL gets the same AdamW and per-step multipliers), max_grad_norm 1, "
        f"{cfg['precision']}, gradient checkpointing off, no eval or checkpoints during training. kd: "
        f"`divergence: fkl`, `kd_ratio: 1`"
        + (fused_note(runs["kd"].get("fused_head")) if "kd" in runs else "")
        + ". GKD: `lmbda=0` (no student sampling), `beta=0` (forward KL(teacher‖student)), `temperature=1`, "
        "`seq_kd=False`. DistillationTrainer (`trl.DistillationTrainer`, TRL's stable distillation API): `beta=0` "
        "(forward KL), `temperature=1`; it is on-policy only (it samples the completions from the student), so its "
        "`_generate` is replaced by one that hands back the data's responses, kd's tokens: its loss (a chunked "
        "generalised JSD from the hidden states, never the whole logits), forward, padding and optimizer path are "
        "its own.",
        "",
        "| trainer | tokens/s | peak RSS | train s | process s | loss step 1 → last | eval fkl | eval CE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if "initial" in students:
        s = students["initial"]
        lines.append(f"| initial student | - | - | - | - | - | {s['fkl']:.4f} | {s['ce']:.4f} |")
    for trainer in cfg["trainers"]:
        run, s = runs[trainer], students.get(trainer)
        loss = f"{run['loss'][0]:.4f} → {run['loss'][-1]:.4f}" if run["loss"] else "-"
        lines.append(
            f"| {names[trainer]} | {run['tokens_seen'] / run['train_seconds']:.0f} | {run['peak_rss_mib']:,.0f} MiB | "
            f"{run['train_seconds']:.0f} | {run['process_seconds']:.0f} | {loss} | "
            + (f"{s['fkl']:.4f} | {s['ce']:.4f} |" if s else "- | - |")
        )
    lines += [
        "",
        "tokens/s: non-pad tokens of the training batches (attention_mask.sum() of every batch, counted inside each "
        "trainer) over the seconds of its training loop: kd's run.json `train_seconds`, TRL's from `on_train_begin` "
        "to `on_train_end`; loading and saving are left out of both, and in `process s` (the whole child process). "
        "Peak RSS: `ru_maxrss` of each trainer's process, read by the parent with `os.wait4` (loading included). "
        "Loss: each trainer's own logged training loss, both the full-vocabulary KL summed over response positions "
        "and divided by their number; step 1 sees the same weights and batch, so the two should agree. Eval: kd's "
        f"`evaluate` with the online teacher on the starter eval split ({scores['eval_examples']} examples, "
        f"{next(iter(students.values()))['tokens'] if students else 0} response tokens): eval fkl is kd's objective "
        "at `fkl`, `kd_ratio` 1 (token-weighted mean KL(teacher‖student)), eval CE the student's cross-entropy on the "
        "responses. One run each, one after the other.",
    ]
    for peer in PEERS:
        if "kd" not in runs or peer not in runs:
            continue
        kd, trl = runs["kd"], runs[peer]
        speed = (kd["tokens_seen"] / kd["train_seconds"]) / (trl["tokens_seen"] / trl["train_seconds"])
        gap = max((abs(a - b) for a, b in zip(kd["loss"], trl["loss"], strict=False)), default=float("nan"))
        lines += [
            "",
            f"kd against {names[peer]}: {speed:.2f}× the tokens/s, {kd['peak_rss_mib'] / trl['peak_rss_mib']:.2f}× "
            f"the peak RSS. Largest gap between their per-step training losses: {gap:.1e}.",
        ]
    lines += memory_lines(runs, prepared, cfg["precision"])
    if prepared["uneven_batches"]:
        lines += ["", f"Warning: kd batches {prepared['uneven_batches']} are short; TRL's batches then differ."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each trainer (default 20)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="after warmup")
    parser.add_argument("--warmup-steps", type=int, default=5, help="linear warmup steps (default 5)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="both trainers (default fp32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each process (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="recipe seed: kd's data order (default 0)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (default 256)")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER, help=f"teacher.model (default {DEFAULT_TEACHER})")
    parser.add_argument("--max-eval-examples", type=int, help="score only the first N eval examples (default all)")
    parser.add_argument(
        "--trainers",
        default=",".join(DEFAULT_TRAINERS),
        help="which trainers, in the order they run: kd, kd-ckpt (train.activation_checkpointing), kd-bf16-states "
        "(train.optimizer_states: bf16), kd-both, trl (GKDTrainer), distillation (DistillationTrainer); default "
        f"{','.join(DEFAULT_TRAINERS)}",
    )
    parser.add_argument(
        "--trl-data",
        choices=("kd-tokens", "messages"),
        default="kd-tokens",
        help="TRL's input: kd's token ids (identical tokens; default), or chat messages its collator tokenizes",
    )
    parser.add_argument("--trl-python", default=DEFAULT_TRL_PYTHON, help=f"TRL's python (default {DEFAULT_TRL_PYTHON})")
    parser.add_argument("--kd-python", default=None, help="kd's python (default: the repo's .venv, else this one)")
    parser.add_argument("--set", action="append", help="an extra recipe override of the kd run only, as kd distill")
    parser.add_argument("--work-dir", type=Path, help="keep the students, logs and records here (default: a temp dir)")
    parser.add_argument("--no-doc", action="store_true", help=f"do not rewrite the section of {DOC.relative_to(REPO)}")
    args = parser.parse_args(argv)
    venv = REPO / ".venv" / "bin" / "python"
    args.kd_python = args.kd_python or (str(venv) if venv.exists() else sys.executable)
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if not trainers or any(t not in TRAINERS for t in trainers) or len(set(trainers)) != len(trainers):
        parser.error(f"--trainers: a comma list of {', '.join(TRAINERS)}, each once")
    args.trainer_list = trainers
    if any(t in PEERS for t in trainers) and not Path(args.trl_python).exists():
        parser.error(f"--trl-python {args.trl_python}: no such file; make TRL's venv first (see --help)")
    return args


PATH_OPTIONS = ("--work-dir", "--trl-python", "--kd-python")


def portable_args(argv: Sequence[str]) -> list[str]:
    """The command line as docs/benchmarks.md records it: the values of options that name this machine's paths
    become the option's name (`--work-dir DIR`), so no committed file holds them."""
    out: list[str] = []
    for arg in argv:
        option, equals, _ = arg.partition("=")
        if equals and option in PATH_OPTIONS:
            out.append(f"{option}={option.strip('-').split('-')[-1].upper()}")
        elif out and out[-1] in PATH_OPTIONS:
            out.append(out[-1].strip("-").split("-")[-1].upper())
        else:
            out.append(arg)
    return out


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    p = paths(work)
    cfg = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "schedule": args.schedule,
        "warmup_steps": args.warmup_steps,
        "precision": args.precision,
        "threads": args.threads,
        "seed": args.seed,
        "max_length": args.max_length,
        "teacher": args.teacher,
        "max_eval_examples": args.max_eval_examples,
        "trl_data": args.trl_data,
        "trainers": args.trainer_list,
    }
    write_json(p["config"], cfg)
    env, me, logs = child_env(args.threads), str(Path(__file__).resolve()), work / "logs"
    logs.mkdir(exist_ok=True)
    load_start = os.getloadavg()[0]
    run_child("prepare", [args.kd_python, me, "_prepare", str(work)], logs / "prepare.log", env, REPO)
    runs: dict[str, dict[str, Any]] = {}
    for trainer in args.trainer_list:
        if trainer in KD_VARIANTS:
            usage = run_child(trainer, kd_command(args, cfg, work, trainer), logs / f"{trainer}.log", env, REPO)
            runs[trainer] = {**kd_result(work, trainer), **usage}
        else:
            stage, record = ("_trl", p["trl_record"]) if trainer == "trl" else ("_distillation", p["distill_record"])
            usage = run_child(trainer, [args.trl_python, me, stage, str(work)], logs / f"{trainer}.log", env, REPO)
            runs[trainer] = {**read_json(record), **usage}
    load_end = os.getloadavg()[0]
    run_child("score", [args.kd_python, me, "_score", str(work)], logs / "score.log", env, REPO)
    versions = {"kd": kd_versions(args.kd_python)}
    for trainer in PEERS:
        if trainer in runs:
            versions["trl"] = runs[trainer]["versions"]
    return {
        "command": " ".join(["python bench/versus_trl.py", *map(shlex.quote, portable_args(sys.argv[1:]))]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load": (load_start, load_end),
        "config": cfg,
        "prepared": read_json(p["prepared"]),
        "runs": runs,
        "scores": read_json(p["scores"]),
        "versions": versions,
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in STAGES:
        STAGES[sys.argv[1]](Path(sys.argv[2]))
        return
    args = parse_args()
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        work = args.work_dir.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="kd-versus-trl-"))
    try:
        results = bench(args, work)
    except BaseException:
        # The logs of the stage that failed are the way to its cause: keep them.
        print(f"kept {work} (logs/ has each stage's output)", file=sys.stderr)
        raise
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    if args.work_dir:
        write_json(work / "results.json", results)
    section = render(results)
    print(section)
    if not args.no_doc:
        from losses import write_section  # torch only here (this folder is on sys.path): the parent stays light

        write_section(DOC, section)
        print(f"wrote section '{SECTION}' of {DOC}")


if __name__ == "__main__":
    main()
