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
  (process killed, node lost) has its in-flight experiment recorded as `crash`; Ray
  restarts it (max_restarts) and the swarm goes on.

Commits cross machines as git bundles relative to the swarm's base commit, so a
worker on another node can adopt a commit made elsewhere.

At the end (done, or Ctrl-C) every worker is stopped, its leftover processes are
killed, its worktree is removed (the per-worker branches stay, they hold the kept
commits), and `autoresearch/<run>` points at the swarm's best commit.
"""

# Ray is an optional dependency (the [swarm] extra): every module here imports it inside the
# functions that use it, so the rest of arun (and these modules' git and process helpers) work without it.
from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from arun.core import gitops
from arun.core.errors import ArunError
from arun.core.ratchet import SCORED
from arun.swarm.actors import DIED, Coordinator, LedgerWriter
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
        self.dropped: dict[int, str] = {}
        self.started = False
        self.stopped: dict | None = None
        self.pg: Any = None
        self.driver_node: str | None = None

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
            raise ArunError(f"{self.repo} has no commit yet; commit the project first (git add -A && git commit)")
        dirty = gitops.run_git(self.repo, "status", "--porcelain", "--untracked-files=no")
        if dirty:
            self.log(f"note: uncommitted changes in {self.repo} stay there; workers start from {self.base[:12]} (HEAD)")
        gitops.run_git(self.repo, "update-ref", base_ref(self.run_name), self.base)

        if ray.is_initialized():
            pass  # a caller (a test, a notebook) already connected; leave its cluster alone at the end
        elif o.address:
            ray.init(address=o.address, logging_level="WARNING", log_to_driver=True)
        else:
            ncpu = o.num_cpus or max(os.cpu_count() or 1, o.workers or 1)
            # address="local": always a fresh private instance, never one a stale /tmp/ray file points at.
            ray.init(address="local", num_cpus=ncpu, include_dashboard=False, object_store_memory=o.object_store_mb * 2**20,
                     logging_level="WARNING", log_to_driver=True)
            self.own_cluster = True
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
               "noise": measured_noise(self.repo),
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
                raise ArunError(f"worker w{k} did not start: {_ray_cause(e)}")
        self.infos = infos
        tags = sorted({i["tag"] for i in infos.values()})
        self.log(f"swarm {self.run_name}: {n} {o.backend} worker(s) on {len(nodes)} machine(s), base {self.base[:12]}, "
                 f"tag(s) {', '.join(tags)}")

    # -- run
    def run(self, iterations: int | None = None, deadline: float | None = None,
            on_result: Callable[["Swarm", dict], None] | None = None) -> list[dict]:
        """Keeps every worker busy until `iterations` experiments (in all) were dispatched or the
        deadline passed, then waits for those in flight. Returns this call's step summaries."""
        import ray
        from ray.exceptions import ActorDiedError, RayActorError
        pending: dict[Any, tuple[int, str]] = {}     # ref -> (worker, "step" | "revive")
        dispatched = 0
        deaths = {k: 0 for k in self.workers}     # worker process deaths in a row
        unscored = {k: 0 for k in self.workers}   # experiments in a row without a score
        revive_until: dict[int, float] = {}
        out: list[dict] = []

        def more() -> bool:
            if iterations is not None and dispatched >= iterations:
                return False
            return deadline is None or time.time() < deadline

        def submit(k: int) -> None:
            nonlocal dispatched
            if k in self.dropped or not more():
                return
            pending[self.workers[k].step.remote()] = (k, "step")
            dispatched += 1

        def drop(k: int, why: str) -> None:
            self.dropped[k] = why
            self.log(f"w{k} dropped: {why}")
            if len(self.dropped) == len(self.workers):
                raise ArunError(f"every worker failed; last: {why}")

        def revive(k: int) -> None:
            # Ray is restarting the actor; a call made too early fails with ActorUnavailableError,
            # so the next step waits until the new process answers.
            revive_until.setdefault(k, time.time() + 600)
            pending[self.workers[k].info.remote()] = (k, "revive")

        for k in list(self.workers):
            submit(k)
        while pending:
            if not more():  # nothing more to dispatch: a worker still coming back has nothing to do
                for ref in [r for r, (_, kind) in pending.items() if kind == "revive"]:
                    del pending[ref]
                if not pending:
                    break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if not ready:
                continue
            ref = ready[0]
            k, kind = pending.pop(ref)
            if kind == "revive":
                try:
                    ray.get(ref)
                except ActorDiedError as e:
                    drop(k, f"worker w{k} is gone for good: {_ray_cause(e)}")
                    continue
                except RayActorError as e:
                    if time.time() > revive_until[k]:
                        drop(k, f"worker w{k} did not come back: {_ray_cause(e)}")
                    else:
                        time.sleep(0.5)
                        revive(k)
                    continue
                revive_until.pop(k, None)
                submit(k)
                continue
            try:
                res = ray.get(ref)
            except RayActorError as e:
                why = f"{type(e).__name__}: process killed or machine lost"
                crash = ray.get(self.coord.crash.remote(k, DIED.format(k=k, why=why)))
                res = {"worker": k, "status": "died", "error": why, "record": crash,
                       "start_commit": (crash or {}).get("parent_commit")}
                permanent = isinstance(e, ActorDiedError)
            except Exception as e:  # the step itself failed outside the experiment: a bug, reported
                res = {"worker": k, "status": "error", "error": _ray_cause(e), "record": None}
                permanent = False
            else:
                permanent = False
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
            if permanent:
                drop(k, f"worker w{k} died and Ray will not restart it ({res['error']})")
            elif res["status"] == "died":
                if deaths[k] > self.opts.max_restarts:
                    drop(k, f"worker w{k} died {deaths[k]} times in a row ({res['error']})")
                else:
                    revive(k)
            elif self.opts.max_crashes > 0 and unscored[k] >= self.opts.max_crashes:
                drop(k, f"{unscored[k]} experiments in a row without a score (crash, timeout or invalid); "
                        f"last: {rec.get('error') or res.get('error')}")
            else:
                submit(k)
        return out

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
        summary: dict = {"run": self.run_name, "interrupted": interrupted, "experiments": 0, "best": {},
                         "branches": {}, "adoptions": []}
        if self.stopped is not None:
            return self.stopped
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
                state = ray.get(self.coord.state.remote(), timeout=60)
            except Exception as e:
                log(f"coordinator unreachable at stop: {_ray_cause(e)}")
        registered = (state or {}).get("workers", {})
        best_runs = None if state is None else [Path(r["run_dir"]).name for r in state["best"].values()
                                                if r.get("run_dir")]
        where = {k: w.get("node_id") for k, w in registered.items()}
        # The killed workers' train runs and agents outlive them; each machine cleans its own worktrees.
        cleanups = []
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        for k in self.workers:
            repo = registered.get(k, {}).get("repo") or str(Path(self.opts.worker_repos.get(k, self.repo)).resolve())
            node = where.get(k)
            if node is None or node not in alive:
                if node is None or node == self.driver_node:
                    cleanup_worker(repo, self.run_name, k, best_runs)
                continue
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            task = ray.remote(num_cpus=0)(cleanup_worker).options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
            cleanups.append(task.remote(repo, self.run_name, k, best_runs))
        for ref in cleanups:
            try:
                ray.get(ref, timeout=120)
            except Exception as e:
                log(f"cleanup on a worker's machine failed: {_ray_cause(e)}")
        if state is not None:
            best = state["best"]
            summary["best"] = best
            summary["adoptions"] = state["adoptions"]
            for key_id, rec in best.items():
                commit = rec.get("commit")
                if not commit or commit == self.base or not gitops.commit_exists(self.repo, commit):
                    continue
                branch = f"autoresearch/{self.run_name}" if len(best) == 1 else \
                    f"autoresearch/{self.run_name}-{rec.get('tag') or key_id}"
                if gitops.move_branch(self.repo, branch, commit):
                    summary["branches"][branch] = commit
        summary["experiments"] += sum(1 for r in self.results if r.get("record"))
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group
            remove_placement_group(self.pg)
        if self.own_cluster:
            ray.shutdown()
        return summary


def measured_noise(repo: Path) -> dict[str, float]:
    """key_id -> run-to-run std measured by `arun noise` in the main repo (for --confidence with one seed)."""
    out: dict[str, float] = {}
    for path in sorted(Path(repo).glob("bench/*/noise.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for kid, entry in (data.items() if isinstance(data, dict) else []):
            if isinstance(entry, dict) and isinstance(entry.get("std"), (int, float)):
                out[kid] = float(entry["std"])
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
    lines = [l.strip() for l in text.splitlines() if l.strip()]
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
