"""
The rough edges a new user hit in the first hour, each checked through the real CLI:
install hints keep their [extra], export writes beside the ledger, a new key's first run says
BASELINE and why the key is new, id suffixes, a clean tree after every verdict, one-line errors
for a missing backend and a wrong directory, the summary's figures, `arun set` validation and
comment alignment, unwrapped piped logs, and a plot whose legend hides nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from arun.cli import cli
from arun.core.ledger import Ledger, ledger_path
from arun.core.trainfile import constants, rewrite_constants
from arun.report.plot import draw
from engines.summary_block import summary_text
from test_harness import MINI_MLX, edit, git, make_repo, set_constants

REPO = Path(__file__).resolve().parents[1]


def cli_proc(repo: Path, *args: str, block: str = "", timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess (stdout piped, as an agent reads it); `block` names a module
    made unimportable first, as on a machine where its package is not installed."""
    pre = f"sys.modules[{block!r}] = None; " if block else ""
    code = f"import sys; {pre}from arun.cli import main; sys.argv[0] = 'arun'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=repo, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})


def porcelain(repo: Path) -> str:
    return git(repo, "status", "--porcelain", "--untracked-files=all")


# --------------------------------------------------------------------------- a real night, in miniature

@pytest.fixture(scope="module")
def night(tiny_data: Path, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Keep, discard, crash, export, a run after the export, and a run at another budget."""
    repo = make_repo(tmp_path_factory.mktemp("night") / "repo", {"train_mlx.py": MINI_MLX})
    set_constants(repo, "train_mlx.py", LEARNING_RATE=0.05)
    out: dict = {"repo": repo}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARUN_CACHE", str(tiny_cache))
        mp.setenv("ARUN_DATA_DIR", str(tiny_data))

        def step(name: str, *args: str) -> None:
            proc = cli_proc(repo, "--backend", "mlx", "--budget", "1", *args)
            out[name] = {"proc": proc, "status": porcelain(repo), "head": git(repo, "log", "-1", "--format=%s")}

        step("keep", "-m", "good LR")
        set_constants(repo, "train_mlx.py", LEARNING_RATE=1e-05)
        step("discard", "-m", "tiny LR")
        edit(repo, "train_mlx.py", "    loader = ", "    raise RuntimeError('boom')\n    loader = ")
        step("crash", "-m", "a bug")
        out["export"] = cli_proc(repo, "export")
        set_constants(repo, "train_mlx.py", LEARNING_RATE=2e-05)
        step("after_export", "-m", "after the export")
        step("new_key", "--budget", "1.5", "-m", "longer budget")
    out["records"] = [r for p in sorted((repo / "bench").glob("*/ledger.jsonl")) for r in Ledger(p).records()]
    return out


def test_tree_is_clean_after_every_verdict(night: dict) -> None:
    for name, status in (("keep", "keep"), ("discard", "discard"), ("crash", "crash")):
        s = night[name]
        assert s["proc"].stdout.splitlines()[-1].startswith(f"arun: {'BASELINE' if name == 'keep' else status.upper()}"), \
            s["proc"].stdout + s["proc"].stderr
        assert s["status"] == "", (name, s["status"])
        assert s["head"].startswith("arun: record ") and s["head"].endswith(f"({status})")
    keep = night["records"][0]
    repo = night["repo"]
    # The keep's record names the keep commit; its ledger line rides in the record commit right after it.
    record_commit = git(repo, "log", "--format=%H", f"--grep=^arun: record {keep['id']} (keep)")
    assert git(repo, "rev-parse", f"{record_commit}^") == keep["commit"]
    assert git(repo, "show", "--name-only", "--format=", keep["commit"]) == "train_mlx.py"
    assert keep["id"] in git(repo, "show", f"{record_commit}:bench/{keep['tag']}/ledger.jsonl")


def test_export_writes_beside_the_ledger_and_the_next_run_is_not_refused(night: dict) -> None:
    repo, tag = night["repo"], night["records"][0]["tag"]
    assert night["export"].returncode == 0, night["export"].stderr
    assert not (repo / "results.tsv").exists()
    rows = (repo / "bench" / tag / "results.tsv").read_text().splitlines()
    assert rows[0].startswith("commit\tval_bpb") and [r.split("\t")[3] for r in rows[1:]] == ["keep", "discard", "crash"]
    after = night["after_export"]["proc"]
    assert after.returncode == 0 and "arun: DISCARD" in after.stdout, after.stdout + after.stderr
    # -o still writes where it is told
    out = cli_proc(repo, "export", "-o", str(repo.parent / "mine.tsv"))
    assert out.returncode == 0 and (repo.parent / "mine.tsv").read_text().startswith("commit\t")


def test_a_new_keys_first_run_is_a_baseline_that_names_the_other_key(night: dict) -> None:
    first = night["keep"]["proc"].stdout.splitlines()
    assert any(line.startswith("arun: train_mlx.py on") and "baseline run" in line for line in first)
    assert first[-1].startswith("arun: BASELINE ") and "first run of key" in first[-1] and "not compared" not in first[-1]
    lines = night["new_key"]["proc"].stdout.splitlines()
    old = night["records"][0]
    start = next(line for line in lines if line.startswith("arun: train_mlx.py on"))
    assert f"new key (differs from key {old['key_id']}: budget 1s -> 1.5s" in start
    assert lines[-1].startswith("arun: BASELINE ") and "budget 1s -> 1.5s" in lines[-1]
    assert f"key {old['key_id']}'s best is {old['val_bpb']:.6f}, not compared" in lines[-1]
    assert night["records"][-1]["status"] == "keep" and night["records"][-1]["baseline"]


def test_summary_figures_of_a_run_that_trained(night: dict) -> None:
    summary = night["keep"]["proc"].stdout
    rec = night["records"][0]
    tokens = next(line for line in summary.splitlines() if line.startswith("total_tokens_M:"))
    assert float(tokens.split()[1]) == pytest.approx(rec["total_tokens"] / 1e6, abs=1e-3) and rec["total_tokens"] > 0
    mfu = next(line for line in summary.splitlines() if line.startswith("mfu_percent:"))
    assert "nan" not in mfu and float(mfu.split()[1]) >= 0
    assert "nan" not in summary.split("val_bpb:")[1]
    # Upstream's figures keep upstream's format; small ones get the decimals they need.
    text = summary_text({"val_bpb": 0.9979, "total_tokens_M": 499.6, "num_params_M": 0.012, "mfu_percent": None})
    assert "total_tokens_M:   499.6" in text and "num_params_M:     0.012" in text and "mfu_percent:      0.00" in text


def test_show_takes_the_printed_suffix_and_names_ambiguous_candidates(night: dict, tmp_path: Path) -> None:
    rec = night["records"][1]
    suffix = rec["id"].rsplit("-", 1)[1]
    out = cli_proc(night["repo"], "show", suffix)
    assert out.returncode == 0 and rec["id"] in out.stdout and "tiny LR" in out.stdout, out.stderr
    # Two experiments whose ids end alike: the error names both.
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    ledger = Ledger(ledger_path(repo, "mlx-cpu-test"))
    for rid in ("20250101-010101-850a", "20250102-020202-850a"):
        ledger.append({"id": rid, "tag": "mlx-cpu-test", "key_id": "k", "status": "discard", "val_bpb": 2.0})
    out = cli_proc(repo, "show", "850a")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "20250101-010101-850a" in out.stderr and "20250102-020202-850a" in out.stderr


def test_log_piped_is_not_wrapped(night: dict) -> None:
    out = cli_proc(night["repo"], "log")
    assert out.returncode == 0, out.stderr
    for rec in night["records"]:
        row = next(line for line in out.stdout.splitlines() if rec["id"] in line)
        assert rec["description"] in row  # the whole row on one line
    assert max(len(line) for line in out.stdout.splitlines()) > 80


# --------------------------------------------------------------------------- errors without a run

def test_install_hints_keep_their_extra(data_env: Path, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    out = cli_proc(repo, "loop", "--backend", "mlx", "--agent", "sweep", "--iterations", "1", block="optuna")
    assert out.returncode == 1 and "pip install -e '.[sweep]'" in out.stderr, out.stdout + out.stderr
    out = cli_proc(repo, "doctor", block="torch", COLUMNS="300")
    assert "pip install -e '.[cuda]'" in out.stdout, out.stdout
    for page in ("README.md", "docs/loop.md"):  # wherever the sweep is shown, its install names the extra
        lines = (REPO / page).read_text().splitlines()
        sweep_line = next(i for i, line in enumerate(lines) if "arun loop --backend mlx --agent sweep" in line)
        assert "sweep]" in "\n".join(lines[max(sweep_line - 2, 0):sweep_line + 1]), page


def test_options_without_a_backend_are_one_line_error(tmp_path: Path) -> None:
    out = cli_proc(tmp_path, "-m", "x")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1
    assert "--backend mlx|cuda" in out.stderr and "Usage" not in out.stdout
    out = cli_proc(tmp_path)
    assert out.returncode == 0 and "Usage" in out.stdout  # bare `arun` still shows the help


def test_read_side_commands_name_a_wrong_directory(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    git(other, "init", "-q")
    (other / "x").write_text("x")
    git(other, "add", "-A")
    git(other, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    for where in (plain, other):
        for cmd in (["log"], ["export"]):
            out = cli_proc(where, *cmd)
            assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stdout + out.stderr
            assert "not an arun project" in out.stderr and "no experiments" not in out.stdout + out.stderr
        assert not (where / "results.tsv").exists()


def test_set_validates_values_and_keeps_the_comment_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": (REPO / "train_mlx.py").read_text()})
    monkeypatch.chdir(repo)
    runner = CliRunner()
    before = (repo / "train_mlx.py").read_text()
    bad = ["DEPTH=-1", "DEPTH=2.5", "DEVICE_BATCH_SIZE=0", "MATRIX_LR=-0.1", "MATRIX_LR=1e9", "WARMDOWN_RATIO=1.5",
           "COMPILE=3", "ADAM_BETAS=0.9", "NOT_A_NAME=1", "DEPTH=abc"]
    for item in bad:
        out = runner.invoke(cli, ["set", "--backend", "mlx", item])
        assert out.exit_code == 1, (item, out.output)
        assert len(out.output.strip().splitlines()) == 1 and item.split("=")[0] in out.output, (item, out.output)
        assert (repo / "train_mlx.py").read_text() == before
    out = runner.invoke(cli, ["set", "--backend", "mlx", "DEPTH=12", "WARMUP_STEPS=0", "MATRIX_LR=0.05"])
    assert out.exit_code == 0, out.output
    after = (repo / "train_mlx.py").read_text()
    assert constants(after)["DEPTH"] == 12 and constants(after)["WARMUP_STEPS"] == 0
    column = {line.split("=")[0].strip(): line.index("#") for line in before.splitlines()
              if "=" in line and "  #" in line and line.split("=")[0].strip().isupper()}
    for line in after.splitlines():
        name = line.split("=")[0].strip()
        if name in ("DEPTH", "WARMUP_STEPS", "MATRIX_LR"):
            assert line.index("#") == column[name], line
    # a value longer than the padding pushes the comment, two spaces after it
    long = rewrite_constants(before, {"HEAD_DIM": 10**20})
    line = next(x for x in long.splitlines() if x.startswith("HEAD_DIM"))
    assert "100000000000000000000  # " in line


# --------------------------------------------------------------------------- the plot

@pytest.mark.unit
def test_plot_ticks_legend_entries_and_placement() -> None:
    key = {"dataset": "pystdlib", "profile": "tiny", "time_budget": 1.0}
    vals = [("keep", 2.0), ("discard", 2.1), ("keep", 1.9), ("crash", None), ("discard", 1.95)]
    records = [{"id": f"r{i}", "tag": "t", "key_id": "k", "key": key, "status": st, "val_bpb": v,
                "baseline": i == 0} for i, (st, v) in enumerate(vals)]
    fig, panels = draw(records)
    fig.canvas.draw()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    legend = ax.get_legend()
    box = legend.get_window_extent()
    s = panels[0]
    for x, y in s.keep + s.discard:
        px, py = ax.transData.transform((x, y))
        assert not box.contains(px, py), (x, y)
    # One experiment: no running-best line is drawn, so the legend has no entry for it.
    fig1, _ = draw(records[:1])
    labels = [t.get_text() for t in fig1.axes[0].get_legend().get_texts()]
    assert labels == ["keep (1)"]
    import matplotlib.pyplot as plt
    plt.close(fig)
    plt.close(fig1)
