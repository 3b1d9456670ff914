"""IngestConfig: which dataset to bring in and how to split it (params.yaml ``ingest:``).

Credentials are never part of the config: S3 access uses boto3's own chain
(environment variables, AWS profile), so params files can be committed safely.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

DATASETS = ("mnist5k", "digits", "mnist1d", "file")
FILE_SUFFIXES = (".npz", ".parquet")
VALID_LOCATIONS = "a plain local path (file) or s3://bucket/key (s3)"  # the only schemes read
MAX_HELD_OUT = 0.9  # val + test must leave at least 10% of the data for training


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: Literal["mnist5k", "digits", "mnist1d", "file"] = Field(
        "mnist5k", description="built-in set, or 'file' for user data at `path`")
    path: str | None = Field(
        None, description="dataset 'file' only: local .npz/.parquet path (relative to the "
                          "workspace root) or s3://bucket/key of either")
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000; default: "
                          "env AWS_ENDPOINT_URL, else AWS itself")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of each class for validation")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of each class for test")
    seed: int = Field(0, description="seeds the subset and the split")
    max_examples: int | None = Field(
        None, ge=1, description="keep a seeded stratified subset of this many examples first")

    @model_validator(mode="after")
    def _check(self) -> IngestConfig:
        if self.dataset == "file":
            _check_path(self.path)
        elif self.path is not None:
            raise ValueError(f"ingest.path is only read when ingest.dataset is 'file', "
                             f"but dataset is {self.dataset!r}; remove path or set dataset: file")
        if self.s3_endpoint_url is not None:
            _check_endpoint(self.s3_endpoint_url)
        held_out = self.val_fraction + self.test_fraction
        if held_out >= MAX_HELD_OUT:
            raise ValueError(f"ingest.val_fraction + ingest.test_fraction = {held_out:g}; "
                             f"expected a sum below {MAX_HELD_OUT:g} so training keeps data")
        return self


def _check_path(path: str | None) -> None:
    if not path:
        raise ValueError("ingest.path is required when ingest.dataset is 'file': "
                         "a local .npz/.parquet path or an s3://bucket/key URI")
    parts = urlsplit(path)
    if parts.scheme not in ("", "s3"):  # http:, ftp:, gs:, file:, data:, ...
        raise ValueError(f"ingest.path {path!r}: scheme {parts.scheme!r} is not supported; "
                         f"valid: {VALID_LOCATIONS}")
    if parts.scheme == "s3":
        if not parts.hostname or not parts.path.strip("/"):
            raise ValueError(f"ingest.path {path!r}: expected s3://bucket/key")
        if parts.username or parts.password or parts.query:
            raise ValueError("ingest.path: an s3:// URI must not carry credentials or a query; "
                             "credentials come from the environment or an AWS profile")
    elif "://" in path:  # e.g. "//host/x.npz", which urlsplit reads as a host without a scheme
        raise ValueError(f"ingest.path {path!r} is not a plain path; valid: {VALID_LOCATIONS}")
    if not path.lower().endswith(FILE_SUFFIXES):
        raise ValueError(f"ingest.path {path!r}: expected a file ending in "
                         f"{' or '.join(FILE_SUFFIXES)}")


def _check_endpoint(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"ingest.s3_endpoint_url {url!r}: expected http(s)://host[:port]")
    if parts.username or parts.password:
        raise ValueError("ingest.s3_endpoint_url must not carry credentials; "
                         "they come from the environment or an AWS profile")
