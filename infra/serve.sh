#!/usr/bin/env bash
# The local stack on loopback: a Prefect server, a process worker and a SeaweedFS S3 store.
#
#   bash infra/serve.sh start | stop | status        (make serve / make serve-stop)
#
# State lives in $SLIMFORGE_SERVE_DIR (default .serve/, gitignored): one pid file per process
# (each the leader of its own session and process group, so stop ends exactly what start
# began), logs, PREFECT_HOME, the object store's data and, when the environment has no AWS
# credentials, a generated local pair in credentials (mode 600). Ports: SLIMFORGE_PREFECT_PORT
# (4200), SLIMFORGE_S3_PORT (8333); SeaweedFS's internal ports are picked free once, kept in ports.env.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SERVE_DIR=${SLIMFORGE_SERVE_DIR:-$ROOT/.serve}
mkdir -p "$SERVE_DIR" && SERVE_DIR=$(cd "$SERVE_DIR" && pwd)
BIN=${SLIMFORGE_VENV_BIN:-$ROOT/.venv/bin}
WORKSPACE=${SLIMFORGE_WORKSPACE:-$ROOT}  # the DVC repository whose default remote points here
PREFECT_PORT=${SLIMFORGE_PREFECT_PORT:-4200}
S3_PORT=${SLIMFORGE_S3_PORT:-8333}
POOL=${SLIMFORGE_WORK_POOL:-slimforge-process}
BUCKET=slimforge
HOST=127.0.0.1
API_URL="http://$HOST:$PREFECT_PORT/api"
S3_URL="http://$HOST:$S3_PORT"
COMPONENTS=(prefect-server weed worker)  # started in this order, stopped in reverse

say() { echo "serve: $*"; }
die() {
    echo "serve: error: $*" >&2
    if compgen -G "$SERVE_DIR/*.pid" >/dev/null; then echo "serve: what did start still runs; make serve-stop ends it" >&2; fi
    exit 1
}

# What each component's command line contains (so a reused pid is never taken for ours).
match_of() { case $1 in prefect-server) echo "server start" ;; worker) echo "worker start" ;; *) echo "$1" ;; esac; }

# The live pid recorded for component $1, if its command line still names that component.
alive_pid() {
    local file="$SERVE_DIR/$1.pid" pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -e "$(match_of "$1")" || return 1
    echo "$pid"
}

# Whether any live (non-zombie) process is left in group -PGID, or process PID.
group_alive() {
    if [[ $1 == -* ]]; then
        ps -eo pgid=,stat= | awk -v g="${1#-}" '$1 == g && $2 !~ /^Z/ {found = 1} END {exit !found}'
    else
        ps -o stat= -p "$1" | grep -qv '^Z'
    fi
}

port_busy() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Start "$@" as the leader of a new session and process group; log to $SERVE_DIR/$name.log.
# A non-interactive bash starts background commands with SIGINT ignored, and Prefect's worker
# turns SIGTERM into a SIGINT to itself, so the shim restores SIGINT's default before it execs.
launch() {
    local name=$1; shift
    "$BIN/python" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.setsid()
os.execvp(sys.argv[1], sys.argv[1:])' "$@" >"$SERVE_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$SERVE_DIR/$name.pid"
}

wait_for() {  # wait_for NAME SECONDS COMMAND...: until COMMAND succeeds or NAME's process dies
    local name=$1 secs=$2 deadline=$((SECONDS + $2)); shift 2
    until "$@" >/dev/null 2>&1; do
        alive_pid "$name" >/dev/null || die "$name exited; see $SERVE_DIR/$name.log"
        ((SECONDS < deadline)) || die "$name not ready after $secs s; see $SERVE_DIR/$name.log"
        sleep 0.5
    done
}

load_credentials() {
    if [[ -n ${AWS_ACCESS_KEY_ID:-} && -n ${AWS_SECRET_ACCESS_KEY:-} ]]; then
        CRED_NOTE="it accepts AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY from your environment"
        return
    fi
    local file="$SERVE_DIR/credentials"
    if [[ ! -f $file ]]; then
        (umask 077 && "$BIN/python" - "$file" "$S3_URL" <<'EOF'
import secrets, string, sys
key = "SF" + "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(18))
with open(sys.argv[1], "w") as f:
    f.write("# local SeaweedFS credentials written by infra/serve.sh; `source` this file\n"
            f"export AWS_ACCESS_KEY_ID={key}\nexport AWS_SECRET_ACCESS_KEY={secrets.token_urlsafe(30)}\n"
            f"export AWS_ENDPOINT_URL={sys.argv[2]}\n")
EOF
        )
    fi
    # shellcheck disable=SC1090
    source "$file"
    CRED_NOTE="generated local credentials: run \`source $file\` in your shell"
}

write_s3_identities() {  # the one identity SeaweedFS accepts: the credentials in the environment
    (umask 077 && "$BIN/python" - "$SERVE_DIR/s3.json" <<'EOF'
import json, os, sys
identity = {"name": "slimforge", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": os.environ["AWS_ACCESS_KEY_ID"],
                             "secretKey": os.environ["AWS_SECRET_ACCESS_KEY"]}]}
with open(sys.argv[1], "w") as f:
    json.dump({"identities": [identity]}, f)
EOF
    )
}

# Master, volume, filer (+ their gRPC) and S3 gRPC ports, picked free once, then kept; the admin
# port too, but its maintenance worker dials admin+10000 whatever -admin.port.grpc says.
weed_ports() {
    local file="$SERVE_DIR/ports.env"
    [[ -f $file ]] || "$BIN/python" - >"$file" <<'EOF'
import random, socket
names = ["MASTER", "MASTER_GRPC", "VOLUME", "VOLUME_GRPC", "FILER", "FILER_GRPC", "S3_GRPC"]
socks = [socket.socket() for _ in names]
for s in socks:
    s.bind(("127.0.0.1", 0))
ports = {name: s.getsockname()[1] for name, s in zip(names, socks)}
for _ in range(200):
    admin = random.randrange(20000, 55000)
    try:
        for port in (admin, admin + 10000):
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
    except OSError:
        continue
    if not {admin, admin + 10000} & set(ports.values()):
        break
for name, port in {**ports, "ADMIN": admin}.items():
    print(f"WEED_{name}={port}")
EOF
    # shellcheck disable=SC1090
    source "$file"
}

start_weed() {
    weed_ports
    write_s3_identities
    local data="$SERVE_DIR/weed" sock=""
    mkdir -p "$data"
    rm -f "$data/mini.options"  # mini reloads its last options; the command line below is the truth
    # unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them here when the path fits
    ((${#data} < 90)) && sock="-s3.localSocket=$data/s3.sock"
    launch weed env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
        "$BIN/weed" mini -dir="$data" -ip=$HOST -ip.bind=$HOST -master.telemetry=false \
        -master.port="$WEED_MASTER" -master.port.grpc="$WEED_MASTER_GRPC" \
        -volume.port="$WEED_VOLUME" -volume.port.grpc="$WEED_VOLUME_GRPC" \
        -filer.port="$WEED_FILER" -filer.port.grpc="$WEED_FILER_GRPC" \
        -s3.port="$S3_PORT" -s3.port.grpc="$WEED_S3_GRPC" -s3.port.iceberg=0 -s3.port.lance=0 \
        -admin.port="$WEED_ADMIN" -admin.ui=false -webdav=false \
        -s3.config="$SERVE_DIR/s3.json" $sock
}

# Create the bucket and point the workspace's DVC default remote here (in .dvc/config.local).
setup_bucket_and_remote() {
    "$BIN/python" - "$S3_URL" "$BUCKET" "$WORKSPACE" <<'EOF'
import sys, time
from pathlib import Path
import boto3, botocore.exceptions as bex
from slimforge.remote import RemoteError, configure_remote, scrub

url, bucket, workspace = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
deadline = time.monotonic() + 60
while True:  # the filer can lag the S3 listener by a moment
    try:
        s3.head_bucket(Bucket=bucket)
        break
    except bex.ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
            s3.create_bucket(Bucket=bucket)
            break
        err = e
    except (bex.EndpointConnectionError, bex.ConnectionClosedError) as e:
        err = e
    if time.monotonic() > deadline:
        sys.exit(f"serve: error: S3 at {url}: {scrub(str(err))}")
    time.sleep(0.5)
if (Path(workspace) / ".dvc").is_dir():
    try:
        configure_remote(workspace, f"s3://{bucket}/dvc", url, level="local")
    except RemoteError as e:
        sys.exit(f"serve: error: {e}")
    print(f"serve: DVC default remote 'storage' = s3://{bucket}/dvc at {url} ({workspace}/.dvc/config.local)")
else:
    print(f"serve: {workspace} is not a DVC repository; no remote configured")
EOF
}

prefect_env() { env PREFECT_HOME="$SERVE_DIR/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_API_URL="$API_URL" "$@"; }

# The worker this script started (named in its log) has reported to the server as ONLINE.
worker_online() {
    local name
    name=$(grep -o "Worker '[^']*' started" "$SERVE_DIR/worker.log" | head -n 1 | cut -d"'" -f2)
    [[ -n $name ]] || return 1
    curl -fsS -X POST -H 'Content-Type: application/json' -d '{}' "$API_URL/work_pools/$POOL/workers/filter" \
        | grep -q "\"name\":\"$name\"[^{}]*\"status\":\"ONLINE\""
}

start() {
    local name pid out running=0
    for name in "${COMPONENTS[@]}"; do alive_pid "$name" >/dev/null && running=$((running + 1)); done
    if ((running == ${#COMPONENTS[@]})); then
        say "already running: Prefect UI http://$HOST:$PREFECT_PORT, S3 $S3_URL; stop with make serve-stop"
        return
    fi
    load_credentials
    export AWS_ENDPOINT_URL=${AWS_ENDPOINT_URL:-$S3_URL}
    if pid=$(alive_pid prefect-server); then
        say "Prefect server already running (pid $pid)"
    else
        port_busy "$PREFECT_PORT" && die "port $PREFECT_PORT is in use; set SLIMFORGE_PREFECT_PORT"
        launch prefect-server env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u PREFECT_API_URL \
            PREFECT_HOME="$SERVE_DIR/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false \
            PREFECT_UI_API_URL="$API_URL" "$BIN/prefect" server start --host $HOST --port "$PREFECT_PORT"
    fi
    if pid=$(alive_pid weed); then
        say "SeaweedFS already running (pid $pid)"
    else
        port_busy "$S3_PORT" && die "port $S3_PORT is in use; set SLIMFORGE_S3_PORT"
        start_weed
    fi
    wait_for weed 60 curl -s -o /dev/null "$S3_URL"  # any HTTP answer (403 without a signature) will do
    setup_bucket_and_remote
    wait_for prefect-server 120 curl -fsS "$API_URL/health"
    if pid=$(alive_pid worker); then
        say "worker already running (pid $pid)"
    else
        if ! out=$(prefect_env "$BIN/prefect" work-pool create "$POOL" --type process 2>&1) \
            && ! grep -qi "already exists" <<<"$out"; then
            die "could not create work pool $POOL: $(tail -n 1 <<<"$out")"
        fi
        launch worker env PREFECT_HOME="$SERVE_DIR/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false \
            PREFECT_API_URL="$API_URL" "$BIN/prefect" worker start --pool "$POOL" --type process
        wait_for worker 90 worker_online
    fi
    if [[ -f $ROOT/infra/deploy.py && ${SLIMFORGE_SERVE_DEPLOY:-1} != 0 ]]; then
        if prefect_env "$BIN/python" "$ROOT/infra/deploy.py" --pool "$POOL" --workspace "$WORKSPACE" \
            >"$SERVE_DIR/deploy.log" 2>&1; then
            say "deployments registered (infra/deploy.py)"
        else
            say "infra/deploy.py failed, the stack runs without deployments: $(tail -n 1 "$SERVE_DIR/deploy.log")"
        fi
    fi
    say "Prefect UI   http://$HOST:$PREFECT_PORT  (PREFECT_API_URL=$API_URL)"
    say "S3 endpoint  $S3_URL, bucket $BUCKET; $CRED_NOTE"
    say "work pool    $POOL, one process worker; logs in $SERVE_DIR"
    say "stop with    make serve-stop"
}

# Every process below pid $1 (flow runs the worker started sit in sessions of their own).
descendants() {
    ps -eo pid=,ppid= | awk -v root="$1" '{parent[$1] = $2}
        END {for (p in parent) {q = p; while ((q in parent) && q != root && q > 1) q = parent[q]; if (q == root && p != root) print p}}'
}

end_target() {  # end_target -PGID|PID: TERM, then INT, then KILL, 10 s for each to take effect
    local sig
    for sig in TERM INT KILL; do
        kill "-$sig" -- "$1" 2>/dev/null || return 0
        for _ in $(seq 1 40); do
            group_alive "$1" || return 0
            sleep 0.25
        done
    done
}

leader_or_pid() { [[ $(ps -o pgid= -p "$1" | tr -d ' ') == "$1" ]] && echo "-$1" || echo "$1"; }

stop_one() {
    local name=$1 pid stray strays
    if ! pid=$(alive_pid "$name"); then
        rm -f "$SERVE_DIR/$name.pid"
        return
    fi
    strays=$(descendants "$pid")
    end_target "$(leader_or_pid "$pid")"  # its whole process group
    for stray in $strays; do  # ... and what it started in groups of their own
        group_alive "$stray" && end_target "$(leader_or_pid "$stray")"
    done
    rm -f "$SERVE_DIR/$name.pid"
    say "stopped $name (pid $pid)"
}

stop() {
    local i
    for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do stop_one "${COMPONENTS[i]}"; done
}

status() {
    local name pid
    for name in "${COMPONENTS[@]}"; do
        if pid=$(alive_pid "$name"); then say "$name running (pid $pid)"; else say "$name not running"; fi
    done
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: bash infra/serve.sh start|stop|status" ;;
esac
