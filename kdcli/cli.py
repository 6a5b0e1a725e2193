"""The `kd` command line. It parses arguments and renders results; the work happens in the modules it calls."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kdcli.errors import KdError

if TYPE_CHECKING:
    from kdcli.recipe import Recipe

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


# The LLM judge's options, shared by `kd eval` and `kd compare`.
JudgeModelOpt = Annotated[str, typer.Option("--judge-model", help="The judge's model name.")]
JudgeUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--judge-url", help="OpenAI-compatible base URL (default: $OPENAI_BASE_URL, else OpenAI).", show_default=False
    ),
]
JudgeConcurrencyOpt = Annotated[int, typer.Option("--judge-concurrency", help="Judge requests in flight.")]
JudgeRetriesOpt = Annotated[int, typer.Option("--judge-retries", help="Retries on 429, 5xx and timeouts.")]
JudgeTimeoutOpt = Annotated[float, typer.Option("--judge-timeout", help="Seconds per judge request.")]


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
    recipe: Annotated[
        Path | None, typer.Argument(help="The recipe YAML file (omit it with --resume).", show_default=False)
    ] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing, non-empty run folder.")] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc", min=1, help="Processes on this machine (via torchrun); more than one trains on DeepSpeed ZeRO."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the run in this folder from its newest complete checkpoint."),
    ] = None,
    local_rank: Annotated[int | None, typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
) -> None:
    """Train the recipe's student against its teacher and write the run folder."""
    # `local_rank` is accepted because the deepspeed launcher appends it; kd reads LOCAL_RANK from the environment.
    from transformers.utils import logging as hf_logging

    from kdcli.engine import distill as run_distill
    from kdcli.engine.trainer import RunInterrupted
    from kdcli.ui import RichObserver, err_console

    with user_errors():
        resolved = _distill_recipe(recipe, set_, resume)
        if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
            from kdcli.engine.launch import launch

            _check_launch(resolved, nproc, overwrite, resume)
            args = ["distill", *([str(recipe)] if recipe else []), *[a for item in set_ or [] for a in ("--set", item)]]
            args += [*(["--overwrite"] if overwrite else []), *(["--resume", str(resume)] if resume else [])]
            raise typer.Exit(launch(nproc, args))
        if nproc and int(os.environ.get("WORLD_SIZE", 1)) != nproc:
            raise KdError(f"--nproc {nproc}: kd runs under a launcher with WORLD_SIZE={os.environ['WORLD_SIZE']}.")

    hf_logging.disable_progress_bar()  # kd draws its own progress; per-load bars are noise
    observer = RichObserver()
    with user_errors():
        try:
            run_distill(resolved, overwrite=overwrite, observer=observer, resume=resume)
        except RunInterrupted as stop:
            if int(os.environ.get("RANK", 0)) == 0:
                err_console.print(f"[yellow]{stop}[/yellow]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        finally:
            observer.close()


def _distill_recipe(recipe: Path | None, set_: list[str] | None, resume: Path | None) -> Recipe:
    from kdcli.recipe import load_recipe
    from kdcli.runs import RunFolder

    if resume is None:
        if recipe is None:
            raise KdError("kd distill needs a recipe file, or --resume RUN_DIR to continue a run.")
        return load_recipe(recipe, set_)
    folder = RunFolder(resume)
    if recipe is not None or set_:
        raise KdError(f"--resume takes the recipe saved in {folder.recipe_file}; drop the recipe file and --set.")
    return load_recipe(RunFolder.existing(resume).recipe_file)


def _check_launch(recipe: Recipe, nproc: int, overwrite: bool, resume: Path | None) -> None:
    """Refuse contradictions before starting N processes, so the user sees one line, not N tracebacks."""
    from kdcli.engine.checkpoint import resume_checkpoint
    from kdcli.engine.distributed import World, deepspeed_config
    from kdcli.runs import RunFolder

    deepspeed_config(recipe, nproc)  # checks the global batch and the raw config
    if resume:
        resume_checkpoint(RunFolder.existing(resume), World(world_size=nproc))
    else:
        RunFolder.for_recipe(recipe).refuse_existing(overwrite)


@app.command("cache-teacher")
def cache_teacher(
    recipe: Annotated[
        Path | None, typer.Argument(help="The recipe YAML file (not needed with --verify).", show_default=False)
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Cache folder. Default: the recipe's teacher.cache, else <output_dir>/caches/<name>.",
            show_default=False,
        ),
    ] = None,
    top_k: Annotated[
        int | None,
        typer.Option("--top-k", help="Teacher log-probs kept per position (cache.top_k).", show_default=False),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="What to cache: train, eval or all.")] = "train",
    verify: Annotated[
        Path | None, typer.Option("--verify", help="Check an existing cache's shards and exit.", show_default=False)
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Rebuild a cache written with other settings.")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Run the recipe's teacher once over its data and store a compact, verifiable top-K cache to train from."""
    from transformers.utils import logging as hf_logging

    from kdcli.ui import console

    hf_logging.disable_progress_bar()
    with user_errors():
        if verify is not None:
            from kdcli.cache import verify_cache

            manifest = verify_cache(verify, on_shard=lambda path: console.print(f"[green]✓[/green] {path}"))
            shards = sum(len(entry["shards"]) for entry in manifest["splits"].values())
            console.print(f"[green]✓[/green] {verify}: {shards} shard(s) match the manifest.")
            return
        if recipe is None:
            raise KdError("cache-teacher: give a RECIPE to cache, or --verify DIR to check a cache.")
        if split not in ("train", "eval", "all"):
            raise KdError(f"--split: '{split}' is not one of train, eval, all.")
        if top_k is not None and top_k < 1:
            raise KdError(f"--top-k: {top_k} must be at least 1.")
        from kdcli.cache import write_cache
        from kdcli.cache.render import CacheProgress, summary_table
        from kdcli.recipe import load_recipe

        resolved = load_recipe(recipe, set_)
        target = out or Path(resolved.teacher.cache or Path(resolved.output_dir) / "caches" / resolved.name)
        splits = ("train", "eval") if split == "all" else (split,)
        bar = CacheProgress(console)
        try:
            manifest = write_cache(
                resolved,
                target,
                splits,
                top_k=top_k,
                overwrite=overwrite,
                on_progress=bar.update,
                on_message=bar.message,
            )
        finally:
            bar.close()
        console.print(summary_table(manifest, str(target)))


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


@app.command()
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    nproc: Annotated[
        int | None,
        typer.Option("--nproc", help="Processes (ranks) for the ZeRO rows. Default: $WORLD_SIZE, else 1."),
    ] = None,
    device_memory: Annotated[
        str | None,
        typer.Option(
            "--device-memory",
            help="Memory per rank, e.g. 80GiB. Default: the GPU's total, or this machine's available RAM.",
            show_default=False,
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            "--device", help="auto (the recipe's train.device), cpu or cuda: the memory limit and the loss chunk size."
        ),
    ] = "auto",
) -> None:
    """Per-rank memory of a recipe for kd's engine and ZeRO stages 0-3, from model configs: nothing loads."""
    from kdcli.plan import parse_size, plan_recipe
    from kdcli.plan.render import plan_view
    from kdcli.recipe import load_recipe
    from kdcli.ui import console

    with user_errors():
        if device not in ("auto", "cpu", "cuda"):
            raise KdError(f"--device: '{device}' is not one of auto, cpu, cuda.")
        try:
            limit = parse_size(device_memory) if device_memory is not None else None
        except ValueError as err:
            raise KdError(f"--device-memory: {err}") from None
        result = plan_recipe(
            load_recipe(recipe, set_),
            world_size=nproc,
            device=None if device == "auto" else device,  # type: ignore[arg-type]
            memory=limit,
        )
    console.print(plan_view(result))


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
) -> None:
    """Compare runs: the recipe keys that differ, training numbers, eval metrics with 95% intervals over prompts
    (and the spread over seeds), and deltas against a baseline with paired prompt-level bootstrap p-values."""
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
