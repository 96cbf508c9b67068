"""compare / log / show / plot / export over real ledgers (written by arun.core.ledger) in real git repos.

The records here are shaped like the harness's; test_harness.py checks the same
commands on ledgers written by real runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import arun.cli
from arun.cli import cli
from arun.core.errors import ArunError
from arun.core.ledger import Ledger, ledger_path
from arun.report.compare import compare, config_changes, summarize
from arun.report.export import HEADER, tsv_rows
from arun.report.history import find_record, log_rows
from arun.report.plot import plot_records, plot_tags
from helpers_repo import empty_repo, git

H100 = "cuda-nvidia-h100-80gb-hbm3"
M4 = "mlx-apple-m4-max-64gb"


def key(tag: str, backend: str, budget: float = 300.0, profile: str = "upstream") -> dict:
    return {"backend": backend, "hardware": tag, "dataset": "climbmix", "profile": profile,
            "dataset_fingerprint": "fp", "tokenizer_sha256": "tok", "val_rows_sha256": "rows",
            "max_seq_len": 2048, "eval_tokens": 20971520, "time_budget": budget, "evaluator_version": 1}


def rec(tag: str, backend: str, kid: str, n: int, status: str, val: float | None, *, budget: float = 300.0,
        config: dict | None = None, baseline: bool = False, description: str = "", error: str | None = None,
        commit: str | None = None, profile: str = "upstream") -> dict:
    return {"id": f"{kid}-{n:03d}", "time": f"2026-03-05T{n // 60:02d}:{n % 60:02d}:00+0000", "key": key(tag, backend, budget, profile),
            "key_id": kid, "tag": tag, "backend": backend, "status": status, "baseline": baseline, "val_bpb": val,
            "config": config or {"DEPTH": 8, "MATRIX_LR": 0.04}, "description": description, "error": error,
            "commit": commit or f"{n:07d}abcdef{n:029d}"[:40], "peak_memory_mb": 45060.0 if val else None,
            "wall_seconds": 330.0, "diff": f"--- a/train.py\n+++ b/train.py\n@@ -1 +1 @@\n-X = {n - 1}\n+X = {n}\n"}


def h100_records() -> list[dict]:
    return [
        rec(H100, "cuda", "k_h100", 1, "keep", 0.9979, baseline=True, description="baseline"),
        rec(H100, "cuda", "k_h100", 2, "keep", 0.9932, config={"DEPTH": 8, "MATRIX_LR": 0.05}, description="LR 0.05"),
        rec(H100, "cuda", "k_h100", 3, "discard", 1.0050, description="GeLU"),
        rec(H100, "cuda", "k_h100", 4, "crash", None, description="double width", error="torch.OutOfMemoryError: CUDA out of memory"),
        rec(H100, "cuda", "k_h100", 5, "keep", 0.9901, config={"DEPTH": 10, "MATRIX_LR": 0.05}, description="depth 10"),
        rec(H100, "cuda", "k_h100", 6, "timeout", None, description="huge", error="killed at the hard timeout of 600s"),
        rec(H100, "cuda", "k_h100", 7, "discard", 0.9915, description="near"),
    ]


def m4_records() -> list[dict]:
    return [
        rec(M4, "mlx", "k_m4", 1, "keep", 1.3100, baseline=True, description="baseline"),
        rec(M4, "mlx", "k_m4", 2, "discard", 1.3200, description="worse"),
        rec(M4, "mlx", "k_m4", 3, "keep", 1.2800, config={"DEPTH": 4, "MATRIX_LR": 0.04}, description="depth 4"),
        rec(M4, "mlx", "k_m4", 4, "invalid", None, description="peek", error="INVALID: logits before position 32 changed"),
        # A second key on the same machine: another budget, never ranked with the first.
        rec(M4, "mlx", "k_m4_60", 5, "keep", 1.6000, budget=60.0, baseline=True, description="baseline 60s"),
    ]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = empty_repo(tmp_path / "repo")
    for tag, recs in ((H100, h100_records()), (M4, m4_records())):
        led = Ledger(ledger_path(repo, tag))
        for r in recs:
            led.append(r)
    return repo


@pytest.mark.unit
def test_summaries_per_key(repo: Path) -> None:
    by_key = {s.key_id: s for s in compare(repo)}
    h = by_key["k_h100"]
    assert (h.baseline, h.best) == (0.9979, 0.9901)
    assert h.improvement_percent == pytest.approx(100 * (0.9979 - 0.9901) / 0.9979)
    assert (h.runs, h.kept, h.crashed) == (7, 3, 2)
    assert h.hours == pytest.approx(7 * 330 / 3600)
    assert h.winning_change == "DEPTH 8->10, MATRIX_LR 0.04->0.05 @ 0000005"
    m = by_key["k_m4"]
    assert (m.baseline, m.best, m.runs, m.kept, m.crashed) == (1.31, 1.28, 4, 2, 1)
    assert m.winning_change == "DEPTH 8->4 @ 0000003"
    assert by_key["k_m4_60"].winning_change == "baseline is best" and by_key["k_m4_60"].time_budget == 60.0
    assert config_changes({"A": 1, "B": 2}, {"A": 1, "C": 3}) == ["B 2->-", "C -->3"]


def test_compare_command_tables(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    monkeypatch.setattr(arun.cli.console, "width", 250)
    out = CliRunner().invoke(cli, ["compare"])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "climbmix / upstream" in text
    for needle in (H100, M4, "0.997900", "0.990100", "0.78%", "2.29%", "DEPTH 8->10", "60s", "300s"):
        assert needle in text, needle
    # One table row per key (hardware tag + backend + budget).
    assert sum(1 for line in text.splitlines() if M4 in line) == 2


def test_compare_reads_ledgers_on_git_refs(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An A100's ledger exists only on another branch (fetched from another machine).
    git(repo, "checkout", "-qb", "autoresearch/a100")
    a100 = "cuda-nvidia-a100-sxm4-80gb"
    led = Ledger(ledger_path(repo, a100))
    led.append(rec(a100, "cuda", "k_a100", 1, "keep", 1.05, baseline=True))
    led.append(rec(a100, "cuda", "k_a100", 2, "keep", 1.02))
    git(repo, "add", f"bench/{a100}")
    git(repo, "commit", "-qm", "a100 ledger")
    git(repo, "checkout", "-q", "main")
    assert "k_a100" not in {s.key_id for s in compare(repo)}
    by_key = {s.key_id: s for s in compare(repo, ["autoresearch/a100"])}
    assert by_key["k_a100"].best == 1.02 and by_key["k_h100"].runs == 7
    monkeypatch.chdir(repo)
    monkeypatch.setattr(arun.cli.console, "width", 250)
    out = CliRunner().invoke(cli, ["compare", "--ref", "autoresearch/a100"])
    assert out.exit_code == 0 and a100 in out.output
    out = CliRunner().invoke(cli, ["compare", "--ref", "no-such-ref"])
    assert out.exit_code == 1 and "not found" in out.output


def test_log_rows_and_command(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = log_rows(Ledger(ledger_path(repo, H100)).records())
    assert [r.n for r in rows] == list(range(1, 8))
    assert rows[0].baseline and rows[0].delta is None
    assert rows[1].delta == pytest.approx(0.9932 - 0.9979)
    assert rows[2].delta == pytest.approx(1.0050 - 0.9932)
    assert rows[3].delta is None and rows[3].val_bpb is None
    assert rows[6].delta == pytest.approx(0.9915 - 0.9901)      # against the best before it
    monkeypatch.chdir(repo)
    monkeypatch.setattr(arun.cli.console, "width", 250)
    out = CliRunner().invoke(cli, ["log", "--tag", H100])
    assert out.exit_code == 0, out.output
    assert "k_h100-004" in out.output and "+0.011800" in out.output and "baseline" in out.output
    assert M4 not in out.output
    out = CliRunner().invoke(cli, ["log"])          # every ledger: a tag column appears
    assert M4 in out.output and H100 in out.output
    out = CliRunner().invoke(cli, ["log", "--tag", "nope"])
    assert out.exit_code == 1 and "no ledger for tag 'nope'" in out.output and H100 in out.output


def test_show_finds_by_prefix_and_highlights_the_diff(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recs = Ledger(ledger_path(repo, H100)).records()
    assert find_record(recs, "k_h100-005")["val_bpb"] == 0.9901
    with pytest.raises(ArunError, match="matches 7 experiments"):
        find_record(recs, "k_h100")
    with pytest.raises(ArunError, match="no experiment with id"):
        find_record(recs, "zzz")
    monkeypatch.chdir(repo)
    monkeypatch.setattr(arun.cli.console, "width", 200)
    out = CliRunner().invoke(cli, ["show", "k_h100-004"])
    assert out.exit_code == 0, out.output
    assert "torch.OutOfMemoryError" in out.output and "double width" in out.output and "+X = 4" in out.output
    # On a terminal the diff goes through rich's syntax highlighter: added lines in colour.
    import io

    from rich.console import Console
    from rich.syntax import Syntax

    from arun.report.history import show_renderables
    parts = show_renderables(find_record(recs, "k_h100-004"))
    assert any(isinstance(r, Syntax) for r in parts[0].renderables)
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, color_system="truecolor", width=120).print(*parts)
    colored = [line for line in buf.getvalue().splitlines() if "+X = 4" in line]
    assert colored and "\x1b[" in colored[0]


@pytest.mark.e2e
def test_plot_one_png_per_tag_with_the_plotted_points(repo: Path, tmp_path: Path) -> None:
    from PIL import Image
    written = plot_tags(repo, out_dir=tmp_path / "plots")
    assert set(written) == {H100, M4}
    path, panels = written[H100]
    assert path == tmp_path / "plots" / f"{H100}.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 500
    (p,) = panels
    assert p.keep == [(1, 0.9979), (2, 0.9932), (5, 0.9901)]
    assert p.discard == [(3, 1.0050), (7, 0.9915)]
    assert p.crash == [4, 6] and p.points == 5
    assert [v for _, v in p.best] == [0.9979, 0.9932, 0.9932, 0.9932, 0.9901, 0.9901, 0.9901]
    assert "climbmix/upstream" in p.title and H100 in p.title
    _, m4_panels = written[M4]
    assert len(m4_panels) == 2 and [q.points for q in m4_panels] == [3, 1]   # one panel per key
    # Default location: next to the ledger.
    assert plot_tags(repo, tag=M4)[M4][0] == repo / "bench" / M4 / "progress.png"
    assert (repo / "bench" / M4 / "progress.png").stat().st_size > 1000
    # Only crashes so far: still a valid image, with a note instead of points.
    panels = plot_records([rec(H100, "cuda", "k", 1, "crash", None)], tmp_path / "crash-only.png")
    assert panels[0].points == 0 and panels[0].crash == [1]
    import matplotlib.image
    assert matplotlib.image.imread(tmp_path / "crash-only.png").ndim == 3


def test_export_writes_upstreams_results_tsv(repo: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rows = tsv_rows(Ledger(ledger_path(repo, H100)).records())
    assert HEADER == ("commit", "val_bpb", "memory_gb", "status", "description")
    assert rows[0] == ("0000001", "0.997900", "44.0", "keep", "baseline")
    assert rows[3] == ("0000004", "0.000000", "0.0", "crash", "double width")
    assert rows[5] == ("0000006", "0.000000", "0.0", "crash", "huge (timeout: killed at the hard timeout of 600s)")
    monkeypatch.chdir(repo)
    out = CliRunner().invoke(cli, ["export"])
    assert out.exit_code == 1 and "several hardware tags" in out.output
    out = CliRunner().invoke(cli, ["export", "--tag", H100, "-o", str(tmp_path / "results.tsv")])
    assert out.exit_code == 0, out.output
    lines = (tmp_path / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert len(lines) == 8 and all(len(line.split("\t")) == 5 for line in lines)
    assert lines[2] == "0000002\t0.993200\t44.0\tkeep\tLR 0.05"
    assert {line.split("\t")[3] for line in lines[1:]} == {"keep", "discard", "crash"}


@pytest.mark.unit
def test_summarize_ignores_records_without_a_key() -> None:
    assert summarize([{"status": "keep", "val_bpb": 1.0}]) == []
