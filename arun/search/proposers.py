"""
Proposers for `arun loop`: who makes the next change to the train file.

- `--agent sweep`: the built-in TPE hyperparameter sweep (arun.search.sweep), no LLM.
- `--agent "COMMAND ..."`: any coding-agent CLI, e.g. `claude -p --permission-mode acceptEdits`
  or `codex exec --sandbox workspace-write -` (both read the prompt from stdin and need the flag
  that lets them edit without asking), or a script.

The external-agent convention (also in program.md):

    arun writes the prompt to a file and runs COMMAND in the repository root with
      stdin                  the prompt
      $ARUN_PROMPT_FILE      path of the same prompt (inside .arun/, which git ignores)
      $ARUN_DESCRIPTION_FILE where the agent may write a one-line description of its change
      $ARUN_TRAIN_FILE       the one file it may change (train_mlx.py or train_cuda.py)
      $ARUN_BACKEND          mlx or cuda
    `{prompt_file}` in COMMAND is replaced by the prompt file's path (for CLIs that take a file);
    `{prompt}` by the prompt text as one argument.
    The description is the first line of $ARUN_DESCRIPTION_FILE if the agent wrote it (a plain file:
    a link is ignored with a note), else the last non-empty line the agent printed on stdout, which
    the harness captures in .arun/agent-logs/ (a folder the agent cannot write).
    The agent gets --agent-timeout seconds of wall clock; then its whole process group is killed,
    whatever it changed is reverted, and the attempt is recorded `invalid` ("agent timed out").
    Where the OS can, the agent runs confined (arun.core.confine.agent_policy): it reads the repo
    and its own settings, writes the train file (in place), .arun/agent/ and the CLI config and
    cache folders of confine.AGENT_WRITABLE (extend: ARUN_AGENT_EXTRA_WRITE), and nothing else;
    it never reads the val or test rows, bench/ or the rest of .arun/.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from arun.core import confine as confinement
from arun.core import runfolder
from arun.core.errors import ArunError

DEFAULT_AGENT_TIMEOUT = 900.0  # 15 minutes to think and edit; a training run is 5
HISTORY_ROWS = 20
DIFF_LINES = 60
DESCRIPTION_CAP = 4096  # bytes of the agent's description file the harness reads


@dataclass
class Context:
    """What a proposer knows at the start of an iteration."""
    repo_dir: Path
    backend: str
    train_file: str
    key_id: str
    tag: str
    records: list[dict]             # this key's records, in ledger order
    best: dict | None
    baseline: dict | None = None
    seq_len: int | None = None
    iteration: int = 1
    budget: float | None = None


@dataclass
class Proposal:
    description: str
    error: str | None = None        # set: nothing is run, the attempt is recorded invalid with this reason
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the prompt

def _fmt(v: object) -> str:
    return f"{v:.6f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _clip_diff(diff: str, lines: int = DIFF_LINES) -> str:
    rows = [r for r in (diff or "").splitlines() if not r.startswith(("diff --git", "index "))]
    if len(rows) > lines:
        rows = rows[:lines] + [f"... ({len(rows) - lines} more diff lines)"]
    return "\n".join(rows)


def build_prompt(ctx: Context, program_text: str = "", *, history: int = HISTORY_ROWS, diffs: int = 4) -> str:
    """The prompt for one iteration: program.md, then the state of the search and this iteration's rules."""
    recs = ctx.records
    best, base = ctx.best, ctx.baseline
    scored = [r for r in recs if r.get("status") in ("keep", "discard")]
    out: list[str] = []
    if program_text.strip():
        out += [program_text.rstrip(), "", "---", ""]
    out += [
        f"# arun loop, iteration {ctx.iteration}: make ONE change to {ctx.train_file}",
        "",
        f"You are called by `arun loop --backend {ctx.backend}` for one experiment. Your job in this call:",
        f"1. Read `{ctx.train_file}` (and the history below) and pick one idea that could lower val_bpb.",
        f"2. Edit `{ctx.train_file}` only, then exit. arun trains it for the fixed budget"
        f"{f' ({ctx.budget:g} s)' if ctx.budget else ''}, scores val_bpb, keeps it (a commit) if it beats "
        "the best, otherwise reverts it.",
        "3. Describe the change in one short line: write it to the file named by $ARUN_DESCRIPTION_FILE, "
        "or make it the last line you print.",
        "",
        "Rules for this call: do not run training or arun yourself, do not commit, do not install anything, "
        f"do not touch any file but `{ctx.train_file}` (prepare.py, engines/, arun/ and everything else are "
        "checked: any change there is reverted and the attempt is recorded invalid). Making no change is "
        "recorded invalid too. Do not ask questions; nobody is watching.",
        "",
        "## Where the search stands",
        "",
    ]
    if best is None:
        out.append("No baseline yet for this hardware and data.")
    else:
        n = len(recs)
        keeps = sum(1 for r in recs if r.get("status") == "keep")
        crashes = sum(1 for r in recs if r.get("status") in ("crash", "timeout"))
        gain = f" ({base['val_bpb'] - best['val_bpb']:+.6f} vs baseline {base['val_bpb']:.6f})" if base and base is not best else ""
        out += [
            f"- best val_bpb: {best['val_bpb']:.6f}{gain}, commit {str(best.get('commit'))[:10]}: "
            f"{best.get('description') or '-'}",
            f"- experiments so far on this key ({ctx.tag}, key {ctx.key_id}): {n} ({keeps} kept, "
            f"{sum(1 for r in recs if r.get('status') == 'discard')} discarded, {crashes} crashed/timed out)",
            "- the best's hyperparameters: " + ", ".join(f"{k}={v!r}" for k, v in (best.get("config") or {}).items()),
        ]
    if recs:
        out += ["", f"## Recent experiments (newest last, up to {history})", "",
                "| id | status | val_bpb | description |", "|---|---|---|---|"]
        for r in recs[-history:]:
            status = r.get("status", "?") + (" (near miss)" if r.get("near_miss") else "")
            desc = (r.get("description") or "").replace("|", "/")[:120]
            err = f" — {str(r.get('error'))[:120]}" if r.get("error") else ""
            out.append(f"| {r.get('id', '-')} | {status} | {_fmt(r.get('val_bpb'))} | {desc}{err} |")
    near = [r for r in scored if r.get("near_miss") and r.get("status") == "discard"][-diffs:]
    if near:
        out += ["", "## Near misses (almost as good as the best; worth combining or retrying in another form)", ""]
        for r in near:
            out += [f"### {r.get('id')}: {r.get('description') or '-'} (val_bpb {_fmt(r.get('val_bpb'))})",
                    "```diff", _clip_diff(r.get("diff", "")), "```"]
    near_ids = {r.get("id") for r in near}
    discards = [r for r in scored if r.get("status") == "discard" and r.get("id") not in near_ids][-diffs:]
    if discards:
        out += ["", "## Recently discarded changes (they did not help; do not repeat them as they are)", ""]
        for r in discards:
            out += [f"### {r.get('id')}: {r.get('description') or '-'} (val_bpb {_fmt(r.get('val_bpb'))})",
                    "```diff", _clip_diff(r.get("diff", "")), "```"]
    recent_crashes = [r for r in recs if r.get("status") in ("crash", "timeout")][-3:]
    if recent_crashes:
        out += ["", "## Recent crashes", ""]
        out += [f"- {r.get('id')}: {r.get('description') or '-'} -> {r.get('error')}" for r in recent_crashes]
    out += ["", f"Now edit `{ctx.train_file}` and exit."]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- external agents

def _kill_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM to the agent's whole process group, SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers that ignored SIGTERM but outlived the leader


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()
    return ""


class AgentProposer:
    """Runs an external coding agent once per iteration (see the module docstring for the convention)."""

    def __init__(self, spec: str, timeout: float = DEFAULT_AGENT_TIMEOUT, program_file: str = "program.md",
                 confine: bool = True):
        try:
            argv = shlex.split(spec)
        except ValueError as e:
            raise ArunError(f"cannot parse --agent {spec!r} ({e}); quote it like --agent \"claude -p\"") from None
        if not argv:
            raise ArunError("--agent is empty; pass a command such as \"claude -p\" or \"codex exec\", or sweep")
        if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
            raise ArunError(f"agent command {argv[0]!r} not found on PATH; install it, give its full path, "
                            f"or use --agent sweep")
        if timeout <= 0:
            raise ArunError(f"--agent-timeout must be positive, got {timeout}")
        self.spec, self.argv, self.timeout, self.program_file = spec, argv, float(timeout), program_file
        self.name = f"agent:{spec}"
        self.calls = 0
        self.confine = confine  # False: the agent runs with the caller's rights (the scope check still reverts)

    def command(self, prompt_file: Path, prompt: str) -> list[str]:
        return [a.replace("{prompt_file}", str(prompt_file)).replace("{prompt}", prompt) for a in self.argv]

    def propose(self, ctx: Context) -> Proposal:
        self.calls += 1
        state = Path(ctx.repo_dir) / ".arun" / "agent"
        state.mkdir(parents=True, exist_ok=True)
        program = Path(ctx.repo_dir) / self.program_file
        program_text = program.read_text(encoding="utf-8", errors="replace") if program.exists() else ""
        prompt = build_prompt(ctx, program_text)
        prompt_file, desc_file = state / "prompt.md", state / "description.txt"
        # The agent writes its exchange folder (and may plant links there): the harness's own files, the
        # agent's captured output, live where the agent cannot write; the prompt is a file made afresh.
        logs = Path(ctx.repo_dir) / ".arun" / "agent-logs"
        logs.mkdir(parents=True, exist_ok=True)
        out_file, err_file = logs / "stdout.log", logs / "stderr.log"
        with os.fdopen(runfolder.create_fresh(prompt_file, 0o644), "w", encoding="utf-8") as f:
            f.write(prompt)
        runfolder.remove(desc_file)
        env = dict(os.environ, ARUN_PROMPT_FILE=str(prompt_file), ARUN_DESCRIPTION_FILE=str(desc_file),
                   ARUN_TRAIN_FILE=ctx.train_file, ARUN_BACKEND=ctx.backend, ARUN_ITERATION=str(ctx.iteration))
        cmd = self.command(prompt_file, prompt)
        data_dir = os.environ.get("ARUN_DATA_DIR")
        policy = confinement.agent_policy(ctx.repo_dir, ctx.train_file, state, Path(data_dir) if data_dir else None, cmd)
        run = confinement.wrap(policy, cmd, env, self.confine)
        t0 = time.monotonic()
        with os.fdopen(os.open(prompt_file, os.O_RDONLY | os.O_NOFOLLOW), "rb") as stdin, \
                open(out_file, "wb") as out, open(err_file, "wb") as err:
            # Files, not pipes: an agent's grandchild holding a pipe open can never hang us.
            proc = subprocess.Popen(run.cmd, cwd=ctx.repo_dir, env=run.env, stdin=stdin,
                                    stdout=out, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return Proposal(description=self._description(desc_file, out_file) or "(agent timed out)",
                                error=f"agent timed out after {self.timeout:g}s (killed)",
                                seconds=time.monotonic() - t0)
            except BaseException:
                _kill_group(proc, grace=1.0)  # Ctrl-C: the agent goes with us
                raise
            finally:
                # Whatever the agent left running in its group (language servers, watchers) ends with it.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        seconds = time.monotonic() - t0
        description = self._description(desc_file, out_file)
        extra = {"agent_exit": proc.returncode, "agent_confined": run.confined, "agent_confinement": run.how}
        if proc.returncode != 0:
            why = _last_line(err_file.read_text(errors="replace")) or _last_line(out_file.read_text(errors="replace"))
            why = confinement.rename_hint(why[:300], ctx.train_file) if run.confined else why[:300]
            extra["agent_error"] = f"agent exited with code {proc.returncode}: {why}"
        return Proposal(description=description or "(the agent gave no description)", seconds=seconds, extra=extra)

    @staticmethod
    def _description(desc_file: Path, out_file: Path) -> str:
        if os.path.lexists(desc_file):
            raw = runfolder.read_regular(desc_file, DESCRIPTION_CAP)  # never through a link the agent planted
            if raw is None:
                print(f"arun: ignored the agent's {desc_file.name}: not a plain file (a link, FIFO or device)")
            for line in (raw or b"").decode("utf-8", errors="replace").splitlines():
                if line.strip():
                    return line.strip()[:200]
        if out_file.exists():
            return _last_line(out_file.read_text(encoding="utf-8", errors="replace"))[:200]
        return ""
