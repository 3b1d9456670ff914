"""`infra/serve.sh start|stop` (make serve / make serve-stop) on free loopback ports.

The stack keeps its state in a temporary SLIMFORGE_SERVE_DIR and configures the DVC remote
of a temporary workspace, so the repository's .serve/ and .dvc/ are untouched. Deployment
registration (infra/deploy.py) is skipped here: tests/infra/test_deployments.py covers it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

import boto3
import botocore.exceptions
import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "serve.sh"
COMPONENTS = ("prefect-server", "weed", "worker")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    """No listener on the port (SO_REUSEADDR: connections left in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _serve(action: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def _json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _credentials(path: Path) -> dict[str, str]:
    pairs = (line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines()
             if line.startswith("export "))
    return dict(pairs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(env, serve dir, workspace, ports, start output, pids of every process the stack runs)."""
    from dvc.repo import Repo

    tmp = tmp_path_factory.mktemp("serve")
    workspace = tmp / "workspace"
    workspace.mkdir()
    Repo.init(str(workspace), no_scm=True).close()
    ports = {"prefect": _free_port(), "s3": _free_port()}
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "PREFECT_")) and k != "SLIMFORGE_WORKSPACE"}
    env.update(SLIMFORGE_SERVE_DIR=str(tmp / "serve"), SLIMFORGE_WORKSPACE=str(workspace),
               SLIMFORGE_PREFECT_PORT=str(ports["prefect"]), SLIMFORGE_S3_PORT=str(ports["s3"]),
               SLIMFORGE_SERVE_DEPLOY="0", AWS_CONFIG_FILE=str(tmp / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp / "none"))
    try:
        started = _serve("start", env)
        assert started.returncode == 0, started.stdout + started.stderr
        serve_dir = tmp / "serve"
        pids = {int((serve_dir / f"{name}.pid").read_text()) for name in COMPONENTS}
        for pid in list(pids):
            pids |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        yield env, serve_dir, workspace, ports, started, pids
    finally:
        stopped = _serve("stop", env)
        assert stopped.returncode == 0, stopped.stderr


def test_prefect_answers_with_a_process_pool_and_an_online_worker(stack):
    env, serve_dir, _, ports, started, _ = stack
    api = f"http://127.0.0.1:{ports['prefect']}/api"
    assert _json(f"{api}/health") is True
    assert _json(f"{api}/work_pools/slimforge-process")["type"] == "process"
    workers = _json(f"{api}/work_pools/slimforge-process/workers/filter", {})
    assert any(w["status"] == "ONLINE" for w in workers), workers
    assert f"Prefect UI   http://127.0.0.1:{ports['prefect']}" in started.stdout
    assert f"source {serve_dir / 'credentials'}" in started.stdout
    again = _serve("start", env)
    assert again.returncode == 0 and "already running" in again.stdout


def test_s3_takes_the_generated_credentials_and_refuses_a_wrong_secret(stack):
    _, serve_dir, workspace, ports, started, _ = stack
    creds_file = serve_dir / "credentials"
    assert creds_file.stat().st_mode & 0o777 == 0o600 and (serve_dir / "s3.json").stat().st_mode & 0o777 == 0o600
    creds = _credentials(creds_file)
    key, secret = creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"]
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    assert creds["AWS_ENDPOINT_URL"] == endpoint

    def client(secret_key: str):
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                            aws_secret_access_key=secret_key)

    client(secret).put_object(Bucket="slimforge", Key="probe/hello.txt", Body=b"hello")
    assert client(secret).get_object(Bucket="slimforge", Key="probe/hello.txt")["Body"].read() == b"hello"
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        client(secret + "x").get_object(Bucket="slimforge", Key="probe/hello.txt")
    local = (workspace / ".dvc/config.local").read_text()
    assert "url = s3://slimforge/dvc" in local and f"endpointurl = {endpoint}" in local
    for path in [workspace / ".dvc/config", workspace / ".dvc/config.local", *serve_dir.glob("*.log")]:
        assert secret not in path.read_text(), path
    assert secret not in started.stdout + started.stderr


def test_stop_ends_every_process_it_started_and_frees_the_ports(stack):
    env, serve_dir, _, ports, _, pids = stack
    weed = {k: int(v) for k, v in (line.split("=") for line in (serve_dir / "ports.env").read_text().split())}
    weed_ports = [*weed.values(), weed["WEED_ADMIN"] + 10000]  # the admin's gRPC sits 10000 above it
    stopped = _serve("stop", env)
    assert stopped.returncode == 0, stopped.stderr
    assert [line.split()[2] for line in stopped.stdout.splitlines()] == ["worker", "weed", "prefect-server"]
    left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, [psutil.Process(p).cmdline() for p in left]
    assert not list(serve_dir.glob("*.pid"))
    busy = [p for p in [ports["prefect"], ports["s3"], *weed_ports] if not _port_free(p)]
    assert not busy
    assert "stopped" not in _serve("stop", env).stdout  # nothing left to stop
