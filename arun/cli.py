"""The `arun` command line. Each command is thin: the work lives in one module per job."""

from __future__ import annotations

import ast
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

import prepare
from arun.core import confine, forward_store, gitops, trust
from arun.core.attempts import load_attempt, restore_attempt
from arun.core.errors import ArunError
from arun.core.experiment import run_experiment
from arun.core.ledger import all_records
from arun.core.timing import default_allowance
from arun.core.trainfile import check_value, constants, rewrite_constants, safe_eval
from arun.report.compare import NOT_HELD_OUT_NOTE, compare, compare_tables
from arun.report.export import write_tsv
from arun.report.history import find_record, log_rows, log_table, show_renderables, tag_records
from arun.report.plot import plot_tags
from arun.report.signers import signer_lines
from arun.report.site import build_site
from arun.report.summary import parse_time, report, select
from arun.report.val_vs_test import heldout_report
from arun.search.calibrate import Options as CalibrateOptions
from arun.search.calibrate import calibrate, calibration_table
from arun.search.loop import run_loop, stopper_for
from arun.search.noise import measure_noise, significance_decider
from arun.search.transfer import transfer
from arun.swarm.driver import SwarmOptions, run_swarm, swarm_report
from arun_data import build, not_held_out
from engines import BACKENDS, TRAIN_FILES, get_engine
from engines.atomic import write_atomic

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """One line naming the problem and the fix, then a non-zero exit."""
    # escape: a hint such as pip install -e '.[sweep]' must keep its [extra] (rich reads [..] as markup)
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)


def require_project(cwd: Path) -> None:
    """The read-side commands name a wrong directory instead of reporting "no experiments yet"."""
    try:
        gitops.open_repo(cwd)
    except ArunError as e:
        fail(f"not an arun project: {e}")
    if not (cwd / "prepare.py").is_file() and not any((cwd / "bench").glob("*/ledger.jsonl")):
        fail(f"not an arun project: {cwd} has neither prepare.py nor bench/*/ledger.jsonl; "
             f"cd into the project (your clone of arun)")


class ArunGroup(click.Group):
    """The one place an ArunError becomes the one-line message and exit code 1, for every command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ArunError as e:
            fail(str(e))


def say(line: str) -> None:
    """The harness's progress lines, printed as they are (no markup, no highlighting)."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- options shared by several commands

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]  # what click.option returns: it adds one option

def backend_choice(help: str) -> Decorator:
    return click.option("--backend", required=True, type=click.Choice(BACKENDS), help=help)


def budget_option() -> Decorator:
    return click.option("--budget", type=float, default=None, help="training seconds (default: prepare.TIME_BUDGET = 300)")


def device_option(help: str = "torch engine device") -> Decorator:
    return click.option("--device", type=click.Choice(["cuda", "cpu"]), default=None, help=help)


def timeout_option(help: str = "hard kill of a training run (seconds)") -> Decorator:
    return click.option("--timeout", "hard_timeout", type=float, default=None, help=help)


def allowance_option() -> Decorator:
    return click.option("--allowance", type=float, default=None,
                        help="seconds a run may spend besides training: start-up, compilation, export "
                             "(default: max(60, budget/5)); the rest of its wall time is charged as training")


def seeds_option(help: str = "score every change over N seeds", default: int = 1) -> Decorator:
    return click.option("--seeds", type=int, default=default, show_default=True, help=help)


def confidence_option(help: str) -> Decorator:
    return click.option("--confidence", type=float, default=None, help=help)


def hours_option() -> Decorator:
    return click.option("--hours", type=float, default=None, help="start no experiment after this many hours")


def near_miss_option() -> Decorator:
    return click.option("--near-miss", type=float, default=None, help="flag discards this close to the best (default 0.002)")


def require_confinement_option() -> Decorator:
    """--require-confinement (or ARUN_REQUIRE_CONFINEMENT=1): refuse to run where the OS cannot confine
    the train process. Set in the environment, so the harness checks it again wherever it launches one
    (every loop iteration, every swarm worker)."""
    def apply(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            os.environ["ARUN_REQUIRE_CONFINEMENT"] = "1"
            try:
                confine.require(True)
            except ArunError as e:
                fail(str(e))
        return value
    return click.option("--require-confinement", is_flag=True, envvar="ARUN_REQUIRE_CONFINEMENT", expose_value=False,
                        callback=apply, help="refuse to run unless the OS confines the train process (Landlock, Seatbelt)")


def options(*opts: Decorator) -> Decorator:
    """Applies options in the order listed (as stacked decorators would read)."""
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(opts):
            f = option(f)
        return f
    return apply


# The options of one experiment, shared by `arun --backend X` and `arun run`.
experiment_options = options(
    click.option("--backend", metavar="NAME", help="engine: mlx (Apple GPU / CPU) or cuda (PyTorch; --device cpu without a GPU)"),
    click.option("-m", "--message", "description", default="", help="what this experiment tried"),
    budget_option(),
    device_option("torch engine device; cpu is explicit, never a fallback"),
    timeout_option("hard kill this many seconds after the start (default: a clock that starts at the first step, "
                   "budget + max(120, budget); compilation before it gets up to 30 minutes)"),
    allowance_option(),
    seeds_option("score the change over N seeds"),
    confidence_option("with --seeds: keep only when better at this confidence (e.g. 0.95)"),
    click.option("--wait", type=float, default=0.0, help="seconds to wait for another arun in this repo"),
    click.option("--early-stop", is_flag=True, help="stop the run once its train loss is clearly behind the best's "
                 "at the same progress (recorded discard, stopped_at)"),
    require_confinement_option(),
)


def run_one(backend: str | None, description: str, budget: float | None, device: str | None,
            hard_timeout: float | None, seeds: int, confidence: float | None, wait: float,
            allowance: float | None, early_stop: bool = False) -> dict:
    if backend is None:
        fail("no backend given; use arun --backend mlx or arun --backend cuda")
    decide_fn = None
    if confidence:  # the significance gate (arun.search.stats); with one seed it needs `arun noise` for the key
        try:
            decide_fn = significance_decider(confidence, log=lambda s: console.print(s, markup=False, highlight=False))
        except ValueError as e:
            fail(str(e))
    try:
        stopper = stopper_for(Path.cwd(), backend, budget, device, log=say) if early_stop else None
        return run_experiment(Path.cwd(), backend, description, budget=budget, seeds=seeds, device=device,
                              hard_timeout=hard_timeout, confidence=confidence, wait=wait, decide_fn=decide_fn,
                              allowance=allowance, early_stop=stopper,
                              log=say)
    except KeyboardInterrupt as e:
        if e.args:  # raised by run_experiment after it recorded the interrupted run
            fail(f"interrupted ({e.args[0]}): the run was recorded as crash and the train file is as it was "
                 "before the run", code=130)
        fail("interrupted before the experiment started; nothing was recorded or changed", code=130)


@click.group(cls=ArunGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@experiment_options
@click.pass_context
def cli(ctx: click.Context, backend: str | None, **opts: Any) -> None:
    """arun: autonomous ML research on a fixed time budget, on MLX or PyTorch/CUDA.

    `arun --backend mlx -m "what I tried"` runs one experiment (same as `arun run`)."""
    if ctx.invoked_subcommand is not None:
        return
    if backend is None:
        # (a setting from the environment, e.g. ARUN_REQUIRE_CONFINEMENT=1 in a profile, is not an option given)
        given = [p.opts[-1] for p in ctx.command.params
                 if ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT,
                                                             click.core.ParameterSource.ENVIRONMENT)]
        if given:  # options of an experiment without its engine: an error, not the help text
            fail(f"{' '.join(given)} given without a backend; add --backend mlx|cuda (e.g. arun --backend mlx -m \"...\")")
        click.echo(ctx.get_help())
        return
    record = run_one(backend, **opts)
    sys.exit(0 if record["status"] in ("keep", "discard") else 2)


@cli.command("run")
@experiment_options
def run_cmd(backend: str | None, **opts: Any) -> None:
    """Run one experiment on the current train file: record it, keep it or revert it."""
    record = run_one(backend, **opts)
    sys.exit(0 if record["status"] in ("keep", "discard") else 2)


@cli.command("start")
@click.argument("name")
def start_cmd(name: str) -> None:
    """Create (or switch to) the run branch autoresearch/NAME."""
    branch, created = gitops.ensure_run_branch(Path.cwd(), name)
    console.print(f"{'created' if created else 'on'} {branch}")


@cli.command("set")
@backend_choice("whose train file to edit")
@click.argument("assignments", nargs=-1, required=True, metavar="NAME=VALUE...")
def set_cmd(backend: str, assignments: tuple[str, ...]) -> None:
    """Set constants in the train file's hyperparameter block, e.g. `arun set --backend mlx DEPTH=2`.

    VALUE is a Python literal or arithmetic (2**16, (0.8, 0.95), "SSSL"); a bare word is a string.
    The edit is an ordinary change to the train file: the next experiment records and judges it."""
    path = Path.cwd() / TRAIN_FILES[backend]
    if not path.exists():
        fail(f"{path.name} not found in {Path.cwd()}; run arun set from the project's root")
    overrides = {}
    for item in assignments:
        name, eq, raw = item.partition("=")
        if not eq or not name.strip():
            fail(f"{item!r} is not NAME=VALUE; write e.g. DEPTH=2")
        try:
            value = safe_eval(ast.parse(raw.strip(), mode="eval").body)
        except (SyntaxError, ValueError):
            value = raw.strip()  # a bare word such as SSSL
        overrides[name.strip()] = value
    text = path.read_text()
    before = constants(text, keep_source=True)
    unknown = sorted(set(overrides) - set(before))
    if unknown:
        fail(f"{', '.join(unknown)} not in the hyperparameter block of {path.name}; it has: {', '.join(before)}")
    for name, value in overrides.items():
        problem = check_value(name, before[name], value)
        if problem:
            fail(f"{problem} (nothing was changed)")
    write_atomic(path, rewrite_constants(text, overrides).encode())
    for name, value in overrides.items():
        console.print(f"{path.name}: {name} = {before[name]!r} -> {value!r}")


@cli.command("calibrate")
@backend_choice("whose train file to size")
@device_option()
@budget_option()
@click.option("--probe-seconds", type=float, default=2.0, show_default=True, help="training seconds of each probe")
@click.option("--max-depth", type=int, default=None, help="deepest model to consider (default: the file's DEPTH)")
@click.option("--max-rows", type=int, default=None, help="most rows a step to consider (default: the file's batch)")
@click.option("--max-probes", type=int, default=3, show_default=True, help="probe runs at most")
def calibrate_cmd(backend: str, device: str | None, budget: float | None, probe_seconds: float,
                  max_depth: int | None, max_rows: int | None, max_probes: int) -> None:
    """Size the train file for this machine: short probes, then DEPTH and the batch sizes written into its
    constants block (an ordinary edit, as arun set; the next experiment records it)."""
    from arun.core.context import default_budget
    opts = CalibrateOptions(budget=default_budget(budget), probe_seconds=probe_seconds, max_depth=max_depth,
                            max_rows=max_rows, max_probes=max_probes)
    cal = calibrate(Path.cwd(), backend, opts, device=device, log=say)
    console.print(calibration_table(cal))
    for line in cal.reasons:
        say(f"  {line}")
    say(f"one-time compilation: {cal.compile_seconds:.1f}s (measured with a cold cache, as every run has)")
    if cal.allowance_hint:
        say(f"a run here spends up to about {cal.allowance_hint / 1.5:.0f}s besides training, near the default "
            f"allowance of {default_allowance(opts.budget):g}s: add --allowance {cal.allowance_hint:g} to arun")
    say(f"{TRAIN_FILES[backend]}: " + ", ".join(f"{k} = {v!r}" for k, v in cal.chosen.items())
        + f"; next: arun --backend {backend}" + (f" --device {cal.device}" if cal.device else "")
        + f" --budget {opts.budget:g} -m \"baseline, calibrated\"")


@cli.command("compare")
@click.option("--ref", "refs", multiple=True, metavar="REF",
              help="also read bench/*/ledger.jsonl from this git ref (e.g. origin/autoresearch/mar5); repeatable")
def compare_cmd(refs: tuple[str, ...]) -> None:
    """Every comparability key side by side: baseline, best, improvement, runs, hours, winning change."""
    summaries = compare(Path.cwd(), refs)
    if not summaries:
        console.print("no experiments yet (bench/*/ledger.jsonl is empty); run one with arun --backend NAME")
        return
    for table in compare_tables(summaries):
        console.print(table)
    say("\n".join(heldout_report([r for s in summaries for r in s.records])))
    say("\n".join(signer_lines([r for s in summaries for r in s.records])))


@cli.command("log")
@click.option("--tag", default=None, help="one hardware tag's ledger (default: every ledger under bench/)")
def log_cmd(tag: str | None) -> None:
    """The experiments in ledger order: id, status, val_bpb, change against the best, description."""
    require_project(Path.cwd())
    records = tag_records(Path.cwd(), tag)
    if not records:
        console.print("no experiments yet")
        return
    table = log_table(log_rows(records), show_tag=len({r.get("tag") for r in records}) > 1)
    # Piped (not a terminal): no 80-column wrap; a row is one line, as grep and less expect.
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    out = console if console.is_terminal else Console(highlight=False, width=max(console.width, natural))
    out.print(table)
    if any(not_held_out(r) for r in records):
        say(NOT_HELD_OUT_NOTE)
    say("\n".join(heldout_report(records)))
    say("\n".join(signer_lines(records)))


@cli.command("show")
@click.argument("ident", metavar="ID")
def show_cmd(ident: str) -> None:
    """One experiment's record, its diff and, for one not kept, where its train file is saved
    (an id from arun log; a unique prefix or suffix is enough)."""
    rec = find_record(tag_records(Path.cwd(), None), ident)
    for part in show_renderables(rec):
        console.print(part)
    if rec.get("status") != "keep" and load_attempt(Path.cwd(), rec.get("train_sha256")) is not None:
        console.print(f"its train file is saved: arun restore {rec['id']} writes it back to {rec.get('train_file')}")


@cli.command("restore")
@click.argument("ident", metavar="ID")
@click.option("--force", is_flag=True, help="overwrite uncommitted edits of the train file")
def restore_cmd(ident: str, force: bool) -> None:
    """Write an experiment's train file back (a discarded, crashed or invalid attempt; no edit is lost)."""
    rec = find_record(tag_records(Path.cwd(), None), ident)
    target = restore_attempt(Path.cwd(), rec, force=force)
    console.print(f"restored {target.name} as experiment {rec['id']} ran it ({rec.get('status')}); "
                  f"run it with arun --backend {rec.get('backend')}")


@cli.command("audit")
@click.option("--tag", default=None, help="one hardware tag's ledger (default: every ledger under bench/)")
@click.option("--ref", default=None, metavar="REF", help="audit the ledgers on this git ref instead of the working tree (printed only: audit.json is not written)")
def audit_cmd(tag: str | None, ref: str | None) -> None:
    """Check every ledger line's seal and re-score every keep whose forward is still stored; writes
    bench/<tag>/audit.json, which log, compare, summary and the ratchet honour. Exit 1 if any record fails."""
    from arun.core.audit import RTOL, audit
    rows = audit(Path.cwd(), tag, ref)
    table = Table(expand=False)
    for col in ("tag", "id", "status", "recorded", "re-scored", "verdict"):
        table.add_column(col, overflow="fold", no_wrap=col in ("id", "recorded", "re-scored"))
    for r in rows:
        style = "bold red" if r.fails else ("green" if r.verdict == "ok" else "yellow")
        table.add_row(r.tag, r.id, r.status, "-" if r.recorded is None else f"{r.recorded:.6f}",
                      "-" if r.rescored is None else f"{r.rescored:.6f}", Text(r.verdict, style=style))
    console.print(table)
    failed = [r for r in rows if r.fails]
    console.print(f"{len(rows)} record(s) shown, {len(failed)} failed (re-scores must match within {RTOL:g} relative)")
    sys.exit(1 if failed else 0)


@cli.command("plot")
@click.option("--tag", default=None, help="one hardware tag (default: every tag)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="write DIR/<tag>.png (default: bench/<tag>/progress.png)")
def plot_cmd(tag: str | None, out_dir: str | None) -> None:
    """One progress PNG per hardware tag: every experiment, the running best, crashes on top."""
    written = plot_tags(Path.cwd(), tag, out_dir)
    if not written:
        fail("no experiments to plot yet; run one with arun --backend NAME")
    for t, (path, panels) in written.items():
        n = sum(p.points for p in panels)
        console.print(f"{path} ({t}: {n} scored, {sum(len(p.crash) for p in panels)} failed)")


@cli.command("report")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="report", show_default=True,
              help="folder for index.html and its assets (publishable as is)")
@click.option("--ref", "refs", multiple=True, metavar="REF", help="also read the ledgers on this git ref; repeatable")
def report_cmd(out_dir: str, refs: tuple[str, ...]) -> None:
    """A static web page of every ledger: leaderboards, winning changes, transfers, progress charts."""
    site = build_site(Path.cwd(), out_dir, refs)
    console.print(f"{site.index} ({len(site.rows)} key(s), {site.charts} chart(s), {len(site.transfers)} transfer(s)); "
                  f"open it in a browser, no network needed", soft_wrap=True)


@cli.command("transfer")
@click.option("--from", "source", required=True, metavar="TAG|COMMIT", help="the hardware tag (its best keep) or a keep's commit")
@backend_choice("engine to try the winner on, here")
@click.option("--agent", default=None, metavar="CMD", help="agent that ports code changes (as arun loop); else they are listed")
@click.option("--ref", "refs", multiple=True, metavar="REF", help="also look for the winner in the ledgers on this git ref")
@budget_option()
@device_option()
def transfer_cmd(source: str, backend: str, agent: str | None, refs: tuple[str, ...], budget: float | None,
                 device: str | None) -> None:
    """Try another machine's winner here: its changed constants that exist in this backend's train file run
    as an ordinary experiment (recorded with transfer_from); code changes go to --agent or are listed."""
    result = transfer(Path.cwd(), source, backend, agent=agent, budget=budget, device=device, refs=refs, log=say)
    for rec in result.records:
        if rec.get("transfer_from"):
            say(f"transferred: {rec.get('status')} val_bpb {rec.get('val_bpb')} (best before {rec.get('best_before')})")
    for item in result.not_transferred:
        say(f"not transferred: {item}")


@cli.command("export")
@click.option("--tag", default=None, help="the hardware tag to export (needed when bench/ has several)")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="where to write it (default: bench/<tag>/results.tsv, beside the ledger)")
def export_cmd(tag: str | None, output: str | None) -> None:
    """Write upstream's results.tsv (commit, val_bpb, memory_gb, status, description)."""
    require_project(Path.cwd())
    records = tag_records(Path.cwd(), tag)
    tags = sorted({str(r.get("tag")) for r in records})
    if len(tags) > 1:
        fail(f"bench/ holds several hardware tags ({', '.join(tags)}); pick one with --tag")
    if output is None:  # not the repo root: a new file there would trip the scope guard on the next run
        if not tags:
            fail("no experiments to export yet; run one with arun --backend NAME")
        output = str(Path("bench") / tags[0] / "results.tsv")
    n = write_tsv(records, output)
    console.print(f"{output}: {n} experiment(s)" + (f" from {tags[0]}" if tags else ""))


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
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:,}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                label = {"tokenizer": "training tokenizer", "tokenize": "tokenizing (tokens)"}.get(stage, stage)
                tasks[stage] = bar.add_task(label, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            path = build.prepare(dataset, profile, num_shards=num_shards, workers=download_workers,
                                txt_split=txt_split, force=force, log=console.print, progress=progress)
        except prepare.PrepareError as e:
            fail(str(e))
    console.print(f"Ready: {path}")


@cli.command("doctor")
def doctor_cmd() -> None:
    """List each engine, whether it runs here (and why not), and its hardware tag."""
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
        table.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", tag, escape(why))
    console.print(table)
    console.print(confine.doctor_line(), markup=False, highlight=False)
    for line in confine.jail_lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    try:
        data = prepare.PreparedData.open()
        console.print(f"data: {data.dir} ({data.manifest['describe']})")
    except Exception as e:
        console.print(f"data: {e}", markup=False)
    files, size = forward_store.disk_use(Path.cwd())
    console.print(f"kept forwards: {files} file(s), {size / 2**20:.1f} MiB in {forward_store.store_dir(Path.cwd())} "
                  f"(each key's best and the last {forward_store.KEEP_RECENT} keeps)")
    kept = forward_store.retention(Path.cwd())  # every local branch's ledgers, whichever is checked out
    console.print(f"retention: {kept.keeps} keep(s) on all branches; kept: the best of {kept.best} key(s) and the "
                  f"last {kept.recent} keep(s), {len(kept.wanted)} forward(s), {size} bytes; "
                  + (f"{kept.missing} wanted forward(s) missing: those keeps are unverified (arun audit fails them)"
                     if kept.missing else "none missing"), markup=False, highlight=False, soft_wrap=True)


@cli.group("trust", invoke_without_command=True)
@click.pass_context
def trust_cmd(ctx: click.Context) -> None:
    """Machine identities: this machine's public key, and the keys whose records this repo believes."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(trust_list_cmd)


@trust_cmd.command("show")
def trust_show_cmd() -> None:
    """This machine's public key (made on first use): what other machines pass to arun trust add."""
    public = trust.own_public()
    say(f"{trust.public_text(public)}  (id {trust.key_id(public)}, private key {trust.identity_path()})")


@trust_cmd.command("list")
def trust_list_cmd() -> None:
    """This machine's key and the keys bench/trusted_keys lists."""
    public = trust.own_public()
    say(f"{trust.key_id(public)}  this machine (always trusted)  {trust.public_text(public)}")
    repo = Path.cwd()
    for k in trust.repo_keys(repo):
        say(f"{k.key_id}  {k.name}  {trust.public_text(k.public)}")
    if not trust.repo_keys(repo):
        say(f"no other key trusted in {trust.TRUST_FILE}; add one with: arun trust add <key or file> --name NAME")


@trust_cmd.command("add")
@click.argument("key", metavar="KEY|FILE")
@click.option("--name", default="", help="who this key belongs to (e.g. gpu-box); default: its id")
def trust_add_cmd(key: str, name: str) -> None:
    """Trust another machine's records here: KEY is what `arun trust show` prints there (or a file holding it)."""
    require_project(Path.cwd())
    known = trust.add(Path.cwd(), key, name)
    say(f"trusted {known.key_id} ({known.name}) in {trust.TRUST_FILE}; commit it to share it with the lab: "
        f"git add {trust.TRUST_FILE} && git commit -m 'trust {known.name}'")


@trust_cmd.command("remove")
@click.argument("which", metavar="ID|NAME")
def trust_remove_cmd(which: str) -> None:
    """Stop trusting a key (by id, a 6+ digit id prefix, or name): its records show as foreign again."""
    for k in trust.remove(Path.cwd(), which):
        say(f"removed {k.key_id} ({k.name}) from {trust.TRUST_FILE}")


@cli.command("swarm")
@backend_choice("engine every worker runs")
@click.option("--workers", type=int, default=None,
              help="workers (default: one per GPU for cuda, one per machine for mlx or --device cpu)")
@click.option("--address", default=None, help="join this Ray cluster (HOST:PORT or auto); default: start one here")
@click.option("--agent", default="sweep", show_default=True, metavar="SPEC", help="proposer, as in arun loop")
@hours_option()
@click.option("--iterations", type=int, default=None, help="experiments in all, across workers")
@budget_option()
@device_option("torch engine device; cpu asks for no GPU")
@seeds_option()
@confidence_option("keep only changes better at this confidence (as arun loop)")
@timeout_option()
@click.option("--agent-timeout", type=float, default=None, help="seconds an agent gets per proposal (default as arun loop)")
@near_miss_option()
@allowance_option()
@click.option("--max-crashes", type=int, default=3, show_default=True,
              help="drop a worker after K consecutive experiments without a score; 0: never")
@click.option("--max-restarts", type=int, default=3, show_default=True, help="restarts of a dead worker before it is dropped")
@click.option("--run", "run_name", default=None, help="run name: branches autoresearch/<run>-w<k> (default: swarm-<time>)")
@require_confinement_option()
def swarm_cmd(backend: str, workers: int | None, address: str | None, agent: str, hours: float | None,
              iterations: int | None, budget: float | None, device: str | None, seeds: int, confidence: float | None,
              hard_timeout: float | None, agent_timeout: float | None, near_miss: float | None,
              allowance: float | None, max_crashes: int, max_restarts: int, run_name: str | None) -> None:
    """Run the loop on every GPU of a Ray cluster: a worktree per worker, one ledger, adopt the best."""
    if iterations is not None and iterations < 1:
        fail(f"--iterations must be at least 1, got {iterations}")
    if hours is not None and hours <= 0:
        fail(f"--hours must be positive, got {hours}")
    loop_options = {k: v for k, v in {"seeds": seeds, "confidence": confidence, "hard_timeout": hard_timeout,
                                      "near_miss": near_miss, "allowance": allowance}.items() if v is not None}
    try:
        repo = Path(gitops.run_git(Path.cwd(), "rev-parse", "--show-toplevel"))
        opts = SwarmOptions(repo_dir=repo, backend=backend, agent=agent, workers=workers, run=run_name,
                            address=address, hours=hours, iterations=iterations, budget=budget, device=device,
                            max_restarts=max_restarts, max_crashes=max_crashes, agent_timeout=agent_timeout,
                            loop_options=loop_options)
        summary = run_swarm(opts, log=lambda line: console.print(line, soft_wrap=True, markup=False, highlight=False))
    except ImportError as e:  # Ray is optional: the swarm imports it when it starts
        fail(f"arun swarm needs Ray ({e}); install it with: pip install -e '.[swarm]'")
    for line in swarm_report(summary):
        console.print(line, soft_wrap=True, markup=False, highlight=False)
    sys.exit(130 if summary["interrupted"] else 0)


@cli.command("swarm-down")
@click.option("--temp-dir", "temp_dir", required=True, type=click.Path(file_okay=False),
              help="the --temp-dir this cluster's `ray start --head` was given")
def swarm_down_cmd(temp_dir: str) -> None:
    """Stops this machine's processes of one Ray cluster (run it on every node), never another Ray of the
    user (as `ray stop` would)."""
    from arun.swarm.procs import ray_processes, stop_pids
    try:
        pids = ray_processes(Path(temp_dir))
    except ImportError as e:
        fail(f"arun swarm-down needs Ray ({e}); install it with: pip install -e '.[swarm]'")
    if not pids:
        say(f"no process of the Ray cluster at {temp_dir} runs on this machine")
        return
    stop_pids(pids, grace=5.0)
    say(f"stopped {len(pids)} process(es) of the Ray cluster at {temp_dir} on this machine")


@cli.command("loop")
@backend_choice("engine: mlx or cuda (PyTorch)")
@click.option("--agent", required=True, metavar="SPEC",
              help='who proposes changes: sweep (built-in, no LLM) or an agent command that reads the prompt on stdin, '
                   'e.g. "claude -p --permission-mode acceptEdits" or "codex exec --sandbox workspace-write -"')
@click.option("--iterations", type=int, default=None, help="stop after this many experiments")
@hours_option()
@seeds_option()
@confidence_option("keep only changes better at this confidence (one-sided Welch t-test, e.g. 0.95)")
@budget_option()
@device_option()
@timeout_option()
@click.option("--agent-timeout", type=float, default=900.0, show_default=True,
              help="wall-clock seconds the agent gets per proposal before it is killed")
@click.option("--max-crashes", type=int, default=3, show_default=True,
              help="stop after K consecutive iterations without a score (crash, timeout, invalid); 0: never")
@near_miss_option()
@allowance_option()
@click.option("--no-early-stop", "early_stop", is_flag=True, flag_value=False, default=True,
              help="run every experiment to the end (default: stop one clearly behind the best mid-run)")
@click.option("--no-confirm", "confirm", is_flag=True, flag_value=False, default=True,
              help="keep any result below the best at once (default: a near win is re-run with fresh seeds first)")
@click.option("--no-measure-noise", "measure", is_flag=True, flag_value=False, default=True,
              help="do not measure the key's spread first (default: arun noise --baseline over 3 runs, once per "
                   "key, when none is stored; without it near wins are kept by the plain rule)")
@require_confinement_option()
def loop_cmd(backend: str, agent: str, iterations: int | None, hours: float | None, seeds: int,
             confidence: float | None, budget: float | None, device: str | None, hard_timeout: float | None,
             agent_timeout: float, max_crashes: int, near_miss: float | None, allowance: float | None,
             early_stop: bool, confirm: bool, measure: bool) -> None:
    """Run experiments unattended: propose a change, run it, keep or revert, repeat."""
    result = run_loop(Path.cwd(), backend, agent, iterations=iterations, hours=hours, seeds=seeds,
                      confidence=confidence, budget=budget, device=device, hard_timeout=hard_timeout,
                      agent_timeout=agent_timeout, max_crashes=max_crashes, near_miss=near_miss,
                      allowance=allowance, early_stop=early_stop, confirm=confirm, measure=measure, log=say)
    sys.exit({"interrupted": 130, "crashes": 3, "baseline": 3}.get(result.reason, 0))


@cli.command("noise")
@backend_choice("engine: mlx or cuda (PyTorch)")
@seeds_option("runs of the best train file, one seed each", default=5)
@budget_option()
@device_option()
@timeout_option()
@allowance_option()
@click.option("--baseline", "of_baseline", is_flag=True, default=False,
              help="measure the key's baseline train file (a file no agent wrote; what arun loop measures) "
                   "instead of the best")
@require_confinement_option()
def noise_cmd(backend: str, seeds: int, budget: float | None, device: str | None, hard_timeout: float | None,
              allowance: float | None, of_baseline: bool) -> None:
    """Measure run-to-run noise: the best train file over N seeds -> bench/<tag>/noise.json."""
    try:
        measure_noise(Path.cwd(), backend, seeds, budget=budget, device=device, hard_timeout=hard_timeout,
                      allowance=allowance, of_baseline=of_baseline, log=say)
    except KeyboardInterrupt:
        fail("interrupted: nothing was stored", code=130)


@cli.command("summary")
@click.option("--tag", default=None, help="one hardware tag (default: every ledger under bench/)")
@click.option("--since", default=None, metavar="ISO", help="only experiments from then on, e.g. 2025-03-05T22:00")
def summary_cmd(tag: str | None, since: str | None) -> None:
    """The morning report: experiments, keeps, crashes, best vs baseline, top changes, hours."""
    when = None
    if since:
        when = parse_time(since)
        if when is None:
            fail(f"--since {since!r} is not a date/time; use ISO format such as 2025-03-05 or 2025-03-05T22:00")
    history = select(all_records(Path.cwd()), tag=tag)
    console.print(report(select(history, since=when), history), markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    # Ctrl-C (or `kill -INT`) means "stop cleanly" even when arun was started with SIGINT ignored, as
    # a script's background job is: Python installs its handler only where the signal was not ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cli()


if __name__ == "__main__":
    main()
