"""quantize stage runner: one packed artifact per configured variant of the trained base."""

from __future__ import annotations

from slimforge.artifacts import WEIGHTS, atomic_dir, read_meta, write_meta
from slimforge.checkpoint import build_from_spec, load_model
from tasks.quantize.packed import load_packed_artifact, quantize_model, save_packed


def run(params, ws, fanout=None) -> dict:
    cfg = params.quantize
    base_dir = ws.artifact("train")
    spec = read_meta(base_dir)["model"]
    base = load_model(base_dir)
    out = {}
    with atomic_dir(ws.artifact("quantize")) as d:
        for variant in cfg.variants:
            target = d / variant.name
            target.mkdir()
            tensors = quantize_model(base, variant)
            save_packed(target / WEIGHTS, tensors, variant)
            write_meta(target, root=ws.root, stage="quantize", method=variant.method,
                       config=variant.model_dump(mode="json"), seed=cfg.seed, parents={"base": base_dir},
                       extra={"model": spec, "format": "packed", "kernel": cfg.kernel})
            load_packed_artifact(target, build_from_spec(spec), cfg.kernel)  # fail here, not downstream
            packed = sum(k.endswith(".qweight") for k in tensors)
            out[variant.name] = {"bits": variant.bits, "granularity": variant.granularity,
                                 "packed_layers": packed, "size_bytes": (target / WEIGHTS).stat().st_size}
    return out
