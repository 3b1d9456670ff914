"""Quantize benchmark: method × bits × granularity, each variant saved packed and run by the real loader.

Models: the small CNN and the tiny ViT trained on MNIST-5k with benchmarks/prune.py's base
recipe (AdamW, ``--epochs``, one base per ``--seeds`` seed), and all-MiniLM-L6-v2 from its
wheel (``slimforge.text.load_minilm``). Every method in the quantize registry whose data is
``"calibration"`` runs by default (``--qat`` adds the ones that train), at each of ``--bits`` and
``--granularities`` (group: 32 input channels for CNN/ViT, 128 for MiniLM). A variant goes
through the stage's own path: its config from the registry, ``quantize_model``, ``save_packed``
to a temp dir, ``load_packed_artifact`` into a fresh model (``kernel: auto``; ``--cpu-int4 w4a8``
runs the 2/3/4-bit layers on onnxruntime's W4A8 MatMulNBits instead of torch's weight-only op). A config the
method rejects (SmoothQuant below 8 bits or grouped) or a model no layer of which fits is
skipped, with the reason printed.

Calibration: 256 random train images (CNN/ViT, drawn with the base's seed); 128 of the ~400
reference-manual sentences (every third, padded, with their attention mask) for MiniLM, whose
quality is measured on the other ~270. Per variant a row records quality (MNIST-5k test
accuracy; MiniLM: ``embedding_agreement`` with fp32: cosine mean/min, 10-NN overlap,
Spearman), bytes on disk of the packed file vs the fp32 safetensors, CPU latency (median of
``--repeats``) at batch 1 and 256 (MiniLM: ``encode`` of 1 and of 256 sentences), quantize
wall time, how many layers were packed and which module runs each (a packed kernel, or
``dense``: dequantized at load, e.g. convs, 8-bit groups,
per-channel sub-8-bit weights whose K is no int4 group size). The fp32 base is timed again
right before each variant and the speedup is the ratio of that pair, so other load on a
shared machine hits both sides. Rows go to ``<out>/quantize.csv`` as they finish
(``--resume`` keeps them); then a markdown table and a plot (``quantize.png``: quality vs
bits per method, one panel per model; quality vs bytes).

    python -m benchmarks.quantize [--models cnn vit minilm] [--methods rtn gptq ...] [--bits 8 4 3 2]
        [--granularities channel group] [--seeds 0] [--epochs 8] [--repeats 10] [--qat] [--cpu-int4 w4a8] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from pydantic import ValidationError
from torch import nn

from benchmarks.prune import ARCHS, SHAPE, train_base
from benchmarks.select import load_mnist5k
from slimforge.artifacts import WEIGHTS, save_tensors
from slimforge.models import ATTENTION
from slimforge.training import accuracy, progress_bar
from tasks.evaluate.harness import latency_ms
from tasks.quantize import METHODS, get_method, load_packed_artifact, quantize_model, save_packed

OUT = Path(__file__).parent / "results"
MODELS = [*ARCHS, "minilm"]
GROUP = {"cnn": 32, "vit": 32, "minilm": 128}
KEY = ["model", "seed", "method", "bits", "granularity"]
QUALITY = {"cnn": "test_accuracy", "vit": "test_accuracy", "minilm": "cosine_mean"}
CALIBRATION_IMAGES, CALIBRATION_SENTENCES, SENTENCE_POOL = 256, 128, 400


@dataclass
class Bench:
    """One base model and how to calibrate, rebuild, judge and time it."""

    model: str
    seed: int
    base: nn.Module
    calibration: object  # a tensor (images) or a tokenizer batch (MiniLM)
    train: tuple | None  # (x, y) for methods that train (QAT)
    fresh: Callable[[], nn.Module]  # an fp32 model of the same architecture to load a variant into
    quality: Callable[[nn.Module], dict]
    latency: Callable[[nn.Module, int], float]  # ms at a batch size


def image_bench(arch: str, seed: int, data, args) -> Bench:
    x, y, x_test, y_test = data
    train = {"epochs": args.epochs, "batch_size": 128, "optimizer": "adamw", "lr": args.lr}
    base, _ = train_base(arch, x, y, seed, train)
    base.eval()
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:args.calibration]

    def timed(model: nn.Module, batch: int) -> float:
        return latency_ms(model, SHAPE, batch, repeats=args.repeats, warmup=3, generator=torch.Generator().manual_seed(0))

    return Bench(arch, seed, base, x[pick], (x, y), lambda: copy.deepcopy(base),
                 lambda m: {"test_accuracy": accuracy(m, x_test, y_test)}, timed)


def minilm_bench(args) -> Bench:
    from benchmarks.minilm_latency import calibration_batch, encode_ms
    from slimforge.text import embedding_agreement, encode, english_sentences, load_minilm

    fp32, tokenizer = load_minilm()
    pool = english_sentences(SENTENCE_POOL)
    calib = pool[::3][:args.calibration_sentences]
    held = [s for s in pool if s not in set(calib)]  # quality is measured on sentences never calibrated on
    reference = encode(fp32, tokenizer, held)

    def timed(model: nn.Module, batch: int) -> float:
        return encode_ms(model, tokenizer, held[:batch], args.repeats if batch == 1 else args.encode_repeats, warmup=1)

    return Bench("minilm", 0, fp32, calibration_batch(tokenizer, calib), None, lambda: copy.deepcopy(fp32),
                 lambda m: embedding_agreement(reference, encode(m, tokenizer, held), k=10), timed)


def kernel_summary(model: nn.Module, names: list[str]) -> str:
    """Which module runs each packed layer after loading, e.g. 'Int4CpuLinear×3 dense×2'."""
    kinds = Counter(type(m).__name__ if getattr(m, "is_packed", False) else "dense"
                    for m in (model.get_submodule(n) for n in names))
    return " ".join(f"{k}×{v}" for k, v in sorted(kinds.items()))


def measure(bench: Bench, model: nn.Module, batches: tuple[int, ...], paired: bool = True) -> dict:
    """Quality and latency; ``paired``: the fp32 base is timed right before the variant at each batch
    size, so a speedup compares two timings taken under the same load of a shared machine."""
    model.eval()
    row = bench.quality(model)
    for b in batches:
        if paired:
            row[f"fp32_ms_b{b}"] = round(bench.latency(bench.base, b), 3)
        row[f"ms_b{b}"] = round(bench.latency(model, b), 3)
    return row


def fp32_row(bench: Bench, batches) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / WEIGHTS
        save_tensors(path, {k: v.detach().float().contiguous() for k, v in bench.base.state_dict().items()})
        size = path.stat().st_size
    return {"model": bench.model, "seed": bench.seed, "method": "fp32", "bits": 32, "granularity": "-",
            "bytes": size, "quantize_s": 0.0, **measure(bench, bench.base, batches, paired=False)}


def variant_row(bench: Bench, method: str, bits: int, granularity: str, batches, cpu_int4: str = "w4a16") -> dict | str:
    """The measured row of one variant, or the reason it was skipped."""
    entry = get_method(method)
    name = f"{method}-w{bits}{'g' + str(GROUP[bench.model]) if granularity == 'group' else 'c'}"
    try:
        cfg = entry.config(name=name, method=method, bits=bits, granularity=granularity,
                           group_size=GROUP[bench.model])
    except ValidationError as e:
        return "; ".join(err["msg"] for err in e.errors())
    data = bench.train if entry.data == "train" else bench.calibration
    start = time.perf_counter()
    try:
        tensors = quantize_model(bench.base, cfg, data)
    except ValueError as e:
        return f"quantize raised {e}"
    seconds = time.perf_counter() - start
    packed = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not packed:
        return "no layer fits this grid"
    with tempfile.TemporaryDirectory() as d:
        save_packed(Path(d) / WEIGHTS, tensors, cfg)
        size = (Path(d) / WEIGHTS).stat().st_size
        loaded = load_packed_artifact(d, bench.fresh(), cpu_int4=cpu_int4)  # what a user of the artifact runs
    layers = [n for n, m in bench.base.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, *ATTENTION))]
    return {"model": bench.model, "seed": bench.seed, "method": method, "bits": bits, "granularity": granularity,
            "group_size": GROUP[bench.model] if granularity == "group" else None, "bytes": size,
            "quantize_s": round(seconds, 2), "packed_layers": f"{len(packed)}/{len(layers)}", "cpu_int4": cpu_int4,
            "kernels": kernel_summary(loaded, packed), **measure(bench, loaded, batches)}


def run(args) -> list[str]:
    path = args.out / "quantize.csv"
    rows = pd.read_csv(path).to_dict("records") if args.resume and path.exists() else []
    done = {tuple(str(r[k]) for k in KEY) for r in rows}
    skipped: list[str] = []
    data = load_mnist5k() if set(args.models) & set(ARCHS) else None
    batches = (1, 256)
    for model in args.models:
        for seed in ([0] if model == "minilm" else args.seeds):
            todo = [(m, b, g) for m in args.methods for b in args.bits for g in args.granularities
                    if (model, str(seed), m, str(b), g) not in done]
            if not todo and (model, str(seed), "fp32", "32", "-") in done:
                continue
            bench = minilm_bench(args) if model == "minilm" else image_bench(model, seed, data, args)
            if (model, str(seed), "fp32", "32", "-") not in done:
                rows.append(fp32_row(bench, batches))
                print(rows[-1], flush=True)
            with progress_bar(f"{model} seed {seed}", len(todo)) as (bar, task):
                for method, bits, granularity in todo:
                    row = variant_row(bench, method, bits, granularity, batches, args.cpu_int4)
                    bar.update(task, advance=1)
                    if isinstance(row, str):
                        skipped.append(f"{model} {method} {bits}-bit {granularity}: {row}")
                        print("skipped", skipped[-1], flush=True)
                        continue
                    rows.append(row)
                    print({k: v for k, v in row.items() if k not in ("group_size",)}, flush=True)
                    pd.DataFrame(rows).to_csv(path, index=False)
    pd.DataFrame(rows).to_csv(path, index=False)
    return skipped


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per model and variant: quality (mean, std over seeds), size and latency against fp32 and RTN."""
    df = df.copy()
    df["quality"] = [r[QUALITY[r["model"]]] for _, r in df.iterrows()]
    fp32 = df[df.method == "fp32"].groupby("model")
    for b in (1, 256):  # per row: the paired fp32 timing, else (fp32 row, older rows) the fp32 row's
        paired = df[f"fp32_ms_b{b}"] if f"fp32_ms_b{b}" in df else pd.Series(float("nan"), index=df.index)
        df[f"speedup_b{b}"] = paired.fillna(df.model.map(fp32[f"ms_b{b}"].median())) / df[f"ms_b{b}"]
        df.loc[df.method == "fp32", f"speedup_b{b}"] = 1.0
    extra = [c for c in ("cosine_min", "knn_overlap@10", "spearman") if c in df]
    agg = {"quality": ("quality", "mean"), "std": ("quality", "std"), "n": ("seed", "count"),
           "bytes": ("bytes", "mean"), "ms_b1": ("ms_b1", "median"), "ms_b256": ("ms_b256", "median"),
           "speedup_b1": ("speedup_b1", "median"), "speedup_b256": ("speedup_b256", "median"),
           "quantize_s": ("quantize_s", "mean"), **{c: (c, "mean") for c in extra},
           **{c: (c, "first") for c in ("packed_layers", "kernels") if c in df}}
    out = df.groupby(["model", "method", "bits", "granularity"], sort=False).agg(**agg).reset_index()
    out["size_x"] = out.bytes / out.model.map(out[out.method == "fp32"].set_index("model").bytes)
    rtn = out[out.method == "rtn"].set_index(["model", "bits", "granularity"]).quality
    out["vs_rtn"] = [q - rtn.get((m, b, g), float("nan")) for q, m, b, g in
                     zip(out.quality, out.model, out.bits, out.granularity, strict=True)]
    image = out.model.isin(list(ARCHS))
    out.loc[image, ["quality", "std", "vs_rtn"]] *= 100  # accuracy in %
    first = {"model": {m: i for i, m in enumerate(MODELS)}, "method": {"fp32": ""}}  # models as MODELS, fp32 on top
    out = out.sort_values(["model", "bits", "granularity", "method"], ascending=[True, False, True, True],
                          key=lambda c: c.map(first[c.name]).fillna(c) if c.name in first else c)
    return out.round({"quality": 4, "std": 4, "vs_rtn": 4, "size_x": 3, "speedup_b1": 2, "speedup_b256": 2,
                      "quantize_s": 2, **{c: 4 for c in extra}})


def plot(table: pd.DataFrame, path: Path) -> None:
    models = [m for m in MODELS if m in set(table.model)]
    index = {m: i for i, m in enumerate(sorted(set(table.method) - {"fp32"}))}  # one colour per method everywhere
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 9), squeeze=False)
    for col, model in enumerate(models):
        part = table[table.model == model]
        label = "test accuracy (%)" if model in ARCHS else "cosine to fp32 (mean)"
        top, bottom = axes[0][col], axes[1][col]
        fp32 = part[part.method == "fp32"]
        for method in sorted(set(part.method) - {"fp32"}):
            i = index[method]
            color, marker = plt.cm.tab10(i % 10), "os^Dvx*"[i % 7]
            for granularity, ls in (("channel", "-"), ("group", "--"), ("tensor", ":")):
                m = part[(part.method == method) & (part.granularity == granularity)].sort_values("bits")
                if len(m):
                    top.errorbar(m.bits, m.quality, yerr=m["std"].fillna(0), ls=ls, marker=marker, color=color,
                                 capsize=3, label=f"{method} {granularity}")
            m = part[part.method == method]
            bottom.scatter(m.bytes / 1e3, m.quality, marker=marker, color=color, label=method)
        for ax in (top, bottom):
            for q in fp32.quality:
                ax.axhline(q, color="k", lw=0.8, ls=":", label="fp32")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        bottom.scatter(fp32.bytes / 1e3, fp32.quality, marker="*", s=120, color="k")
        top.set_title(f"{model}: quality vs bits (solid channel, dashed group {GROUP[model]})")
        top.set_xlabel("bits per weight")
        top.set_xticks([2, 3, 4, 8])
        bottom.set_title(f"{model}: quality vs packed file size")
        bottom.set_xscale("log")
        bottom.set_xlabel("kB on disk")
        top.legend(fontsize=6, ncol=2)
        bottom.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    calibrated = [n for n, m in METHODS.items() if m.data == "calibration"]
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                    help=f"default: every calibration method ({' '.join(calibrated)}); plus QAT with --qat")
    ap.add_argument("--qat", action="store_true", help="also run the registry's training methods (slow)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--granularities", nargs="+", default=["channel", "group"], choices=["tensor", "channel", "group"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of the CNN/ViT bases")
    ap.add_argument("--epochs", type=int, default=8, help="AdamW epochs of the CNN/ViT base")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--repeats", type=int, default=10, help="timed repeats per latency (median reported)")
    ap.add_argument("--encode-repeats", type=int, default=3, help="timed repeats of MiniLM's 256-sentence encode "
                                                                   "(seconds each on one thread)")
    ap.add_argument("--calibration", type=int, default=CALIBRATION_IMAGES, help="calibration images (CNN/ViT)")
    ap.add_argument("--calibration-sentences", type=int, default=CALIBRATION_SENTENCES)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", type=Path, default=OUT, help="directory of quantize.csv and quantize.png")
    ap.add_argument("--cpu-int4", choices=["w4a16", "w4a8"], default="w4a16",
                    help="the 2/3/4-bit CPU kernel the loader picks (quantize.cpu_int4); give w4a8 its own --out")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in quantize.csv, skip them")
    ap.add_argument("--quick", action="store_true", help="smoke run: CNN, 1 epoch, rtn+gptq+smoothquant, 8/4-bit, "
                                                         "64 calibration images, 2 repeats")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.seeds, args.epochs, args.repeats, args.calibration = ["cnn"], [0], 1, 2, 64
        args.methods, args.bits = args.methods or ["rtn", "gptq", "smoothquant"], [8, 4]
    args.methods = args.methods or calibrated + ([n for n, m in METHODS.items() if m.data == "train"] if args.qat else [])
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    skipped = run(args)
    table = summarize(pd.read_csv(args.out / "quantize.csv").drop_duplicates(KEY, keep="last"))
    plot(table, args.out / "quantize.png")
    for model, part in table.groupby("model", sort=False):
        part = part.dropna(axis=1, how="all").drop(columns="model")
        print(f"\n### {model} ({'MNIST-5k test accuracy, %' if model in ARCHS else 'embedding cosine to fp32'}"
              f"; ms on {args.threads} thread(s))\n")
        print(part.to_markdown(index=False))
    if skipped:
        print("\nskipped variants:\n" + "\n".join(f"- {s}" for s in skipped))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
