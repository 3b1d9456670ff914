"""s3:// sources against a real S3-compatible server (moto_server) on loopback."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pytest

from slimforge.artifacts import ArtifactError
from slimforge.workspace import Workspace
from tasks.ingest import IngestConfig, run
from tasks.ingest.sources import SOURCES

BUCKET = "slimforge-data"
FAKE_SECRET = "fake-secret-for-moto"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server not answering at {url} after {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """http://127.0.0.1:<port> of a moto_server, with fake credentials in the environment."""
    exe = Path(sys.executable).parent / "moto_server"
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "fake-key-id")
        mp.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", str(log.name) + ".none")  # ignore any real AWS config
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(log.name) + ".none")
        try:
            _wait_until_up(url, proc)
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def _put(endpoint: str, key: str, body: bytes) -> str:
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=BUCKET, Key=key, Body=body)
    return f"s3://{BUCKET}/{key}"


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_run_ingests_an_npz_from_s3(s3_endpoint, arrays, tmp_path, make_params):
    uri = _put(s3_endpoint, "sets/small.npz", _npz_bytes(x=arrays[0], y=arrays[1]))
    ws = Workspace(tmp_path)
    metrics = run(make_params(dataset="file", path=uri, s3_endpoint_url=s3_endpoint), ws)
    assert metrics["examples_total"] == 60 and metrics["num_classes"] == 3
    meta_text = ws.artifact("ingest", "meta.json").read_text()
    meta = json.loads(meta_text)
    assert meta["source"] == uri and meta["parents"] == {}
    assert FAKE_SECRET not in meta_text and "fake-key-id" not in meta_text


def test_endpoint_falls_back_to_the_environment(s3_endpoint, arrays, monkeypatch, write_parquet):
    pixels = list(arrays[0].reshape(60, 16))
    local = write_parquet("p.parquet", {"label": arrays[1], "pixels": pixels})
    uri = _put(s3_endpoint, "sets/p.parquet", local.read_bytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    x, y = SOURCES["file"](IngestConfig(dataset="file", path=uri))
    assert x.shape == (60, 16) and np.array_equal(y, arrays[1])


def test_missing_key_names_the_uri(s3_endpoint, tmp_path, make_params):
    ws = Workspace(tmp_path / "ws")
    uri = f"s3://{BUCKET}/sets/absent.npz"
    with pytest.raises(ArtifactError, match=rf"{uri}: could not read from S3 at {s3_endpoint}"):
        run(make_params(dataset="file", path=uri, s3_endpoint_url=s3_endpoint), ws)
    assert not ws.root.exists()


def test_corrupt_object_names_the_uri(s3_endpoint):
    uri = _put(s3_endpoint, "sets/cut.npz", _npz_bytes(x=np.zeros((4, 2)), y=np.arange(4))[:100])
    cfg = IngestConfig(dataset="file", path=uri, s3_endpoint_url=s3_endpoint)
    with pytest.raises(ArtifactError, match=rf"{uri}: not a readable \.npz file"):
        SOURCES["file"](cfg)
