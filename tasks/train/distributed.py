"""One training run across processes or machines: torch DistributedDataParallel (DDP),
launched with torchrun (``python -m torch.distributed.run``); gloo on CPU, NCCL on GPUs.

``fit_distributed`` is ``slimforge.training.fit`` run as ``world_size`` processes. The parent
writes a job file (data, initialised weights, masks, plan, generator state; safetensors),
runs ``torchrun ... -m tasks.train.distributed_worker JOB OUT`` and reads the trained weights
back. Every rank draws the same shuffle from its copy of the generator and trains on its
contiguous part of each global batch (``slimforge.training.Shard``), so each optimizer step
sees the single-process run's global batch and the weights match it to float rounding. The
models have no BatchNorm (``slimforge.models``), so no statistics need syncing across ranks.

Multi-machine: set ``nnodes``, ``master_addr`` and ``master_port`` and run the stage on every
machine (same params and workspace) with its own ``node_rank``; each node's local rank 0
writes the weights for its own stage, so every node ends with the same artifact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open
from torch import Tensor, nn

from slimforge import REPO_ROOT
from slimforge.artifacts import load_tensors, save_tensors
from slimforge.training import Checkpointing, EpochPlan, FitConfig

WORKER = "tasks.train.distributed_worker"
JOB, RESULT = "job.safetensors", "result.safetensors"


class DistributedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nproc_per_node: int = Field(default=1, ge=1, description="training processes on this machine (one per GPU "
                                                             "with nccl); 1 with nnodes 1 = off, train in-process")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        default="auto", description="torch.distributed backend; auto = nccl when CUDA is available, else gloo")
    nnodes: int = Field(default=1, ge=1, description="machines taking part; each runs the stage with its node_rank")
    node_rank: int = Field(default=0, ge=0, description="this machine's index, 0..nnodes-1; 0 hosts the master")
    master_addr: str | None = Field(default=None, description="address of node 0 that every node can reach; "
                                                              "None = 127.0.0.1 (one machine only)")
    master_port: int | None = Field(default=None, ge=1, le=65535,
                                    description="TCP port on master_addr; None = a free port (one machine only)")
    timeout_s: float = Field(default=86_400, gt=0, description="wall-clock limit of one distributed run in seconds; "
                                                               "past it the processes are stopped and the stage fails")

    @model_validator(mode="after")
    def _multi_node_needs_a_master(self) -> DistributedConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and (self.master_addr is None or self.master_port is None):
            raise ValueError(f"nnodes {self.nnodes} needs master_addr and master_port: the address of node 0 "
                             "that every node can reach")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "nccl" if torch.cuda.is_available() else "gloo"
        return self.backend


class DistributedRunError(ValueError):
    """The torchrun processes failed. A ValueError so the CLI reports it as one line."""


def check_distributed(cfg: DistributedConfig, batch_size: int) -> str:
    """The backend to use; refuses what this machine or the batch size cannot run."""
    backend = cfg.resolved_backend()
    if batch_size % cfg.world_size:
        raise ValueError(f"train.batch_size {batch_size} must be divisible by the world size {cfg.world_size} "
                         f"(train.distributed.nproc_per_node {cfg.nproc_per_node} × nnodes {cfg.nnodes}) so "
                         "every process takes an equal part of each global batch")
    if backend == "nccl" and torch.cuda.device_count() < cfg.nproc_per_node:
        raise ValueError(f"train.distributed.backend 'nccl' with nproc_per_node {cfg.nproc_per_node} needs that "
                         f"many CUDA GPUs; this machine has {torch.cuda.device_count()} (use 'gloo' or 'auto')")
    return backend


def fit_distributed(spec: dict, model: nn.Module, x: Tensor, y: Tensor, cfg: FitConfig, generator: torch.Generator,
                    dist: DistributedConfig, *, masks: dict[str, Tensor] | None = None, plan: EpochPlan | None = None,
                    augment: Literal["none", "dsa"] = "none", label: str = "train",
                    checkpoint: Checkpointing | None = None) -> list[float]:
    """``fit(model, x, y, cfg, generator, hold=MaskHold(masks), ...)`` as a DDP run of
    ``dist.world_size`` processes: ``model`` (built from ``spec``, already initialised) is
    trained in place and ``generator`` ends where ``fit`` would leave it. Returns the
    per-epoch mean losses. ``checkpoint`` must be a path every rank can read."""
    backend = check_distributed(dist, cfg.batch_size)
    with tempfile.TemporaryDirectory(prefix="slimforge-ddp-") as tmp:
        job = {"spec": spec, "fit": cfg.model_dump(mode="json"), "backend": backend, "augment": augment,
               "label": label, "timeout_s": dist.timeout_s,
               "checkpoint": None if checkpoint is None else [str(Path(checkpoint.directory).absolute()),
                                                              checkpoint.every_steps, checkpoint.keep_last]}
        save_tensors(Path(tmp, JOB), _job_tensors(model, x, y, generator, masks, plan), {"job": json.dumps(job)})
        _launch(Path(tmp), dist)
        result = load_tensors(Path(tmp, RESULT))
        history = json.loads(_metadata(Path(tmp, RESULT))["history"])
    model.load_state_dict({k.removeprefix("model."): v for k, v in result.items() if k.startswith("model.")})
    generator.set_state(result["generator"])
    return history


def _job_tensors(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator,
                 masks: dict[str, Tensor] | None, plan: EpochPlan | None) -> dict[str, Tensor]:
    """What the workers load: the initialised weights go along, so every rank starts from the
    parent's init (including inits read from files) without drawing it again."""
    out = {"x": x, "y": y, "generator": generator.get_state()}
    out |= {f"model.{k}": v for k, v in model.state_dict().items()}
    out |= {f"mask.{k}": v for k, v in (masks or {}).items()}
    if plan is not None:
        out["plan.indices"] = plan.indices
        if plan.weights is not None:
            out["plan.weights"] = plan.weights
    return out


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _launch(tmp: Path, cfg: DistributedConfig) -> None:
    """Run torchrun and wait for it; on failure or timeout stop it and raise one line."""
    log = tmp / "stderr.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cfg.nproc_per_node}",
           f"--nnodes={cfg.nnodes}", f"--node-rank={cfg.node_rank}", f"--master-addr={cfg.master_addr or '127.0.0.1'}",
           f"--master-port={cfg.master_port or _free_port()}", f"--log-dir={tmp / 'logs'}", "--redirects=2",
           "-m", WORKER, str(tmp / JOB), str(tmp / RESULT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    # torchrun would force one thread per worker; share this machine's cores out instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.nproc_per_node)))
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=None, stderr=err, env=env)  # stdout: rank 0's progress bar
        try:
            code = proc.wait(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _stop(proc)
    if code is None:
        raise DistributedRunError(f"train.distributed: torchrun did not finish within timeout_s {cfg.timeout_s:g} s; "
                                  "it and its workers were stopped")
    if code != 0 or not (tmp / RESULT).is_file():
        raise DistributedRunError(f"train.distributed: torchrun ({cfg.world_size} processes) exited with status "
                                  f"{code}: {_tail(tmp, log)}")


def _stop(proc: subprocess.Popen) -> None:
    """Reap torchrun. SIGTERM first: its agent then stops the workers (they run in sessions of
    their own, so only torchrun can reach them); SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(tmp: Path, log: Path) -> str:
    """Each worker's last stderr line (torchrun keeps them per rank under logs/), else
    torchrun's own last lines, as one line."""
    seen: dict[str, list[str]] = {}
    for f in sorted((tmp / "logs").rglob("stderr.log")):  # logs/<run id>/attempt_0/<local rank>/stderr.log
        if last := _lines(f)[-1:]:
            seen.setdefault(last[0], []).append(f.parent.name)
    if seen:
        return " | ".join(f"rank {','.join(ranks)}: {line}" for line, ranks in seen.items())
    return " | ".join(_lines(log)[-3:]) or "(no output)"


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]


def _free_port() -> int:
    """A TCP port free on loopback now (another process could take it before torchrun binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
