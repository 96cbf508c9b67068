"""
A scripted stand-in for a coding agent, driven by `arun loop --agent "python tests/fake_agent.py MODE ..."`.

It follows arun's agent convention: the prompt arrives on stdin (and in $ARUN_PROMPT_FILE),
the file to edit is $ARUN_TRAIN_FILE, the description goes to $ARUN_DESCRIPTION_FILE or is
the last stdout line. Modes:

    set NAME=VALUE ...   rewrite constants of the hyperparameter block (VALUE is a Python literal)
    comment [TEXT]       append a comment line to the train file (a change that changes nothing)
    forbidden            edit the train file, prepare.py, and create notes.txt
    forbidden-commit     edit the train file and prepare.py, then git commit both
    hang                 edit the train file, start a grandchild `sleep`, then sleep forever
    detach DIR           start a setsid child and a double-forked grandchild that write their pids to
                         DIR at once and DIR/<kind>.marker 3 s later, make an honest edit, exit
    gitconfig            write a hostile ~/.config/git/config (hooksPath, fsmonitor), print "denied: ..."
                         or "done: ...", then make an honest edit
    nochange             print something and exit without editing
    break                write a syntax error into the train file (unique per iteration)
    fail                 exit 3 without editing
    attack WHAT          try something the loop's confinement forbids (val: read the val rows of
                         $ARUN_DATA_DIR; bench: write into bench/; pth: drop a .pth into site-packages;
                         evaluator: edit engines/evaluator.py), print "denied: ..." or "done: ...",
                         then make an honest edit of the train file (in place) and run `git diff`
    links SECRET TARGET  plant links in the exchange folder for the harness to follow (description.txt ->
                         SECRET, stdout.log/stderr.log -> TARGET, the harness's log folder too), try to put a
                         link in place of the train file, print "denied: ..." or "done: ...", honest edit

$FAKE_AGENT_DUMP: if set, the prompt read from stdin is written there (with the env it saw).
$FAKE_AGENT_PIDS: if set, `hang` writes "<own pid> <grandchild pid>" there once it is running.
$FAKE_AGENT_DESCRIBE: if set, `set` writes it to $ARUN_DESCRIPTION_FILE.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def rewrite(path: Path, overrides: dict) -> None:
    from arun.core.trainfile import rewrite_constants
    path.write_text(rewrite_constants(path.read_text(), overrides))


def append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def attack(what: str, train: Path, it: str) -> None:
    import sysconfig
    target = {"val": Path(os.environ.get("ARUN_DATA_DIR", ".")) / "val_rows.npy", "bench": Path("bench") / "stolen.txt",
              "pth": Path(sysconfig.get_paths()["purelib"]) / "zz_agent.pth", "evaluator": Path("engines") / "evaluator.py"}[what]
    try:
        if what == "val":
            target.read_bytes()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a") as f:
                f.write("import os  # the agent was here\n")
        print(f"done: {target}")
    except OSError as e:
        print(f"denied: {e}")
    append(train, f"# honest edit {it}")
    diff = subprocess.run(["git", "diff", "--stat"], capture_output=True, text=True)
    print(f"git diff exit {diff.returncode}: {diff.stdout.strip()[:80]} {diff.stderr.strip()[:200]}")
    print(f"attack {what}")


def detach(folder: Path) -> None:
    """What an agent that wants to keep working after its turn would start (a watcher that edits the
    train file once the harness has looked): two helpers the agent's process group no longer holds."""
    def helper(kind: str) -> None:
        (folder / f"{kind}.pid").write_text(str(os.getpid()))
        time.sleep(3)
        (folder / f"{kind}.marker").write_text("still alive")
        os._exit(0)
    if os.fork() == 0:
        os.setsid()
        helper("setsid")
    if os.fork() == 0:
        if os.fork() == 0:
            helper("dfork")
        os._exit(0)
    deadline = time.time() + 10
    while not all((folder / f"{k}.pid").exists() for k in ("setsid", "dfork")) and time.time() < deadline:
        time.sleep(0.05)


def links(secret: Path, target: Path, train: Path, it: str) -> None:
    """The red team's replay: the unconfined harness reads description.txt and wrote stdout.log in the
    agent's own exchange folder; links there once made it copy a key and write where the agent may not."""
    exchange = Path(os.environ["ARUN_DESCRIPTION_FILE"]).parent
    for name, to in (("description.txt", secret), ("stdout.log", target), ("stderr.log", target),
                     ("prompt.md", target), ("../agent-logs/stdout.log", target)):
        try:
            (exchange / name).unlink(missing_ok=True)
            (exchange / name).symlink_to(to)
            print(f"done: {name}")
        except OSError as e:
            print(f"denied: {name}: {e}")
    try:  # a link in place of the train file: the harness would read (and commit) whatever it points at
        moved = train.with_name(train.name + ".agent")
        os.symlink(secret, moved)
        os.replace(moved, train)
        print("done: train file is a link")
    except OSError as e:
        print(f"denied: train link: {e}")
    append(train, f"# honest edit {it}")
    print(f"links planted at iteration {it}")


def main(argv: list[str]) -> int:
    prompt = sys.stdin.read()
    train = Path(os.environ["ARUN_TRAIN_FILE"])
    it = os.environ.get("ARUN_ITERATION", "0")
    dump = os.environ.get("FAKE_AGENT_DUMP")
    if dump:
        Path(dump).write_text(json.dumps({"stdin": prompt, "env": {k: v for k, v in os.environ.items()
                                                                   if k.startswith("ARUN_")}, "argv": argv}))
    mode, args = (argv[0], argv[1:]) if argv else ("nochange", [])
    if mode == "set":
        overrides = {}
        for a in args:
            name, _, value = a.partition("=")
            overrides[name] = ast.literal_eval(value)
        rewrite(train, overrides)
        print("thinking...")
        print("set " + ", ".join(args))  # the last stdout line is the description...
        if os.environ.get("FAKE_AGENT_DESCRIBE"):  # ...unless the description file says otherwise
            Path(os.environ["ARUN_DESCRIPTION_FILE"]).write_text(os.environ["FAKE_AGENT_DESCRIBE"] + "\n")
    elif mode == "comment":
        text = " ".join(args) or f"a comment from iteration {it}"
        append(train, f"# {text}")
        Path(os.environ["ARUN_DESCRIPTION_FILE"]).write_text(f"comment: {text}\nsecond line is ignored\n")
    elif mode == "forbidden":
        append(train, "# fake agent")
        append(Path("prepare.py"), "# the agent was here")
        Path("notes.txt").write_text("scratch\n")
        print("edited three files")
    elif mode == "forbidden-commit":
        append(train, "# fake agent")
        append(Path("prepare.py"), "# the agent was here")
        subprocess.run(["git", "commit", "-qam", "agent commit"], check=True)
        print("committed")
    elif mode == "hang":
        append(train, "# about to hang")
        child = subprocess.Popen(["sleep", "600"])
        pids = os.environ.get("FAKE_AGENT_PIDS")
        if pids:
            Path(pids).write_text(f"{os.getpid()} {child.pid}")
        time.sleep(600)
    elif mode == "detach":
        detach(Path(args[0]))
        append(train, f"# honest edit {it}")
        print("detached two helpers")
    elif mode == "gitconfig":
        target = Path.home() / ".config" / "git" / "config"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a") as f:
                f.write(f"[core]\n\thooksPath = {Path.cwd() / '.arun' / 'agent'}\n")
            print(f"done: {target}")
        except OSError as e:
            print(f"denied: {e}")
        append(train, f"# honest edit {it}")
    elif mode == "attack":
        attack(args[0], train, it)
    elif mode == "links":
        links(Path(args[0]), Path(args[1]), train, it)
    elif mode == "nochange":
        print("I looked and changed nothing")
    elif mode == "break":
        append(train, f"def broken_{it}(:")
        print("broke it")
    elif mode == "fail":
        print("something went wrong", file=sys.stderr)
        return 3
    else:
        print(f"fake_agent: unknown mode {mode!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
