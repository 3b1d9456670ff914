"""The DVC remote on S3: configure it, push and pull artifacts, keep secrets out of messages.

Credentials come only from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN) or an AWS profile; the remote's config holds the URL, the endpoint and
at most a profile name. Every message this module logs or raises passes through `scrub`.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

DEFAULT_NAME = "storage"
# DVC's s3 remote options that would put a credential into a config file
CREDENTIAL_OPTIONS = ("access_key_id", "secret_access_key", "session_token", "sse_customer_key")
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_SECRET_FIELDS = r"(?:aws_)?(?:secret_access_key|access_key_id|session_token|secret_key|secretkey|accesskey)"
_PATTERNS = (  # (pattern, replacement): key=value pairs, URL user info, signed-URL parts, AWS key ids
    (re.compile(rf"(?i)(\b{_SECRET_FIELDS}['\"]?\s*[=:]\s*['\"]?)[^\s'\",;&]+"), r"\1***"),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s@]+@"), r"\1***@"),
    (re.compile(r"(?i)(X-Amz-(?:Credential|Signature|Security-Token)=)[^&\s]+"), r"\1***"),
    (re.compile(r"(\bCredential=)[^/\s,]+/"), r"\1***/"),  # the key id in a SigV4 Authorization header
    (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), "***"),
)
_CREDENTIAL_QUERY = re.compile(r"(?i)access|secret|token|signature|credential|password")
# Retries and timeouts when neither the environment nor the remote's config sets them. botocore
# retries each request (standard mode: exponential backoff with jitter) and s3fs retries a timed-out
# or cut request up to 5 times more, so a silent store fails one object after at most about
# 5 x MAX_ATTEMPTS x read_timeout seconds, never hangs.
RETRY_MODE, MAX_ATTEMPTS = "standard", 4
TIMEOUTS = {"connect_timeout": 5, "read_timeout": 30}  # seconds, per connection attempt / per socket read
log = logging.getLogger(__name__)


class RemoteError(RuntimeError):
    """A remote problem, as one line with no credential in it."""


@dataclass(frozen=True)
class TransferSummary:
    action: str  # "pushed" or "pulled"
    remote: str
    url: str
    files: int  # objects moved to (push) or fetched from (pull) the remote, .dir listings included
    restored: int = 0  # pull: files added or modified in the workspace
    never_ran: tuple[str, ...] = ()  # pull: outputs with no hash in dvc.lock, so nothing to restore

    def __str__(self) -> str:
        where = "to" if self.action == "pushed" else "from"
        tail = f", {self.restored} files restored in the workspace" if self.action == "pulled" else ""
        if self.never_ran:
            tail += f"; not produced yet: {', '.join(self.never_ran)}"
        return f"{self.action} {self.files} objects {where} remote {self.remote!r} ({self.url}){tail}"


def _known_secrets() -> list[str]:
    """Credential values from the environment and the shared credentials file (never logged)."""
    values = [os.environ.get(var, "") for var in SECRET_ENV]
    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE", Path.home() / ".aws" / "credentials"))
    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
    except (configparser.Error, OSError, UnicodeDecodeError):
        pass
    for section in parser.sections():
        values += [parser.get(section, k, fallback="") for k in
                   ("aws_secret_access_key", "aws_access_key_id", "aws_session_token")]
    # longest first, so that a value containing another is replaced whole; very short values
    # would shred ordinary words, and no real key is that short
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


def scrub(text: str) -> str:
    """`text` with AWS access key ids, secret keys, session tokens and URL passwords masked."""
    for value in _known_secrets():
        text = text.replace(value, "***")
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f": {' '.join(str(cause).split())}"
    return scrub(text)


def _refuse_credentials(what: str, value: str) -> None:
    parts = urlsplit(value)
    in_query = any(_CREDENTIAL_QUERY.search(k) for k, _ in parse_qsl(parts.query))
    if parts.username or parts.password or in_query or scrub(value) != value:
        raise RemoteError(f"{what} {scrub(value)!r} carries credentials; set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY in the environment or use an AWS profile instead")


def check_url(url: str, endpoint_url: str | None = None, options: Mapping[str, str] | None = None) -> None:
    """Raise RemoteError unless url is s3://bucket[/prefix] and nothing carries a credential."""
    _refuse_credentials("remote URL", url)
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise RemoteError(f"remote URL {url!r} is not of the form s3://bucket/prefix")
    if endpoint_url is not None:
        _refuse_credentials("endpoint URL", endpoint_url)
        ep = urlsplit(endpoint_url)
        if ep.scheme not in ("http", "https") or not ep.netloc:
            raise RemoteError(f"endpoint URL {endpoint_url!r} is not of the form http(s)://host[:port]")
    for key, value in (options or {}).items():
        if key in CREDENTIAL_OPTIONS:
            raise RemoteError(f"remote option {key!r} would store a credential in the DVC config; "
                              "set it in the environment or an AWS profile instead")
        _refuse_credentials(f"remote option {key!r}", str(value))


def _dvc_dir(root: Path | str) -> Path:
    dvc_dir = Path(root) / ".dvc"
    if not dvc_dir.is_dir():
        raise RemoteError(f"{root}: not a DVC repository (no .dvc directory)")
    return dvc_dir


def configure_remote(root: Path | str, url: str, endpoint_url: str | None = None, name: str = DEFAULT_NAME,
                     level: str = "repo", options: Mapping[str, str] | None = None) -> None:
    """Write remote `name` (url, endpointurl, options) and make it DVC's default remote.

    level "repo" writes .dvc/config (committed: what every checkout shares); "local" writes
    .dvc/config.local (this machine only). The endpoint defaults to AWS_ENDPOINT_URL.
    """
    from dvc.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    check_url(url, endpoint_url, options)
    if level not in ("repo", "local"):
        raise RemoteError(f"level {level!r} is not one of repo, local")
    section = {"url": url, **dict(options or {})}
    if endpoint_url:
        section["endpointurl"] = endpoint_url
    config = Config(dvc_dir=str(_dvc_dir(root)), validate=False)
    try:
        with config.edit(level) as conf:
            conf["remote"][name] = section
            conf["core"]["remote"] = name
    except Exception as e:  # noqa: BLE001 - DVC's config errors have no common base worth naming
        raise RemoteError(f"could not write the DVC config: {_one_line(e)}") from None


def _default_remote(root: Path | str, name: str | None = None) -> tuple[str, dict]:
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(_dvc_dir(root)))
    except ConfigError as e:
        raise RemoteError(f"{root}: invalid DVC config: {_one_line(e)}") from None
    name = name or config["core"].get("remote")
    if not name or name not in config["remote"]:
        raise RemoteError(f"{root}: no default DVC remote; run `slimforge remote add s3://bucket/prefix` first")
    section = dict(config["remote"][name])
    stored = [k for k in CREDENTIAL_OPTIONS if k in section]
    if stored:
        raise RemoteError(f"remote {name!r} stores {', '.join(stored)} in the DVC config; remove it "
                          f"(`dvc remote modify --unset {name} {stored[0]}`) and use the environment")
    return name, section


def has_remote(root: Path | str) -> bool:
    """Whether the repository at root has a usable default DVC remote."""
    try:
        _default_remote(root)
    except RemoteError:
        return False
    return True


def check_access(section: Mapping) -> None:
    """List one key under the remote's prefix, so bad credentials fail with a clear line."""
    import boto3
    import botocore.exceptions as bex
    from botocore.config import Config as BotoConfig

    parts = urlsplit(section["url"])
    endpoint = section.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"{section['url']}" + (f" at {endpoint}" if endpoint else "")
    try:
        session = boto3.Session(profile_name=section.get("profile"), region_name=section.get("region"))
        timeouts = {k: int(section.get(k, v)) for k, v in TIMEOUTS.items()}
        client = session.client("s3", endpoint_url=endpoint, config=BotoConfig(retries={
            "mode": os.environ.get("AWS_RETRY_MODE", RETRY_MODE),
            "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", MAX_ATTEMPTS))}, **timeouts))
        client.list_objects_v2(Bucket=parts.netloc, Prefix=parts.path.lstrip("/"), MaxKeys=1)
    except bex.NoCredentialsError:
        raise RemoteError(f"{where}: no AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                          "(or AWS_PROFILE)") from None
    except bex.ProfileNotFound as e:
        raise RemoteError(f"{where}: {_one_line(e)}") from None
    except bex.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "error")
        hint = {"SignatureDoesNotMatch": "; check AWS_SECRET_ACCESS_KEY",
                "InvalidAccessKeyId": "; check AWS_ACCESS_KEY_ID",
                "NoSuchBucket": f"; create bucket {parts.netloc!r} first"}.get(code, "")
        if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
            hint = " (still failing after retries; the object store is failing or overloaded, try again later)"
        raise RemoteError(scrub(f"{where}: {code}{hint}")) from None
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError) as e:
        raise RemoteError(f"{where}: cannot reach the endpoint ({_one_line(e)}); is the object store "
                          "running (`make serve`)?") from None
    except bex.ReadTimeoutError:
        raise RemoteError(f"{where}: no answer within read_timeout={timeouts['read_timeout']} s after retries; "
                          "the object store is stalled or overloaded") from None


_SCRUBBED_LOGGERS = ("dvc", "dvc_", "s3fs", "botocore", "aiobotocore", "boto3", "fsspec", "urllib3", "aiohttp")


@contextmanager
def _scrubbed_records() -> Iterator[None]:
    """Scrub every log record DVC and the S3 stack create meanwhile (logger filters do not
    reach child loggers, so the record factory is the one place that sees them all)."""
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name.startswith(_SCRUBBED_LOGGERS):
            record.msg, record.args = scrub(record.getMessage()), ()
            if record.exc_info and record.exc_info[1] is not None:
                record.msg += f": {_one_line(record.exc_info[1])}"
                record.exc_info, record.exc_text = None, None
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


@contextmanager
def _retry_settings() -> Iterator[None]:
    """AWS_RETRY_MODE / AWS_MAX_ATTEMPTS as botocore reads them when DVC's S3 session starts:
    ours unless the environment sets them, and the environment restored afterwards."""
    ours = {"AWS_RETRY_MODE": RETRY_MODE, "AWS_MAX_ATTEMPTS": str(MAX_ATTEMPTS)}
    added = [var for var in ours if var not in os.environ]
    os.environ.update({var: ours[var] for var in added})
    try:
        yield
    finally:
        for var in added:
            os.environ.pop(var, None)


@contextmanager
def _dvc_call(root: Path | str, action: str, name: str, section: Mapping, **remote_config) -> Iterator:
    """An open dvc Repo whose errors become RemoteError; the remote gets TIMEOUTS where its config
    sets none, and `remote_config` on top (for this call only: nothing is written)."""
    from dvc.repo import Repo

    overrides = {k: v for k, v in TIMEOUTS.items() if k not in section} | remote_config
    try:
        with _retry_settings(), Repo(str(root), config={"remote": {name: overrides}}) as repo:
            yield repo
    except RemoteError:
        raise
    except Exception as e:  # noqa: BLE001 - DVC, s3fs and botocore errors share no base class
        raise RemoteError(f"{action} failed: {_one_line(e)}") from None


def push(root: Path | str, remote: str | None = None, jobs: int | None = None) -> TransferSummary:
    """Push every DVC-tracked output of the workspace at root to the (default) remote."""
    name, section = _default_remote(root, remote)
    with _scrubbed_records():
        check_access(section)
        with _dvc_call(root, "dvc push", name, section) as repo:
            count = repo.push(remote=name, jobs=jobs)
    summary = TransferSummary("pushed", name, section["url"], count)
    log.info("%s", summary)
    return summary


def pull(root: Path | str, remote: str | None = None, jobs: int | None = None) -> TransferSummary:
    """Fetch every DVC-tracked output from the (default) remote and check it out at root.

    Outputs of stages that never ran (no hash in dvc.lock) are skipped and listed in the
    summary; any other output that cannot be restored is an error.
    """
    from dvc.exceptions import CheckoutError

    name, section = _default_remote(root, remote)
    with _scrubbed_records():
        check_access(section)
        with _dvc_call(root, "dvc pull", name, section, verify=True) as repo:  # md5 of every fetched object
            never_ran = {os.path.abspath(out.fs_path): out.def_path  # DVC reports paths relative to the cwd
                         for out in repo.index.outs if out.use_cache and not out.hash_info}
            try:
                result = repo.pull(remote=name, jobs=jobs)
            except CheckoutError as e:
                lost = sorted(p for p in e.result.get("failed", []) if os.path.abspath(p) not in never_ran)
                if lost:
                    raise RemoteError(f"dvc pull: {', '.join(lost)} not restored: not in the cache, and missing or "
                                      f"corrupt (md5 mismatch, discarded) on remote {name!r} ({section['url']}); "
                                      "push them again from a checkout that has them") from None
                result = e.result
    stats = result["stats"]
    summary = TransferSummary("pulled", name, section["url"], stats.get("fetched", 0),
                              restored=stats["added"] + stats["modified"], never_ran=tuple(sorted(never_ran.values())))
    log.info("%s", summary)
    return summary
