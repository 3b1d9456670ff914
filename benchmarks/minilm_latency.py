"""all-MiniLM-L6-v2 on CPU: fp32 vs RTN / GPTQ / AWQ int8 / int4 and SmoothQuant W8A8 on the packed low-bit kernels.

Quantizes every Linear of the real pretrained encoder (``slimforge.text.load_minilm``) with
the quantize stage (``quantize_model`` + ``load_quantized``): RTN int8 per-channel on
``_weight_int8pack_mm`` and int4 group-32 on ``_weight_int4pack_mm_for_cpu`` (weight-only,
bf16 activations around the ops), and SmoothQuant W8A8 (α = 0.5, int8 per-channel weights,
activations quantized per tensor, per token, or chosen per layer (``adaptive``), all on fbgemm's
dynamic int8 Linear through ``W8A8Linear``), calibrated on ``--calibration`` sentences each cut to its first 16 tokens so
the calibration batch needs no padding; and GPTQ and AWQ int4 (groups of 128 and 32, symmetric,
on the same int4 kernel as RTN's; every group-128 int4 variant also runs as a "W4A8" twin, the same
packed weights on onnxruntime's int4 × int8 MatMulNBits, ``cpu_int4: w4a8``), calibrated on up to
``--gptq-calibration`` whole sentences,
padded, with their ``attention_mask`` so only real tokens enter each layer's X
(``layerwise.layer_inputs``). Every calibration sentence is disjoint from the evaluation ones
(400 of the reference manual's ~405 sentences: 300 for evaluation leave 100). It reports, per variant, ms to encode one batch of
real English sentences (tokenize, encoder, mean pooling, normalise; median of repeats after a
warm-up, as the evaluate harness's ``latency_ms``) at each thread count, plus the agreement
of its sentence embeddings with fp32 on ``--sentences`` sentences
(``slimforge.text.embedding_agreement``).

    python -m benchmarks.minilm_latency [--threads 1 2] [--batch 1 16 64] [--repeats 10] [--sentences 300]
        [--calibration 64] [--gptq-calibration 128] [--variants smoothquant "int4 group-128" ...]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import Tensor, nn

from kernels.cpu_w4a8 import w4a8_available
from slimforge.text import embedding_agreement, encode, english_sentences, load_minilm
from tasks.quantize.awq import AwqConfig
from tasks.quantize.gptq import GptqConfig
from tasks.quantize.packed import load_quantized, packed_layout, quantize_model
from tasks.quantize.rtn import GridConfig, RtnConfig
from tasks.quantize.smoothquant import SmoothQuantConfig

VARIANTS = {
    "int8 per-channel": RtnConfig(name="int8", bits=8, granularity="channel"),
    "int4 group-32": RtnConfig(name="int4", bits=4, granularity="group", group_size=32),
    "int4 group-128": RtnConfig(name="int4g128", bits=4, granularity="group", group_size=128),
    "W8A8 smoothquant per-tensor": SmoothQuantConfig(name="sq-t", method="smoothquant", activations="per_tensor"),
    "W8A8 smoothquant per-token": SmoothQuantConfig(name="sq", method="smoothquant"),
    "W8A8 smoothquant adaptive": SmoothQuantConfig(name="sq-ad", method="smoothquant", activations="adaptive"),
}
# calibrated on whole, masked sentences (``calibration_batch``)
MASKED_VARIANTS = {
    f"{label} int4 group-{g}": cfg_class(name=f"{method}-w4g{g}", method=method, bits=4, granularity="group",
                                         group_size=g)
    for g in (128, 32) for label, method, cfg_class in (("GPTQ", "gptq", GptqConfig), ("AWQ", "awq", AwqConfig))
}
# the same packed weights run on onnxruntime's W4A8 MatMulNBits too (``cpu_int4: w4a8``)
W4A8_TWINS = {"int4 group-128", "GPTQ int4 group-128", "AWQ int4 group-128"}
RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION_TOKENS = 16
SENTENCE_POOL = 400  # of the ~405 sentences english_sentences has


def calibration_ids(tokenizer, sentences: list[str]) -> torch.Tensor:
    """input_ids (B, 16) of the sentences with at least 16 tokens, cut there: no padding to mask."""
    ids = [tokenizer(s)["input_ids"] for s in sentences]
    return torch.tensor([i[:CALIBRATION_TOKENS] for i in ids if len(i) >= CALIBRATION_TOKENS])


def calibration_batch(tokenizer, sentences: list[str]) -> dict[str, torch.Tensor]:
    """The tokenizer's padded batch (input_ids, token_type_ids, attention_mask), each (B, T)."""
    return dict(tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))


def held_out(sentences: list[str], n: int) -> list[str]:
    """Up to ``n`` of the first ``SENTENCE_POOL`` reference-manual sentences not in ``sentences``, spread evenly."""
    rest = [s for s in english_sentences(SENTENCE_POOL) if s not in set(sentences)]
    return [rest[i * len(rest) // n] for i in range(n)] if n < len(rest) else rest


def load_minilm_packed(model: nn.Module, cfg: GridConfig, state: dict[str, Tensor], cpu_int4: str = "w4a16") -> nn.Module:
    """A copy of ``model`` whose Linear layers run the packed weights of ``state``."""
    return load_quantized(copy.deepcopy(model), state, packed_layout(cfg, state), cpu_int4=cpu_int4).eval()


def quantized_models(fp32: nn.Module, calib: Tensor, masked: dict[str, Tensor], wanted: list[str] | None) -> dict:
    """name -> loaded model for every variant whose name contains one of ``wanted`` (all when None),
    plus a W4A8 twin of each int4 group-128 variant."""
    models = {}
    for name, cfg, data in ([(n, c, calib) for n, c in VARIANTS.items()]
                            + [(n, c, masked) for n, c in MASKED_VARIANTS.items()]):
        if wanted and not any(w in name for w in wanted):
            continue
        state = quantize_model(fp32, cfg, data)
        models[name] = load_minilm_packed(fp32, cfg, state)
        if name in W4A8_TWINS and w4a8_available():
            models[f"{name} W4A8"] = load_minilm_packed(fp32, cfg, state, "w4a8")
    return models


def encode_ms(model: nn.Module, tokenizer, batch: list[str], repeats: int, warmup: int = 2) -> float:
    """Median wall-clock ms of ``encode`` on one batch."""
    for _ in range(warmup):
        encode(model, tokenizer, batch, batch_size=len(batch))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode(model, tokenizer, batch, batch_size=len(batch))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def plot(df: pd.DataFrame, threads: list[int], batches: list[int], path: Path) -> None:
    """Speedup over fp32 against batch size, one panel per thread count, each line labelled with its cosine."""
    fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 5.5), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], threads, strict=True):
        for name, row in df.drop(index="fp32").iterrows():
            ax.plot(batches, [row[f"speedup b{b} {t} thr"] for b in batches], marker="o",
                    label=f"{name} (cos {row['cosine_mean']:.3f})")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.5, color="grey", ls="--", lw=0.8)  # the quantize issue's target
        ax.set(xscale="log", xticks=batches, xticklabels=[str(b) for b in batches], xlabel="sentences per batch",
               ylabel="speedup over fp32", title=f"all-MiniLM-L6-v2 encode, {t} thread(s)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=3)  # below the panels, off the lines
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch intra-op thread counts")
    ap.add_argument("--batch", type=int, nargs="+", default=[64], help="sentences per timed batch (one column each)")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="only the variants whose name contains one of these (default: all)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--sentences", type=int, default=300, help="sentences for the agreement with fp32")
    ap.add_argument("--calibration", type=int, default=64, help="sentences SmoothQuant calibrates on")
    ap.add_argument("--gptq-calibration", type=int, default=128,
                    help="most sentences GPTQ and AWQ calibrate on, none of them evaluation sentences")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    ap.add_argument("--plot", type=Path, default=RESULTS / "minilm_latency.png", help="speedup vs batch plot")
    args = ap.parse_args(argv)
    fp32, tokenizer = load_minilm()
    sentences = english_sentences(args.sentences)
    calib = calibration_ids(tokenizer, held_out(sentences, args.calibration))
    masked = calibration_batch(tokenizer, held_out(sentences, args.gptq_calibration))
    models = {"fp32": fp32} | quantized_models(fp32, calib, masked, args.variants)
    reference = encode(fp32, tokenizer, sentences)
    rows = []
    for name, model in models.items():
        agreement = embedding_agreement(reference, encode(model, tokenizer, sentences), k=10)
        row = {"model": name} | {k: round(v, 4) for k, v in agreement.items()}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for size in args.batch:
                batch = english_sentences(size)
                row[f"ms b{size} {threads} thr"] = round(encode_ms(model, tokenizer, batch, args.repeats), 1)
        rows.append(row)
    df = pd.DataFrame(rows).set_index("model")
    for threads in args.threads:
        for size in args.batch:
            ms = df[f"ms b{size} {threads} thr"]
            df[f"speedup b{size} {threads} thr"] = (ms["fp32"] / ms).round(2)
    if args.csv:
        df.to_csv(args.csv)
    print(f"all-MiniLM-L6-v2, batches of {args.batch} sentences, {args.sentences} sentences for agreement, "
          f"GPTQ/AWQ calibrated on {len(masked['input_ids'])} other sentences "
          f"({int(masked['attention_mask'].sum())} tokens)")
    print(df.to_string())
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(df, args.threads, args.batch, args.plot)
    return df


if __name__ == "__main__":
    main()
