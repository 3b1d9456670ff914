"""What SECURITY.md promises about exposure: loopback binds, no secret in any output, no path
escaping its root, only file and s3 locations."""

from __future__ import annotations

import ast
import json
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from slimforge.artifacts import ArtifactError

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# ---------------------------------------------------------------------------------------------
# 3. Servers listen on loopback

SERVE = REPO / "infra" / "serve.sh"


def _serve_command(marker: str) -> str:
    """The (backslash-joined) command line of serve.sh that contains ``marker``."""
    text = SERVE.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if marker in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, f"expected one command with {marker!r} in {SERVE}, found {lines}"
    return lines[0]


def test_serve_binds_every_listener_to_loopback():
    text = SERVE.read_text()
    assert re.search(r"^HOST=127\.0\.0\.1$", text, re.MULTILINE), "serve.sh: HOST is not 127.0.0.1"
    assert "0.0.0.0" not in text and "::" not in text.replace("::1", "")
    server = _serve_command("prefect\" server start")
    assert "--host $HOST" in server, server
    weed = _serve_command('"$BIN/weed" mini')
    assert "-ip=$HOST" in weed and "-ip.bind=$HOST" in weed, weed
    worker = _serve_command("worker start --pool")
    # a Prefect worker opens no port unless asked for its health-check web server (which would
    # listen on PREFECT_WORKER_WEBSERVER_HOST, 0.0.0.0 by default)
    assert "--with-healthcheck" not in worker or "PREFECT_WORKER_WEBSERVER_HOST=127.0.0.1" in worker, worker
    assert re.findall(r"http://\$HOST", text), "serve.sh's URLs should name $HOST"


# server command lines in the test suite: executable -> the argument that binds it to loopback
SERVER_BINDS = {"moto_server": '"-H", "127.0.0.1"', "weed": '"-ip.bind=127.0.0.1"'}


def test_test_servers_bind_loopback():
    """Every moto_server / weed command line and every socket bind in the tests names 127.0.0.1."""
    servers = binds = 0
    for f in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.List) and node.elts:
                head, line = ast.unparse(node.elts[0]), ast.unparse(node)
                for exe, bind in SERVER_BINDS.items():
                    if re.search(rf"['\"]{exe}['\"]", head):  # the executable itself
                        servers += 1
                        assert bind.replace('"', "'") in line, f"{f}:{node.lineno}: {exe} not bound to loopback"
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "bind"
                    and node.args and isinstance(node.args[0], ast.Tuple)):
                binds += 1
                host = ast.unparse(node.args[0].elts[0])
                assert host == "'127.0.0.1'", f"{f}:{node.lineno}: binds {host}, not '127.0.0.1'"
    assert servers >= 2 and binds >= 2, f"found {servers} server commands and {binds} binds; has the suite changed?"


def test_dask_local_cluster_binds_loopback():
    from flows.runners import task_runner
    from slimforge.config import OrchestrateConfig

    runner = task_runner(OrchestrateConfig(task_runner="dask", n_workers=1))
    assert runner.cluster_kwargs["host"] == "127.0.0.1"
    assert runner.cluster_kwargs["dashboard_address"].startswith("127.0.0.1:")


def test_a_started_local_cluster_listens_on_loopback_only():
    distributed = pytest.importorskip("distributed")
    from flows.runners import task_runner
    from slimforge.config import OrchestrateConfig

    kwargs = dict(task_runner(OrchestrateConfig(task_runner="dask", n_workers=1)).cluster_kwargs)
    # the same listeners in this process, without spawning a worker process (tcp, not inproc)
    kwargs.update(processes=False, protocol="tcp://")
    with distributed.LocalCluster(**kwargs) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:"), cluster.scheduler_address
        assert "127.0.0.1" in cluster.dashboard_link, cluster.dashboard_link
        workers = list(cluster.scheduler_info["workers"])
        assert workers and all(w.startswith("tcp://127.0.0.1:") for w in workers), workers


# ---------------------------------------------------------------------------------------------
# 4. A secret in the environment appears in no output


def _files_containing(root: Path, needles: list[str]) -> list[str]:
    hits = []
    raw = [n.encode() for n in needles]
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            hits += [f"{f}: {n.decode()[:6]}..." for n in raw if n in data]
    return hits


def test_the_grep_finds_a_planted_secret(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "meta.json").write_text('{"token": "XYZ-secret-123"}')
    assert len(_files_containing(tmp_path, ["XYZ-secret-123"])) == 1


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, make_workspace, cli_env):
    """The tiny pipeline run with credentials and a token in its environment, plus a refused
    remote URL that carries the secret: (secrets, workspace, prefect home, captured output)."""
    tmp = tmp_path_factory.mktemp("secret")
    ws = make_workspace(tmp / "ws")
    values = {"AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
              "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
              "SLIMFORGE_TEST_TOKEN": "sftok-" + secrets.token_hex(16)}
    env = {**cli_env(tmp), **values}
    started = time.monotonic()
    run = subprocess.run([str(BIN / "slimforge"), "run", "--params", "params/tiny.yaml"], cwd=ws, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = subprocess.run([str(BIN / "slimforge"), "report"], cwd=ws, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    leaky = f"http://{values['AWS_ACCESS_KEY_ID']}:{values['AWS_SECRET_ACCESS_KEY']}@127.0.0.1:9/"
    refused = subprocess.run([str(BIN / "slimforge"), "remote", "add", "s3://bucket/dvc", "--endpoint-url", leaky],
                             cwd=ws, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert report.returncode == 0, report.stdout[-2000:] + report.stderr[-2000:]
    assert refused.returncode != 0 and "***" in refused.stderr + refused.stdout, \
        "a URL carrying credentials must be refused, the credentials masked"
    output = "".join(p.stdout + p.stderr for p in (run, report, refused))
    return values, ws, tmp / "prefect-home", output, time.monotonic() - started


@pytest.mark.slow
def test_no_secret_in_any_output(secret_run):
    values, ws, prefect_home, output, _ = secret_run
    needles = list(values.values())
    assert (ws / "dvc.lock").is_file() and list((ws / "artifacts").rglob("meta.json"))
    assert list((ws / "metrics").glob("*.json")) and list((ws / "reports").iterdir())
    leaked = _files_containing(ws, needles) + _files_containing(prefect_home, needles)
    leaked += [f"captured output: {name}" for name, v in values.items() if v in output]
    assert not leaked, "secret values written to:\n" + "\n".join(leaked)


@pytest.mark.slow
def test_the_secret_run_took_a_bounded_time(secret_run):
    assert secret_run[4] < 300, f"tiny run + report took {secret_run[4]:.0f} s"


# ---------------------------------------------------------------------------------------------
# 5. Paths listed in a manifest or found in an image folder stay inside their root


@pytest.fixture
def dataset_root(tmp_path):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "0001.png").write_bytes(b"png")
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the dataset")
    (root / "cat" / "link.png").symlink_to(outside)
    (root / "cat" / "inner.png").symlink_to(root / "cat" / "0001.png")
    return root


@pytest.mark.parametrize("entry", ["../../etc/passwd", "cat/../../secret.txt", "/etc/passwd", "cat/link.png", ""])
def test_an_entry_escaping_its_root_is_refused(dataset_root, entry):
    from slimforge.data import resolve_inside

    source = dataset_root / "manifest.csv"
    with pytest.raises(ArtifactError) as info:
        resolve_inside(dataset_root, entry, source)
    message = str(info.value)
    assert "\n" not in message and str(source) in message and repr(entry) in message, message


@pytest.mark.parametrize("entry", ["cat/0001.png", "cat/inner.png", "./cat/0001.png"])
def test_an_entry_inside_its_root_resolves(dataset_root, entry):
    from slimforge.data import resolve_inside

    assert resolve_inside(dataset_root, entry, "manifest.csv") == (dataset_root / "cat" / "0001.png").resolve()


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE"])
def test_a_sharded_index_cannot_name_a_shard_outside_its_folder(tmp_path, shard):
    from tasks.merge.checkpoints import open_checkpoint

    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    folder = tmp_path / "ckpt"
    folder.mkdir()
    entry = str(outside) if shard == "ABSOLUTE" else shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": entry}}))
    with pytest.raises(ArtifactError, match=re.escape(repr(entry))):
        open_checkpoint(folder)


# ---------------------------------------------------------------------------------------------
# 6. Only plain paths (file) and s3:// locations

BAD_LOCATIONS = ["http://host/x.npz", "https://host/x.npz", "ftp://host/x.npz", "gs://bucket/x.npz",
                 "file://host/x.npz", "file:///tmp/x.npz", "data:,x.npz", "hdfs://nn/x.npz"]


@pytest.mark.parametrize("path", BAD_LOCATIONS)
def test_ingest_path_accepts_only_file_and_s3(path):
    from tasks.ingest.config import IngestConfig

    with pytest.raises(ValidationError) as info:
        IngestConfig(dataset="file", path=path)
    assert "plain local path (file) or s3://bucket/key (s3)" in str(info.value)


@pytest.mark.parametrize("path", ["data/x.npz", "/abs/x.parquet", "s3://bucket/dir/x.npz"])
def test_ingest_path_accepts_plain_paths_and_s3(path):
    from tasks.ingest.config import IngestConfig

    assert IngestConfig(dataset="file", path=path).path == path


@pytest.mark.parametrize("url", ["http://host/dvc", "https://host/dvc", "gs://bucket/dvc", "file:///tmp/dvc",
                                 "/tmp/dvc", "ftp://host/dvc", "azure://c/dvc"])
def test_dvc_remote_accepts_only_s3(url):
    from slimforge.remote import RemoteError, check_url

    with pytest.raises(RemoteError, match="s3://bucket/prefix"):
        check_url(url)


@pytest.mark.parametrize("url", [u.replace("x.npz", "model.safetensors") for u in [*BAD_LOCATIONS, "s3://b/x.npz"]])
def test_checkpoint_paths_accept_plain_paths_only(url):
    """merge checkpoints and train.init pretrained read local files only: a URL is refused by the
    params schema, naming the valid form, before anything is opened."""
    from tasks.merge.checkpoints import CheckpointInputs
    from tasks.train.init_config import PretrainedConfig

    for build in (lambda: CheckpointInputs(base=url, models=["m.safetensors"]),
                  lambda: CheckpointInputs(base="b.safetensors", models=[url]),
                  lambda: PretrainedConfig(path=url)):
        with pytest.raises(ValidationError, match="is not a local path; valid: a plain path"):
            build()
    assert PretrainedConfig(path="models/model.safetensors").path == "models/model.safetensors"
