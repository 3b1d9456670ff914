"""Where the pipeline's fan-outs run: the flow process's threads, or a Dask cluster.

``params.orchestrate`` picks Prefect's ``ThreadPoolTaskRunner`` (``local``) or prefect-dask's
``DaskTaskRunner`` (``dask``): on the scheduler at ``dask_address``, or on a ``LocalCluster`` of
``n_workers`` processes started for the run and closed with it. Stage runners see neither:
they get a ``fanout(fn, items)`` (``PrefectFanout``) that maps ``fn`` through the runner of
the flow it is called in.

On Dask, ``fn`` (a stage's closure over params, the workspace, tensors and modules) is
pickled with cloudpickle and run in another process, possibly on another machine, so what it
captures must pickle (open files, locks and generators do not); its results come back the
same way. A fresh worker imports the stage code on its first item (seconds). Workers read and
write the workspace by the same absolute path (train's checkpoints, for one), so workers on
other machines need that path on a shared filesystem, the same slimforge code installed, and
a Prefect server they can reach (``PREFECT_API_URL``): the ephemeral API of a flow started
without one listens on 127.0.0.1 only, which serves a LocalCluster but no remote worker.
LocalCluster workers are spawned processes that re-import the main module: a script calling
the flow needs an ``if __name__ == "__main__":`` guard (``slimforge run`` has one).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from functools import partial
from urllib.parse import urlsplit

from prefect import task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from slimforge.config import OrchestrateConfig

CONNECT_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"  # where a LocalCluster listens


class SchedulerUnreachable(ConnectionError):
    """``orchestrate.dask_address`` names no scheduler that answers."""


def task_runner(cfg: OrchestrateConfig, source: str = "params") -> TaskRunner:
    """The Prefect task runner ``cfg`` (read from ``source``) names; a Dask address is checked
    first, so a wrong one fails within seconds, before any stage runs."""
    if cfg.task_runner == "local":
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        check_scheduler(cfg.dask_address, source)
        return DaskTaskRunner(address=cfg.dask_address,
                              client_kwargs={"timeout": f"{CONNECT_TIMEOUT_S}s"})
    # processes=True: torch holds the GIL in Python-level training loops; one process per
    # worker is what a multi-machine cluster gives too. Scheduler, workers and dashboard listen
    # on loopback only (a LocalCluster serves this machine; Dask's default is every interface,
    # and its workers run whatever the scheduler sends). ":0": a free dashboard port, so two
    # runs on one machine do not collide.
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs=local_cluster_kwargs(cfg))


def local_cluster_kwargs(cfg: OrchestrateConfig) -> dict:
    """``distributed.LocalCluster`` arguments for a run without ``dask_address``: loopback only."""
    return {"n_workers": cfg.n_workers, "threads_per_worker": cfg.threads_per_worker,
            "processes": True, "host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"}


def check_scheduler(address: str, source: str = "params", timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ``SchedulerUnreachable`` unless something accepts TCP connections at ``address``
    (the Dask client itself would wait 30 s per attempt)."""
    parts = urlsplit(address)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
            pass
    except OSError as e:
        raise SchedulerUnreachable(
            f"{source}: orchestrate.dask_address: no Dask scheduler answers at {address} within "
            f"{timeout:g} s ({e.strerror or e}); start one (`dask scheduler`) or set "
            "dask_address: null for a LocalCluster") from None


def worker_torch_threads(cfg: OrchestrateConfig) -> int | None:
    """torch intra-op threads for each fan-out item on a Dask worker; None on the local runner.

    torch's CPU reductions split work by thread count, so trained weights depend on it in the
    last bits: by default a worker uses as many threads as this process, which keeps its
    weights bit-identical to the local runner's and ``dvc repro``'s. (Dask sets
    OMP_NUM_THREADS=1 in its workers, so leaving torch's default would not.)
    """
    if cfg.task_runner == "local":
        return None
    if cfg.torch_threads is not None:
        return cfg.torch_threads
    import torch

    return torch.get_num_threads()


@contextmanager
def api_for_workers(cfg: OrchestrateConfig):
    """Point Dask workers at this flow's Prefect API.

    Without PREFECT_API_URL each process starts an ephemeral API server of its own (several
    seconds per worker, one SQLite database written by all); Prefect hands the current
    settings to the task runs it ships to workers, so pinning the URL here makes them report
    to the server this flow already runs.
    """
    context = FlowRunContext.get()
    if cfg.task_runner == "local" or PREFECT_API_URL.value() or context is None:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: str(context.client.api_url).rstrip("/")}):
        yield


def placement() -> dict:
    """Where the calling code runs: host, process id and Dask worker address (None off Dask)."""
    try:
        from distributed import get_worker

        worker = get_worker().address
    except (ImportError, ValueError):
        worker = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "worker": worker}


def _with_torch_threads(fn, threads: int, item):
    # Only ever run in a Dask worker process: torch's thread count is process-wide.
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return fn(item)


@task(cache_policy=NO_CACHE, task_run_name="fan-out item {item}")
def fanout_item(fn, item):
    return fn(item), placement()


class PrefectFanout:
    """The ``fanout(fn, items)`` the flow gives stage runners: ``fn`` mapped over ``items``
    through the task runner of the flow it is called in, results in the order of ``items``.

    ``placements`` records where each item ran, e.g. ``{"item": "0", "host": ..., "pid": ...,
    "worker": "tcp://127.0.0.1:40123"}``.
    """

    def __init__(self, torch_threads: int | None = None):
        self.torch_threads = torch_threads
        self.placements: list[dict] = []

    def __call__(self, fn, items: list) -> list:
        work = fn if self.torch_threads is None else partial(_with_torch_threads, fn, self.torch_threads)
        done = [f.result() for f in fanout_item.map(unmapped(work), items)]
        self.placements += [{"item": str(item), **where} for item, (_, where) in zip(items, done, strict=True)]
        return [result for result, _ in done]
