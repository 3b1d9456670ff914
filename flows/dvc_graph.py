"""The stage graph as DVC sees it, and DVC's own bookkeeping around a stage run.

The flow never keeps a list of stages: it asks DVC for dvc.yaml's pipeline in dependency
order, asks DVC whether each stage changed, and after running a stage records it the way
``dvc repro`` does (save deps/outs, commit outs to the cache, update dvc.lock).
"""

from __future__ import annotations

from contextlib import chdir, contextmanager
from pathlib import Path

import networkx as nx
from dvc.lock import LockError
from dvc.repo import Repo


class WorkspaceBusy(RuntimeError):
    """Another run (`slimforge run`, `dvc repro`, ...) holds the workspace's DVC lock."""


@contextmanager
def open_repo(root: Path):
    """The DVC repo at ``root``, locked for the duration (a second run waits or fails clearly).
    The process works inside ``root`` meanwhile: DVC resolves a stage's paths against the current
    directory and refuses one outside the repo, so a workspace given by path must also be the cwd."""
    with chdir(root):
        repo = Repo(str(root))
        try:
            try:
                repo.lock.lock()  # DVC retries for about 3 s, then gives up
            except LockError:
                raise WorkspaceBusy(f"workspace {root} is busy: another run (slimforge run, dvc repro) holds the "
                                    f"DVC lock {Path(repo.tmp_dir) / 'lock'}; wait for it to finish, or remove "
                                    "that file if no such process is running") from None
            try:
                yield repo
            finally:
                repo.lock.unlock()
        finally:
            repo.close()


def pipeline_stages(repo: Repo, until: str | None = None) -> list:
    """Pipeline stages in dependency order; with ``until``, only that stage and its ancestors."""
    graph = repo.index.graph
    stages = [s for s in nx.dfs_postorder_nodes(graph) if s.cmd]
    by_name = {s.name: s for s in stages}
    if until is None:
        return stages
    if until not in by_name:
        raise ValueError(f"--until: {until!r} is not one of {', '.join(by_name)}")
    wanted = set(nx.descendants(graph, by_name[until])) | {by_name[until]}  # edges point to dependencies
    return [s for s in stages if s in wanted]


def stage_changed(stage) -> bool:
    return bool(stage.changed())


def before_run(stage) -> None:
    stage.remove_outs(ignore_remove=False, force=False)


def record_run(stage) -> None:
    """What ``dvc repro`` does after a stage's command succeeded."""
    stage.save()
    stage.commit()
    stage.dump(update_pipeline=False)
