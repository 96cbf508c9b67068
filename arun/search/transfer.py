"""
`arun transfer --from <tag|commit> --backend X`: try one machine's winner on this one.

The winner is the best kept record of the source tag (or the keep at the given commit). What it
changed is read off the records, never guessed: the constants whose values differ from its key's
baseline config, and, when both commits are in this repository, the lines of its train file
outside the hyperparameter block. The constants that also exist in this backend's train file are
written into it and run as an ordinary experiment (same path, same ratchet, this machine's key),
with `transfer_from: {tag, commit, id}` in the record. Code changes go to `--agent`, which ports
them as one more ordinary experiment, or are listed as not transferred. Both engines' train files
share one skeleton (the same top-level names), so a code change is also named by what it touches:
for each function, class or constant it changes, whether this backend's file has that name (the
change ports by name) or not (new code to port).
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from arun.core import gitops, trust
from arun.core.chain import OWN_LEGACY_SIGNER
from arun.core.context import ExperimentContext, experiment_context
from arun.core.errors import ArunError
from arun.core.experiment import run_experiment
from arun.core.ledger import SIGNER, TRUST, Ledger, all_records, trust_mark
from arun.core.ratchet import baseline_record, best_record, key_records
from arun.core.trainfile import block_span, changed_names, constants, rewrite_constants, top_level
from arun.report.board import train_file_at
from arun.search.proposers import DEFAULT_AGENT_TIMEOUT, AgentProposer, Context
from engines.atomic import write_atomic


@dataclass
class Winner:
    """A source winner and what it changed against its key's baseline."""
    record: dict
    baseline: dict
    constants: dict                                   # NAME -> the winner's value, where it differs
    code_diff: str = ""                               # its train file's changes outside the constants
    source: str = ""                                  # whose records it was chosen from, in words
    code_names: list[str] | None = None               # the top-level names that change touches (None: unknown)

    @property
    def origin(self) -> dict:
        return {"tag": self.record.get("tag"), "commit": self.record.get("commit"), "id": self.record.get("id")}


@dataclass
class Transfer:
    winner: Winner
    applied: dict = field(default_factory=dict)       # NAME -> value written into this backend's train file
    not_transferred: list[str] = field(default_factory=list)
    code_map: dict[str, bool] = field(default_factory=dict)  # name the code change touches -> in this file too
    records: list[dict] = field(default_factory=list)  # what ran here, in order


def believable(records: list[dict]) -> list[dict]:
    """Records a winner may be taken from: ours, and other machines' ("foreign": their seal is theirs to
    check); never forged, edited or audit-failed ones. The run here is judged under this machine's key."""
    return [{**r, TRUST: "ok", "_source_trust": trust_mark(r) or "verified"} for r in records
            if trust_mark(r) in ("", "foreign")]


def own(record: dict) -> bool:
    """Whether this machine wrote a believable record: signed with its key (by key id: a trusted key's
    display name is anyone's to choose) or with its legacy HMAC seal."""
    if record.get("_source_trust") != "verified":
        return False
    if record.get("sig_key"):
        return record["sig_key"] == trust.own_key_id()
    return record.get(SIGNER) == OWN_LEGACY_SIGNER


def records_of_tag(records: list[dict], tag: str) -> tuple[list[dict], str]:
    """The records of `tag` a winner is chosen from, and whose they are: this machine's own when it has
    any (a clone ships reference ledgers under bench/, and a user on the same hardware shares their tag:
    theirs must win), else every believable one."""
    of_tag = [r for r in records if r.get("tag") == tag]
    mine = [r for r in of_tag if own(r)]
    where = f"bench/{tag}/ledger.jsonl"
    if mine:
        return mine, (f"this machine's own records in {where} ({len(mine)} of its {len(of_tag)}"
                      + ("; the rest are other machines', e.g. a reference shipped with the project)" if len(mine) < len(of_tag) else ")"))
    signers = sorted({str(r.get(SIGNER) or "unsigned") for r in of_tag})
    return of_tag, f"other machines' records in {where} (signed by {', '.join(signers)}; none are this machine's)"


def find_winner(repo_dir: Path | str, source: str, refs: tuple[str, ...] | list[str] = ()) -> Winner:
    """The best keep of tag `source` (its most-run key; this machine's own records when it has some:
    records_of_tag), or the keep whose commit starts with `source`."""
    records = believable(all_records(repo_dir, refs))
    of_tag, whose = records_of_tag(records, source)
    if of_tag:
        records = of_tag  # (its baseline too: the changes are measured within the same machine's records)
        counts = Counter(str(r.get("key_id")) for r in of_tag)
        kid = max(counts, key=lambda k: counts[k])
        best = best_record(of_tag, kid)
        if best is None:
            raise ArunError(f"tag {source!r} has no scored keep yet in {whose}; nothing to transfer")
    else:
        hits = [r for r in records if r.get("status") == "keep" and len(source) >= 7
                and str(r.get("commit") or "").startswith(source)]
        # A record of another machine may claim any commit: this machine's own keep there wins.
        hits = [r for r in hits if own(r)] or hits
        if not hits:
            tags = ", ".join(sorted({str(r.get("tag")) for r in records})) or "none"
            raise ArunError(f"{source!r} is neither a hardware tag with records nor the commit of a keep "
                            f"(7+ hex digits); tags here: {tags}")
        best, kid = hits[-1], str(hits[-1].get("key_id"))
        whose = f"the keep at commit {source} ({'this machine' if own(best) else 'another machine'}'s record)"
    base = baseline_record(key_records(records, kid), kid)
    if base is None:
        raise ArunError(f"key {kid} of {best.get('tag')} has no baseline record; its changes cannot be told apart")
    before, after = base.get("config") or {}, best.get("config") or {}
    changed = {n: after[n] for n in after if before.get(n, object()) != after[n]}
    return Winner(best, base, changed, code_diff(repo_dir, base, best), whose,
                  code_names=code_names(repo_dir, base, best))


def _outside_block(text: str) -> list[str]:
    try:
        start, end = block_span(text)
    except ValueError:
        return text.splitlines(keepends=True)
    return (text[:start] + text[end:]).splitlines(keepends=True)


def code_diff(repo_dir: Path | str, base: dict, best: dict) -> str:
    """The winner's changes outside the hyperparameter block: from git when both commits are here, else
    the non-constant lines of the records' own diffs (each against the best commit when it ran)."""
    path = best.get("train_file")
    a, b = train_file_at(repo_dir, base.get("commit"), path), train_file_at(repo_dir, best.get("commit"), path)
    if a is not None and b is not None:
        return "".join(difflib.unified_diff(_outside_block(a), _outside_block(b), f"a/{path}", f"b/{path}"))
    lines = [line for line in str(best.get("diff") or "").splitlines()
             if line[:1] in "+-" and not line.startswith(("+++", "---")) and not _constant_line(line[1:])]
    return "\n".join(lines)


def code_names(repo_dir: Path | str, base: dict, best: dict) -> list[str] | None:
    """The top-level names (functions, classes, constants outside the hyperparameter block) whose
    definition the winner changed, added or removed; None when either commit is not here or a file
    does not parse (a record's diff alone cannot say)."""
    path = best.get("train_file")
    a, b = train_file_at(repo_dir, base.get("commit"), path), train_file_at(repo_dir, best.get("commit"), path)
    if a is None or b is None:
        return None
    try:
        return changed_names("".join(_outside_block(a)), "".join(_outside_block(b)))
    except ValueError:
        return None


def port_map(names: list[str], train_text: str) -> dict[str, bool]:
    """For each name a code change touches: whether the other engine's train file defines it too."""
    try:
        here = top_level(train_text)
    except ValueError:
        here = {}
    return {n: n in here for n in names}


def describe_port(code_map: dict[str, bool], train_file: str) -> str:
    """One line: which touched names map onto `train_file` by name and which do not."""
    same = [n for n, ok in code_map.items() if ok]
    new = [n for n, ok in code_map.items() if not ok]
    parts = ([f"{', '.join(same)} (in {train_file} too: ports by name)"] if same else []) + \
            ([f"{', '.join(new)} (not in {train_file}: new code to port)"] if new else [])
    return "; ".join(parts)


def _constant_line(code: str) -> bool:
    name, eq, _ = code.partition("=")
    return bool(eq) and name.strip().isupper() and name.strip().replace("_", "").isalnum()


def _value(v: object) -> object:
    return tuple(_value(x) for x in v) if isinstance(v, list) else v  # JSON turned the file's tuples into lists


def transfer(repo_dir: Path | str, source: str, backend: str, *, agent: str | None = None,
             budget: float | None = None, device: str | None = None, refs: tuple[str, ...] | list[str] = (),
             agent_timeout: float = DEFAULT_AGENT_TIMEOUT, log: Callable[[str], None] = print) -> Transfer:
    """Runs the winner's transferable changes here as ordinary experiments; returns what was done."""
    repo_dir = Path(repo_dir)
    winner = find_winner(repo_dir, source, refs)
    ctx = experiment_context(repo_dir, backend, budget, device)
    out = Transfer(winner)
    here = constants(ctx.train_path.read_text(), keep_source=True)
    for name, value in winner.constants.items():
        if name not in here:
            out.not_transferred.append(f"{name}={value!r} (no such constant in {ctx.train_file})")
        elif here[name] != _value(value):
            out.applied[name] = _value(value)
    if winner.code_names:
        out.code_map = port_map(winner.code_names, ctx.train_path.read_text())
    if winner.code_diff.strip() and agent is None:
        touched = f" touching {describe_port(out.code_map, ctx.train_file)}" if out.code_map else ""
        out.not_transferred.append(f"code change outside the constants{touched} (pass --agent to port it):\n"
                                   + winner.code_diff)
    log(f"arun transfer: the winner comes from {winner.source}")
    log(f"arun transfer: {winner.origin['tag']} id {winner.origin['id']} at {str(winner.origin['commit'])[:10]} "
        f"changed {', '.join(f'{n}={v!r}' for n, v in winner.constants.items()) or 'no constants'}")
    if out.code_map:
        log(f"arun transfer: its code change touches {describe_port(out.code_map, ctx.train_file)}")
    signer = winner.record.get(SIGNER) or "an unsigned line"
    log(f"arun transfer: the winner's record is {winner.record.get('_source_trust', 'verified')} (signed by {signer})"
        + ("; arun trust add its machine's key to verify it here" if winner.record.get("_source_trust") == "foreign" else ""))
    if not out.applied and not (agent and winner.code_diff.strip()):
        log("arun transfer: nothing to run here (every change is already so, or not transferable)")
        return out
    run = partial(run_experiment, repo_dir, backend, budget=budget, device=device, log=log)
    if best_record(Ledger(ctx.ledger_path).records(), ctx.key_id) is None:
        # A gain here needs something to beat: the unchanged train file runs first, as this key's baseline.
        out.records.append(run("baseline"))
    origin = {"transfer_from": winner.origin}
    if out.applied:
        text = rewrite_constants(ctx.train_path.read_text(), out.applied)
        write_atomic(ctx.train_path, text.encode())
        what = ", ".join(f"{n}={v!r}" for n, v in out.applied.items())
        out.records.append(run(f"transfer from {winner.origin['tag']}: {what}",
                               extra={**origin, "transfer_applied": out.applied}))
    if agent and winner.code_diff.strip():
        out.records.append(_agent_port(repo_dir, ctx, winner, agent, agent_timeout,
                                       {**origin, **({"transfer_code_map": out.code_map} if out.code_map else {})},
                                       run))
    return out


def _agent_port(repo_dir: Path, ctx: ExperimentContext, winner: Winner, agent: str, timeout: float, origin: dict,
                run: Callable[..., dict]) -> dict:
    """The agent ports the code change (a prompt of program.md plus the change), then it runs as usual."""
    brief = repo_dir / ".arun" / "agent" / "transfer.md"
    brief.parent.mkdir(parents=True, exist_ok=True)
    program = repo_dir / "program.md"
    brief.write_text((program.read_text() if program.exists() else "") +
                     f"\n\n## This iteration: port a change found on {winner.origin['tag']}\n"
                     f"Apply the idea of this change to {ctx.train_file} (it was made to "
                     f"{winner.record.get('train_file')}); change nothing else."
                     + (f" It touches {describe_port(origin['transfer_code_map'], ctx.train_file)}: both train "
                        "files share one skeleton, so change the same names." if origin.get("transfer_code_map") else "")
                     + f"\n\n```diff\n{winner.code_diff}\n```\n")
    proposer = AgentProposer(agent, timeout=timeout, program_file=str(brief))
    records = Ledger(ctx.ledger_path).records()
    mine = key_records(records, ctx.key_id)
    proposal = proposer.propose(Context(repo_dir=repo_dir, backend=ctx.backend, train_file=ctx.train_file,
                                        key_id=ctx.key_id, tag=ctx.tag, records=mine,
                                        best=best_record(mine, ctx.key_id), baseline=baseline_record(mine, ctx.key_id),
                                        seq_len=ctx.seq_len, budget=ctx.budget))
    if proposal.error:
        gitops.restore_train_file(repo_dir, ctx.train_file, "HEAD")
        raise ArunError(f"the agent could not port the change ({proposal.error}); nothing was run")
    return run(f"transfer from {winner.origin['tag']} (agent): {proposal.description}",
               proposer=proposer.name, extra={**origin, "transfer_code": True, **proposal.extra})
