"""quantize stage runner: one packed artifact per configured variant of the trained base.

Per variant the metrics hold the method, the packed size, and how close the loaded model (run
by the real low-bit kernels) stays to the float model on the calibration set: top-1
agreement, mean KL of the output distributions, and the mean relative layer-output error
‖Y_l − Ŷ_l‖_F / ‖Y_l‖_F over the quantized layers (each seeing its own model's earlier layers).
A method registered with ``data="train"`` (QAT) gets the labelled train split (x, y) instead of
the calibration inputs, and its per-epoch training figures join its metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimforge.artifacts import WEIGHTS, atomic_dir, read_meta, write_meta
from slimforge.checkpoint import build_from_spec, load_model
from slimforge.data import load_dataset
from tasks.quantize import get_method
from tasks.quantize.layerwise import layer_output_errors
from tasks.quantize.lorc import apply_lorc
from tasks.quantize.packed import load_packed_artifact, pack_layers, save_packed
from tasks.select.output import named_set


@torch.inference_mode()
def calibration_fidelity(base: torch.nn.Module, quantized: torch.nn.Module, x: torch.Tensor) -> dict:
    """Top-1 agreement and mean KL(float || quantized) of the output distributions on ``x``."""
    base.eval()
    quantized.eval()
    p, q = F.log_softmax(base(x), dim=1), F.log_softmax(quantized(x), dim=1)
    kl = F.kl_div(q, p, log_target=True, reduction="batchmean")
    return {"calibration_agreement": round(float((p.argmax(1) == q.argmax(1)).float().mean()), 6),
            "calibration_kl": round(float(kl), 8)}


def training_metrics(layers: dict) -> dict:
    """A training method's per-epoch figures (QAT's ``QatLayers.report``), and its last epoch's
    oscillating share; nothing for PTQ methods."""
    report = getattr(layers, "report", None)
    if not report:
        return {}
    return {"oscillating_share": report[-1]["oscillating_share"], "training": report}


def run(params, ws, fanout=None) -> dict:
    cfg = params.quantize
    base_dir = ws.artifact("train")
    spec = read_meta(base_dir)["model"]
    base = load_model(base_dir)
    dataset = load_dataset(ws.artifact("ingest"))
    calib_x, _ = named_set(cfg.calibration, ws.artifact("select"), dataset, torch.Generator().manual_seed(cfg.seed))
    parents = {"base": base_dir, "calibration": ws.artifact("select" if cfg.calibration.source == "selection" else "ingest")}
    out = {}
    with atomic_dir(ws.artifact("quantize")) as d:
        for variant in cfg.variants:
            target = d / variant.name
            target.mkdir()
            method = get_method(variant.method)
            if method.data == "train":  # QAT: trains through the fake-quant op that cfg.kernel picks
                layers = method.quantize(base, dataset.part("train"), variant, kernel=cfg.kernel)
            else:
                layers = method.quantize(base, calib_x, variant)
            layers = apply_lorc(base, layers, variant)  # LoRC after any PTQ method (lorc_rank > 0)
            tensors = pack_layers(base, layers)
            save_packed(target / WEIGHTS, tensors, variant)
            write_meta(target, root=ws.root, stage="quantize", method=variant.method,
                       config=variant.model_dump(mode="json"), seed=cfg.seed,
                       parents={**parents, "training": ws.artifact("ingest")} if method.data == "train" else parents,
                       extra={"model": spec, "format": "packed", "kernel": cfg.kernel, "cpu_int4": cfg.cpu_int4})
            # fail here, not downstream
            quantized = load_packed_artifact(target, build_from_spec(spec), cfg.kernel, cfg.cpu_int4)
            packed = [k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")]
            errors = layer_output_errors(base, quantized, calib_x, packed)
            out[variant.name] = {"method": variant.method, "bits": variant.bits, "granularity": variant.granularity,
                                 "packed_layers": len(packed), "size_bytes": (target / WEIGHTS).stat().st_size,
                                 "calibration_examples": len(calib_x), **calibration_fidelity(base, quantized, calib_x),
                                 "calibration_layer_error": round(sum(errors.values()) / max(len(errors), 1), 6),
                                 **training_metrics(layers)}
    return out
