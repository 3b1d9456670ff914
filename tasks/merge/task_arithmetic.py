"""Task arithmetic: theta = theta_0 + lambda * sum_k tau_k, tau_k = theta_k - theta_0.

Ilharco et al., "Editing Models with Task Arithmetic" (ICLR 2023). Task vectors are taken
over the shared backbone only; per-task heads are never merged. lambda is chosen from a
grid by the mean validation accuracy over the tasks.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor


class TaskArithmeticConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["task_arithmetic"] = "task_arithmetic"
    lambdas: list[float] = Field(default=[round(0.1 * i, 1) for i in range(1, 11)], min_length=1,
                                 description="grid of scaling coefficients searched on validation data")
    seed: int = 0


def task_vectors(base: dict[str, Tensor], finetuned: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """tau_k = theta_k - theta_0 for every tensor of ``base``; missing or mismatched tensors raise."""
    out = []
    for k, theta in enumerate(finetuned):
        tau = {}
        for name, w0 in base.items():
            if name not in theta:
                raise ValueError(f"merge: task model {k} has no tensor {name!r}")
            if theta[name].shape != w0.shape:
                raise ValueError(f"merge: tensor {name!r} of task model {k} has shape "
                                 f"{tuple(theta[name].shape)}, base has {tuple(w0.shape)}")
            tau[name] = theta[name] - w0
        out.append(tau)
    return out


def merge_task_vectors(base: dict[str, Tensor], taus: list[dict[str, Tensor]], lam: float) -> dict[str, Tensor]:
    """theta_0 + lam * sum_k tau_k, tensor by tensor."""
    return {name: w0 + lam * sum(tau[name] for tau in taus) for name, w0 in base.items()}
