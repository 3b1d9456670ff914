"""Object-store faults: a real S3 server (moto_server) on loopback behind a fault-injecting proxy.

The proxy answers 503, cuts connections mid-answer, stalls or slows answers; the server is
stopped during a push and started again; a pushed object is corrupted in the bucket. Each time
the push or pull either recovers by retrying or fails with one clear line in bounded time, a
later push completes, a fresh checkout pulls identical bytes, and no cache holds a bad object.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest

from slimforge.remote import configure_remote

ERROR_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
              b"<Message>injected by the test proxy</Message></Error>")
CUT_AFTER = 300  # bytes of an answer a "cut" connection forwards: inside the headers or the body


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults: list[str] = []
        self.delay = 0.0
        self.injected: Counter = Counter()
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def inject(self, fault: str, times: int = 1) -> None:
        with self._lock:
            self.faults += [fault] * times

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
        self.delay = 0.0

    def close(self) -> None:
        self._stop.set()
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                fault = self.faults.pop(0) if self.faults else None
                self.connections += 1
                if fault == "ok":
                    fault = None  # a placeholder: this connection passes
                elif fault:
                    self.injected[fault] += 1
            threading.Thread(target=self._handle, args=(conn, fault), daemon=True).start()

    def _handle(self, conn: socket.socket, fault: str | None) -> None:
        try:
            with contextlib.suppress(OSError):  # the client hung up: nothing left to answer
                if fault == "503":
                    _read_request(conn)
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(ERROR_BODY), ERROR_BODY))
                elif fault == "stall":
                    _read_request(conn)
                    self._stop.wait(60)
                else:
                    self._forward(conn, limit=CUT_AFTER if fault == "cut" else None)
        finally:
            _close(conn)

    def _forward(self, conn: socket.socket, limit: int | None) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            return  # the server is down: the client sees its connection dropped
        upstream.settimeout(None)
        threading.Thread(target=_pipe, args=(conn, upstream), daemon=True).start()
        sent = 0
        try:
            with contextlib.suppress(OSError):  # either side closed: the relay ends
                while data := upstream.recv(65536):
                    if self.delay:
                        time.sleep(self.delay)
                    if limit is not None and sent + len(data) >= limit:
                        conn.sendall(data[:limit - sent])
                        break
                    conn.sendall(data)
                    sent += len(data)
        finally:
            _close(upstream)


def _close(sock: socket.socket) -> None:
    """Shut down first: a plain close leaves the connection open while another thread reads it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _read_request(conn: socket.socket) -> None:
    """Read one request's head and, unless the client waits for 100-continue, its body."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
    headers = {k.strip().lower(): v.strip().lower() for k, v in headers.items()}
    if headers.get(b"expect") == b"100-continue":
        return
    if b"content-length" in headers:
        want = int(headers[b"content-length"])
        while len(body) < want and (chunk := conn.recv(65536)):
            body += chunk
    elif headers.get(b"transfer-encoding") == b"chunked":
        while b"\r\n0\r\n" not in body and not body.startswith(b"0\r\n") and (chunk := conn.recv(65536)):
            body += chunk


BIN = Path(sys.executable).parent
BUCKET = "slimforge-faults"
TRACKED = ("data", "model.bin")  # what `dvc add` tracks in the origin workspace
CREDS = {"AWS_ACCESS_KEY_ID": "faults-test-key", "AWS_SECRET_ACCESS_KEY": "faults-test-secret",
         "AWS_DEFAULT_REGION": "us-east-1"}
RECORD: list[tuple[str, int, str, int]] = []  # (fault, injected, recovered, artifacts lost)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    """moto_server on a fixed port (so that it can be stopped and started again), a proxy in front."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, _free_port()
        self.proc: subprocess.Popen | None = None
        self.start()
        self.proxy = FaultProxy(self.port)

    def client(self):
        return boto3.session.Session(**{k.lower(): v for k, v in CREDS.items() if k != "AWS_DEFAULT_REGION"},
                                     region_name="us-east-1").client("s3", endpoint_url=f"http://127.0.0.1:{self.port}")

    def start(self) -> None:
        log = (self.tmp / "moto.log").open("ab")
        self.proc = subprocess.Popen([BIN / "moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().create_bucket(Bucket=BUCKET)
                return
            except Exception:
                assert self.proc.poll() is None and time.monotonic() < deadline, (self.tmp / "moto.log").read_text()
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def empty(self) -> None:
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=BUCKET, Key=obj["Key"])

    def keys(self) -> list[str]:
        return [o["Key"] for o in self.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
            mp.delenv(var, raising=False)
        for var, value in CREDS.items():
            mp.setenv(var, value)
        tmp = tmp_path_factory.mktemp("moto")
        mp.setenv("AWS_CONFIG_FILE", str(tmp / "none"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "none"))
        store = Store(tmp)
        try:
            yield store
        finally:
            store.proxy.close()
            store.stop()


@pytest.fixture(scope="module")
def origin(store, tmp_path_factory):
    """A DVC workspace tracking a directory of 6 files and one 1 MiB file, its remote behind the proxy."""
    root = tmp_path_factory.mktemp("faults") / "origin"
    root.mkdir()
    _run([BIN / "dvc", "init", "--no-scm", "-q"], root)
    rng = __import__("random").Random(0)
    (root / "data").mkdir()
    for i in range(6):
        (root / "data" / f"part-{i}.bin").write_bytes(rng.randbytes(96 * 1024))
    (root / "model.bin").write_bytes(rng.randbytes(1024 * 1024))
    _run([BIN / "dvc", "add", "-q", *TRACKED], root)
    configure_remote(root, f"s3://{BUCKET}/dvc", store.proxy.url, options={"read_timeout": "2", "connect_timeout": "2"})
    return root


@pytest.fixture(autouse=True)
def _fresh(store):
    store.proxy.clear()
    store.empty()
    yield
    store.proxy.clear()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    lines = [f"{'fault':<34} {'injected':>8}  {'recovered':<40} {'lost':>4}"]
    lines += [f"{f:<34} {n:>8}  {r:<40} {lost:>4}" for f, n, r, lost in RECORD]
    print("\nobject-store faults:\n" + "\n".join(lines))


def _run(cmd, cwd, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def _env(**extra) -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", **extra}


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, f"{proc.args}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def _clone(origin: Path, dest: Path) -> Path:
    """A fresh checkout: the DVC config and .dvc files, no cache, no data."""
    shutil.copytree(origin / ".dvc", dest / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
    for path in (p for p in origin.glob("*.dvc") if p.is_file()):
        shutil.copy(path, dest / path.name)
    return dest


def _sha256s(root: Path) -> dict[str, str]:
    files = [p for name in TRACKED for p in ([root / name] if (root / name).is_file() else (root / name).rglob("*"))]
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)
            if p.is_file()}


def _bad_cache_objects(root: Path) -> list[str]:
    """Cache files whose md5 differs from their name (DVC names each object by its md5)."""
    bad = []
    for path in (root / ".dvc/cache/files/md5").rglob("*"):
        if path.is_file() and not path.name.endswith(".unpacked"):
            oid = path.parent.name + path.name.removesuffix(".dir")
            if hashlib.md5(path.read_bytes()).hexdigest() != oid:
                bad.append(path.relative_to(root).as_posix())
    return bad


def test_transient_503s_and_cut_connections_are_retried(store, origin, tmp_path):
    for fault in ("503", "cut", "ok", "503", "503", "cut", "cut"):  # the access check, then DVC's requests
        store.proxy.inject(fault)
    start = time.monotonic()
    pushed = _ok(_run([BIN / "slimforge", "push"], origin))
    seconds = time.monotonic() - start
    assert store.proxy.injected == Counter({"503": 3, "cut": 3}) and "pushed 8 objects" in pushed.stdout, pushed.stdout
    clone = _clone(origin, tmp_path / "clone")
    for fault in ("503", "ok", "503", "cut", "cut"):  # cut mid-answer: headers or body on the way back
        store.proxy.inject(fault)
    _ok(_run([BIN / "slimforge", "pull"], clone))
    assert store.proxy.injected == Counter({"503": 5, "cut": 5})
    assert _sha256s(clone) == _sha256s(origin) and len(_sha256s(origin)) == 7
    assert not _bad_cache_objects(clone) and not _bad_cache_objects(origin)
    RECORD.append(("503 then cut, push and pull", 10, f"yes, retried (push {seconds:.1f} s)", 0))


def test_a_corrupted_object_is_refused_on_pull(store, origin, tmp_path):
    _ok(_run([BIN / "slimforge", "push"], origin))
    client = store.client()
    want = hashlib.md5((origin / "data/part-2.bin").read_bytes()).hexdigest()
    key = f"dvc/files/md5/{want[:2]}/{want[2:]}"
    assert key in store.keys()
    client.put_object(Bucket=BUCKET, Key=key, Body=b"half-written" * 100)
    clone = _clone(origin, tmp_path / "clone")
    proc = _run([BIN / "slimforge", "pull"], clone)
    error = _one_line_error(proc)
    assert "data not restored" in error and "corrupt (md5 mismatch, discarded)" in error, error
    assert not (clone / "data").exists() and not _bad_cache_objects(clone)  # the bad object was never kept
    assert _sha256s(clone) == {"model.bin": _sha256s(origin)["model.bin"]}
    RECORD.append(("object corrupted in the bucket", 1, "refused on pull, named, nothing kept", 0))


def test_the_server_stopped_during_a_push_is_one_line_then_a_push_completes(store, origin, tmp_path):
    store.proxy.delay = 0.05  # slower answers: the push is under way when the server stops
    before = store.proxy.connections
    push = subprocess.Popen([BIN / "slimforge", "push"], cwd=origin, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while store.proxy.connections < before + 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    store.stop()
    start = time.monotonic()
    out, err = push.communicate(timeout=120)
    seconds = time.monotonic() - start
    _one_line_error(subprocess.CompletedProcess(push.args, push.returncode, out, err))
    assert seconds < 60 and "dvc push failed" in err, err
    assert not _bad_cache_objects(origin)
    store.proxy.delay = 0.0
    store.start()  # moto keeps nothing: the bucket comes back empty
    assert "pushed 8 objects" in _ok(_run([BIN / "slimforge", "push"], origin)).stdout
    clone = _clone(origin, tmp_path / "clone")
    _ok(_run([BIN / "slimforge", "pull"], clone))
    assert _sha256s(clone) == _sha256s(origin) and not _bad_cache_objects(clone)
    RECORD.append(("server stopped mid-push", 1, f"error in {seconds:.1f} s, push again ok", 0))


def test_a_stalled_server_times_out_with_one_line(store, origin):
    store.proxy.inject("stall", 50)
    start = time.monotonic()
    proc = _run([BIN / "slimforge", "push"], origin, env=_env(AWS_MAX_ATTEMPTS="2"))
    seconds = time.monotonic() - start
    error = _one_line_error(proc)
    assert "no answer within read_timeout=2 s" in error and seconds < 30, (seconds, error)
    store.proxy.clear()
    assert "pushed 8 objects" in _ok(_run([BIN / "slimforge", "push"], origin)).stdout
    RECORD.append(("stalled answers (read timeout)", store.proxy.injected["stall"],
                   f"error in {seconds:.1f} s, push again ok", 0))
