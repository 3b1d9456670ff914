"""The DVC remote on a real S3-compatible server (SeaweedFS `weed mini`) on loopback.

A git repository runs a tiny pipeline (digits, an MLP) up to train, pushes its artifacts, and a fresh
clone pulls them back: every output file has the same sha256. Credentials live only in
the environment; the secret appears in no config, file, log or message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest

from slimforge.remote import RemoteError, configure_remote, has_remote, push, scrub

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "slimforge-test"
ACCESS_KEY = "SFTEST" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(14))
SECRET = f"slimforge-test-secret-{secrets.token_hex(12)}"
OUTS = ("artifacts/ingest", "artifacts/select", "artifacts/train")  # what `dvc repro train` produces


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _admin_port() -> int:
    """A free port whose +10000 is free too: weed's maintenance worker dials the admin there."""
    for port in range(_free_ports(1)[0] % 30000 + 20000, 55000, 7):
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free admin port pair")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # 403 to an unsigned request: the S3 API is up
    except OSError:
        return False
    return True


def _start_weed(tmp: Path) -> tuple[subprocess.Popen, str]:
    (tmp / "s3.json").write_text('{"identities": [{"name": "t", "actions": ["Admin", "Read", "Write", "List"], '
                                 f'"credentials": [{{"accessKey": "{ACCESS_KEY}", "secretKey": "{SECRET}"}}]}}]}}')
    s3, master, mgrpc, vol, vgrpc, filer, fgrpc, s3grpc = _free_ports(8)
    cmd = [BIN / "weed", "mini", f"-dir={tmp}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
           f"-master.port={master}", f"-master.port.grpc={mgrpc}", f"-volume.port={vol}", f"-volume.port.grpc={vgrpc}",
           f"-filer.port={filer}", f"-filer.port.grpc={fgrpc}", f"-s3.port={s3}", f"-s3.port.grpc={s3grpc}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-admin.port={_admin_port()}",
           "-admin.ui=false", "-webdav=false", f"-s3.config={tmp / 's3.json'}", f"-s3.localSocket={tmp / 's3.sock'}"]
    proc = subprocess.Popen(cmd, stdout=(tmp / "weed.log").open("wb"), stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{s3}", time.monotonic() + 60
    while not _answers(url):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "weed.log").read_text()[-2000:]
        time.sleep(0.3)
    return proc, url


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(endpoint, weed log): SeaweedFS accepting only ACCESS_KEY/SECRET, which sit in the environment."""
    tmp = tmp_path_factory.mktemp("weed")
    proc, url = _start_weed(tmp)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "SLIMFORGE_WORKSPACE"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", str(tmp / "none"))  # ignore any real AWS config
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "none"))
        try:
            deadline = time.monotonic() + 30
            while True:  # the filer may lag the S3 listener; a fresh session: boto3.client caches credentials
                try:
                    boto3.session.Session().client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            yield url, tmp / "weed.log"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}


def _run(cmd, cwd, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], check=False, cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=300)
    assert not check or proc.returncode == 0, f"{cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _git(*args, cwd) -> None:
    _run(["git", "-c", "user.name=slimforge-test", "-c", "user.email=test@localhost", "-c", "commit.gpgsign=false",
          *args], cwd)


def _dvc_repo(root: Path, git: bool = False) -> Path:
    from dvc.repo import Repo

    root.mkdir()
    if git:
        _git("init", "-q", cwd=root)
    Repo.init(str(root), no_scm=not git).close()
    return root


def _tiny_params(root: Path) -> str:
    """params/tiny.yaml, made cheaper: random selection (no scoring runs) and one epoch."""
    import yaml

    from slimforge.config import dump_params, load_params

    params = yaml.safe_load((root / "params/tiny.yaml").read_text())
    params["select"] = {"method": "random", "keep_fraction": 0.8, "seed": 0}
    params["train"]["epochs"] = 1
    (root / "params/remote-test.yaml").write_text(yaml.safe_dump(params))
    return dump_params(load_params(root / "params/remote-test.yaml"))


def _sha256s(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for out in OUTS for p in sorted((root / out).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def roundtrip(store, tmp_path_factory):
    """origin ran a tiny pipeline to train and pushed; clone is a fresh `git clone` that pulled."""
    endpoint, _ = store
    base = tmp_path_factory.mktemp("remote")
    origin = _dvc_repo(base / "origin", git=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, origin / name)
    for pkg in ("slimforge", "tasks", "kernels", "params"):  # dvc.yaml's code deps
        shutil.copytree(REPO / pkg, origin / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (origin / "params.yaml").write_text(_tiny_params(origin))
    _run([BIN / "dvc", "repro", "-q", "train"], origin)
    configure_remote(origin, f"s3://{BUCKET}/dvc", endpoint)  # .dvc/config: shared by every checkout
    _git("add", "-A", cwd=origin)
    _git("commit", "-q", "-m", "tiny run", cwd=origin)
    pushed = _run([BIN / "slimforge", "push"], origin)
    _git("clone", "-q", str(origin), str(base / "clone"), cwd=base)
    clone = base / "clone"
    assert not (clone / "artifacts/train").exists()
    pulled = _run([BIN / "slimforge", "pull"], clone)
    return origin, clone, pushed, pulled


def test_a_fresh_clone_pulls_identical_artifacts(roundtrip):
    origin, clone, pushed, pulled = roundtrip
    want, got = _sha256s(origin), _sha256s(clone)
    assert len(want) >= 7 and {"artifacts/train/model.safetensors", "artifacts/ingest/meta.json"} <= set(want)
    assert got == want
    objects = len(want) + len(OUTS)  # every file, plus one .dir listing per output directory
    assert f"pushed {objects} objects to remote 'storage'" in pushed.stdout, pushed.stdout
    assert f"pulled {objects} objects from remote 'storage'" in pulled.stdout, pulled.stdout


def test_the_secret_is_nowhere(roundtrip, store):
    origin, clone, pushed, pulled = roundtrip
    for text in (pushed.stdout, pushed.stderr, pulled.stdout, pulled.stderr):
        assert SECRET not in text and ACCESS_KEY not in text
    for repo in (origin, clone):
        assert "endpointurl" in (repo / ".dvc/config").read_text()
        assert not (repo / ".dvc/config.local").exists() or SECRET not in (repo / ".dvc/config.local").read_text()
        assert list(repo.rglob("meta.json"))
        for path in repo.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert SECRET.encode() not in data and ACCESS_KEY.encode() not in data, path


def test_a_second_push_sends_nothing_and_logs_no_secret(roundtrip, caplog, capfd):
    origin, *_ = roundtrip
    with caplog.at_level(logging.DEBUG):
        summary = push(origin)
    assert summary.files == 0 and summary.remote == "storage"
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, str(summary)):
        assert SECRET not in text and ACCESS_KEY not in text


def test_a_wrong_secret_is_one_line_without_the_secret(roundtrip, monkeypatch):
    origin, *_ = roundtrip
    wrong = SECRET[::-1]
    proc = _run([BIN / "slimforge", "push"], origin, env={**_env(), "AWS_SECRET_ACCESS_KEY": wrong}, check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "SignatureDoesNotMatch; check AWS_SECRET_ACCESS_KEY" in proc.stderr
    for text in (proc.stdout, proc.stderr):
        assert wrong not in text and SECRET not in text
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(RemoteError, match="SignatureDoesNotMatch") as info:
        push(origin)
    assert wrong not in str(info.value) and "\n" not in str(info.value)


def test_a_secret_stored_in_the_dvc_config_is_refused(roundtrip, tmp_path):
    origin, *_ = roundtrip
    repo = tmp_path / "copy"
    shutil.copytree(origin / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    _run([BIN / "dvc", "remote", "modify", "--local", "storage", "secret_access_key", SECRET], repo)
    assert not has_remote(repo)
    with pytest.raises(RemoteError, match="stores secret_access_key in the DVC config") as info:
        push(repo)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url, endpoint, options", ids=["userinfo", "query", "endpoint", "option", "in-path"], argvalues=[
    (f"s3://{ACCESS_KEY}:{SECRET}@{BUCKET}/dvc", None, None),
    (f"s3://{BUCKET}/dvc?aws_secret_access_key={SECRET}", None, None),
    (f"s3://{BUCKET}/dvc", f"http://{ACCESS_KEY}:{SECRET}@127.0.0.1:9000", None),
    (f"s3://{BUCKET}/dvc", None, {"secret_access_key": SECRET}),
    (f"s3://{BUCKET}/{SECRET}", None, None),
])
def test_configure_refuses_credentials_and_writes_nothing(tmp_path, monkeypatch, url, endpoint, options):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    repo = _dvc_repo(tmp_path / "r")
    before = (repo / ".dvc/config").read_text()
    with pytest.raises(RemoteError, match="credential") as info:
        configure_remote(repo, url, endpoint, options=options)
    assert SECRET not in str(info.value) and "\n" not in str(info.value)
    assert (repo / ".dvc/config").read_text() == before and not (repo / ".dvc/config.local").exists()
    assert not has_remote(repo)


def test_cli_remote_add_refuses_a_url_with_credentials_in_one_line(tmp_path):
    repo = _dvc_repo(tmp_path / "r")
    url = f"s3://{ACCESS_KEY}:{SECRET}@{BUCKET}/dvc"
    proc = _run([BIN / "slimforge", "remote", "add", url], repo, env={**_env(), "AWS_SECRET_ACCESS_KEY": SECRET},
                check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: remote URL 's3://***@slimforge-test/dvc' carries credentials")
    assert SECRET not in proc.stderr + proc.stdout and ACCESS_KEY not in proc.stderr + proc.stdout
    ok = _run([BIN / "slimforge", "remote", "add", f"s3://{BUCKET}/dvc", "--endpoint-url", "http://127.0.0.1:9",
               "--local"], repo)
    assert ok.stdout == f"remote 'storage': s3://{BUCKET}/dvc at http://127.0.0.1:9, the default\n"
    assert has_remote(repo) and "endpointurl = http://127.0.0.1:9" in (repo / ".dvc/config.local").read_text()


def test_configure_writes_the_default_remote_at_the_chosen_level(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:8333")
    repo = _dvc_repo(tmp_path / "r")
    assert not has_remote(repo) and not has_remote(tmp_path)
    configure_remote(repo, "s3://b/prefix", level="local")
    local = (repo / ".dvc/config.local").read_text()
    assert "remote = storage" in local and "endpointurl = http://127.0.0.1:8333" in local
    assert "s3://b/prefix" not in (repo / ".dvc/config").read_text()
    assert has_remote(repo)
    with pytest.raises(RemoteError, match="not of the form s3://bucket/prefix"):
        configure_remote(repo, "https://b/prefix")


def test_scrub_masks_keys_from_the_environment_and_common_shapes(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    text = scrub(f"failed with {SECRET}: aws_access_key_id=AKIAIOSFODNN7EXAMPLE secret_key: 'abc/def' "
                 "at https://user:pass@host/x?X-Amz-Signature=deadbeef&part=1")
    assert SECRET not in text and "AKIAIOSFODNN7EXAMPLE" not in text and "abc/def" not in text
    assert "pass@" not in text and "deadbeef" not in text and "part=1" in text
    assert scrub("pushed 3 objects to s3://bucket/dvc") == "pushed 3 objects to s3://bucket/dvc"
