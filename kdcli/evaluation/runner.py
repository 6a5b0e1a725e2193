"""`kd eval` end to end: resolve the target, load the sets, generate (or reuse) every pass, score, judge, record.

Everything that can be wrong with the input (target, data, a missing API key, generations made differently) is
reported before the model is loaded or anything is generated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kdcli.errors import KdError
from kdcli.evaluation.baselines import baseline_entry, baseline_rows
from kdcli.evaluation.generate import generate_pass, pass_file, pass_label
from kdcli.evaluation.judge import (
    JudgeClient,
    JudgeSettings,
    ReplyCache,
    cache_key,
    estimate,
    load_template,
    pass_requests,
)
from kdcli.evaluation.judge import score_pass as judge_pass
from kdcli.evaluation.judge.failures import JudgeFailures, check_some_succeeded
from kdcli.evaluation.metrics import aggregate, mean_std, score_pass
from kdcli.evaluation.observer import EvalObserver, SilentEvalObserver
from kdcli.evaluation.results import (
    JUDGE_CACHE_FILE,
    RESULTS_FILE,
    check_generation,
    delete_pass,
    now,
    read_json,
    record_pass,
    update_results,
    write_jsonl,
)
from kdcli.evaluation.sets import EvalSet, load_eval_set, parse_data_arg, set_name
from kdcli.evaluation.targets import Target, resolve_target
from kdcli.hardware import Runtime, check_device_spec, resolve_device, resolve_precision, saved_precision
from kdcli.models import GenerationSettings, read_generations, weights_fingerprint
from kdcli.recipe.schema import DataFields

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_SEEDS = (10, 20, 30, 40, 50)
JUDGES = ("gpt4",)
Precision = Literal["auto", "bf16", "fp32"]


@dataclass
class EvalOptions:
    target: str
    data: Sequence[str] = ()
    seeds: Sequence[int] = DEFAULT_SEEDS
    greedy: bool = False
    max_new_tokens: int = 256
    batch_size: int = 8
    max_examples: int | None = None
    template: str | None = None
    precision: Precision = "auto"
    device: str = "auto"
    out: Path | None = None
    force: bool = False
    judge: str | None = None
    judge_settings: JudgeSettings = field(default_factory=JudgeSettings)
    judge_dry_run: bool = False
    baselines: bool = False  # also score the answers that need no model (`evaluation.baselines`)


@dataclass
class _Judging:
    settings: JudgeSettings
    cache: ReplyCache
    client: JudgeClient | None  # None in a dry run
    requests: list[list[dict[str, str]]] = field(default_factory=list)  # dry run: what would be sent
    uncached: int = 0


def run_eval(opts: EvalOptions, observer: EvalObserver | None = None, *, api_key: str | None = None) -> dict[str, Any]:
    """Evaluate `opts.target` on every set; return `results.json` as written, plus this run's judge usage.

    `api_key` defaults to $OPENAI_API_KEY; the judge's URL to `opts.judge_settings.base_url`, then
    $OPENAI_BASE_URL.
    """
    observer = observer or SilentEvalObserver()
    _validate(opts)
    target = resolve_target(opts.target, out=opts.out, template=opts.template)
    judging = _judging(opts, target, api_key)  # a missing key stops here, before any model work

    from kdcli.models import load_tokenizer

    tokenizer = load_tokenizer(target.model, field="TARGET")
    sets = _load_sets(opts, target, tokenizer)
    passes: list[int | None] = [None] if opts.greedy else list(dict.fromkeys(opts.seeds))
    mode = "greedy" if opts.greedy else "sampling"
    inputs_model = {"model": target.recorded_model, "weights": weights_fingerprint(target.model)}

    runtime = _runtime(opts, target)
    precision = runtime.precision
    settings = GenerationSettings(max_new_tokens=opts.max_new_tokens, greedy=opts.greedy, precision=precision)
    records: dict[str, dict[str, Any]] = {}
    for eval_set in sets:
        set_dir = target.eval_dir / eval_set.name
        inputs = {"data": eval_set.spec, "examples": len(eval_set), "prompts_sha256": eval_set.digest(), **inputs_model}
        records[eval_set.name] = check_generation(set_dir, inputs, mode, settings.as_dict(), force=opts.force)
        if opts.force:
            for seed in passes:
                delete_pass(set_dir, pass_label(seed))

    todo = [(s, seed) for s in sets for seed in passes if not pass_file(target.eval_dir / s.name, seed).exists()]
    observer.message(f"kd eval → {target.eval_dir}  ·  {target.kind} {target.name}  ·  {mode}")
    model = _load_model(target, runtime, observer) if todo else None

    results: dict[str, Any] = {}
    failures = JudgeFailures()  # of this run's verdicts, every set and pass
    for eval_set in sets:
        set_dir = target.eval_dir / eval_set.name
        record = records[eval_set.name]
        per_pass: dict[str, dict[str, float]] = {}
        rows_by_pass: dict[str, list[dict[str, Any]]] = {}
        for seed in passes:
            label, path = pass_label(seed), pass_file(set_dir, seed)
            if path.exists():
                stats = {**record["passes"].get(label, {}), "reused": True}
            else:
                assert model is not None
                observer.on_pass_start(eval_set.name, label, len(eval_set))
                stats = generate_pass(
                    model,
                    tokenizer,
                    eval_set.items,
                    settings,
                    seed,
                    path,
                    batch_size=opts.batch_size,
                    on_progress=observer.on_pass_progress,
                )
                stats = {**stats, "device": runtime.describe()}
                record_pass(set_dir, record, label, stats)
                stats = {**stats, "reused": False}
            rows = read_generations(path, "Pass --force to regenerate it.")
            if len(rows) != len(eval_set):
                raise KdError(f"{path}: has {len(rows)} rows for {len(eval_set)} examples. Pass --force to regenerate.")
            rows_by_pass[label] = rows
            per_pass[label] = score_pass(rows)
            observer.on_pass_end(eval_set.name, label, {**stats, **per_pass[label]})

        judge_entry = _judge_set(judging, eval_set, set_dir, rows_by_pass, per_pass, observer) if judging else None
        if judge_entry and "failures" in judge_entry:
            failures += JudgeFailures.from_dict(judge_entry["failures"])
        entry = _set_entry(eval_set, mode, passes, settings, record, per_pass, judge_entry)
        if opts.baselines or _had_baselines(target.eval_dir, eval_set.name, mode):  # kept up to date once asked for
            entry["baselines"] = _baselines(eval_set, set_dir, tokenizer)
        results = update_results(target.eval_dir, target.describe(), eval_set.name, mode, entry)

    if judging is not None and judging.client is None:
        observer.on_dry_run(judging.requests[0] if judging.requests else [], _dry_estimate(judging))
    summary = {**results, "eval_dir": str(target.eval_dir), "evaluated": [(s.name, mode) for s in sets]}
    if judging is not None and judging.client is not None:
        summary["judge_usage"] = judging.client.stats.as_dict()
    observer.on_end(summary)
    if opts.judge is not None:
        check_some_succeeded(failures, opts.judge, f"{target.eval_dir}/<set>/judge-<pass>.jsonl")
    return summary


def _validate(opts: EvalOptions) -> None:
    if not opts.greedy:
        if not opts.seeds:
            raise KdError("--seeds: give at least one seed, e.g. --seeds 10,20,30,40,50 (or use --greedy).")
        if any(s < 0 for s in opts.seeds):
            raise KdError(f"--seeds: seeds are non-negative integers (got {list(opts.seeds)}).")
    check_device_spec(opts.device, "--device")
    if opts.max_new_tokens < 1:
        raise KdError(f"--max-new-tokens: must be at least 1 (got {opts.max_new_tokens}).")
    if opts.batch_size < 1:
        raise KdError(f"--batch-size: must be at least 1 (got {opts.batch_size}).")
    if opts.max_examples is not None and opts.max_examples < 1:
        raise KdError(f"--max-examples: must be at least 1 (got {opts.max_examples}).")
    if opts.judge is not None and opts.judge not in JUDGES:
        raise KdError(f"--judge: unknown judge '{opts.judge}'. Choose one of: {', '.join(JUDGES)}.")
    if opts.judge_dry_run and opts.judge is None:
        raise KdError("--judge-dry-run: needs --judge gpt4 (it previews that judge's requests).")
    js = opts.judge_settings
    if js.concurrency < 1 or js.max_retries < 0 or js.timeout <= 0:
        raise KdError("--judge-concurrency must be ≥ 1, --judge-retries ≥ 0 and --judge-timeout > 0.")


def _judging(opts: EvalOptions, target: Target, api_key: str | None) -> _Judging | None:
    if opts.judge is None:
        return None
    settings = opts.judge_settings
    if settings.base_url is None and os.environ.get("OPENAI_BASE_URL"):
        settings = replace(settings, base_url=os.environ["OPENAI_BASE_URL"])
    load_template(settings.prompt)  # a broken template is an input error: report it before generating
    cache = ReplyCache.open(target.eval_dir / JUDGE_CACHE_FILE)
    if opts.judge_dry_run:
        return _Judging(settings, cache, None)
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
    if not key.strip():
        raise KdError(
            f"--judge {opts.judge}: OPENAI_API_KEY is not set. Export it (any non-empty value for a local server "
            "without authentication), or preview the requests with --judge-dry-run. Nothing was generated."
        )
    return _Judging(settings, cache, JudgeClient(settings, key.strip(), cache))


def _load_sets(opts: EvalOptions, target: Target, tokenizer: PreTrainedTokenizerBase) -> list[EvalSet]:
    recipe_eval = target.data.eval if target.kind != "model" else None
    if opts.data:
        specs = [parse_data_arg(arg) for arg in opts.data]
    elif target.data.eval:
        specs = [(None, target.data.eval)]
    else:
        raise KdError(f"TARGET: the recipe of {target.name} has no data.eval. Name a set with --data SPEC.")
    sets: list[EvalSet] = []
    for name, spec in specs:
        name = name or set_name(spec)
        if any(s.name == name for s in sets):
            raise KdError(f"--data: two sets are named '{name}'. Name them apart: --data NAME=SPEC.")
        # The recipe's column mapping and example limit belong to its own eval set; other files are auto-mapped.
        own = spec == recipe_eval
        fields = target.data.fields if own else DataFields()
        limit = opts.max_examples or (target.data.max_eval_examples if own else None)
        key = "data.eval" if own and not opts.data else "--data"
        sets.append(load_eval_set(spec, name, target.data, tokenizer, fields=fields, limit=limit, key=key))
    return sets


def _runtime(opts: EvalOptions, target: Target) -> Runtime:
    """`--device` as `train.device` reads it; `--precision auto` as `train.precision` does, except that on a CPU
    with native bf16 a model is run in the precision it was saved in (emulated bf16 is about 5x slower, and fp32
    holds bf16 weights exactly)."""
    device = resolve_device(opts.device, "--device")
    saved = None
    if opts.precision == "auto" and device.type == "cpu":
        from kdcli.models import load_config

        saved = saved_precision(load_config(target.model, field="TARGET"))
    return Runtime(device, resolve_precision(opts.precision, str(device), saved=saved))


def _load_model(target: Target, runtime: Runtime, observer: EvalObserver) -> PreTrainedModel:
    from kdcli.models import load_model

    observer.message(f"Loading {target.model} ({runtime.precision}, {runtime.device})")
    model = load_model(target.model, runtime.inference_dtype, field="TARGET").to(runtime.device)
    model.eval()
    model.requires_grad_(False)
    return model


def _judge_set(
    judging: _Judging,
    eval_set: EvalSet,
    set_dir: Path,
    rows_by_pass: dict[str, list[dict[str, Any]]],
    per_pass: dict[str, dict[str, float]],
    observer: EvalObserver,
) -> dict[str, Any]:
    template = load_template(judging.settings.prompt)
    params = judging.settings.request_params()
    judged: dict[str, dict[str, Any]] = {}
    failures = JudgeFailures()
    for label, rows in rows_by_pass.items():
        requests = pass_requests(rows, template)
        if judging.client is None:
            judging.requests.extend(requests)
            judging.uncached += sum(
                1 for m in requests if not judging.cache.replies(cache_key(judging.settings.model, m, params))
            )
            continue
        observer.on_judge_start(eval_set.name, label, len(requests))
        verdicts = judging.client.judge_all(requests, on_done=lambda: observer.on_judge_progress(1))
        metrics, records = judge_pass(rows, verdicts)
        failures += JudgeFailures.of(verdicts)
        write_jsonl(set_dir / f"judge-{label}.jsonl", records)
        observer.on_judge_end(eval_set.name, label)
        judged[label] = metrics
        if metrics["judge"] is not None:
            per_pass[label]["judge"] = metrics["judge"]
    if judging.client is None:
        return {"dry_run": True}
    return {
        "settings": judging.settings.record(),
        "prompt": template.version,
        "prompt_sha256": template.sha256,
        "per_seed": judged,
        "failed_verdicts": sum(m["failed_verdicts"] for m in judged.values()),
        "excluded_examples": sum(m["excluded_examples"] for m in judged.values()),
        "failures": failures.as_dict(),
    }


def _had_baselines(eval_dir: Path, set_name: str, mode: str) -> bool:
    try:
        results = read_json(eval_dir / RESULTS_FILE) or {}
    except KdError:
        return False  # a damaged results.json is rebuilt by update_results, which names it
    sets = results.get("sets")
    modes = sets.get(set_name) if isinstance(sets, dict) else None  # a damaged one is named by update_results
    entry = modes.get(mode) if isinstance(modes, dict) else None
    return isinstance(entry, dict) and bool(entry.get("baselines"))


def _baselines(eval_set: EvalSet, set_dir: Path, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Write each model-free answer's pass file beside the model's and return its results.json entry."""

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    entries: dict[str, Any] = {}
    for name, rows in baseline_rows(eval_set.items, count_tokens).items():
        entry = baseline_entry(name, rows)
        write_jsonl(set_dir / f"{entry['label']}.jsonl", rows)
        entries[name] = entry
    return entries


def _dry_estimate(judging: _Judging) -> dict[str, Any]:
    return estimate(judging.requests, judging.uncached, judging.settings)


def _set_entry(
    eval_set: EvalSet,
    mode: str,
    passes: list[int | None],
    settings: GenerationSettings,
    record: dict[str, Any],
    per_pass: dict[str, dict[str, float]],
    judge: dict[str, Any] | None,
) -> dict[str, Any]:
    generation = {label: record["passes"].get(label, {}) for label in per_pass}
    speeds = [float(p["tokens_per_s"]) for p in generation.values() if p.get("tokens_per_s")]
    entry: dict[str, Any] = {
        "data": eval_set.spec,
        "examples": len(eval_set),
        "mode": mode,
        "seeds": [s for s in passes if s is not None],
        "settings": settings.as_dict(),
        "metrics": aggregate(per_pass),
        "generation": {"passes": generation, "tokens_per_s": mean_std(speeds)[0] if speeds else None},
        "updated": now(),
    }
    if judge is not None and not judge.get("dry_run"):
        entry["judge"] = judge
    return entry
