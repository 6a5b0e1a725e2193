"""The `kd` command line. It parses arguments and renders results; the work happens in the modules it calls."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from kdcli.errors import KdError

app = typer.Typer(
    name="kd",
    help="Distill large language models: one YAML recipe, exact AKL/ATKD and classic divergences.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipe_app = typer.Typer(help="Inspect and validate recipes.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")

_state = {"debug": False}


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input becomes one line on stderr and exit code 2; `kd --debug` shows the traceback instead."""
    try:
        yield
    except KdError as err:
        if _state["debug"]:
            raise
        from rich.markup import escape

        from kdcli.ui import err_console

        err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe key, e.g. --set train.max_steps=10 --set loss.divergence=rkl. Repeatable.",
        show_default=False,
    ),
]


def _version(value: bool) -> None:
    if value:
        from kdcli import __version__

        typer.echo(f"kd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug


@app.command()
def distill(
    recipe: RecipeArg,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing, non-empty run folder.")] = False,
) -> None:
    """Train the recipe's student against its teacher and write the run folder."""
    from transformers.utils import logging as hf_logging

    from kdcli.engine import distill as run_distill
    from kdcli.recipe import load_recipe
    from kdcli.ui import RichObserver

    hf_logging.disable_progress_bar()  # kd draws its own progress; per-load bars are noise
    observer = RichObserver()
    with user_errors():
        try:
            run_distill(load_recipe(recipe, set_), overwrite=overwrite, observer=observer)
        finally:
            observer.close()


@recipe_app.command("check")
def recipe_check(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Validate a recipe and print it resolved, with every default filled in."""
    from rich.syntax import Syntax

    from kdcli.recipe import load_recipe
    from kdcli.runs import recipe_yaml
    from kdcli.ui import console

    with user_errors():
        resolved = load_recipe(recipe, set_)
    console.print(f"[green]✓[/green] {recipe} is valid. Resolved recipe:", soft_wrap=True)
    console.print(Syntax(recipe_yaml(resolved), "yaml", theme="ansi_dark", background_color="default"))


@recipe_app.command("keys")
def recipe_keys(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table (as in the README).")] = False,
) -> None:
    """List every recipe key with its default and meaning."""
    from kdcli.recipe.reference import reference_markdown, reference_rows
    from kdcli.ui import console, keys_table

    if markdown:
        typer.echo(reference_markdown(), nl=False)
    else:
        console.print(keys_table(reference_rows()))


@app.command()
def losses() -> None:
    """List the divergences: parameters, defaults and the paper each comes from."""
    from kdcli.losses import LOSSES
    from kdcli.ui import console, losses_table

    console.print(losses_table(LOSSES.values()))


@app.command("eval")
def eval_(
    target: Annotated[
        str, typer.Argument(help="A run folder, a model id or folder, or teacher:RECIPE.", show_default=False)
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
        str, typer.Option("--precision", help="auto (bf16 when saved so, or on a GPU), bf16 or fp32.")
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
    judge: Annotated[
        str | None, typer.Option("--judge", help="LLM judge: gpt4 (the OpenAI chat API).", show_default=False)
    ] = None,
    judge_model: Annotated[str, typer.Option("--judge-model", help="The judge's model name.")] = "gpt-4",
    judge_url: Annotated[
        str | None,
        typer.Option(
            "--judge-url",
            help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL, else OpenAI).",
            show_default=False,
        ),
    ] = None,
    judge_dry_run: Annotated[
        bool,
        typer.Option("--judge-dry-run", help="Print one judge prompt and the request/token estimate; send nothing."),
    ] = False,
    judge_concurrency: Annotated[int, typer.Option("--judge-concurrency", help="Judge requests in flight.")] = 4,
    judge_retries: Annotated[int, typer.Option("--judge-retries", help="Retries on 429, 5xx and timeouts.")] = 5,
    judge_timeout: Annotated[float, typer.Option("--judge-timeout", help="Seconds per judge request.")] = 120.0,
) -> None:
    """Generate with a student (or any model), score ROUGE-L, exact match, length and distinct-n over seeds,
    and optionally judge the answers against the references with an LLM."""
    from transformers.utils import logging as hf_logging

    from kdcli.evaluation import EvalOptions, JudgeSettings, run_eval
    from kdcli.evaluation.render import RichEvalObserver
    from kdcli.ui import console

    hf_logging.disable_progress_bar()
    observer = RichEvalObserver(console)
    with user_errors():
        try:
            seed_list = [int(s) for s in seeds.replace(" ", "").split(",") if s]
        except ValueError:
            raise KdError(f"--seeds: '{seeds}' is not a comma-separated list of integers, e.g. 10,20,30.") from None
        if precision not in ("auto", "bf16", "fp32"):
            raise KdError(f"--precision: '{precision}' is not one of auto, bf16, fp32.")
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
        )
        try:
            run_eval(options, observer)
        finally:
            observer.close()


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
    resamples: Annotated[int, typer.Option("--resamples", help="Paired bootstrap resamples per test.")] = 10_000,
    judge: Annotated[
        str | None,
        typer.Option("--judge", help="Head-to-head LLM judge against the baseline: gpt4.", show_default=False),
    ] = None,
    judge_model: Annotated[str, typer.Option("--judge-model", help="The judge's model name.")] = "gpt-4",
    judge_url: Annotated[
        str | None,
        typer.Option(
            "--judge-url",
            help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL, else OpenAI).",
            show_default=False,
        ),
    ] = None,
    judge_max_examples: Annotated[
        int | None,
        typer.Option("--judge-max-examples", help="Judge the first N shared examples per pass.", show_default=False),
    ] = None,
    judge_concurrency: Annotated[int, typer.Option("--judge-concurrency", help="Judge requests in flight.")] = 4,
    judge_retries: Annotated[int, typer.Option("--judge-retries", help="Retries on 429, 5xx and timeouts.")] = 5,
    judge_timeout: Annotated[float, typer.Option("--judge-timeout", help="Seconds per judge request.")] = 120.0,
) -> None:
    """Compare runs: the recipe keys that differ, training numbers, eval metrics with 95% CIs over seeds, and
    deltas against a baseline with paired bootstrap p-values."""
    from kdcli.compare.cli import run_compare
    from kdcli.ui import console

    with user_errors():
        run_compare(
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
        )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
