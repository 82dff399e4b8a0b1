"""The Ray backend: one actor per (model, set) on a Ray cluster, rows streamed back as tasks finish.

Each actor loads its model, tokenizes its set and runs the FP32 baseline once, then serves that
group's tasks; the driver keeps `depth` tasks queued on each actor (so a worker never waits for the
driver), collects results with `ray.wait` as they finish, and retires an actor when its group is done
so that its CPUs go to the next group. Actors are created with `max_restarts` and `max_task_retries`:
when a worker process dies, Ray restarts the actor (its constructor reloads the model) and reruns the
tasks that were in flight; only when the retries are spent does a task's row carry an error.

Connects to a running cluster (`address`, or RAY_ADDRESS), or starts a local one on 127.0.0.1 and stops
it afterwards. Tested with ray 2.60.0.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

import ray
from ray.exceptions import RayError

from engine.core.vocabulary import TaskKind
from engine.grid import work
from engine.grid.local import execute, one_line
from engine.grid.tasks import GridError, Task, group_tasks

RAY_VERSION_TESTED = "2.60.0"
ROOT = Path(__file__).resolve().parents[2]  # the project root: workers import `engine` from here
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE")
OBJECT_STORE_MB = 200

log = logging.getLogger(__name__)


def loopback_only() -> None:
    """Keep every Ray server of a cluster on this machine on 127.0.0.1.

    Ray 2.60 replaces a loopback node address with the machine's external IP (and binds its gRPC
    servers there) unless its cluster mode is off, which is what it does on macOS and Windows
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). The variable reaches the processes started afterwards; the
    constant is already read in this process, so it is set too. Needed before starting a loopback
    cluster and before joining one (`ray start --head --node-ip-address 127.0.0.1` under the same variable).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def is_loopback(address: str) -> bool:
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK_HOSTS


def worker_env() -> dict:
    """The runtime environment of the grid's actors: the project on the import path, offline settings passed on.

    On a cluster of several machines the project (and any model folder named in the grid) must sit at the
    same path on every node.
    """
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    env = {"PYTHONPATH": os.pathsep.join(paths), "TOKENIZERS_PARALLELISM": "false"}
    env.update({name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)})
    return {"env_vars": env}


def start_local_cluster(num_cpus: int | None = None, object_store_mb: int = OBJECT_STORE_MB) -> str:
    """Start a one-machine Ray cluster on 127.0.0.1 (no dashboard) and connect; returns its temp folder.

    `address="local"` starts a new cluster even where another one runs on this machine, and the private
    temp folder keeps its sessions apart from theirs.
    """
    loopback_only()
    temp_dir = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths live under it
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", object_store_memory=object_store_mb * 1024**2, _temp_dir=temp_dir,
             log_to_driver=False, logging_level=logging.WARNING)
    return temp_dir


def stop_local_cluster(temp_dir: str | None) -> None:
    """Stop the cluster this process started (ray.shutdown stops what ray.init started) and remove its folder."""
    ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def connection_error(address: str | None, error: BaseException) -> str:
    """One line on why the cluster could not be reached or started."""
    where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
    chain, seen = error, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if type(chain).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(chain):
            return (f"cannot connect to {where}: it uses token authentication; run with RAY_AUTH_MODE=token "
                    f"(Ray reads the cluster's token from ~/.ray/auth_token or RAY_AUTH_TOKEN)")
        chain = chain.__cause__ or chain.__context__
    return f"cannot {'connect to' if address else 'start'} {where}: {one_line(error)}"


class GridWorker:
    """A Ray actor: one worker state (a model on a set), many tasks. Never raises for a task's own failure."""

    def __init__(self, group: tuple, keep_states: bool, threads: int):
        started = time.perf_counter()
        self.state, self.error = None, None
        try:
            self.state = work.open_state(*group, keep_states=keep_states, threads=threads)
        except Exception as error:  # every task of this group will say why
            self.error = one_line(error)
        self.open_s = time.perf_counter() - started
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed

    def run(self, task: Task) -> dict:
        return execute(self.state, task, self.error)

    def info(self) -> dict:
        return {"worker": work.worker_id(), "open_s": self.open_s, "restarted": self.restarted,
                "pid": os.getpid()}


class RayBackend:
    """Runs tasks on Ray actors, one per (model, set) (`replicas` per group to spread a large group)."""

    name = "ray"

    def __init__(self, address: str | None = None, threads: int = 1, replicas: int = 1, num_cpus: int | None = None,
                 max_restarts: int = 3, max_task_retries: int = 3, depth: int = 2,
                 object_store_mb: int = OBJECT_STORE_MB):
        if threads < 1 or replicas < 1 or depth < 1:
            raise GridError("threads, replicas and depth must each be at least 1")
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.threads, self.replicas, self.depth = threads, replicas, depth
        self.num_cpus, self.object_store_mb = num_cpus, object_store_mb
        self.max_restarts, self.max_task_retries = max_restarts, max_task_retries
        self.workers = 0
        self.open_s: list[float] = []
        self.actors_info: list[dict] = []
        self._temp_dir: str | None = None
        self._owns_connection = False
        self._live: dict[tuple, object] = {}

    # ---- the cluster ----------------------------------------------------------------------
    def __enter__(self) -> RayBackend:
        if ray.is_initialized():  # a driver that set up Ray itself (a test, a notebook) keeps it
            return self
        try:
            if self.address:
                if is_loopback(self.address):
                    loopback_only()
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            else:
                self._temp_dir = start_local_cluster(self.num_cpus, self.object_store_mb)
        except Exception as error:
            if self._temp_dir is None and not self.address:
                ray.shutdown()
            raise GridError(connection_error(self.address, error)) from None
        self._owns_connection = True
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill the actors still alive; disconnect, and stop the cluster if this backend started it."""
        for actor in self._live.values():
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self._live.clear()
        if self._owns_connection:
            if self._temp_dir:
                stop_local_cluster(self._temp_dir)
            else:
                ray.shutdown()
            self._owns_connection, self._temp_dir = False, None

    def _slots(self) -> int:
        """How many actors of `threads` CPUs the cluster runs at once (GPUs, for --device cuda, not counted)."""
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        per_node = [int(node.get("Resources", {}).get("CPU", 0) // self.threads) for node in nodes]
        if not any(per_node):
            largest = max((node.get("Resources", {}).get("CPU", 0) for node in nodes), default=0)
            raise GridError(f"no node of the Ray cluster has {self.threads} CPUs for a worker (largest: {largest:g})")
        return sum(per_node)

    # ---- running --------------------------------------------------------------------------
    def run(self, tasks: Sequence[Task]) -> Iterator[tuple[Task, dict]]:
        """(task, result) pairs as tasks finish, in any order."""
        if not tasks:
            return
        actor_class = ray.remote(GridWorker)
        groups = group_tasks(tasks)
        queues = {group: deque(members) for group, members in groups.items()}
        inflight: dict[object, tuple[tuple, Task]] = {}
        load: dict[tuple, int] = {}
        slots = self._slots()
        for group, members in groups.items():
            keep = any(task.kind == TaskKind.SENSITIVITY for task in members)
            for index in range(min(self.replicas, len(members))):
                slot = (group, index)
                self._live[slot] = actor_class.options(
                    num_cpus=self.threads, num_gpus=1 if group[3] == "cuda" else 0,  # group: model, set, limit, device
                    max_restarts=self.max_restarts, max_task_retries=self.max_task_retries,
                    runtime_env=worker_env()).remote(group, keep, self.threads)
                load[slot] = 0
        self.workers = min(len(self._live), slots)

        def submit(slot: tuple) -> None:
            queue = queues[slot[0]]
            if queue:
                task = queue.popleft()
                inflight[self._live[slot].run.remote(task)] = (slot, task)
                load[slot] += 1

        def retire(slot: tuple) -> None:
            actor = self._live.pop(slot)
            try:
                info = ray.get(actor.info.remote(), timeout=30)
                self.actors_info.append(info)
                self.open_s.append(info["open_s"])
            except Exception:  # a dead actor has no figures to give
                pass
            ray.kill(actor)

        for slot in list(self._live):
            for _ in range(self.depth):
                submit(slot)
        try:
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    slot, task = inflight.pop(ref)
                    load[slot] -= 1
                    try:
                        result = ray.get(ref)
                    except RayError as error:  # the worker died more often than Ray retries
                        result = {"error": one_line(f"worker lost after {self.max_task_retries} retries: "
                                                    f"{one_line(error)}"), "worker": None}
                    submit(slot)
                    if load[slot] == 0 and not queues[slot[0]]:
                        retire(slot)
                    yield task, result
        finally:
            for slot in list(self._live):
                ray.kill(self._live.pop(slot))
