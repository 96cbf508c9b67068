"""
The harness end to end: real git repos in tmp dirs, real train-file subprocesses
(a bigram model on MLX's CPU backend and on torch's CPU device, finished by the
real engines.run.finish_run), real ledgers, the real CLI.

Each repo is built like a user's clone: prepare.py, engines/, the train file(s)
and .gitignore copied from this project and committed on `main`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from arun.cli import cli
from arun.core import gitops
from arun.core.errors import ArunError
from arun.core.experiment import repo_lock, run_experiment
from arun.core.ledger import Ledger, ledger_path
from arun.core.process import last_error_line
from arun.core.steplines import parse_step_line
from arun.core.trainfile import rewrite_constants
from engines.forward_file import SUFFIX
from helpers_repo import pid_alive

REPO = Path(__file__).resolve().parents[1]

RECORD_FIELDS = {
    "id", "time", "key", "key_id", "tag", "backend", "hardware", "commit", "parent_commit", "train_file",
    "train_sha256", "diff", "description", "status", "baseline", "val_bpb", "val_bpb_seeds", "training_seconds",
    "total_seconds", "overhead_seconds", "startup_seconds", "eval_seconds", "peak_memory_mb", "mfu_percent",
    "total_tokens", "num_steps", "num_params", "seeds", "error", "proposer", "near_miss", "config",
}

# A minimal train file: the contract's shape (constants block, train(), StepLog, fail_fast,
# finish_run) around a bigram model, so a run costs about a second plus the budget.
MINI_MLX = '''"""Minimal harness-test train file: a bigram model on MLX."""
import os
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

import prepare
from engines.mlx import ENGINE
from engines.run import StepLog, env_seed, fail_fast, finish_run
from engines.timer import TimeBudget

# --- hyperparameters ---
LEARNING_RATE = 1e-05
BATCH_SIZE = 8
EVAL_BATCH_SIZE = 64
SEED = 1
WARMUP_STEPS = 1
# --- end hyperparameters ---


class Bigram(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def __call__(self, idx):
        return self.table(idx)


def train():
    t_start = time.time()
    if os.environ.get("ARUN_TEST_PID_FILE"):
        with open(os.environ["ARUN_TEST_PID_FILE"], "w") as f:
            f.write(str(os.getpid()))
    seed = env_seed(SEED)
    mx.random.seed(seed)
    data = prepare.PreparedData.open()
    vocab, seq_len = data.manifest["vocab_size"], data.profile.max_seq_len
    model = Bigram(vocab)
    mx.eval(model.parameters())
    opt = optim.Adam(learning_rate=LEARNING_RATE)
    step_fn = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
    loader = prepare.make_dataloader(BATCH_SIZE, seq_len, seed=seed)
    budget = TimeBudget(prepare.TIME_BUDGET, warmup_steps=WARMUP_STEPS, sync=ENGINE.sync)
    log = StepLog(every_seconds=0.2)
    t_first = time.time()
    while not budget.done:
        x, y, epoch = next(loader)
        budget.start_step()
        loss, grads = step_fn(model, mx.array(x), mx.array(y))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        dt = budget.end_step()
        fail_fast(loss.item(), budget.step)
        log(budget, loss.item(), BATCH_SIZE * seq_len, dt, None, epoch, force=budget.step == 1)
    finish_run(ENGINE, model, model, budget=budget, t_start=t_start, tokens_per_step=BATCH_SIZE * seq_len,
               flops_per_token=6.0 * vocab * vocab, eval_batch_size=EVAL_BATCH_SIZE, seed=seed,
               constants=globals(), extra={"startup_seconds": t_first - t_start})


def load_eval_model(config, weights):
    """Unused by the harness since the evaluator scores the exported forward; kept as a plain helper."""
    model = Bigram(weights["table.weight"].shape[0])
    model.table.weight = mx.array(weights["table.weight"])
    return model


if __name__ == "__main__":
    train()
'''

# The same on the torch engine (ARUN_DEVICE=cpu): the cuda backend's train file.
MINI_TORCH = '''"""Minimal harness-test train file: a bigram model on torch."""
import time

import torch
import torch.nn.functional as F

import prepare
from engines.cuda import ENGINE
from engines.run import StepLog, env_seed, fail_fast, finish_run
from engines.timer import TimeBudget

# --- hyperparameters ---
LEARNING_RATE = 1e-05
BATCH_SIZE = 8
EVAL_BATCH_SIZE = 64
SEED = 1
WARMUP_STEPS = 1
# --- end hyperparameters ---


def train():
    t_start = time.time()
    seed = env_seed(SEED)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    data = prepare.PreparedData.open()
    vocab, seq_len = data.manifest["vocab_size"], data.profile.max_seq_len
    table = torch.nn.Embedding(vocab, vocab).to(ENGINE.device())
    opt = torch.optim.Adam(table.parameters(), lr=LEARNING_RATE)
    loader = prepare.make_dataloader(BATCH_SIZE, seq_len, seed=seed)
    budget = TimeBudget(prepare.TIME_BUDGET, warmup_steps=WARMUP_STEPS, sync=ENGINE.sync)
    log = StepLog(every_seconds=0.2)
    t_first = time.time()
    while not budget.done:
        x, y, epoch = next(loader)
        budget.start_step()
        x, y = ENGINE.to_device(x).long(), ENGINE.to_device(y).long()
        loss = F.cross_entropy(table(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dt = budget.end_step()
        fail_fast(loss.item(), budget.step)
        log(budget, loss.item(), BATCH_SIZE * seq_len, dt, None, epoch, force=budget.step == 1)

    def logits(idx):
        with torch.no_grad():
            return table(idx.long())

    finish_run(ENGINE, table, logits, budget=budget, t_start=t_start, tokens_per_step=BATCH_SIZE * seq_len,
               flops_per_token=6.0 * vocab * vocab, eval_batch_size=EVAL_BATCH_SIZE, seed=seed,
               constants=globals(), extra={"startup_seconds": t_first - t_start})


def load_eval_model(config, weights):
    """Unused by the harness since the evaluator scores the exported forward; kept as a plain helper."""
    table = torch.nn.Embedding(*weights["table.weight"].shape).to(ENGINE.device())
    with torch.no_grad():
        table.weight.copy_(torch.from_numpy(weights["table.weight"]))

    def logits(idx):
        with torch.no_grad():
            return table(idx.long())
    return logits


if __name__ == "__main__":
    train()
'''


# --------------------------------------------------------------------------- helpers

def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path: Path, train_files: dict[str, str]) -> Path:
    """A user's clone: the project's fixed files plus the given train files, committed on main."""
    path.mkdir(parents=True)
    shutil.copy2(REPO / "prepare.py", path / "prepare.py")
    shutil.copytree(REPO / "engines", path / "engines", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / ".gitignore", path / ".gitignore")
    for name, text in train_files.items():
        (path / name).write_text(text)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", "test@arun")
    git(path, "config", "user.name", "arun test")
    git(path, "add", "-A")
    git(path, "commit", "-qm", "init")
    return path


def set_constants(repo: Path, train_file: str, **values: object) -> None:
    p = repo / train_file
    p.write_text(rewrite_constants(p.read_text(), values))


def edit(repo: Path, train_file: str, old: str, new: str) -> None:
    p = repo / train_file
    text = p.read_text()
    assert old in text, old
    p.write_text(text.replace(old, new, 1))


def subjects(repo: Path) -> list[str]:
    """Commit subjects, newest first, without the `arun: record <id>` commits that carry ledger lines."""
    return [s for s in git(repo, "log", "--format=%s").splitlines() if not s.startswith("arun: record ")]


def work_head(repo: Path) -> str:
    """The newest commit that is not a ledger-record commit (the keep commit after a keep)."""
    return git(repo, "log", "-1", "--format=%H", "--invert-grep", "--grep=^arun: record ")


def run(repo: Path, backend: str = "mlx", description: str = "", **kw) -> dict:
    kw.setdefault("budget", 1.0)
    kw.setdefault("show_progress", False)
    if backend == "cuda":
        kw.setdefault("device", "cpu")
    return run_experiment(repo, backend, description, log=lambda s: None, **kw)


def ledger(repo: Path, rec: dict) -> list[dict]:
    return Ledger(ledger_path(repo, rec["tag"])).records()


def wait_dead(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- keep -> discard -> crash

@pytest.fixture(scope="module")
def sequence(tiny_data: Path, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One repo taken through baseline, keep, discard, crash, FAIL, INVALID; the state after each step
    is captured for the tests below (and the read-side commands use the final repo)."""
    repo = make_repo(tmp_path_factory.mktemp("seq") / "repo", {"train_mlx.py": MINI_MLX})
    steps: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARUN_CACHE", str(tiny_cache))
        mp.setenv("ARUN_DATA_DIR", str(tiny_data))

        def step(description: str) -> None:
            before = (repo / "train_mlx.py").read_text()
            rec = run(repo, "mlx", description)
            steps.append({"rec": rec, "before": before, "after": (repo / "train_mlx.py").read_text(),
                          "head": work_head(repo), "subjects": subjects(repo),
                          "clean": git(repo, "status", "--porcelain", "--untracked-files=all"),
                          "branch": git(repo, "branch", "--show-current"), "ledger": ledger(repo, rec),
                          "run_log": (repo / "run.log").read_text(),
                          "head_ledger": git(repo, "show", f"{rec['commit']}:bench/{rec['tag']}/ledger.jsonl")
                          if rec["status"] == "keep" and len(steps) > 0 else None})

        step("")                                                   # 0: baseline (LR 1e-5: barely trains)
        set_constants(repo, "train_mlx.py", LEARNING_RATE=0.05)
        step("raise LR to 0.05")                                   # 1: keep
        set_constants(repo, "train_mlx.py", LEARNING_RATE=2e-05)
        step("LR 2e-5")                                            # 2: discard
        edit(repo, "train_mlx.py", "    loader = ", "    raise RuntimeError('boom: deliberate bug')\n    loader = ")
        step("a bug")                                              # 3: crash (exception)
        set_constants(repo, "train_mlx.py", LEARNING_RATE=1e9)
        step("LR 1e9")                                             # 4: crash (FAIL: diverged)
        edit(repo, "train_mlx.py", "return self.table(idx)",
             "return self.table(mx.concatenate([idx[:, 1:], idx[:, :1]], axis=1))")
        step("peek at the next token")                             # 5: invalid
    return {"repo": repo, "steps": steps}


def test_baseline_is_kept_on_a_new_run_branch(sequence: dict) -> None:
    s = sequence["steps"][0]
    rec = s["rec"]
    assert rec["status"] == "keep" and rec["baseline"] is True
    assert rec["description"] == "baseline"
    assert s["branch"].startswith("autoresearch/")
    # The train file was unchanged: nothing to commit, the baseline is HEAD (its ledger line rides in
    # the `arun: record` commit after it, as every record does: the tree is clean after every verdict).
    assert s["subjects"] == ["init"] and rec["commit"] == s["head"]
    assert all(step["clean"] == "" for step in sequence["steps"]), [step["clean"] for step in sequence["steps"]]
    assert len(s["ledger"]) == 1 and s["ledger"][0]["id"] == rec["id"]
    assert set(RECORD_FIELDS) <= set(rec), RECORD_FIELDS - set(rec)
    assert 0 < rec["val_bpb"] < 20 and rec["val_bpb_seeds"] == [rec["val_bpb"]]
    assert rec["key"]["backend"] == "mlx" and rec["key"]["time_budget"] == 1.0 and rec["key"]["profile"] == "tiny"
    assert rec["config"]["LEARNING_RATE"] == 1e-05 and rec["seeds"] == [1]
    assert rec["training_seconds"] >= 1.0 and rec["num_steps"] > 1
    for name in ("startup_seconds", "eval_seconds", "overhead_seconds", "bookkeeping_seconds", "launch_seconds"):
        assert rec[name] is not None and rec[name] >= 0, name
    assert rec["total_seconds"] >= rec["training_seconds"]
    assert abs(rec["overhead_seconds"] - (rec["wall_seconds"] - rec["training_seconds"])) < 1e-6
    assert [line for line in s["run_log"].splitlines() if line.startswith("val_bpb:")] == [f"val_bpb:          {rec['val_bpb']:.6f}"]
    assert "step 00001" in s["run_log"]


def test_improvement_is_committed_with_the_ledger(sequence: dict) -> None:
    base, s = sequence["steps"][0]["rec"], sequence["steps"][1]
    rec = s["rec"]
    assert rec["status"] == "keep" and rec["baseline"] is False
    assert rec["val_bpb"] < base["val_bpb"] and rec["best_before"] == base["val_bpb"]
    assert s["subjects"] == ["raise LR to 0.05", "init"]
    assert rec["commit"] == s["head"] and git(sequence["repo"], "rev-parse", f"{rec['commit']}^") == rec["parent_commit"]
    # its parent is the baseline's record commit, on top of the baseline's commit
    assert git(sequence["repo"], "rev-parse", f"{rec['parent_commit']}^") == base["commit"]
    assert "LEARNING_RATE = 0.05" in s["after"] and s["after"] == s["before"]
    assert "-LEARNING_RATE = 1e-05" in rec["diff"] and "+LEARNING_RATE = 0.05" in rec["diff"]
    # The keep commit carries the train file (the ledger as it stood before this record, already
    # committed with the baseline's record); this record rides in the `arun: record` commit after it.
    repo = sequence["repo"]
    assert git(repo, "show", f"{rec['commit']}:train_mlx.py") == s["after"].rstrip("\n")
    assert [json.loads(line)["id"] for line in s["head_ledger"].splitlines()] == [base["id"]]
    assert git(repo, "show", "--name-only", "--format=", rec["commit"]).splitlines() == ["train_mlx.py"]
    record_commit = git(repo, "log", "--format=%H", f"--grep=^arun: record {rec['id']} (keep)")
    assert git(repo, "rev-parse", f"{record_commit}^") == rec["commit"]


def test_worse_result_is_discarded_and_the_best_train_file_restored(sequence: dict) -> None:
    keep, s = sequence["steps"][1], sequence["steps"][2]
    rec = s["rec"]
    assert rec["status"] == "discard" and rec["val_bpb"] > keep["rec"]["val_bpb"]
    assert rec["commit"] == keep["rec"]["commit"] == s["head"]
    assert s["subjects"] == keep["subjects"]             # no commit
    assert s["after"] == keep["after"]                    # back to the best train file
    assert "+LEARNING_RATE = 2e-05" in rec["diff"]
    assert len(s["ledger"]) == 3


def test_crashes_are_recorded_with_their_error_line(sequence: dict) -> None:
    keep = sequence["steps"][1]
    bug, fail, invalid = (sequence["steps"][i] for i in (3, 4, 5))
    assert bug["rec"]["status"] == "crash"
    assert bug["rec"]["error"] == "RuntimeError: boom: deliberate bug"
    assert fail["rec"]["status"] == "crash" and fail["rec"]["error"].startswith("FAIL: training loss")
    assert invalid["rec"]["status"] == "invalid" and invalid["rec"]["error"].startswith("the evaluator refused the exported forward: logits before position")
    for s in (bug, fail, invalid):
        assert s["rec"]["val_bpb"] is None and s["rec"]["commit"] == keep["rec"]["commit"]
        assert s["after"] == keep["after"] and s["subjects"] == keep["subjects"]
        # As upstream: a crashed run.log has no val_bpb line (the agent's grep comes back empty).
        assert not [line for line in s["run_log"].splitlines() if line.startswith("val_bpb:")]
        assert "arun: " in s["run_log"].splitlines()[-1]
    assert "raise RuntimeError" in bug["rec"]["diff"] and "Traceback" in bug["run_log"]
    final = sequence["steps"][-1]["ledger"]
    assert [r["status"] for r in final] == ["keep", "keep", "discard", "crash", "crash", "invalid"]
    assert all(set(RECORD_FIELDS) <= set(r) for r in final)
    assert len({r["id"] for r in final}) == 6


def test_read_side_commands_on_the_real_ledger(sequence: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    repo = sequence["repo"]
    steps = sequence["steps"]
    tag = steps[0]["rec"]["tag"]
    monkeypatch.chdir(repo)
    import arun.cli
    monkeypatch.setattr(arun.cli.console, "width", 250)  # a wide terminal: table cells unwrapped
    runner = CliRunner()

    out = runner.invoke(cli, ["log"])
    assert out.exit_code == 0, out.output
    for s in steps:
        assert s["rec"]["id"] in out.output
    assert "baseline" in out.output and "invalid" in out.output
    delta = steps[2]["rec"]["val_bpb"] - steps[1]["rec"]["val_bpb"]
    assert f"{delta:+.6f}" in out.output

    out = runner.invoke(cli, ["show", steps[1]["rec"]["id"][:-2]])
    assert out.exit_code == 0, out.output
    assert "+LEARNING_RATE = 0.05" in out.output and "raise LR to 0.05" in out.output

    out = runner.invoke(cli, ["compare"])
    assert out.exit_code == 0, out.output
    assert tag[:20] in out.output and "LEARNING_RATE 1e-05->0.05" in out.output
    improvement = 100 * (steps[0]["rec"]["val_bpb"] - steps[1]["rec"]["val_bpb"]) / steps[0]["rec"]["val_bpb"]
    assert f"{improvement:.2f}%" in out.output

    out = runner.invoke(cli, ["plot", "--out", str(tmp_path / "plots")])
    assert out.exit_code == 0, out.output
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "plots" / f"{tag}.png")
    assert img.ndim == 3 and img.shape[0] > 100

    out = runner.invoke(cli, ["export", "-o", str(tmp_path / "results.tsv")])
    assert out.exit_code == 0, out.output
    lines = (tmp_path / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    rows = [line.split("\t") for line in lines[1:]]
    assert [r[3] for r in rows] == ["keep", "keep", "discard", "crash", "crash", "crash"]
    assert rows[1][0] == steps[1]["rec"]["commit"][:7] and rows[1][1] == f"{steps[1]['rec']['val_bpb']:.6f}"
    assert rows[3][1:3] == ["0.000000", "0.0"] and rows[5][4].startswith("peek at the next token (invalid: the evaluator refused the exported forward: ")
    assert "looks ahead" in rows[5][4]


# --------------------------------------------------------------------------- refusals: nothing touched

def _snapshot(repo: Path) -> dict:
    return {"status": git(repo, "status", "--porcelain", "--untracked-files=all", "--ignored"),
            "branch": git(repo, "branch", "--show-current"), "head": git(repo, "rev-parse", "HEAD"),
            "train": {p.name: p.read_bytes() for p in repo.glob("train_*.py")},
            "branches": git(repo, "branch", "--list")}


def test_scope_guard_refuses_listing_offenders_and_touches_nothing(data_env: Path, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    set_constants(repo, "train_mlx.py", LEARNING_RATE=0.05)           # allowed
    edit(repo, "prepare.py", "DEFAULT_TIME_BUDGET = 300", "DEFAULT_TIME_BUDGET = 600")  # not allowed
    (repo / "notes.txt").write_text("an untracked file\n")           # not allowed
    (repo / "engines" / "evaluator.py").write_text((repo / "engines" / "evaluator.py").read_text() + "\n# hack\n")
    git(repo, "add", "engines/evaluator.py")                          # staged: not allowed either
    (repo / "bench" / "x").mkdir(parents=True)
    (repo / "bench" / "x" / "ledger.jsonl").write_text("")           # the harness's own: fine
    before = _snapshot(repo)
    with pytest.raises(ArunError) as e:
        run(repo, "mlx", "sneaky")
    msg = str(e.value)
    assert "only train_mlx.py may differ" in msg
    for name in ("prepare.py", "notes.txt", "engines/evaluator.py"):
        assert name in msg
    assert "bench" not in msg and "\n" not in msg
    assert _snapshot(repo) == before
    assert not (repo / ".arun").exists() and not (repo / "run.log").exists()


def test_a_train_file_that_is_a_link_is_refused(data_env: Path, tmp_path: Path) -> None:
    """An unconfined agent (or anyone) puts a link where the train file was: the harness would read,
    record and commit whatever it points at (a key). Refused before anything is written."""
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    secret = tmp_path / "identity.key"
    secret.write_text(MINI_MLX)  # even a link to a valid train file
    (repo / "train_mlx.py").unlink()
    (repo / "train_mlx.py").symlink_to(secret)
    with pytest.raises(ArunError, match="train_mlx.py is not a plain file") as e:
        run(repo, "mlx", "linked")
    assert "\n" not in str(e.value) and not (repo / ".arun").exists() and not (repo / "run.log").exists()


def test_bad_input_is_one_line_and_touches_nothing(data_env: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX, "train_cuda.py": MINI_TORCH})
    monkeypatch.chdir(repo)
    runner = CliRunner()
    before = _snapshot(repo)

    def refuse(args: list[str], *needles: str) -> None:
        out = runner.invoke(cli, args)
        assert out.exit_code != 0, out.output
        text = out.output.strip()
        assert text.startswith("error:") and len(text.splitlines()) == 1, text
        for n in needles:
            assert n in text, (n, text)
        assert _snapshot(repo) == before and not (repo / ".arun").exists()

    refuse(["--backend", "tpu"], "unknown backend 'tpu'", "mlx, cuda")
    import torch
    if not torch.cuda.is_available():
        refuse(["--backend", "cuda", "--budget", "1"], "cuda:", "--device cpu")
    refuse(["run", "--backend", "mlx", "--device", "cpu"], "--device is for the torch engine")
    monkeypatch.setenv("ARUN_DATA_DIR", str(tmp_path / "nothing-here"))
    refuse(["--backend", "mlx", "--budget", "1"], "no prepared data", "arun prepare --dataset")
    monkeypatch.delenv("ARUN_DATA_DIR")
    monkeypatch.setenv("ARUN_CACHE", str(tmp_path / "empty-cache"))
    refuse(["--backend", "mlx", "--budget", "1"], "no prepared data; run: arun prepare --dataset pystdlib")
    monkeypatch.setenv("ARUN_DATA_DIR", str(data_env))
    (repo / "stray.py").write_text("x = 1\n")
    before = _snapshot(repo)
    refuse(["--backend", "mlx", "--budget", "1"], "stray.py")
    refuse(["run", "--backend", "mlx", "--budget", "0"], "--budget must be a positive")


def test_second_arun_waits_then_names_the_pid_holding_the_lock(data_env: Path, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from arun.core.experiment import repo_lock\n"
        f"with repo_lock(Path({str(repo)!r})):\n    print('held', flush=True); time.sleep(30)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(ArunError, match=rf"another arun \(pid {holder.pid}\)"):
            run(repo, "mlx", wait=0.5)
        assert time.perf_counter() - t0 >= 0.5
        assert not list((repo / "bench").glob("*/ledger.jsonl"))
    finally:
        holder.kill()
        holder.wait()
    with repo_lock(repo):  # released by the holder's death: free again
        pass


# --------------------------------------------------------------------------- keys never mix

def test_keys_never_ratchet_against_each_other(data_env: Path, tmp_path: Path) -> None:
    """Same tag with two budgets (two keys in one ledger), plus a foreign key's record that would win
    every comparison if keys mixed: each key has its own baseline, and a discard restores its own
    best commit, not HEAD."""
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    set_constants(repo, "train_mlx.py", LEARNING_RATE=0.05)
    a = run(repo, "mlx", "good LR at 1 s", budget=1.0)
    assert a["status"] == "keep" and a["baseline"]
    good = (repo / "train_mlx.py").read_text()

    set_constants(repo, "train_mlx.py", LEARNING_RATE=1e-05)
    b = run(repo, "mlx", "poor LR at 1.5 s", budget=1.5)
    # Much worse than key a's best, yet kept: it is the first run of its own key.
    assert b["status"] == "keep" and b["baseline"] and b["key_id"] != a["key_id"] and b["tag"] == a["tag"]
    assert b["val_bpb"] > a["val_bpb"] and b["best_before"] is None
    assert subjects(repo)[:2] == ["poor LR at 1.5 s", "good LR at 1 s"]

    # Records of other keys in the same ledger (another machine's, another dataset's) with a far
    # better val_bpb and a commit this repo does not have: if keys mixed, the next run would compare
    # against 0.01 and fail to restore that commit.
    foreign = {"key": {**a["key"], "hardware": "cuda-nvidia-h100-80gb-hbm3"}, "key_id": "f" * 12, "tag": a["tag"],
               "status": "keep", "baseline": True, "val_bpb": 0.01, "commit": "0" * 40}
    Ledger(ledger_path(repo, a["tag"])).append(foreign)
    Ledger(ledger_path(repo, "cuda-nvidia-h100-80gb-hbm3")).append({**foreign, "tag": "cuda-nvidia-h100-80gb-hbm3"})

    # Back on key a with a worse change: compared with a's best only, and restored to a's commit
    # (LR 0.05), not to HEAD (which holds key b's LR 1e-5).
    set_constants(repo, "train_mlx.py", LEARNING_RATE=3e-05)
    d = run(repo, "mlx", "worse on key a", budget=1.0)
    assert d["status"] == "discard" and d["best_before"] == a["val_bpb"] and d["commit"] == a["commit"]
    assert (repo / "train_mlx.py").read_text() == good
    assert "LEARNING_RATE = 1e-05" in git(repo, "show", "HEAD:train_mlx.py")
    # And key b, improved, is kept against b's best only (it is still far worse than a's).
    set_constants(repo, "train_mlx.py", LEARNING_RATE=0.01)
    e = run(repo, "mlx", "better on key b", budget=1.5)
    assert e["status"] == "keep" and e["best_before"] == b["val_bpb"] and e["val_bpb"] < b["val_bpb"]
    recs = ledger(repo, a)
    assert [(r["key_id"], r["status"]) for r in recs] == [
        (a["key_id"], "keep"), (b["key_id"], "keep"), ("f" * 12, "keep"), (a["key_id"], "discard"),
        (b["key_id"], "keep")]


# --------------------------------------------------------------------------- kills

def test_hard_timeout_kills_the_whole_process_group(data_env: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    (tmp_path / "out").mkdir()
    pids = tmp_path / "out" / "pids"
    monkeypatch.setenv("ARUN_SANDBOX_EXTRA_WRITE", str(pids.parent))  # (a confined run writes its run folder only)
    edit(repo, "train_mlx.py", "    seed = env_seed(SEED)\n", (
        "    import subprocess\n"
        "    child = subprocess.Popen(['sleep', '600'])\n"
        f"    open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "    time.sleep(600)\n"
        "    seed = env_seed(SEED)\n"))
    head = git(repo, "rev-parse", "HEAD")
    t0 = time.perf_counter()
    rec = run(repo, "mlx", "hangs", hard_timeout=3.0)
    assert time.perf_counter() - t0 < 30
    assert rec["status"] == "timeout" and "hard timeout of 3s" in rec["error"] and rec["val_bpb"] is None
    for pid in map(int, pids.read_text().split()):
        assert wait_dead(pid), f"pid {pid} survived the timeout"
    assert (repo / "train_mlx.py").read_text() == MINI_MLX       # restored to the best (= HEAD here)
    assert work_head(repo) == head and subjects(repo)[0] == "init"  # only the record commit was added
    assert ledger(repo, rec)[-1]["status"] == "timeout"


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # how a script starts its background jobs (`arun ... &`)


@pytest.mark.parametrize("started", ["plainly", "sigint_ignored"])
def test_ctrl_c_kills_the_run_restores_the_train_file_and_records_crash(data_env: Path, tmp_path: Path,
                                                                         started: str) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    set_constants(repo, "train_mlx.py", LEARNING_RATE=0.01)
    experiment = (repo / "train_mlx.py").read_text()
    (tmp_path / "pid").mkdir()
    pid_file = tmp_path / "pid" / "child.pid"
    # (a confined run writes only its run folder and sees only allowed variables (ARUN_*): the test's pid folder is granted explicitly)
    env = dict(os.environ, ARUN_TEST_PID_FILE=str(pid_file), ARUN_SANDBOX_EXTRA_WRITE=str(pid_file.parent))
    proc = subprocess.Popen([sys.executable, "-m", "arun.cli", "--backend", "mlx", "-m", "long run", "--budget", "120"],
                            cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_ignore_sigint if started == "sigint_ignored" else None)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            log = repo / "run.log"
            if log.exists() and "step 0" in log.read_text():
                break
            time.sleep(0.1)
        else:
            pytest.fail("the run never reached a training step")
        proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C delivers to arun
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "interrupted" in err and len(err.strip().splitlines()) == 1
    assert wait_dead(int(pid_file.read_text()))
    assert (repo / "train_mlx.py").read_text() == experiment        # as it was before the run
    recs = list((repo / "bench").glob("*/ledger.jsonl"))
    last = Ledger(recs[0]).records()[-1]
    assert last["status"] == "crash" and last["error"] == "interrupted (Ctrl-C)" and last["description"] == "long run"
    assert "arun: CRASH: interrupted (Ctrl-C)" in out


# --------------------------------------------------------------------------- the CLI, seeds, the real train files

def test_cli_runs_an_experiment_and_prints_upstreams_summary(data_env: Path, tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    out = subprocess.run(["arun", "start", "night1"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0 and "autoresearch/night1" in out.stdout
    assert git(repo, "branch", "--show-current") == "autoresearch/night1"
    set_constants(repo, "train_mlx.py", LEARNING_RATE=0.05)
    out = subprocess.run(["arun", "run", "--backend", "mlx", "-m", "two seeds", "--budget", "1", "--seeds", "2"],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(("arun: confined", "arun: NOT confined"))  # said first, every run
    lines = lines[1:]
    assert lines[0].startswith("arun: train_mlx.py on mlx-cpu") and "baseline run" in lines[0]
    assert lines[1].startswith("arun: scoring the exported forward")  # every run is scored by the evaluator process
    assert lines[2].startswith("arun: scoring the exported forward")  # (one per seed)
    assert lines[3] == "---" and lines[4].startswith("val_bpb:") and "arun: BASELINE" in lines[-1]
    rec = Ledger(next((repo / "bench").glob("*/ledger.jsonl"))).records()[-1]
    assert rec["seeds"] == [1, 2] and len(rec["val_bpb_seeds"]) == 2
    assert abs(rec["val_bpb"] - sum(rec["val_bpb_seeds"]) / 2) < 1e-12
    assert rec["branch"] == "autoresearch/night1" and subjects(repo)[0] == "two seeds"
    # One val_bpb line in run.log (the mean); each seed's own block is prefixed with its seed.
    log = (repo / "run.log").read_text().splitlines()
    assert [line for line in log if line.startswith("val_bpb:")] == [f"val_bpb:          {rec['val_bpb']:.6f}"]
    assert any(line.startswith("[seed 2] step") for line in log)

    # An agent following upstream's habit: `arun ... > run.log 2>&1`. stdout is run.log then, and
    # arun writes it once, in order, with one val_bpb line.
    set_constants(repo, "train_mlx.py", LEARNING_RATE=1e-05)
    with open(repo / "run.log", "w") as f:
        done = subprocess.run([sys.executable, "-m", "arun.cli", "--backend", "mlx", "-m", "tiny LR", "--budget", "1"],
                              cwd=repo, stdout=f, stderr=subprocess.STDOUT, timeout=120)
    assert done.returncode == 0
    log = (repo / "run.log").read_text().splitlines()
    assert log[0].startswith(("arun: confined", "arun: NOT confined"))
    assert log[1].startswith("arun: train_mlx.py on") and "best so far" in log[1]
    assert len([line for line in log if line.startswith("val_bpb:")]) == 1
    assert any(line.startswith("step 00001 |") for line in log) and log[-1].startswith("arun: DISCARD")


def _tiny_block(train_file: str) -> dict:
    common = dict(DEPTH=1, ASPECT_RATIO=32, HEAD_DIM=32, WINDOW_PATTERN="L", DEVICE_BATCH_SIZE=4,
                  TOTAL_BATCH_SIZE=4 * 64, WARMUP_STEPS=1)
    text = (REPO / train_file).read_text()
    return {k: v for k, v in {**common, "COMPILE": False}.items() if f"\n{k} = " in text}


@pytest.mark.parametrize("backend,train_file", [("cuda", "train_cuda.py"), ("mlx", "train_mlx.py")])
def test_the_real_train_files_run_under_the_harness(backend: str, train_file: str, data_env: Path, tmp_path: Path) -> None:
    if not (REPO / train_file).exists():
        pytest.skip(f"{train_file} is not in the project yet")
    repo = make_repo(tmp_path / "repo", {train_file: (REPO / train_file).read_text()})
    set_constants(repo, train_file, **_tiny_block(train_file))
    rec = run(repo, backend, "tiny real model", budget=1.0)
    assert rec["status"] == "keep" and rec["baseline"], rec.get("error")
    assert 0 < rec["val_bpb"] < 20 and rec["num_params"] > 0 and rec["num_steps"] >= 2
    assert rec["config"]["DEPTH"] == 1 and rec["startup_seconds"] > 0
    assert subjects(repo)[0] == "tiny real model"          # the tiny block differed from HEAD: committed
    stored = repo / ".arun" / "artifacts" / f"{rec['artifact_sha256']}{SUFFIX[backend]}"
    assert stored.exists() and rec["artifact_bytes"] == stored.stat().st_size  # the keep keeps its forward


# --------------------------------------------------------------------------- small parts

@pytest.mark.unit
def test_step_lines_and_error_lines_are_parsed() -> None:
    info = parse_step_line("step 00012 | progress   4.1% | loss 3.210000 | dt 12ms | tok/s 12,345 | mfu n/a | "
                           "epoch 1 | remaining 287s")
    assert info is not None and (info.step, info.progress, info.tokens_per_second, info.remaining) == (12, 4.1, 12345, 287)
    assert parse_step_line("Model config: {...}") is None
    tb = ["Traceback (most recent call last):", '  File "train_cuda.py", line 3, in <module>', "    x = 1/0",
          "ZeroDivisionError: division by zero"]
    assert last_error_line(tb) == "ZeroDivisionError: division by zero"
    assert last_error_line(["step 1", "FAIL: training loss is nan at step 3; lower the learning rates", "more"]) \
        .startswith("FAIL:")
    assert last_error_line(["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"]) \
        .startswith("torch.OutOfMemoryError")
    assert last_error_line([]) == "no output"


def test_run_branch_naming(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": MINI_MLX})
    b1, created = gitops.ensure_run_branch(repo)
    assert created and b1.startswith("autoresearch/")
    assert gitops.ensure_run_branch(repo) == (b1, False)          # stays on a run branch
    git(repo, "checkout", "-q", "main")
    b2, created = gitops.ensure_run_branch(repo)                  # never switches onto an older one
    assert created and b2 == f"{b1}-2"
    assert gitops.ensure_run_branch(repo, "mar5") == ("autoresearch/mar5", True)
    with pytest.raises(ArunError, match="not a valid git branch name"):
        gitops.ensure_run_branch(repo, "bad name..")


@pytest.mark.unit
def test_the_record_config_keeps_every_constant_of_the_block() -> None:
    from arun.core.experiment import train_constants
    text = ("X = 0\n# --- hyperparameters ---\nDEPTH = 8  # layers\nTOTAL_BATCH_SIZE = 2**19\nBETAS = (0.8, 0.95)\n"
            "LR = -1e-3 * 4\nODD = max(1, 2)\nlower = 3\n# --- end hyperparameters ---\nY = 1\n")
    assert train_constants(text) == {"DEPTH": 8, "TOTAL_BATCH_SIZE": 524288, "BETAS": (0.8, 0.95), "LR": -0.004,
                                     "ODD": "max(1, 2)"}
    assert train_constants("no block here") == {}
    for name in ("train_cuda.py", "train_mlx.py"):
        if (REPO / name).exists():
            assert isinstance(train_constants((REPO / name).read_text()).get("TOTAL_BATCH_SIZE"), int)


def test_set_edits_only_the_constants_block(tmp_path: Path) -> None:
    """`arun set` rewrites named constants in place; unknown names and malformed items change nothing."""
    repo = make_repo(tmp_path / "repo", {"train_mlx.py": (REPO / "train_mlx.py").read_text()})
    before = (repo / "train_mlx.py").read_text()
    ok = subprocess.run(["arun", "set", "--backend", "mlx", "DEPTH=2", "TOTAL_BATCH_SIZE=2**11", "WINDOW_PATTERN=L",
                         "ADAM_BETAS=(0.9, 0.95)"], cwd=repo, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    from arun.core.trainfile import constants
    after = (repo / "train_mlx.py").read_text()
    got = constants(after)
    assert (got["DEPTH"], got["TOTAL_BATCH_SIZE"], got["WINDOW_PATTERN"], got["ADAM_BETAS"]) == (2, 2048, "L", (0.9, 0.95))
    changed = [line for line in after.splitlines() if line not in before.splitlines()]
    assert len(changed) == 4 and all(line.split(" = ")[0] in ("DEPTH", "TOTAL_BATCH_SIZE", "WINDOW_PATTERN", "ADAM_BETAS")
                                     for line in changed)
    for bad, why in ((["NOT_A_CONSTANT=1"], "NOT_A_CONSTANT not in the hyperparameter block"),
                     (["DEPTH"], "is not NAME=VALUE")):
        p = subprocess.run(["arun", "set", "--backend", "mlx", *bad], cwd=repo, capture_output=True, text=True)
        assert p.returncode == 1 and why in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert (repo / "train_mlx.py").read_text() == after
