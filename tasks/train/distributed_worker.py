"""One rank of a DDP training run (torch DistributedDataParallel), started by torchrun:

    python -m torch.distributed.run --nproc-per-node N -m tasks.train.distributed_worker JOB OUT

JOB is the job file ``tasks.train.distributed.fit_distributed`` writes; torchrun sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Each rank rebuilds the model from the
job's spec and initialised weights, wraps it in DDP and runs ``slimforge.training.fit`` with a
``Shard``; local rank 0 writes the trained weights, the loss history and the generator state
to OUT (safetensors), every other rank writes nothing. A separate module from
``tasks.train.distributed`` because ``python -m`` of a module the package already imported
runs it twice.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from slimforge.artifacts import load_tensors, save_tensors
from slimforge.checkpoint import build_from_spec
from slimforge.training import Checkpointing, EpochPlan, FitConfig, MaskHold, Shard, fit
from tasks.select.dsa import batch_augment


def main(argv: list[str]) -> None:
    job_path, out_path = (Path(a) for a in argv)
    tensors = load_tensors(job_path)
    with safe_open(str(job_path), framework="pt") as f:
        job = json.loads(f.metadata()["job"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if job["backend"] == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(job["backend"], timeout=timedelta(seconds=job["timeout_s"]))
    try:
        model, history, generator = train(tensors, job, rank, dist.get_world_size(), device)
        if local_rank == 0:  # every rank holds the same weights; one per node writes them
            result = {f"model.{k}": v for k, v in model.state_dict().items()} | {"generator": generator.get_state()}
            save_tensors(out_path, result, {"history": json.dumps(history)})
    finally:
        dist.destroy_process_group()


def train(tensors: dict[str, Tensor], job: dict, rank: int, world: int, device: torch.device):
    """(model, per-epoch losses, generator) after this rank's part of the run."""
    model = build_from_spec(job["spec"])
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    model.to(device)
    masks = {k.removeprefix("mask."): v.to(device) for k, v in tensors.items() if k.startswith("mask.")}
    generator = torch.Generator()
    generator.set_state(tensors["generator"])  # the parent's, after its init draws
    plan = EpochPlan(tensors["plan.indices"], tensors.get("plan.weights")) if "plan.indices" in tensors else None
    checkpoint = None if job["checkpoint"] is None else Checkpointing(Path(job["checkpoint"][0]),
                                                                      *job["checkpoint"][1:])
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    shard = Shard(ddp, rank, world, _sum_across, device)
    history = fit(model, tensors["x"], tensors["y"], FitConfig(**job["fit"]), generator,
                  hold=MaskHold(model, masks) if masks else None, label=job["label"], checkpoint=checkpoint,
                  plan=plan, augment=batch_augment() if job["augment"] == "dsa" else None, shard=shard)
    return model, history, generator


def _sum_across(t: Tensor) -> Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


if __name__ == "__main__":
    main(sys.argv[1:])
