"""Commands that build: `kd distill`, `kd cache-teacher`, `kd recipe`, `kd losses`, `kd plan`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kdcli.cli.app import RecipeArg, SetOpt, app, recipe_app, user_errors
from kdcli.errors import KdError

if TYPE_CHECKING:
    from kdcli.recipe import Recipe


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
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            help=(
                "KEY=V1,V2,...: run the recipe once per value (values read as YAML, like --set); repeat it for the "
                "Cartesian product. The recipe's name must name every gridded key, e.g. `q-{divergence}-{seed}`. "
                "Finished runs are skipped, killed ones resumed, failed ones reported; then the kd compare table."
            ),
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --grid: list the runs and their state, and run nothing.")
    ] = False,
    local_rank: Annotated[int | None, typer.Option("--local_rank", "--local-rank", hidden=True)] = None,
) -> None:
    """Train the recipe's student against its teacher and write the run folder."""
    # `local_rank` is accepted because the deepspeed launcher appends it; kd reads LOCAL_RANK from the environment.
    from transformers.utils import logging as hf_logging

    from kdcli.engine import distill as run_distill
    from kdcli.engine.distributed import world_from_env
    from kdcli.engine.failure import ends_the_job
    from kdcli.engine.trainer import RunInterrupted
    from kdcli.ui import RichObserver, err_console

    if grid or dry_run:
        with user_errors():
            if not grid:
                raise KdError("--dry-run lists the runs of a --grid; add --grid KEY=V1,V2.")
            if resume is not None or recipe is None:
                raise KdError("--grid runs a recipe file: give RECIPE and drop --resume (the grid resumes its runs).")
            _distill_grid(recipe, set_ or [], grid, nproc, overwrite, dry_run)
        return

    with user_errors():
        resolved = _distill_recipe(recipe, set_, resume)
        loggers = _loggers(resolved)  # a missing extra is refused here, before any process starts or model loads
        if nproc and nproc > 1 and "WORLD_SIZE" not in os.environ:
            from kdcli.engine.launch import launch
            from kdcli.engine.trainer import how_to_continue
            from kdcli.runs import RunFolder

            _check_launch(resolved, nproc, overwrite, resume)
            args = ["distill", *([str(recipe)] if recipe else []), *[a for item in set_ or [] for a in ("--set", item)]]
            args += [*(["--overwrite"] if overwrite else []), *(["--resume", str(resume)] if resume else [])]
            folder = RunFolder(resume) if resume else RunFolder.for_recipe(resolved)
            raise typer.Exit(launch(nproc, args, lambda: how_to_continue(folder, nproc)))
        if nproc and int(os.environ.get("WORLD_SIZE", 1)) != nproc:
            raise KdError(f"--nproc {nproc}: kd runs under a launcher with WORLD_SIZE={os.environ['WORLD_SIZE']}.")

    hf_logging.disable_progress_bar()  # kd draws its own progress; per-load bars are noise
    observer: Any = RichObserver()
    if loggers:
        from kdcli.loggers import Fanout, TrainingLog

        observer = Fanout(observer, TrainingLog(loggers, resolved.train))
    # Under a launcher a failed rank reports and exits at once (its loggers closed first), so no other rank waits.
    with user_errors(), ends_the_job(world_from_env(), typer.Exit):
        try:
            run_distill(resolved, overwrite=overwrite, observer=observer, resume=resume)
        except RunInterrupted as stop:
            if int(os.environ.get("RANK", 0)) == 0:
                err_console.print(f"[yellow]{stop}[/yellow]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        finally:
            observer.close()


def _distill_grid(
    recipe: Path, sets: list[str], grid: list[str], nproc: int | None, overwrite: bool, dry_run: bool
) -> None:
    """`kd distill --grid`: plan every run (all checked before the first starts), run them, render the outcome."""
    import subprocess
    import sys

    from rich.table import Table

    from kdcli.grid import parse_axes, plan_grid, run_grid
    from kdcli.ui import console

    axes = parse_axes(grid)
    points = plan_grid(recipe, sets, axes)
    where = points[0].folder.path.parent if points else Path()
    table = Table(title=f"kd distill --grid: {len(points)} runs in {where}", header_style="bold")
    for column in ("run", "overrides", "state"):
        table.add_column(column, overflow="fold")
    for point in points:
        table.add_row(point.recipe.name, " ".join(point.overrides), point.state)
    console.print(table)
    if dry_run:
        return

    def announce(index: int, point: Any) -> None:
        console.rule(f"run {index + 1}/{len(points)}: {point.recipe.name} ({point.state})")

    def run(args: list[str]) -> int:
        return subprocess.call([sys.executable, "-m", "kdcli", *args])

    done = run_grid(recipe, sets, points, run, nproc=nproc, overwrite=overwrite, on_start=announce)
    summary = Table(title="grid outcome", header_style="bold")
    for column in ("run", "outcome"):
        summary.add_column(column)
    for point in done:
        summary.add_row(point.recipe.name, point.outcome or "not run (the grid stopped)")
    console.print(summary)
    finished = [p.folder.path for p in done if p.outcome in ("finished", "finished before")]
    if finished:
        from kdcli.compare.cli import run_compare

        # A seed axis repeats each setting: compare the settings (arms), not the seeds' runs one by one.
        run_compare(finished, console, pool_seeds=any(axis.key == "seed" for axis in axes))
    failed = [p for p in done if p.outcome is None or not p.outcome.startswith("finished")]
    if failed:
        raise typer.Exit(130 if any(p.outcome == "interrupted" for p in failed) else 1)


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


def _loggers(recipe: Recipe) -> list[Any]:
    """`train.report_to`'s loggers, their packages imported (the extras' check), nothing written yet."""
    if not recipe.train.report_to:
        return []
    from kdcli.loggers import loggers_for

    return loggers_for(recipe.train.report_to, run_name=recipe.name, config=recipe.model_dump(mode="json"))


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
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="What to cache: train, eval or all. Default: what kd distill reads (train, and eval if the recipe "
            "has data.eval).",
            show_default=False,
        ),
    ] = None,
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
        if split not in (None, "train", "eval", "all"):
            raise KdError(f"--split: '{split}' is not one of train, eval, all.")
        if top_k is not None and top_k < 1:
            raise KdError(f"--top-k: {top_k} must be at least 1.")
        from kdcli.cache import splits_distill_reads, write_cache
        from kdcli.cache.render import CacheProgress, summary_table
        from kdcli.recipe import load_recipe

        resolved = load_recipe(recipe, set_)
        target = out or Path(resolved.teacher.cache or Path(resolved.output_dir) / "caches" / resolved.name)
        splits = splits_distill_reads(resolved) if split is None else ("train", "eval") if split == "all" else (split,)
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
    from kdcli.losses import CROSS_TOKENIZER, LOSSES
    from kdcli.ui import console, losses_table

    console.print(losses_table(LOSSES.values()))
    title = "across tokenizers (loss.cross_tokenizer.method)"
    console.print(losses_table(CROSS_TOKENIZER.values(), title, "loss.cross_tokenizer.params"))


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
