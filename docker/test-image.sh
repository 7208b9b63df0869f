#!/usr/bin/env bash
# The full image proof (issue 16), run against a real Docker daemon with no registry reachable:
# builds docker/Dockerfile (BuildKit, then the classic builder) from a wheelhouse with --network none,
# runs it with a named volume, waits for health, creates a task from real images, classifies, restarts
# the container and checks the answers are identical, checks the user (non-root), read-only code,
# graceful stop, and memory (`docker stats`). Prints the image size, ready times and memory at the end.
#
#   docker/test-image.sh                    # from the repository root; ~10-20 min on 2 cores, first run
#
# Environment (all optional):
#   SHOTCACHE_DOCKER_DIR   work folder: daemon data, wheelhouse, base image, build context
#                          (default ~/.cache/shotcache-docker; never inside the repository)
#   DOCKER_HOST            a daemon to use; when none answers, the script starts its own dockerd (root;
#                          Debian's docker.io is apt-installed if missing) and stops it at exit, by PID
#   SHOTCACHE_BASE_IMAGE   base image for both stages (default: python:3.11-slim if the daemon has it,
#                          else a local Debian bookworm image: `docker load` of $DIR/base/base.tar, or
#                          made with debootstrap + `docker import` and saved there)
#   SHOTCACHE_BUILDERS     which builders to prove, in order (default "buildkit classic"); the first
#                          one's image is the one run
#   SHOTCACHE_TEST_PORT    port the service binds on 127.0.0.1 (host networking; default 18600)
#   SHOTCACHE_TEST_IMAGES  a folder of <class>/*.jpg with train/ and test/ (default ../shared/datasets/cifar10-mini)
#   KEEP_IMAGES=0          remove the built images at the end (default: keep them as the next run's cache)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${SHOTCACHE_DOCKER_DIR:-$HOME/.cache/shotcache-docker}
PORT=${SHOTCACHE_TEST_PORT:-18600}
BUILDERS=${SHOTCACHE_BUILDERS:-buildkit classic}
IMAGES=${SHOTCACHE_TEST_IMAGES:-$REPO/../shared/datasets/cifar10-mini}
PYTHON=${PYTHON:-python3}
TAG=shotcache:image-test
NAME=shotcache-image-test-$$
VOLUME=shotcache-image-test-data-$$
case "$DIR" in "$REPO" | "$REPO"/*) echo "SHOTCACHE_DOCKER_DIR must be outside the repository" >&2; exit 2 ;; esac
mkdir -p "$DIR"
OUT=$DIR/last-run
rm -rf "$OUT" && mkdir -p "$OUT"

started=$(date +%s)
log() { printf '[%4ds] %s\n' $(($(date +%s) - started)) "$*"; }
fail() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
json() { "$PYTHON" -c "import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'d': d}))" "$@"; }

# --- the daemon ---------------------------------------------------------------------------------------
DOCKERD_PID=""
cleanup() {
    status=$?
    set +e
    if [ -n "${DOCKER_OK:-}" ]; then
        docker rm -f "$NAME" >/dev/null 2>&1
        docker volume rm -f "$VOLUME" >/dev/null 2>&1
        if [ "${KEEP_IMAGES:-1}" = 0 ]; then
            for builder in $BUILDERS; do docker rmi -f "$TAG-$builder" >/dev/null 2>&1; done
            docker builder prune -af >/dev/null 2>&1
        fi
    fi
    if [ -n "$DOCKERD_PID" ]; then
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$DOCKERD_PID" 2>/dev/null
    fi
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! docker info >/dev/null 2>&1; then
    command -v dockerd >/dev/null || {
        log "installing docker.io (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 docker.io >/dev/null
    }
    # Its own data root, exec root and socket: it shares nothing with a system daemon. No bridge and no
    # iptables (none may exist here); containers and builds use --network host or none.
    mkdir -p "$DIR/daemon"
    export DOCKER_HOST=unix://$DIR/daemon/docker.sock
    log "starting dockerd ($DOCKER_HOST)"
    dockerd --storage-driver=overlay2 --iptables=false --bridge=none \
        --data-root "$DIR/daemon/root" --exec-root "$DIR/daemon/exec" --pidfile "$DIR/daemon/dockerd.pid" \
        -H "$DOCKER_HOST" >"$DIR/daemon/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || fail "dockerd did not answer; see $DIR/daemon/dockerd.log"
fi
DOCKER_OK=1
log "daemon: $(docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}')"

# --- the base image: never pulled ----------------------------------------------------------------------
BASE=${SHOTCACHE_BASE_IMAGE:-}
if [ -z "$BASE" ]; then
    if docker image inspect python:3.11-slim >/dev/null 2>&1; then
        BASE=python:3.11-slim
    else
        BASE=shotcache-base:bookworm-python3.11
    fi
fi
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    [ "$BASE" = shotcache-base:bookworm-python3.11 ] || fail "base image $BASE is not on the daemon (this script never pulls)"
    if [ -f "$DIR/base/base.tar" ]; then
        log "docker load of $DIR/base/base.tar"
        docker load -i "$DIR/base/base.tar" >/dev/null
    else
        # Debian bookworm ships Python 3.11, like python:3.11-slim. python-is-python3: `python` exists.
        command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        log "debootstrap bookworm -> $BASE"
        rm -rf "$DIR/base/rootfs" && mkdir -p "$DIR/base"
        debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$DIR/base/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$DIR/base/debootstrap.log" 2>&1 \
            || fail "debootstrap failed; see $DIR/base/debootstrap.log"
        rm -rf "$DIR/base/rootfs/var/lib/apt/lists/"* "$DIR/base/rootfs/var/cache/apt/"*
        tar -C "$DIR/base/rootfs" -c . | docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["python3"]' - "$BASE" >/dev/null
        docker save -o "$DIR/base/base.tar" "$BASE"
        rm -rf "$DIR/base/rootfs"
    fi
fi
log "base image: $BASE"

# --- the wheelhouse and the build context ---------------------------------------------------------------
WHEELS=$DIR/wheelhouse
if ! "$PYTHON" "$REPO/docker/requirements.py" | cmp -s - "$WHEELS/requirements.txt"; then
    log "make wheelhouse -> $WHEELS"
    make -C "$REPO" --no-print-directory wheelhouse WHEELHOUSE="$WHEELS" PYTHON="$PYTHON" >"$DIR/wheelhouse.log" 2>&1 \
        || fail "make wheelhouse failed; see $DIR/wheelhouse.log"
fi
# The context: the repository's files (tracked, or new and not git-ignored) and the wheelhouse as
# wheelhouse/, hard-linked where possible; the repository's .dockerignore still decides what is sent.
CTX=$DIR/context
rm -rf "$CTX" && mkdir -p "$CTX"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"; done | xargs -0 cp --parents -l -t "$CTX" 2>/dev/null \
    || git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$CTX")
cp -al "$WHEELS" "$CTX/wheelhouse" 2>/dev/null || cp -a "$WHEELS" "$CTX/wheelhouse"

# --- build, with each builder ---------------------------------------------------------------------------
for builder in $BUILDERS; do
    case "$builder" in
        buildkit) buildkit=1 ;;
        classic) buildkit=0 ;;
        *) fail "unknown builder $builder (buildkit or classic)" ;;
    esac
    log "build ($builder) -> $TAG-$builder"
    t0=$(now)
    DOCKER_BUILDKIT=$buildkit docker build --network none -f "$CTX/docker/Dockerfile" \
        --build-arg PYTHON_IMAGE="$BASE" --build-arg WHEELHOUSE=wheelhouse -t "$TAG-$builder" "$CTX" \
        >"$OUT/build-$builder.log" 2>&1 || { tail -30 "$OUT/build-$builder.log"; fail "build ($builder) failed"; }
    echo "$(elapsed "$t0" "$(now)")" >"$OUT/build-$builder.seconds"
    log "build ($builder) done in $(cat "$OUT/build-$builder.seconds") s"
done
IMAGE=$TAG-$(echo "$BUILDERS" | awk '{print $1}')
SIZE=$(docker image inspect -f '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((SIZE / 1000000)) MB"
[ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = 10001:10001 ] || fail "image USER is not 10001:10001"
[ -n "$(docker image inspect -f '{{if .Config.Healthcheck}}yes{{end}}' "$IMAGE")" ] || fail "image has no HEALTHCHECK"
docker run --rm --network none --entrypoint sh "$IMAGE" -c \
    'du -sm /opt/venv /opt/shotcache /usr 2>/dev/null; du -sm /opt/venv/lib/python3*/site-packages/* | sort -rn | head -12' \
    >"$OUT/contents.txt"

# --- run it ---------------------------------------------------------------------------------------------
url=http://127.0.0.1:$PORT
wait_ready() {  # seconds from $1 until /readyz answers 200, or fail
    for _ in $(seq 1200); do
        if curl -fsS -o /dev/null "$url/readyz" 2>/dev/null; then elapsed "$1" "$(now)"; return; fi
        [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || { docker logs "$NAME" | tail -30; fail "container exited"; }
        sleep 0.25
    done
    docker logs "$NAME" | tail -30
    fail "not ready after 300 s"
}
wait_healthy() {
    for _ in $(seq 300); do
        [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ] && return
        sleep 1
    done
    fail "health check never passed: $(docker inspect -f '{{json .State.Health}}' "$NAME")"
}
memory() { docker stats --no-stream --format '{{.MemUsage}}' "$NAME" | awk '{print $1}'; }

docker volume create "$VOLUME" >/dev/null
log "run with volume $VOLUME on 127.0.0.1:$PORT"
t0=$(now)
# Host networking (this daemon has no bridge): the service must then bind loopback only.
docker run -d --name "$NAME" --network host --cpus 2 --memory 4g -v "$VOLUME:/data" \
    -e SHOTCACHE_HOST=127.0.0.1 -e SHOTCACHE_PORT="$PORT" --stop-timeout 30 "$IMAGE" >/dev/null
READY_FIRST=$(wait_ready "$t0")
log "ready in $READY_FIRST s (first start, empty volume)"
wait_healthy
log "healthy"

# Non-root, dumb-init as PID 1, code and model read-only for the service, volume writable.
[ "$(docker exec "$NAME" id -u)" = 10001 ] || fail "the service does not run as uid 10001"
pid1=$(docker exec "$NAME" sh -c 'tr "\0" " " </proc/1/cmdline')
case "$pid1" in */dumb-init*) ;; *) fail "PID 1 is not dumb-init: $pid1" ;; esac
server_uid=$(docker exec "$NAME" sh -c 'for p in /proc/[0-9]*; do tr "\0" " " <$p/cmdline | grep -q "shotcache serve" && awk "/^Uid:/{print \$2}" $p/status; done' | sort -u)
[ "$server_uid" = 10001 ] || fail "the server process runs as uid '$server_uid'"
app_dir=$(docker exec "$NAME" python -c 'import app, os; print(os.path.dirname(app.__file__))')
for target in "$app_dir/injected.py" /opt/venv/bin/injected /opt/shotcache/data/injected; do
    if docker exec "$NAME" sh -c "touch '$target'" 2>/dev/null; then fail "$target is writable by the service"; fi
done
docker exec "$NAME" sh -c 'touch /data/.write-test && rm /data/.write-test' || fail "/data is not writable"
for module in torch open_clip timm transformers torchvision; do
    if docker exec "$NAME" python -c "import $module" 2>/dev/null; then fail "the runtime image has $module"; fi
done
log "uid 10001, PID 1 dumb-init, code read-only ($app_dir), /data writable, no torch in the image"

# A task from real images: 4 shots of 3 classes from train/, 6 queries from test/.
classes="cat dog ship"
form=(-F name=image-test)
for class in $classes; do
    for f in $(ls "$IMAGES/train/$class" | sort | head -4); do form+=(-F "images=@$IMAGES/train/$class/$f" -F "labels=$class"); done
done
curl -fsS "$url/v1/tasks" "${form[@]}" -o "$OUT/task.json" || fail "task create failed"
TASK=$(json "$OUT/task.json" "d['id']")
log "task $TASK: method $(json "$OUT/task.json" "d['method']"), loo_accuracy $(json "$OUT/task.json" "d['loo_accuracy']")"
queries=()
for class in $classes; do
    for f in $(ls "$IMAGES/test/$class" | sort | head -2); do queries+=(-F "images=@$IMAGES/test/$class/$f"); done
done
classify() { curl -fsS "$url/v1/tasks/$TASK/classify" "${queries[@]}" -F top_k=3 -o "$1" || fail "classify failed"; }
classify "$OUT/before.json"
log "classified: $(json "$OUT/before.json" "[r['label'] for r in d['results']]")"
MEM_WARM=$(memory)
log "memory after task + classify: $MEM_WARM"

# Restart (SIGTERM, graceful), then the same answers from the task restored from the volume.
t0=$(now)
docker restart -t 30 "$NAME" >/dev/null
READY_RESTART=$(wait_ready "$t0")
log "ready again in $READY_RESTART s after docker restart"
classify "$OUT/after.json"
"$PYTHON" - "$OUT/before.json" "$OUT/after.json" <<'EOF' || fail "answers differ after the restart"
import json, sys
before, after = (json.load(open(p)) for p in sys.argv[1:])
pick = lambda d: [(r["label"], [(t["label"], t["probability"]) for t in r["top_k"]]) for r in d["results"]]
assert pick(before) == pick(after), (pick(before), pick(after))
assert before["task_version"] == after["task_version"]
EOF
MEM_RESTART=$(memory)
log "identical answers after restart; memory $MEM_RESTART"

# Graceful stop: SIGTERM through dumb-init reaches uvicorn, which exits on its own well before the
# 30 s after which Docker would SIGKILL (exit code 137).
t0=$(now)
docker stop -t 30 "$NAME" >/dev/null
STOP=$(elapsed "$t0" "$(now)")
code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
docker logs "$NAME" >"$OUT/container.log" 2>&1
# uvicorn re-raises the SIGTERM it handled once it has shut down: 143 (128 + 15) is the clean exit.
case "$code" in 0 | 143) ;; *) fail "exit code $code after docker stop (137 = killed)" ;; esac
grep -q "Finished server process" "$OUT/container.log" || fail "uvicorn did not shut down cleanly"
log "stopped gracefully in $STOP s (exit $code)"

cat >"$OUT/summary.txt" <<EOF
image $IMAGE (base $BASE): $SIZE bytes ($((SIZE / 1000000)) MB)
builds: $(for b in $BUILDERS; do printf '%s %s s; ' "$b" "$(cat "$OUT/build-$b.seconds")"; done)
ready: first start $READY_FIRST s, after restart $READY_RESTART s
memory (docker stats): after task create + classify $MEM_WARM, after restart + classify $MEM_RESTART
graceful stop: $STOP s
total: $(($(date +%s) - started)) s, load: $(cut -d' ' -f1-3 /proc/loadavg)
contents (MB):
$(cat "$OUT/contents.txt")
EOF
cat "$OUT/summary.txt"
log "PASS"
