"""Fuzzing the file boundaries: dataset files (.npz / .parquet, from valid to garbage) through
ingest's parsing and validation, and safetensors checkpoints through ``load_tensors`` and the
merge's ``open_checkpoint``. Hypothesis is derandomized, so every CI run tries the same inputs.
The property: the file loads, or is refused with an ArtifactError whose every line names it."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st

from slimforge.artifacts import ArtifactError
from tasks.ingest.sources import parse_npz, parse_parquet
from tasks.ingest.validate import split_dataset, validate_arrays

DATASET_EXAMPLES = 240


# ---------------------------------------------------------------- dataset files

NPZ_KINDS = ("valid", "nan", "inf", "huge_x", "neg_label", "float_label", "huge_label", "gap_label",
             "length", "empty", "scalar_x", "x_1d", "y_2d", "x_dtype", "y_dtype", "object", "shape",
             "missing", "truncated", "flipped", "random_bytes", "not_zip", "zip_junk")
PARQUET_KINDS = ("valid_features", "valid_pixels", "nan", "null_label", "string_label", "float_label",
                 "huge_label", "neg_label", "ragged", "null_pixels", "string_pixels", "nested_pixels",
                 "string_feature", "bool_feature", "no_label", "only_label", "duplicate_label", "meta_shape",
                 "empty", "truncated", "random_bytes")
BAD_SHAPES = st.one_of(st.just("[1, 28"), st.just('{"a": 1}'), st.just("5"), st.just('["a"]'), st.just("[1e400]"),
                       st.just("[[1, 2], [3]]"), st.just("[-4]"), st.just("[0]"), st.just("[1.5, 2]"),
                       st.just("[100000000000000000000000]"), st.just("null"), st.just("[]"), st.just("[true]"),
                       st.lists(st.integers(-3, 40), max_size=4).map(str))


@st.composite
def _valid_arrays(draw):
    """x (N, F) float32 in [0, 1) and y (N,) with every class 0..K-1 present, N >= 3K."""
    k = draw(st.integers(1, 4), label="classes")
    n = draw(st.integers(3 * k, 3 * k + 12), label="examples")
    f = draw(st.integers(1, 6), label="features")
    rng = np.random.default_rng(draw(st.integers(0, 2**16), label="seed"))
    return rng.random((n, f), dtype=np.float32), np.arange(n, dtype=np.int64) % k


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _damage(draw, raw: bytes, kind: str) -> bytes:
    if kind == "truncated":
        return raw[:draw(st.integers(0, max(len(raw) - 1, 0)), label="cut")]
    at = draw(st.integers(0, len(raw) - 1), label="at")
    return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255), label="xor")]) + raw[at + 1:]


@st.composite
def npz_files(draw):
    kind = draw(st.sampled_from(NPZ_KINDS), label="npz kind")
    x, y = draw(_valid_arrays())
    arrays = {"x": x, "y": y}
    i = draw(st.integers(0, len(y) - 1), label="index")
    if kind in ("nan", "inf", "huge_x"):
        x[i, 0] = {"nan": np.nan, "inf": -np.inf}.get(kind, 0.0)
        arrays["x"] = x.astype(np.float64) * (1e300 if kind == "huge_x" else 1)
    elif kind == "neg_label":
        y[i] = -draw(st.integers(1, 2**40))
    elif kind == "float_label":
        arrays["y"] = y + draw(st.sampled_from([0.5, np.nan, np.inf, 1e30, 0.0]))
    elif kind == "huge_label":
        arrays["y"] = y.astype(np.uint64)
        arrays["y"][i] = draw(st.sampled_from([2**63 + 5, 2**64 - 1, 10**12, len(y) + 3]))
    elif kind == "gap_label":
        y[y == 0] = y.max() + 2
    elif kind == "length":
        arrays["y"] = y[:-draw(st.integers(1, len(y)))]
    elif kind == "empty":
        arrays = {"x": np.zeros((0,) + x.shape[1:], np.float32), "y": np.zeros(0, np.int64)}
    elif kind == "scalar_x":
        arrays["x"] = np.float32(1.0)
    elif kind == "x_1d":
        arrays["x"] = x[:, 0]
    elif kind == "y_2d":
        arrays["y"] = y[:, None]
    elif kind == "x_dtype":
        arrays["x"] = x.astype(draw(st.sampled_from(["U3", "complex64", "datetime64[s]", "bool", "int8", "S2"])))
    elif kind == "y_dtype":
        arrays["y"] = y.astype(draw(st.sampled_from(["U3", "complex64", "bool", "float16", "datetime64[s]"])))
    elif kind == "object":
        ragged = np.empty(len(y), dtype=object)
        ragged[:] = [np.zeros(1 + j % 2) for j in range(len(y))]
        arrays["x"] = ragged
    elif kind == "shape":
        arrays["shape"] = np.asarray(draw(st.sampled_from(
            [[-1], [0], [1, x.shape[1]], [x.shape[1] + 1], [2**40, 2**40], ["a"], [1.5], [[1], [2]], []])))
    elif kind == "missing":
        arrays.pop(draw(st.sampled_from(["x", "y"])))
    if kind == "random_bytes":
        return kind, draw(st.binary(max_size=300), label="bytes")
    if kind == "not_zip":
        return kind, b"\x93NUMPY" + draw(st.binary(max_size=60))
    if kind == "zip_junk":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(draw(st.sampled_from(["x.npy", "y.npy", "x", "../x.npy"])), draw(st.binary(max_size=80)))
        return kind, buf.getvalue()
    raw = _npz_bytes(**arrays)
    return kind, _damage(draw, raw, kind) if kind in ("truncated", "flipped") else raw


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@st.composite
def parquet_files(draw):
    kind = draw(st.sampled_from(PARQUET_KINDS), label="parquet kind")
    x, y = draw(_valid_arrays())
    i = draw(st.integers(0, len(y) - 1), label="index")
    label = pa.array(y)
    pixels = [list(map(float, row)) for row in x]
    features = {f"f{j}": pa.array(x[:, j]) for j in range(x.shape[1])}
    cols: dict = {"label": label, **features}
    meta = None
    if kind == "valid_pixels" or kind in ("ragged", "null_pixels", "string_pixels", "nested_pixels"):
        if kind == "ragged":
            pixels[i] = pixels[i] + [0.5]
        elif kind == "null_pixels":
            pixels[i] = None
        elif kind == "string_pixels":
            pixels = [[str(v) for v in row] for row in pixels]
        elif kind == "nested_pixels":
            pixels = [[[v] for v in row] for row in pixels]
        cols = {"label": label, "pixels": pa.array(pixels)}
    elif kind == "nan":
        x[i, 0] = draw(st.sampled_from([np.nan, np.inf]))
        cols["f0"] = pa.array(x[:, 0])
    elif kind == "null_label":
        cols["label"] = pa.array([None if j == i else int(v) for j, v in enumerate(y)], pa.int64())
    elif kind == "string_label":
        cols["label"] = pa.array([str(v) for v in y])
    elif kind == "float_label":
        cols["label"] = pa.array(y + draw(st.sampled_from([0.25, 1e30, -0.0])))
    elif kind == "huge_label":
        big = y.astype(np.uint64)
        big[i] = draw(st.sampled_from([2**64 - 1, 2**63, 10**15]))
        cols["label"] = pa.array(big)
    elif kind == "neg_label":
        y[i] = -draw(st.integers(1, 1000))
        cols["label"] = pa.array(y)
    elif kind == "string_feature":
        cols["f0"] = pa.array([str(v) for v in x[:, 0]])
    elif kind == "bool_feature":
        cols["f0"] = pa.array(x[:, 0] > 0.5)
    elif kind == "no_label":
        cols.pop("label")
    elif kind == "only_label":
        cols = {"label": label}
    elif kind == "meta_shape":
        meta = draw(BAD_SHAPES, label="shape meta")
    elif kind == "empty":
        cols = {"label": pa.array([], pa.int64()), "f0": pa.array([], pa.float32())}
    if kind == "random_bytes":
        return kind, draw(st.binary(max_size=300), label="bytes")
    if kind == "duplicate_label":
        table = pa.Table.from_arrays([label, label, features["f0"]], names=["label", "label", "f0"])
    else:
        table = pa.table(cols)
    if meta is not None:
        table = table.replace_schema_metadata({"shape": meta})
    raw = _parquet_bytes(table)
    return kind, _damage(draw, raw, kind) if kind == "truncated" else raw


MUST_REFUSE = ("nan", "inf", "huge", "neg", "gap", "string", "null", "no_", "only", "empty", "length", "missing",
               "random", "object", "ragged", "scalar", "x_1d", "y_2d", "nested", "duplicate")


def ingest_bytes(raw: bytes, source: str) -> int:
    """What the ingest stage does with a file's bytes before writing anything: parse, validate,
    convert and split. Returns the class count."""
    parse = parse_npz if source.endswith(".npz") else parse_parquet
    x, y = parse(raw, source)
    k = validate_arrays(x, y, source)
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
    assert np.isfinite(x).all() and x.shape[0] == len(y) and 0 <= y.min() and y.max() < k
    split_dataset(y, 0.1, 0.2, 0)
    return k


def test_fuzzed_dataset_files_load_or_give_a_named_error(fuzz_log):
    @settings(fuzz_log.settings, max_examples=DATASET_EXAMPLES)
    @given(st.one_of(npz_files().map(lambda c: (".npz", *c)), parquet_files().map(lambda c: (".parquet", *c))))
    def check(case):
        suffix, kind, raw = case
        source = f"data/fuzzed{suffix}"
        loaded = fuzz_log.attempt(lambda: ingest_bytes(raw, source), ArtifactError, source, f"{suffix} {kind}", kind)
        if loaded is not None and kind.startswith(MUST_REFUSE):
            fuzz_log.bugs.setdefault(f"{suffix} {kind} was accepted", kind)

    check()
    tally = fuzz_log.tally
    total = sum(tally.values())
    by_suffix = {s: sum(v for k, v in tally.items() if k.startswith(s)) for s in (".npz", ".parquet")}
    print(f"\ndataset files fuzzed: {total} {by_suffix}; refused {sum(v for k, v in tally.items() if 'refused' in k)}")
    assert not fuzz_log.bugs, fuzz_log.report()
    assert total >= 200 and all(by_suffix.values())
    assert any("loaded" in k for k in tally) and any("refused" in k for k in tally)


# ---------------------------------------------------------------- safetensors checkpoints

SAFETENSORS_EXAMPLES = 150
# JSON values a forged header puts where a dtype, shape or offsets belong
HEADER_JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


@st.composite
def safetensors_files(draw):
    """(kind, bytes) of a small checkpoint: valid, cut, bit-flipped, or with a forged header."""
    import json

    import torch
    from safetensors.torch import save

    n = draw(st.integers(1, 3), label="tensors")
    tensors = {f"t{i}": torch.arange(draw(st.integers(0, 6)) * (i + 1), dtype=torch.float32) for i in range(n)}
    raw = save(tensors)
    kind = draw(st.sampled_from(["valid", "truncated", "flipped", "header", "length", "random"]), label="kind")
    if kind == "valid":
        return kind, raw
    if kind == "random":
        return kind, draw(st.binary(max_size=120))
    if kind in ("truncated", "flipped"):
        return kind, _damage(draw, raw, kind)
    size = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + size]), raw[8 + size:]
    if kind == "length":
        forged = draw(st.sampled_from([0, 1, size + 1, len(raw), 2**40, 2**64 - 1]))
        return kind, forged.to_bytes(8, "little") + raw[8:]
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor")
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry"]), label="field")
    header[name] = {**header[name], field: draw(HEADER_JUNK, label="forged")} if field != "entry" else draw(HEADER_JUNK)
    text = json.dumps(header).encode()
    return kind, len(text).to_bytes(8, "little") + text + body


def _read_checkpoint(path: Path) -> list:
    """The merge's input boundary: open (headers only), then copy out every tensor."""
    from tasks.merge.checkpoints import open_checkpoint

    checkpoint = open_checkpoint(path)
    return [checkpoint.get(name) for name in checkpoint.names()]


def test_fuzzed_safetensors_load_or_give_a_named_error(tmp_path, fuzz_log):
    from slimforge.artifacts import load_tensors

    @settings(fuzz_log.settings, max_examples=SAFETENSORS_EXAMPLES)
    @given(safetensors_files())
    def check(case):
        kind, raw = case
        path = tmp_path / "fuzzed.safetensors"
        path.write_bytes(raw)
        for boundary, read in (("load_tensors", load_tensors), ("open_checkpoint", _read_checkpoint)):
            fuzz_log.attempt(lambda read=read: read(path), ArtifactError, str(path), f"{boundary} {kind}", kind)

    check()
    tally = fuzz_log.tally
    print(f"\nsafetensors files fuzzed: {sum(tally.values()) // 2} (each through load_tensors and open_checkpoint) "
          f"{dict(sorted(tally.items()))}")
    assert not fuzz_log.bugs, fuzz_log.report()
    assert tally["load_tensors valid: loaded"] and tally["open_checkpoint valid: loaded"]
    assert sum(tally.values()) // 2 >= SAFETENSORS_EXAMPLES * 0.9
