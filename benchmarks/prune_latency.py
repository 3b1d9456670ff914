"""CPU latency of the default CNN, dense vs channel-pruned (prune.channel, Li et al. 2017).

Builds the default CNN (channels [16, 32], hidden 128) for 1x28x28 inputs and 10 classes,
removes the lowest-L1 half of every backbone layer's channels / units with
``tasks.prune.channel.prune_channels`` and times both models' forward pass with the evaluate stage's harness
(``latency_ms``: median ms of repeats after a warm-up). The pruned model is an
ordinary dense model of the same family, so the speedup needs no special kernel.
The target is ≥ 1.6x lower latency at batch 256 with half the channels. Run it as a module
(``-m``): run by path, benchmarks/select.py would shadow the standard library's ``select``.

    python -m benchmarks.prune_latency [--threads 1] [--batches 1 256] [--repeats 30] [--csv out.csv]
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from torch import nn

from slimforge.models import CNNConfig, build_model
from tasks.evaluate.harness import latency_ms
from tasks.prune.channel import ChannelConfig, prune_channels
from tasks.train.init import initialize

INPUT_SHAPE, CLASSES = (1, 28, 28), 10


def models(keep_fraction: float) -> dict[str, nn.Module]:
    cfg = CNNConfig()
    dense = build_model(cfg, INPUT_SHAPE, CLASSES)
    initialize(dense, "kaiming", torch.Generator().manual_seed(0))
    out = prune_channels(dense, cfg, ChannelConfig(keep_fraction=keep_fraction))
    slim = build_model(out.config, INPUT_SHAPE, CLASSES)
    slim.load_state_dict(out.state_dict)
    return {f"dense {cfg.channels}/{cfg.hidden}": dense.eval(),
            f"pruned {out.config.channels}/{out.config.hidden}": slim.eval()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--keep-fraction", type=float, default=0.5)
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nets = models(args.keep_fraction)
    rows = []
    for batch in args.batches:
        for name, net in nets.items():
            ms = latency_ms(net, INPUT_SHAPE, batch, args.repeats, warmup=5, generator=torch.Generator().manual_seed(1))
            rows.append({"batch": batch, "model": name, "params": sum(p.numel() for p in net.parameters()),
                         "ms": round(ms, 3)})
    df = pd.DataFrame(rows)
    if args.csv:
        df.to_csv(args.csv, index=False)
    table = df.pivot(index="batch", columns="model", values="ms")
    dense_name, slim_name = nets
    table["speedup"] = (table[dense_name] / table[slim_name]).round(2)
    print(f"threads={args.threads}  params: " + ", ".join(f"{n} = {df[df.model == n].params.iloc[0]:,}" for n in nets))
    print(table.to_string())


if __name__ == "__main__":
    main()
