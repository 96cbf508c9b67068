"""The `arun` command line. Each command is thin: the work lives in one module per job."""

from __future__ import annotations

import sys

import click
from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> None:
    """One line naming the problem and the fix, then a non-zero exit."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    sys.exit(code)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def cli(ctx: click.Context) -> None:
    """arun: autonomous ML research on a fixed time budget, on MLX or PyTorch/CUDA."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command("prepare")
@click.option("--dataset", default="pystdlib", show_default=True,
              help="climbmix | tinystories | pystdlib | files:PATH (a file, directory or glob)")
@click.option("--profile", default="small", show_default=True, help="upstream | small | tiny")
@click.option("--num-shards", default=10, show_default=True, help="climbmix training shards to download")
@click.option("--download-workers", default=8, show_default=True)
@click.option("--txt-split", type=click.Choice(["auto", "file", "blank"]), default="auto", show_default=True,
              help="files: .txt as one document per file, or split on blank lines (auto: one file -> blank)")
@click.option("--force", is_flag=True, help="rebuild even if already prepared")
def prepare_cmd(dataset: str, profile: str, num_shards: int, download_workers: int, txt_split: str, force: bool) -> None:
    """Download data, train the tokenizer, pack the fixed validation rows."""
    import prepare as prep
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                label = {"tokenizer": "training tokenizer", "tokenize": "tokenizing (tokens)"}.get(stage, stage)
                tasks[stage] = bar.add_task(label, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            path = prep.prepare(dataset, profile, num_shards=num_shards, workers=download_workers,
                                txt_split=txt_split, force=force, log=console.print, progress=progress)
        except prep.PrepareError as e:
            fail(str(e))
    console.print(f"Ready: {path}")


@cli.command("doctor")
def doctor_cmd() -> None:
    """List each engine, whether it runs here (and why not), and its hardware tag."""
    from rich.table import Table

    from engines import BACKENDS, get_engine

    table = Table(title="arun engines")
    for col in ("backend", "available", "hardware tag", "detail"):
        table.add_column(col)
    for name in BACKENDS:
        try:
            engine = get_engine(name)
            ok, why = engine.available()
            tag = engine.hardware().tag if ok else "-"
        except Exception as e:  # an engine module failing to import is itself a diagnosis
            ok, why, tag = False, f"{type(e).__name__}: {e}", "-"
        table.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", tag, why)
    console.print(table)
    try:
        import prepare as prep
        data = prep.PreparedData.open()
        console.print(f"data: {data.dir} ({data.manifest['describe']})")
    except Exception as e:
        console.print(f"data: {e}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
