"""IngestConfig: defaults, and errors that name the key and the valid values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.ingest import IngestConfig


def test_defaults_are_valid():
    cfg = IngestConfig()
    assert (cfg.dataset, cfg.val_fraction, cfg.test_fraction, cfg.seed) == ("mnist5k", 0.1, 0.2, 0)


@pytest.mark.parametrize("path", ["data/train.npz", "/abs/x.parquet", "s3://bucket/some/key.npz"])
def test_file_paths_accepted(path):
    assert IngestConfig(dataset="file", path=path).path == path


def test_file_without_path_is_rejected():
    message = r"ingest\.path is required when ingest\.dataset is 'file'"
    with pytest.raises(ValidationError, match=message):
        IngestConfig(dataset="file")


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValidationError) as err:
        IngestConfig(dataset="cifar")
    text = str(err.value)
    assert "dataset" in text
    for name in ("mnist5k", "digits", "mnist1d", "file"):
        assert name in text


def test_fractions_summing_too_high_are_rejected():
    message = r"val_fraction \+ ingest\.test_fraction = 0\.95.*below 0\.9"
    with pytest.raises(ValidationError, match=message):
        IngestConfig(val_fraction=0.45, test_fraction=0.5)


@pytest.mark.parametrize("field, value",
                         [("val_fraction", 0.0), ("test_fraction", 1.0), ("max_examples", 0)])
def test_out_of_range_values_name_the_key(field, value):
    with pytest.raises(ValidationError, match=field):
        IngestConfig(**{field: value})


@pytest.mark.parametrize("fields, message", [
    ({"dataset": "digits", "path": "x.npz"}, "only read when ingest.dataset is 'file'"),
    ({"dataset": "file", "path": "x.csv"}, r"expected a file ending in \.npz or \.parquet"),
    ({"dataset": "file", "path": "s3://bucket"}, "expected s3://bucket/key"),
    ({"dataset": "file", "path": "https://host/x.npz"}, "scheme 'https' is not supported"),
    ({"dataset": "file", "path": "s3://AKIA:secret@bucket/x.npz"}, "must not carry credentials"),
    ({"s3_endpoint_url": "http://key:secret@127.0.0.1:9000"}, "must not carry credentials"),
    ({"s3_endpoint_url": "127.0.0.1:9000"}, r"expected http\(s\)://host\[:port\]"),
    ({"aws_secret_access_key": "x"}, "Extra inputs are not permitted"),
])
def test_bad_combinations_are_rejected(fields, message):
    with pytest.raises(ValidationError, match=message):
        IngestConfig(**fields)
