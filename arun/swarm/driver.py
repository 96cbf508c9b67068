"""
`arun swarm`: the research loop scaled out over a Ray cluster.

One worker per GPU (CUDA) or per machine (MLX, CPU), each a Ray actor that works
in its own git worktree (`.arun/swarm/<run>-w<k>`) on its own branch
(`autoresearch/<run>-w<k>`). A worker proposes, runs and records exactly as
`arun loop` does: the experiment itself is the loop's own iteration function.

Three things are the swarm's own:
- one writer: a single ledger actor appends every record to the main repo's
  `bench/<tag>/ledger.jsonl`; workers never write a ledger themselves;
- adoption: a coordinator actor tracks the best per comparability key; before each
  experiment a worker resets its branch onto that commit (adopt and accumulate, no
  merges), so a win by one worker becomes every worker's starting point. Keys never
  mix: a cluster of mixed GPUs has one best per kind;
- faults: the coordinator knows what each worker is running, so a worker that dies
  has its in-flight experiment recorded once as `crash`, saying what happened: a killed
  process is restarted by Ray (max_restarts); a worker whose machine left the cluster is
  stopped for good, and the swarm goes on with the others.

Commits cross machines as git bundles relative to the swarm's base commit, so a
worker on another node can adopt a commit made elsewhere.

At the end (done, or Ctrl-C) every worker is stopped, its leftover processes are
killed, its worktree is removed (the per-worker branches stay, they hold the kept
commits), `autoresearch/<run>` is this run's best commit (if it beat its start) with the run's records
committed on top (records.py), and the records are committed on the head's branch too. Every keep is
judged by the coordinator against the verified best at the moment it is written (Coordinator.judge).
A lost machine's worktree is removed when it is on this machine's disk; otherwise the summary
says where it is and how to remove it.
"""

# Ray is an optional dependency (the [swarm] extra): every module here imports it inside the
# functions that use it, so the rest of arun (and these modules' git and process helpers) work without it.
from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arun.core import gitops
from arun.core.errors import ArunError
from arun.core.ratchet import SCORED
from arun.search.noise import measured_spread
from arun.swarm import cluster
from arun.swarm.actors import DIED, RESTARTED, Coordinator, LedgerWriter
from arun.swarm.records import commit_records
from arun.swarm.worker import Worker, one_line
from arun.swarm.worktrees import base_ref, cleanup_worker


@dataclass
class SwarmOptions:
    repo_dir: Path
    backend: str
    agent: str = "sweep"
    workers: int | None = None          # None: one per GPU (CUDA) or per machine (MLX, CPU)
    run: str | None = None              # branch names autoresearch/<run>-w<k>; default swarm-<date>
    address: str | None = None          # join this Ray cluster instead of starting one here
    hours: float | None = None
    iterations: int | None = None       # experiments in all, across workers
    budget: float | None = None         # seconds of training per experiment (ARUN_TIME_BUDGET)
    device: str | None = None           # torch engine: "cpu" runs on CPU (tests); GPUs are not asked for
    max_restarts: int = 3               # per worker, by Ray; the swarm drops a worker past this
    max_crashes: int = 3                # a worker with this many unscored experiments in a row is dropped (as arun loop stops)
    agent_timeout: float | None = None  # an external agent's wall clock per proposal (arun loop's default)
    num_cpus: int | None = None         # local cluster only (default: this machine's cores, >= workers)
    object_store_mb: int = 128          # local cluster only: records and bundles are small
    loop_options: dict = field(default_factory=dict)    # to arun.search.loop.iteration: seeds, confidence, near_miss, hard_timeout, allowance
    worker_repos: dict = field(default_factory=dict)    # k -> the clone worker k works in (as on another machine)


class Swarm:
    """Starts or joins the cluster, runs the workers, stops them cleanly. run_swarm() is the CLI's way in;
    tests drive the methods one by one."""

    def __init__(self, opts: SwarmOptions, log: Callable[[str], None] = print):
        self.opts, self.log = opts, log
        self.repo = Path(opts.repo_dir).resolve()
        self.run_name = opts.run or time.strftime("swarm-%Y%m%d-%H%M%S")
        self.workers: dict[int, Any] = {}
        self.coord: Any = None
        self.ledger: Any = None
        self.own_cluster = False
        self.results: list[dict] = []
        self.dropped: dict[int, str] = {}       # worker -> why it stopped before the end
        self.lost: dict[int, dict] = {}         # worker -> the Ray node (machine) it was lost with
        self.started = False
        self.stopped: dict | None = None
        self.pg: Any = None
        self.driver_node: str | None = None
        self.ray_logs: str | None = None

    # -- start
    def start(self) -> None:
        import ray  # Ray is an optional dependency (the [swarm] extra): imported where it is used
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        o = self.opts
        if not (self.repo / ".git").exists():
            raise ArunError(f"{self.repo} is not a git repository; run arun swarm inside the project's clone")
        try:
            self.base = gitops.run_git(self.repo, "rev-parse", "HEAD")
        except ArunError:
            raise ArunError(f"{self.repo} has no commit yet; commit the project first (git add -A && git commit)") from None
        dirty = gitops.run_git(self.repo, "status", "--porcelain", "--untracked-files=no")
        if dirty:
            self.log(f"note: uncommitted changes in {self.repo} stay there; workers start from {self.base[:12]} (HEAD)")

        caller_connected = ray.is_initialized()
        if caller_connected:
            pass  # a caller (a test, a notebook) already connected; leave its cluster alone at the end
        elif o.address:
            cluster.join(o.address)
            if said := cluster.private_token():
                self.log(said)
        else:
            cluster.start_local(o.num_cpus or max(os.cpu_count() or 1, o.workers or 1), o.object_store_mb)
            self.own_cluster = True
            if not cluster.is_loopback(cluster.node_ip()):
                self.log(f"note: this Ray put its node on {cluster.node_ip()}, not loopback; its ports are on the network")
        self.ray_logs = cluster.log_dir()
        if not caller_connected:  # a caller's own connection keeps its console as it was
            cluster.keep_ray_messages_in_logs()
        self.log(f"Ray's logs (workers, raylets): {self.ray_logs}")
        # Written once connected: a swarm that could not start leaves no ref behind.
        gitops.run_git(self.repo, "update-ref", base_ref(self.run_name), self.base)
        self.driver_node = ray.get_runtime_context().get_node_id()

        gpu = o.backend == "cuda" and (o.device or "cuda") != "cpu"
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        n_gpus = int(resources.get("GPU", 0))
        if gpu:
            n = o.workers or n_gpus
            if n_gpus == 0:
                raise ArunError("the Ray cluster has no GPU; start ray on GPU machines, or pass --device cpu")
            if n > n_gpus:
                raise ArunError(f"--workers {n} but the cluster has {n_gpus} GPUs; one worker holds one GPU")
        else:
            n = o.workers or len(nodes)
            if len(nodes) == 1 and n > 1:
                self.log(f"note: {n} {o.backend} workers share this one machine; their timings contend")
        if n < 1:
            raise ArunError("--workers must be at least 1")
        self.n = n

        here = NodeAffinitySchedulingStrategy(node_id=self.driver_node, soft=False)
        self.ledger = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=0)(LedgerWriter) \
            .options(scheduling_strategy=here).remote(str(self.repo))
        self.coord = ray.remote(num_cpus=0)(Coordinator) \
            .options(scheduling_strategy=here, name=f"arun-swarm-{self.run_name}") \
            .remote(str(self.repo), self.run_name, self.base, self.ledger)

        if not gpu and len(nodes) > 1:
            # MLX and CPU on a cluster: one worker per machine, which STRICT_SPREAD enforces.
            if n > len(nodes):
                raise ArunError(f"--workers {n} but the cluster has {len(nodes)} machines; {o.backend} runs one "
                                "worker per machine")
            from ray.util.placement_group import placement_group
            self.pg = placement_group([{"CPU": 1}] * n, strategy="STRICT_SPREAD")
            ray.get(self.pg.ready(), timeout=120)
        cfg = {"run": self.run_name, "base": self.base, "main_repo": str(self.repo), "backend": o.backend,
               "agent": o.agent, "budget": o.budget, "device": o.device, "driver_node": self.driver_node,
               "loop_options": dict(o.loop_options), "workers": n, "agent_timeout": o.agent_timeout,
               "noise": measured_noise(self.repo), "head_key": ray.get(self.ledger.public_key.remote()),
               "coordinator": f"arun-swarm-{self.run_name}"}
        actor = ray.remote(Worker)
        for k in range(n):
            opts: dict = {"max_restarts": o.max_restarts, "max_task_retries": 0,
                          "num_cpus": 1, "num_gpus": 1 if gpu else 0}
            if self.pg is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=k)
            wcfg = dict(cfg, worker_repo=str(Path(o.worker_repos[k]).resolve())) if k in o.worker_repos else cfg
            self.workers[k] = actor.options(**opts).remote(wcfg, k)
        self.started = True
        infos = {}
        for k, w in self.workers.items():
            try:
                infos[k] = ray.get(w.info.remote(), timeout=600)
            except Exception as e:
                raise ArunError(f"worker w{k} did not start: {_ray_cause(e)}") from e
        self.infos = infos
        tags = sorted({i["tag"] for i in infos.values()})
        self.log(f"swarm {self.run_name}: {n} {o.backend} worker(s) on {len(nodes)} machine(s), base {self.base[:12]}, "
                 f"tag(s) {', '.join(tags)}")
        for line in spread_warnings(infos, cfg["noise"], o.backend):
            self.log(f"swarm {self.run_name}: {line}")

    # -- run
    def run(self, iterations: int | None = None, deadline: float | None = None,
            on_result: Callable[[Swarm, dict], None] | None = None) -> list[dict]:
        """Keeps every worker busy until `iterations` experiments (in all) were dispatched or the
        deadline passed, then waits for those in flight. Returns this call's step summaries."""
        import ray
        from ray.exceptions import RayActorError
        pending: dict[Any, int] = {}              # step ref -> worker
        dispatched = 0
        deaths = {k: 0 for k in self.workers}     # worker process deaths in a row
        unscored = {k: 0 for k in self.workers}   # experiments in a row without a score
        out: list[dict] = []

        def more() -> bool:
            if iterations is not None and dispatched >= iterations:
                return False
            return deadline is None or time.time() < deadline

        def submit(k: int) -> None:
            nonlocal dispatched
            if k in self.dropped or not more():
                return
            pending[self.workers[k].step.remote()] = k
            dispatched += 1

        def drop(k: int, why: str) -> None:
            self.dropped[k] = why
            self.log(f"w{k} dropped: {why}")
            if len(self.dropped) == len(self.workers):
                raise ArunError(f"every worker failed; last: {why}")

        for k in list(self.workers):
            submit(k)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if not ready:
                continue
            ref = ready[0]
            k = pending.pop(ref)
            fate = None
            try:
                res = ray.get(ref)
            except RayActorError as e:
                fate, why = self._fate(k, e)
                crash = ray.get(self.coord.crash.remote(k, DIED.format(k=k, why=why)))
                res = {"worker": k, "status": "died", "error": why, "record": crash,
                       "start_commit": (crash or {}).get("parent_commit")}
            except Exception as e:  # the step itself failed outside the experiment: a bug, reported
                res = {"worker": k, "status": "error", "error": _ray_cause(e), "record": None}
            res["adoptions"] = len(ray.get(self.coord.state.remote())["adoptions"])
            self.results.append(res)
            out.append(res)
            if on_result is not None:
                on_result(self, res)
            rec = res.get("record") or {}
            if res["status"] == "died":
                deaths[k] += 1
            elif rec.get("status") in SCORED:
                deaths[k] = unscored[k] = 0
            else:  # crash, timeout, invalid, or a step that failed outside the experiment
                unscored[k] += 1
                if rec.get("baseline") and rec.get("status") == "timeout":
                    self.log(f"w{k}: the baseline timed out; size the model for this machine with: "
                             f"arun calibrate --backend {self.opts.backend}")
            if fate is not None and fate != "restarted":
                drop(k, res["error"])
            elif fate == "restarted" and deaths[k] > self.opts.max_restarts:
                self._kill(k)
                drop(k, f"worker w{k} died {deaths[k]} times in a row ({res['error']})")
            elif fate is None and self.opts.max_crashes > 0 and unscored[k] >= self.opts.max_crashes:
                drop(k, f"{unscored[k]} experiments in a row without a score (crash, timeout or invalid); "
                        f"last: {rec.get('error') or res.get('error')}")
            else:
                submit(k)
        return out

    def _fate(self, k: int, error: BaseException, wait: float = 180.0) -> tuple[str, str]:
        """What became of worker k after its process died mid-experiment: ("restarted", why) once the
        restarted actor answers, or ("lost", why) when its machine left the cluster (the worker is then
        stopped for good: its bundle of the placement group, or its GPU, went with the machine), or
        ("gone", why) when Ray will not restart it. `why` is true of what happened: it goes in the record."""
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError
        node = (self.state()["workers"].get(k) or {}).get("node_id")
        t_end = time.time() + wait
        while time.time() < t_end:
            info = self._node(node)
            if info is not None and not info.get("Alive"):
                self.lost[k] = info
                self._kill(k)
                return "lost", (f"its machine {info.get('NodeManagerHostname') or ''} "
                                f"({info.get('NodeManagerAddress')}) left the Ray cluster; the worker is not restarted")
            try:
                ray.get(self.workers[k].info.remote(), timeout=2)
                return "restarted", RESTARTED
            except ActorDiedError as e:
                return "gone", f"its process died and Ray will not restart it: {_ray_cause(e)}"
            except (RayActorError, GetTimeoutError):
                time.sleep(0.5)  # Ray is restarting it, or the cluster has not yet noticed the machine is gone
        self._kill(k)
        return "gone", f"its process died ({type(error).__name__}) and it did not come back within {wait:.0f} s"

    def _node(self, node_id: str | None) -> dict | None:
        import ray
        return next((n for n in ray.nodes() if n.get("NodeID") == node_id), None) if node_id else None

    def _kill(self, k: int) -> None:
        import ray
        try:
            ray.kill(self.workers[k], no_restart=True)
        except Exception:
            pass

    def state(self) -> dict:
        import ray
        return ray.get(self.coord.state.remote())

    def pid(self, k: int) -> int:
        import ray
        return ray.get(self.workers[k].info.remote())["pid"]

    # -- stop
    def stop(self, interrupted: bool = False) -> dict:
        """Stops every worker, kills what they left running, removes their worktrees (their branches
        stay), points autoresearch/<run> at the best commit. Safe after a partial start."""
        import ray
        summary: dict = {"run": self.run_name, "interrupted": interrupted, "experiments": 0, "statuses": {},
                         "best": {}, "unbeaten": {}, "branches": {}, "adoptions": [], "dropped": {}, "lost": {},
                         "left": {}, "ray_logs": self.ray_logs}
        if self.stopped is not None:
            return self.stopped
        # The base ref only carried the base to other clones during the run; none is left after it
        # (nor after a start that was refused once connected).
        gitops.run_git(self.repo, "update-ref", "-d", base_ref(self.run_name), check=False)
        if not ray.is_initialized():
            return summary
        self.stopped = summary
        log = lambda line: _quiet(self.log, line)  # noqa: E731
        for w in self.workers.values():
            try:
                ray.kill(w, no_restart=True)
            except Exception:
                pass
        for w in self.workers.values():  # ray.kill returns at once; wait until each is really gone
            try:
                ray.get(w.info.remote(), timeout=15)
            except Exception:
                pass
        state = None
        if self.coord is not None:
            try:
                # What the workers were running when they were stopped: recorded as crash, as arun loop
                # records an experiment interrupted by Ctrl-C (its diff stays in the ledger).
                for k in sorted(ray.get(self.coord.state.remote(), timeout=60)["in_flight"]):
                    ray.get(self.coord.crash.remote(k, "interrupted (Ctrl-C): the swarm was stopped"), timeout=60)
                    log(f"w{k}  interrupted: recorded as crash")
                    summary["experiments"] += 1
                    summary["statuses"]["crash"] = summary["statuses"].get("crash", 0) + 1
                state = ray.get(self.coord.state.remote(), timeout=60)
            except Exception as e:
                log(f"coordinator unreachable at stop: {_ray_cause(e)}")
        registered = (state or {}).get("workers", {})
        best_runs = None if state is None else [Path(r["run_dir"]).name for r in state["best"].values()
                                                if r.get("run_dir")]
        # The killed workers' train runs and agents outlive them; each machine cleans its own worktrees.
        cleanups = {}
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        here = socket.gethostname()
        for k in self.workers:
            reg = registered.get(k, {})
            repo = reg.get("repo") or str(Path(self.opts.worker_repos.get(k, self.repo)).resolve())
            node = reg.get("node_id")
            if node is None or node == self.driver_node or (node not in alive and reg.get("host") == here):
                # On this machine's disk (a lost node that ran on this host included): cleaned from here.
                try:
                    cleanup_worker(repo, self.run_name, k, best_runs)
                except Exception as e:
                    summary["left"][k] = _left(reg, repo, k, self.run_name, f"its removal failed: {one_line(e)}")
            elif node not in alive:
                summary["left"][k] = _left(reg, repo, k, self.run_name, "its machine left the cluster")
            else:
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
                task = ray.remote(num_cpus=0)(cleanup_worker).options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
                cleanups[k] = task.remote(repo, self.run_name, k, best_runs)
        for k, ref in cleanups.items():
            try:
                ray.get(ref, timeout=120)
            except Exception as e:
                summary["left"][k] = _left(registered.get(k, {}), "", k, self.run_name,
                                           f"cleanup on its machine failed: {_ray_cause(e)}")
        summary["dropped"] = dict(self.dropped)
        summary["lost"] = {k: f"{n.get('NodeManagerHostname') or '?'} ({n.get('NodeManagerAddress')})"
                           for k, n in self.lost.items()}
        if state is not None:
            # This run's own results only: a best from an earlier run (the start) is not this run's.
            best = {kid: r for kid, r in state["best"].items() if (r.get("swarm") or {}).get("run") == self.run_name}
            summary["best"] = best
            summary["unbeaten"] = {kid: r for kid, r in state["best"].items() if kid not in best}
            summary["adoptions"] = state["adoptions"]
            for key_id, rec in best.items():
                commit = rec.get("commit")
                if not commit or commit == self.base or not gitops.commit_exists(self.repo, commit):
                    continue
                branch = f"autoresearch/{self.run_name}" if len(best) == 1 else \
                    f"autoresearch/{self.run_name}-{rec.get('tag') or key_id}"
                if gitops.move_branch(self.repo, branch, commit):
                    summary["branches"][branch] = commit
        recorded = [r["record"] for r in self.results if r.get("record")]
        if recorded or summary["experiments"]:
            summary["records"] = commit_records(self.repo, self.run_name, summary["branches"], self.base)
        summary["experiments"] += len(recorded)
        for rec in recorded:
            summary["statuses"][rec.get("status")] = summary["statuses"].get(rec.get("status"), 0) + 1
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
        if self.own_cluster:
            ray.shutdown()
        return summary


def _left(reg: dict, repo: str, k: int, run: str, why: str) -> str:
    """Where a worktree the swarm could not remove is, and the command that removes it there."""
    wt = reg.get("worktree") or f"{repo}/.arun/swarm/{run}-w{k}"
    return (f"{reg.get('host') or 'its machine'}:{wt} ({why}); remove it there with: "
            f"git -C {reg.get('repo') or repo or '<its clone>'} worktree remove --force {wt}")


def spread_warnings(infos: dict[int, dict], noise: dict[str, dict], backend: str) -> list[str]:
    """One line per key the workers run without a measured spread: their confirmation gate then keeps
    near wins by the plain rule, and the user should know before the night, not from the records after it."""
    keys = sorted({(i.get("tag"), i.get("key_id")) for i in infos.values() if i.get("key_id") not in noise},
                  key=str)
    return [f"no run-to-run spread measured for key {kid} ({tag}): near wins are kept by the plain rule; measure "
            f"it first on that hardware with arun noise --backend {backend} --seeds 3" for tag, kid in keys]


def measured_noise(repo: Path) -> dict[str, dict]:
    """key_id -> the noise.json entry `arun noise` measured in the main repo: its std is the confirmation
    gate's and --confidence's spread (as measured_spread reads it: never below the key's floor, never 0),
    its loss_trajectory_std the early stop's margins. The workers' worktrees have no noise.json."""
    out: dict[str, dict] = {}
    for path in sorted(Path(repo).glob("bench/*/noise.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for kid in (data if isinstance(data, dict) else {}):
            entry = measured_spread(repo, path.parent.name, str(kid))
            if entry is not None:
                out[str(kid)] = entry
    return out


def _ray_cause(e: BaseException) -> str:
    """The first useful line of a Ray error (they carry whole tracebacks)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and not type(cause).__name__.startswith("Ray"):
        return one_line(cause)
    text = str(e)
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("arun.core.errors.ArunError:", "ArunError:")):
            return line.split(":", 1)[1].strip()
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def run_swarm(opts: SwarmOptions, log: Callable[[str], None] = print) -> dict:
    """The CLI's entry: start, run until --iterations / --hours (or Ctrl-C), stop cleanly."""
    deadline = time.time() + opts.hours * 3600 if opts.hours else None
    return drive(Swarm(opts, log), iterations=opts.iterations, deadline=deadline)


def drive(swarm: Swarm, iterations: int | None = None, deadline: float | None = None) -> dict:
    """Starts the swarm if needed, runs it, and stops it whatever happens. Ctrl-C stops the workers
    mid-experiment: those experiments are recorded as crash ("interrupted"), as `arun loop` does."""
    interrupted = False
    try:
        if not swarm.started:
            swarm.start()
        swarm.run(iterations=iterations, deadline=deadline, on_result=lambda s, r: _quiet(s.log, describe(s, r)))
    except KeyboardInterrupt:
        interrupted = True
        _quiet(swarm.log, "stopping the swarm (Ctrl-C): workers stop, worktrees are removed, branches stay")
    finally:
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None  # a second Ctrl-C must not
        try:                                                                  # leave half-removed worktrees
            summary = swarm.stop(interrupted)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
    return summary


def swarm_report(summary: dict) -> list[str]:
    """The end-of-swarm lines: this run's experiments, its best (or that it beat nothing), which
    workers stopped early and why, and what is left on disk (with how to remove it)."""
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.get("statuses", {}).items()))
    lines = [f"swarm {summary['run']}: {summary['experiments']} experiment(s)" + (f" ({counts})" if counts else "")
             + (" (interrupted)" if summary["interrupted"] else "")]
    for rec in summary["best"].values():
        lines.append(f"best {rec.get('val_bpb'):.6f} on {rec.get('tag')} at {str(rec.get('commit'))[:12]}"
                     f" (worker w{(rec.get('swarm') or {}).get('worker', '-')})")
    for rec in summary.get("unbeaten", {}).values():
        lines.append(f"nothing better than the starting point on {rec.get('tag')}: its best stays "
                     f"{rec.get('val_bpb'):.6f} at {str(rec.get('commit'))[:12]}, from before this run")
    for branch, commit in summary["branches"].items():
        lines.append(f"{branch} -> {commit[:12]}")
    lines.extend((summary.get("records") or {}).get("lines", []))
    for k, why in sorted(summary.get("dropped", {}).items()):
        lines.append(f"w{k} stopped early: {why}")
    for k, where in sorted(summary.get("left", {}).items()):
        lines.append(f"w{k}'s worktree is left at {where}")
    if summary.get("ray_logs"):
        lines.append(f"Ray's logs: {summary['ray_logs']}")
    return lines


def _quiet(log: Callable[[str], None], line: str) -> None:
    try:  # a closed stdout (a pipe whose reader took the Ctrl-C too) must not stop the clean-up
        log(line)
    except (OSError, ValueError):
        pass


def describe(swarm: Swarm, res: dict) -> str:
    rec = res.get("record") or {}
    bpb = rec.get("val_bpb")
    parts = [f"w{res['worker']}", f"{(rec.get('status') or res['status']):8s}",
             f"{bpb:.6f}" if isinstance(bpb, (int, float)) else "   -    ",
             f"from {str(res.get('start_commit') or rec.get('parent_commit') or '')[:8]}"]
    if rec.get("description"):
        parts.append(repr(rec["description"])[:60])
    if res.get("error") and res["status"] in ("died", "error"):
        parts.append(f"({res['error'][:120]})")
    return "  ".join(parts)
