"""`arun transfer` and `arun report` end to end: two hardware tags from real tiny runs (torch on CPU and
MLX on CPU), a real transfer from one to the other, the report built and opened in headless Chromium.

The source runs start from learning rates a hundred times too small and the winner restores them, so the
winner is a real keep with constants to transfer. One source experiment carries an XSS attempt in its
description: the page must show it as text."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from arun.core.ledger import Ledger, ledger_path
from arun.report.board import board
from arun.report.site import build_site
from arun.report.transfers import transfer_rows
from helpers_repo import arun_env, git, make_project, tiny_train_text

# The source machine's baseline does not learn at all (every LR 0), so any step with the restored LRs beats it:
# the winner exists however few steps fit in the budget on a busy machine.
SLOW_LRS = {"MATRIX_LR": 0.0, "EMBEDDING_LR": 0.0, "UNEMBEDDING_LR": 0.0, "SCALAR_LR": 0.0}
GOOD_LRS = {"MATRIX_LR": 0.04, "EMBEDDING_LR": 0.6, "UNEMBEDDING_LR": 0.004, "SCALAR_LR": 0.5}
XSS = "<script>window.__xss=1</script><img src=x onerror=\"window.__xss=2\"> restore the learning rates"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLLECTOR = """<script>window.__errors=[];window.onerror=function(m){window.__errors.push(String(m));};
window.addEventListener('error',function(ev){if(ev.target&&ev.target.src){window.__errors.push('load '+ev.target.src);}},true);
var __ce=console.error;console.error=function(){window.__errors.push([].join.call(arguments,' '));__ce.apply(console,arguments);};
window.addEventListener('load',function(){setTimeout(function(){var p=document.createElement('pre');p.id='js-errors';
p.textContent=JSON.stringify({errors:window.__errors,xss:window.__xss||null});document.body.appendChild(p);},1000);});
</script>"""


def arun(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from arun.cli import main; sys.argv[0] = 'arun'; main()", *args]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 2), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path, tiny_cache: Path) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("report") / "repo"
    make_project(repo, "train_cuda.py", SLOW_LRS)
    (repo / "train_mlx.py").write_text(tiny_train_text("train_mlx.py", {**SLOW_LRS, "COMPUTE_DTYPE": "float32"}))
    git(repo, "commit", "-qam", "tiny mlx train file")
    env = arun_env(tiny_data, tiny_cache)
    torch_cpu = ["--backend", "cuda", "--device", "cpu", "--budget", "1.5"]
    arun(repo, env, "run", *torch_cpu, "-m", "baseline")
    arun(repo, env, "set", "--backend", "cuda", *(f"{k}={v}" for k, v in GOOD_LRS.items()))
    arun(repo, env, "run", *torch_cpu, "-m", XSS)
    arun(repo, env, "start", "mlx-night")   # the other machine's run, from the source's branch
    return repo, env


def test_transfer_runs_the_winners_constants_here(project: tuple[Path, dict]) -> None:
    repo, env = project
    source = [r for r in Ledger(ledger_path(repo, _source_tag(repo))).records()]
    winner = source[-1]
    assert winner["status"] == "keep" and winner["val_bpb"] < source[0]["val_bpb"], "the restored LRs must win"
    proc = arun(repo, env, "transfer", "--from", winner["tag"], "--backend", "mlx", "--budget", "1.5")
    assert "transferred:" in proc.stdout, proc.stdout
    mlx = [p for p in (repo / "bench").glob("*/ledger.jsonl") if p.parent.name != winner["tag"]]
    assert len(mlx) == 1, "the transfer ran under the mlx engine's own tag"
    recs = Ledger(mlx[0]).records()
    assert recs[0]["baseline"] and "transfer_from" not in recs[0]
    moved = recs[-1]
    assert moved["transfer_from"] == {"tag": winner["tag"], "commit": winner["commit"], "id": winner["id"]}
    assert moved["transfer_applied"] == GOOD_LRS and moved["_trust"] == "ok"
    assert moved["config"]["MATRIX_LR"] == 0.04 and moved["status"] in ("keep", "discard")
    # A tag with nothing to transfer says so and runs nothing.
    bad = subprocess.run([sys.executable, "-c", "from arun.cli import main; main()", "transfer", "--from", "nope",
                          "--backend", "mlx"], cwd=repo, env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and "neither a hardware tag" in bad.stderr


def test_report_rows_transfers_and_escaping(project: tuple[Path, dict], tmp_path: Path) -> None:
    repo, env = project
    if not any(r.get("transfer_from") for p in (repo / "bench").glob("*/ledger.jsonl") for r in Ledger(p).records()):
        arun(repo, env, "transfer", "--from", _source_tag(repo), "--backend", "mlx", "--budget", "1.5")
    site = build_site(repo, tmp_path / "site")
    assert {r.s.backend for r in site.rows} == {"cuda", "mlx"} and site.charts == 2
    torch_row = next(r for r in site.rows if r.s.backend == "cuda")
    assert torch_row.changes and any(c.startswith("MATRIX_LR") for c in torch_row.changes)
    assert "+MATRIX_LR = 0.04" in torch_row.diff.replace("  ", " ")
    assert torch_row.test_best is not None and torch_row.trust == "all sealed here"
    [t] = site.transfers
    assert t.source_tag == _source_tag(repo) and t.gain_there and t.gain_there > 0
    text = site.index.read_text()
    assert "<script>window.__xss" not in text and "&lt;script&gt;window.__xss=1&lt;/script&gt;" in text
    assert "cdn" not in text.lower() and (tmp_path / "site" / "assets" / "plotly.js").stat().st_size > 1_000_000
    assert transfer_rows([]) == [] and board(repo, []) == []


def _source_tag(repo: Path) -> str:
    recs = [r for p in (repo / "bench").glob("*/ledger.jsonl") for r in Ledger(p).records()]
    return next(r["tag"] for r in recs if r.get("backend") == "cuda")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it: apt-get install chromium)")
def test_report_in_headless_chromium(project: tuple[Path, dict], tmp_path: Path) -> None:
    repo, env = project
    if not any(r.get("transfer_from") for p in (repo / "bench").glob("*/ledger.jsonl") for r in Ledger(p).records()):
        arun(repo, env, "transfer", "--from", _source_tag(repo), "--backend", "mlx", "--budget", "1.5")
    out = tmp_path / "site"
    proc = arun(repo, env, "report", "--out", str(out))
    assert "2 key(s), 2 chart(s), 1 transfer(s)" in proc.stdout, proc.stdout
    index = out / "index.html"
    probe = out / "probe.html"   # the page plus an error collector that writes what it caught into the DOM
    probe.write_text(index.read_text().replace("<head>", "<head>" + COLLECTOR, 1))
    browser = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--virtual-time-budget=8000",
               "--window-size=1400,2200", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(browser + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180).stdout
    found = re.search(r'<pre id="js-errors">(.*?)</pre>', dom, re.S)
    assert found, "the page's scripts did not run to the end:\n" + dom[-2000:]
    caught = json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    assert caught == {"errors": [], "xss": None}, caught
    board_html = re.search(r'<table class="leaderboard">(.*?)</table>', dom, re.S).group(1)
    assert board_html.count("<tr>") == 3 and ">cuda<" in board_html and ">mlx<" in board_html
    assert 'class="winning"' in dom and "MATRIX_LR" in dom and '<span class="add">+MATRIX_LR' in dom.replace("  ", " ")
    assert dom.count('class="main-svg"') >= 2 and "scatterlayer" in dom, "plotly drew no charts"
    assert "&lt;img src=x" in dom and '<img src="x"' not in dom, "the XSS attempt must render as text"
    assert 'class="transfers"' in dom
    shot = tmp_path / "report.png"
    subprocess.run(browser + [f"--screenshot={shot}", index.as_uri()], capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 10_000
