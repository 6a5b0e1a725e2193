"""Commands that measure: `kd eval` and `kd compare`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kdcli.cli.app import (
    JudgeConcurrencyOpt,
    JudgeModelOpt,
    JudgeRetriesOpt,
    JudgeTimeoutOpt,
    JudgeUrlOpt,
    app,
    user_errors,
)
from kdcli.errors import KdError

if TYPE_CHECKING:
    from kdcli.evaluation import Target

ReportToOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--report-to",
        help="Also log the results into the run's loggers, at its last step: tensorboard (<run>/tensorboard/) "
        "and/or wandb. Repeatable, or comma-separated.",
        show_default=False,
    ),
]


@app.command("eval")
def eval_(
    targets: Annotated[
        list[str],
        typer.Argument(
            metavar="TARGET",
            help="Run folders (or a quoted glob such as 'runs/grid-*'), a model id or folder, or teacher:RECIPE. "
            "Several are evaluated one after another, each skipping the passes it already has.",
            show_default=False,
        ),
    ],
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            "-d",
            help="Eval set: any data spec recipes accept, or NAME=SPEC. Repeatable. "
            "Default: the recipe's data.eval (builtin:starter for a bare model).",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="Sampling seeds, comma-separated.")] = "10,20,30,40,50",
    greedy: Annotated[
        bool, typer.Option("--greedy", help="One deterministic greedy pass instead of sampling.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated at most.")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts generated together.")] = 8,
    max_examples: Annotated[
        int | None, typer.Option("--max-examples", help="Use the first N examples of each set.", show_default=False)
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            "--template",
            help="Prompt template instead of the recipe's (`chat` or a string with {prompt}).",
            show_default=False,
        ),
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision", help="auto (bf16 where native and saved so, or on a GPU; else fp32), bf16 or fp32."
        ),
    ] = "auto",
    device: Annotated[
        str, typer.Option("--device", help="auto (the first GPU where there is one, else the CPU), cpu, cuda, cuda:N.")
    ] = "auto",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Eval folder. Default: <run>/eval, or evals/<name> for a model or teacher.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Regenerate passes that already exist.")] = False,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines",
            help="Also score two answers that need no model: the prompt copied, and a fixed string of the set's most "
            "frequent reference words. A student that does not beat the second is not yet a model (docs/eval.md).",
        ),
    ] = False,
    judge: Annotated[
        str | None, typer.Option("--judge", help="LLM judge: gpt4 (the OpenAI chat API).", show_default=False)
    ] = None,
    judge_model: JudgeModelOpt = "gpt-4",
    judge_url: JudgeUrlOpt = None,
    judge_dry_run: Annotated[
        bool,
        typer.Option("--judge-dry-run", help="Print one judge prompt and the request/token estimate; send nothing."),
    ] = False,
    judge_concurrency: JudgeConcurrencyOpt = 4,
    judge_retries: JudgeRetriesOpt = 5,
    judge_timeout: JudgeTimeoutOpt = 120.0,
    report_to: ReportToOpt = None,
) -> None:
    """Generate with a student (or any model), score ROUGE-L, exact match, length, stop rate and distinct-n over
    seeds, and optionally judge the answers against the references with an LLM."""
    from transformers.utils import logging as hf_logging

    from kdcli.evaluation import EvalOptions, JudgeSettings, expand_targets, resolve_target, run_eval
    from kdcli.evaluation.render import RichEvalObserver
    from kdcli.ui import console

    hf_logging.disable_progress_bar()
    with user_errors():
        try:
            seed_list = [int(s) for s in seeds.replace(" ", "").split(",") if s]
        except ValueError:
            raise KdError(f"--seeds: '{seeds}' is not a comma-separated list of integers, e.g. 10,20,30.") from None
        if precision not in ("auto", "bf16", "fp32"):
            raise KdError(f"--precision: '{precision}' is not one of auto, bf16, fp32.")
        expanded = expand_targets(targets)
        if len(expanded) > 1 and out is not None:
            raise KdError(f"--out names one eval folder, and {len(expanded)} targets were given; drop --out.")
        # Every target is checked (and its loggers made) before the first generates.
        checked = [
            (target, *_eval_loggers(target, resolve_target(target, out=out, template=template), report_to or []))
            for target in expanded
        ]
    failed: list[str] = []
    for target, run_dir, loggers, step in checked:
        if len(checked) > 1:
            console.rule(f"kd eval {target}")
        options = EvalOptions(
            target=target,
            data=data or [],
            seeds=seed_list,
            greedy=greedy,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            max_examples=max_examples,
            template=template,
            precision=precision,  # type: ignore[arg-type]
            device=device,
            out=out,
            force=force,
            judge=judge,
            judge_settings=JudgeSettings(
                model=judge_model,
                base_url=judge_url,
                concurrency=judge_concurrency,
                max_retries=judge_retries,
                timeout=judge_timeout,
            ),
            judge_dry_run=judge_dry_run,
            baselines=baselines,
        )
        observer = RichEvalObserver(console)
        try:
            with user_errors():  # one line for this target's error; with several targets the next one goes on
                try:
                    summary = run_eval(options, observer)
                finally:
                    observer.close()
                if loggers:
                    from kdcli.loggers import log_once, results_scalars

                    log_once(loggers, run_dir, step, results_scalars(summary))
                    console.print(f"[dim]logged to {', '.join(report_to or [])} in {run_dir}, step {step}[/dim]")
        except typer.Exit:
            if len(checked) == 1:
                raise
            failed.append(target)
    if failed:
        console.print(f"[red]kd eval failed for {len(failed)} of {len(checked)} targets: {', '.join(failed)}[/red]")
        raise typer.Exit(1)


@app.command()
def compare(
    runs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN", help="Run folders (<output_dir>/<name>) to compare.", show_default=False),
    ],
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", help="The run deltas are taken against (default: the first).", show_default=False),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write a PNG: loss curves, metric bars with CIs, diagnostics.", show_default=False),
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", "-f", help="table, markdown, json or csv (the last three print plain text).")
    ] = "table",
    resamples: Annotated[
        int, typer.Option("--resamples", help="Bootstrap resamples of the prompts (one set serves every test and CI).")
    ] = 10_000,
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="Head-to-head LLM judge against the baseline: gpt4.", show_default=False),
    ] = None,
    judge_model: JudgeModelOpt = "gpt-4",
    judge_url: JudgeUrlOpt = None,
    judge_max_examples: Annotated[
        int | None,
        typer.Option("--judge-max-examples", help="Judge the first N shared examples per pass.", show_default=False),
    ] = None,
    judge_concurrency: JudgeConcurrencyOpt = 4,
    judge_retries: JudgeRetriesOpt = 5,
    judge_timeout: JudgeTimeoutOpt = 120.0,
    pool_seeds: Annotated[
        bool,
        typer.Option(
            "--pool-seeds",
            help=(
                "Runs whose recipes differ only in `seed` become one arm (one column): the mean over its runs, the "
                "spread over training seeds, and intervals and p-values that include it (docs/compare.md)."
            ),
        ),
    ] = False,
    adjust: Annotated[
        str,
        typer.Option(
            "--adjust",
            help="holm, bonferroni or none: adjust each eval table's p-values for the number of tests it shows, "
            "so that its stars keep a 0.05 chance of any false one (docs/compare.md).",
        ),
    ] = "holm",
    report_to: ReportToOpt = None,
) -> None:
    """Compare runs: the recipe keys that differ, training numbers, eval metrics with 95% intervals over prompts
    (and the spread over seeds), and deltas against a baseline with paired prompt-level bootstrap p-values,
    adjusted for the number of tests in each table."""
    from kdcli.compare.cli import run_compare
    from kdcli.ui import console

    with user_errors():
        base = baseline or (runs[0] if runs else None)
        loggers, step = _run_loggers(base, report_to or []) if base is not None else ([], 0)
        comparison = run_compare(
            runs,
            console,
            baseline=baseline,
            plot=plot,
            fmt=format_,
            resamples=resamples,
            judge=judge,
            judge_model=judge_model,
            judge_url=judge_url,
            judge_max_examples=judge_max_examples,
            judge_concurrency=judge_concurrency,
            judge_retries=judge_retries,
            judge_timeout=judge_timeout,
            pool_seeds=pool_seeds,
            adjust=adjust,
        )
        if loggers and base is not None:
            from kdcli.compare.render import to_markdown
            from kdcli.loggers import log_once

            log_once(loggers, base, step, {}, {"compare": to_markdown(comparison)})


def _eval_loggers(target: str, resolved: Target, report_to: list[str]) -> tuple[Path, list[Any], int]:
    """`kd eval --report-to`: the run folder TARGET (`resolved`: its `Target`) names, its loggers (the extras
    checked) and its last step."""
    from kdcli.loggers import check_names

    if not check_names(report_to, "--report-to"):
        return Path(), [], 0
    if resolved.kind != "run":
        raise KdError(f"--report-to: logs go to a run folder's loggers, and TARGET '{target}' is a {resolved.kind}.")
    run_dir = Path(resolved.model).parent  # the run's student/
    return (run_dir, *_run_loggers(run_dir, report_to))


def _run_loggers(run_dir: Path, report_to: list[str]) -> tuple[list[Any], int]:
    """The loggers `--report-to` names for a finished run, and the step they log at: the run's last."""
    from kdcli.loggers import check_names, loggers_for
    from kdcli.recipe import load_recipe
    from kdcli.runs import RunFolder

    names = check_names(report_to, "--report-to")
    if not names:
        return [], 0
    folder = RunFolder.existing(run_dir, "RUN")
    recipe = load_recipe(folder.recipe_file)
    step = folder.read_record().steps or 0
    return loggers_for(names, run_name=recipe.name, config=recipe.model_dump(mode="json"), key="--report-to"), step
