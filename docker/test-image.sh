#!/usr/bin/env bash
# The full image proof (issue 16), run against a real engine with no registry reachable: builds
# docker/Dockerfile from a wheelhouse with --network none (Docker: BuildKit, then the classic builder;
# podman: `podman build --format docker`, optionally `buildah bud`), runs it with a named volume, waits
# for health, creates a task from real images, classifies, restarts the container and checks the answers
# are identical, checks the user (non-root), read-only code, graceful stop, and memory (`stats`), then starts
# it once more with another CPU limit (`auto` measuring the baked exports, torch-free) on the same volume.
# Prints the image size, ready times and memory at the end.
#
#   docker/test-image.sh                         # from the repository root; ~10-20 min on 2 cores, first run
#   SHOTCACHE_ENGINE=podman docker/test-image.sh # the same proof with podman (daemonless; ~15 min)
#
# Environment (all optional):
#   SHOTCACHE_ENGINE       docker (default) or podman
#   SHOTCACHE_DOCKER_DIR   work folder: daemon data / podman store, wheelhouse, base image, build context
#                          (default ~/.cache/shotcache-docker; never inside the repository)
#   DOCKER_HOST            (docker) a daemon to use; when none answers, the script starts its own dockerd
#                          (root; Debian's docker.io is apt-installed if missing) and stops it at exit, by PID
#   SHOTCACHE_BASE_IMAGE   base image for both stages (default: python:3.11-slim if the engine has it,
#                          else a local Debian bookworm image: `load` of $DIR/base/base.tar, or
#                          made with debootstrap + `import` and saved there)
#   SHOTCACHE_BUILDERS     which builders to prove, in order (docker: "buildkit classic", the default;
#                          podman: "podman", default, and/or "buildah"); the first one's image is the one run
#   SHOTCACHE_TEST_PORT    port the service binds on 127.0.0.1 (host networking; default 18600)
#   SHOTCACHE_TEST_IMAGES  a folder of <class>/*.jpg with train/ and test/ (default ../shared/datasets/cifar10-mini)
#   SHOTCACHE_MIN_FREE_GB  stop a build (and fail) when the work folder's disk has less free space (default 15)
#   SHOTCACHE_PODMAN_DIR   (podman) its store, temp dir and config (default $DIR/podman; deleted at exit)
#   KEEP_IMAGES            1: keep the built images as the next run's cache (docker's default); 0: remove
#                          them (podman's default: its whole store under $DIR/podman is deleted at exit)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${SHOTCACHE_DOCKER_DIR:-$HOME/.cache/shotcache-docker}
PORT=${SHOTCACHE_TEST_PORT:-18600}
ENGINE=${SHOTCACHE_ENGINE:-docker}
case "$ENGINE" in
    docker) BUILDERS=${SHOTCACHE_BUILDERS:-buildkit classic}; KEEP_IMAGES=${KEEP_IMAGES:-1} ;;
    podman) BUILDERS=${SHOTCACHE_BUILDERS:-podman}; KEEP_IMAGES=${KEEP_IMAGES:-0} ;;
    *) echo "SHOTCACHE_ENGINE must be docker or podman, not '$ENGINE'" >&2; exit 2 ;;
esac
MIN_FREE_GB=${SHOTCACHE_MIN_FREE_GB:-15}
IMAGES=${SHOTCACHE_TEST_IMAGES:-$REPO/../shared/datasets/cifar10-mini}
PYTHON=${PYTHON:-python3}
TAG=shotcache:image-test
NAME=shotcache-image-test-$$
VOLUME=shotcache-image-test-data-$$
case "$DIR" in "$REPO" | "$REPO"/*) echo "SHOTCACHE_DOCKER_DIR must be outside the repository" >&2; exit 2 ;; esac
mkdir -p "$DIR"
OUT=$DIR/last-run
[ "$ENGINE" = docker ] || OUT=$DIR/last-run-$ENGINE
rm -rf "$OUT" && mkdir -p "$OUT"
PODMAN_DIR=${SHOTCACHE_PODMAN_DIR:-$DIR/podman}

started=$(date +%s)
log() { printf '[%4ds] %s\n' $(($(date +%s) - started)) "$*"; }
fail() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
json() { "$PYTHON" -c "import json, sys; d = json.load(open(sys.argv[1])); print(eval(sys.argv[2], {'d': d}))" "$@"; }
free_mb() { df -Pm "$DIR" | awk 'NR == 2 {print $4}'; }
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 "$@" >/dev/null; }

# --- cleanup: everything this script starts is stopped by the PID it got, or removed by name ------------
DOCKERD_PID=""
BUILD_PID=""
WATCH_PID=""
cleanup() {
    status=$?
    set +e
    for pid in $BUILD_PID $WATCH_PID; do kill "$pid" 2>/dev/null; done
    [ -z "$BUILD_PID" ] || wait "$BUILD_PID" 2>/dev/null
    if [ -n "${ENGINE_OK:-}" ]; then
        "$ENGINE" rm -f "$NAME" >/dev/null 2>&1
        "$ENGINE" volume rm -f "$VOLUME" >/dev/null 2>&1
        if [ "$ENGINE" = docker ] && [ "$KEEP_IMAGES" = 0 ]; then
            for builder in $BUILDERS; do docker rmi -f "$TAG-$builder" >/dev/null 2>&1; done
            docker builder prune -af >/dev/null 2>&1
        fi
    fi
    # (Only with this script's own store configured: never the system's /var/lib/containers.)
    if [ "$ENGINE" = podman ] && [ "${CONTAINERS_STORAGE_CONF:-}" = "$PODMAN_DIR/storage.conf" ]; then
        # A build stopped half-way leaves its working containers in the store and its layer blobs in
        # TMPDIR (podman exits without cleaning up when signalled): both go, whatever KEEP_IMAGES says.
        rm -rf --one-file-system "$PODMAN_DIR/tmp"
        if [ "$KEEP_IMAGES" = 0 ]; then
            log "deleting the podman store $PODMAN_DIR ($(du -smx "$PODMAN_DIR" 2>/dev/null | cut -f1) MB)"
            podman system reset -f >/dev/null 2>&1
            findmnt -rn -o TARGET | grep "^$PODMAN_DIR/" | sort -r | xargs -r umount -l 2>/dev/null
            rm -rf --one-file-system "$PODMAN_DIR"
        else
            podman rm -af --external >/dev/null 2>&1  # only build leftovers: the test container is gone
        fi
    fi
    if [ -n "$DOCKERD_PID" ]; then
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        kill -9 "$DOCKERD_PID" 2>/dev/null
        # dockerd 20.10 leaves its default network namespace mounted under the exec root.
        findmnt -rn -o TARGET | grep "^$DIR/daemon/exec/" | sort -r | xargs -r umount 2>/dev/null
    fi
    exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the engine ---------------------------------------------------------------------------------------
if [ "$ENGINE" = docker ]; then
    if ! docker info >/dev/null 2>&1; then
        command -v dockerd >/dev/null || { log "installing docker.io (apt)"; apt_install docker.io; }
        # Its own data root, exec root and socket: it shares nothing with a system daemon. No bridge and
        # no iptables (none may exist here); containers and builds use --network host or none.
        mkdir -p "$DIR/daemon"
        export DOCKER_HOST=unix://$DIR/daemon/docker.sock
        log "starting dockerd ($DOCKER_HOST)"
        dockerd --storage-driver=overlay2 --iptables=false --bridge=none \
            --data-root "$DIR/daemon/root" --exec-root "$DIR/daemon/exec" --pidfile "$DIR/daemon/dockerd.pid" \
            -H "$DOCKER_HOST" >"$DIR/daemon/dockerd.log" 2>&1 &
        DOCKERD_PID=$!
        for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
        docker info >/dev/null 2>&1 || fail "dockerd did not answer; see $DIR/daemon/dockerd.log"
        # The client of the daemon's own release, if there is one: a newer one first on PATH (e.g. a
        # docker 28 CLI in /usr/local/bin beside Debian's 20.10) builds with BuildKit only through buildx.
        server=$(docker version --format '{{.Server.Version}}')
        for cli in $(type -ap docker); do
            if [ "$("$cli" version --format '{{.Client.Version}}' 2>/dev/null)" = "$server" ]; then
                PATH=$(dirname "$cli"):$PATH
                hash -r
                break
            fi
        done
    fi
    ENGINE_VERSION="docker $(docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}')"
else
    command -v podman >/dev/null || { log "installing podman (apt)"; apt_install podman; }
    case " $BUILDERS " in *" buildah "*) command -v buildah >/dev/null || apt_install buildah ;; esac
    # Its own store, run dir, temp dir and config, all under $PODMAN_DIR, which is deleted at exit: the
    # system's /var/lib/containers is not touched. Overlay storage: the vfs driver copies every layer
    # in full (tens of GB for this build). TMPDIR: where podman/buildah write each layer's blob while
    # committing it (default /var/tmp, which a killed build leaves full).
    mkdir -p "$PODMAN_DIR/tmp"
    cat >"$PODMAN_DIR/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$PODMAN_DIR/root"
runroot = "$PODMAN_DIR/run"
CONF
    # No systemd here: cgroupfs, events to a file. Containers get the host's own hard limits: podman's
    # defaults (nofile 1048576) exceed them, and raising a limit needs CAP_SYS_RESOURCE, which a
    # sandboxed root may lack (then runc fails with "error setting rlimit ... operation not permitted").
    # RLIMIT_NPROC is capped at kernel.pid_max as well: runc could not set a higher one here.
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    pid_max=$(cat /proc/sys/kernel/pid_max)
    case "$nproc" in *[!0-9]*) nproc=$pid_max ;; esac
    [ "$nproc" -le "$pid_max" ] || nproc=$pid_max
    ulimits="\"nproc=$nproc:$nproc\""
    case "$nofile" in *[!0-9]*) ;; *) ulimits="$ulimits, \"nofile=$nofile:$nofile\"" ;; esac
    cgroup_manager=systemd
    [ -d /run/systemd/system ] || cgroup_manager=cgroupfs
    cat >"$PODMAN_DIR/containers.conf" <<CONF
[containers]
default_ulimits = [$ulimits]
[engine]
cgroup_manager = "$cgroup_manager"
events_logger = "file"
events_logfile_path = "$PODMAN_DIR/run/events.log"
image_copy_tmp_dir = "$PODMAN_DIR/tmp"
tmp_dir = "$PODMAN_DIR/run/libpod"
[network]
network_config_dir = "$PODMAN_DIR/networks"
CONF
    export CONTAINERS_STORAGE_CONF=$PODMAN_DIR/storage.conf CONTAINERS_CONF=$PODMAN_DIR/containers.conf
    export TMPDIR=$PODMAN_DIR/tmp
    podman info >"$OUT/podman-info.txt" 2>&1 || { cat "$OUT/podman-info.txt"; fail "podman info failed"; }
    ENGINE_VERSION="podman $(podman version --format '{{.Client.Version}}') ($(podman info --format '{{.Store.GraphDriverName}} storage, {{.Host.OCIRuntime.Name}}, cgroups {{.Host.CgroupsVersion}}'))"
    case " $BUILDERS " in *" buildah "*) ENGINE_VERSION="$ENGINE_VERSION, buildah $(buildah version --json | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["version"])')" ;; esac
fi
ENGINE_OK=1
log "engine: $ENGINE_VERSION"

# --- the base image: never pulled ----------------------------------------------------------------------
BASE=${SHOTCACHE_BASE_IMAGE:-}
if [ -z "$BASE" ]; then
    if "$ENGINE" image inspect python:3.11-slim >/dev/null 2>&1; then
        BASE=python:3.11-slim
    else
        BASE=shotcache-base:bookworm-python3.11
    fi
fi
if ! "$ENGINE" image inspect "$BASE" >/dev/null 2>&1; then
    [ "$BASE" = shotcache-base:bookworm-python3.11 ] || fail "base image $BASE is not in $ENGINE's images (this script never pulls)"
    if [ -f "$DIR/base/base.tar" ]; then
        log "$ENGINE load of $DIR/base/base.tar"
        "$ENGINE" load -q -i "$DIR/base/base.tar" >/dev/null
    else
        # Debian bookworm ships Python 3.11, like python:3.11-slim. python-is-python3: `python` exists.
        command -v debootstrap >/dev/null || apt_install debootstrap
        log "debootstrap bookworm -> $BASE"
        rm -rf "$DIR/base/rootfs" && mkdir -p "$DIR/base"
        debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$DIR/base/rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$DIR/base/debootstrap.log" 2>&1 \
            || fail "debootstrap failed; see $DIR/base/debootstrap.log"
        rm -rf "$DIR/base/rootfs/var/lib/apt/lists/"* "$DIR/base/rootfs/var/cache/apt/"*
        tar -C "$DIR/base/rootfs" -c . | "$ENGINE" import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'CMD ["python3"]' - "$BASE" >/dev/null
        "$ENGINE" save -o "$DIR/base/base.tar" "$BASE"
        rm -rf "$DIR/base/rootfs"
    fi
fi
log "base image: $BASE"

# --- the wheelhouse and the build context ---------------------------------------------------------------
WHEELS=$DIR/wheelhouse
# Compared as files: `cmp` stops reading at the first difference (or a missing wheelhouse), which would break
# the writer's pipe and print its traceback.
"$PYTHON" "$REPO/docker/requirements.py" >"$DIR/requirements.wanted"
if ! cmp -s "$DIR/requirements.wanted" "$WHEELS/requirements.txt"; then
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
# Every builder gets the same file, the same context and the same args: the air-gapped recipe of
# docker/README.md. podman/buildah: --format docker keeps the HEALTHCHECK (the OCI format has no field
# for it); --layers=false commits each stage once instead of every step: a committed layer is written
# up to four times while it is committed (the container's own copy, the blob in TMPDIR, the store's
# temp copy, the new layer), which for the builder's 6.5 GB torch install is ~26 GB at once.
build() {  # runs (exec: its PID is the one to stop) the build command of builder $1
    local args=(--network none -f "$CTX/docker/Dockerfile" --build-arg PYTHON_IMAGE="$BASE"
        --build-arg WHEELHOUSE=wheelhouse -t "$TAG-$1" "$CTX")
    case "$1" in
        buildkit) DOCKER_BUILDKIT=1 exec docker build "${args[@]}" ;;
        classic) DOCKER_BUILDKIT=0 exec docker build "${args[@]}" ;;
        podman) exec podman build --format docker --layers=false --pull=never "${args[@]}" ;;
        buildah) exec buildah bud --format docker --layers=false --pull=never "${args[@]}" ;;
    esac
}
# Stops build $1 (SIGTERM) if the disk runs low, and keeps the lowest free space seen in $2 (MB).
watch_disk() {
    local lowest free
    lowest=$(free_mb)
    while kill -0 "$1" 2>/dev/null; do
        free=$(free_mb)
        [ "$free" -ge "$lowest" ] || lowest=$free
        echo "$lowest" >"$2"
        if [ "$free" -lt $((MIN_FREE_GB * 1024)) ]; then
            echo "free disk fell to $free MB (< $MIN_FREE_GB GB)" >"$2.abort"
            kill "$1" 2>/dev/null
            return
        fi
        sleep 1
    done
}
for builder in $BUILDERS; do
    case "$ENGINE:$builder" in
        docker:buildkit | docker:classic | podman:podman | podman:buildah) ;;
        *) fail "unknown builder $builder for $ENGINE (docker: buildkit, classic; podman: podman, buildah)" ;;
    esac
    "$ENGINE" image rm "$TAG-$builder" >/dev/null 2>&1 || true
    [ "$(free_mb)" -ge $((MIN_FREE_GB * 1024)) ] || fail "only $(free_mb) MB free on $DIR's disk (SHOTCACHE_MIN_FREE_GB=$MIN_FREE_GB)"
    log "build ($builder) -> $TAG-$builder ($(free_mb) MB free)"
    t0=$(now)
    build "$builder" >"$OUT/build-$builder.log" 2>&1 &
    BUILD_PID=$!
    watch_disk "$BUILD_PID" "$OUT/build-$builder.lowest-free-mb" &
    WATCH_PID=$!
    if wait "$BUILD_PID"; then rc=0; else rc=$?; fi
    BUILD_PID=""
    wait "$WATCH_PID" 2>/dev/null || true
    WATCH_PID=""
    [ ! -f "$OUT/build-$builder.lowest-free-mb.abort" ] || fail "build ($builder) stopped: $(cat "$OUT/build-$builder.lowest-free-mb.abort")"
    [ "$rc" = 0 ] || { tail -30 "$OUT/build-$builder.log"; fail "build ($builder) failed (exit $rc)"; }
    # The exit status alone proves nothing: podman 4 exits 0, silently, when it gets SIGTERM mid-build.
    "$ENGINE" image inspect "$TAG-$builder" >/dev/null 2>&1 \
        || { tail -30 "$OUT/build-$builder.log"; fail "build ($builder) exited 0 but made no image $TAG-$builder"; }
    echo "$(elapsed "$t0" "$(now)")" >"$OUT/build-$builder.seconds"
    log "build ($builder) done in $(cat "$OUT/build-$builder.seconds") s (lowest free disk $(cat "$OUT/build-$builder.lowest-free-mb") MB)"
done
IMAGE=$TAG-$(echo "$BUILDERS" | awk '{print $1}')
SIZE=$("$ENGINE" image inspect -f '{{.Size}}' "$IMAGE")
log "image $IMAGE: $((SIZE / 1000000)) MB"
[ "$("$ENGINE" image inspect -f '{{.Config.User}}' "$IMAGE")" = 10001:10001 ] || fail "image USER is not 10001:10001"
# (podman shows an image's health check as .HealthCheck, Docker as .Config.Healthcheck)
healthcheck='{{if .Config.Healthcheck}}yes{{end}}'
[ "$ENGINE" = docker ] || healthcheck='{{if .HealthCheck}}yes{{end}}'
[ -n "$("$ENGINE" image inspect -f "$healthcheck" "$IMAGE")" ] || fail "image has no HEALTHCHECK"
"$ENGINE" run --rm --network none --entrypoint sh "$IMAGE" -c \
    'du -sm /opt/venv /opt/shotcache /usr 2>/dev/null; du -sm /opt/venv/lib/python3*/site-packages/* | sort -rn | head -12' \
    >"$OUT/contents.txt" 2>>"$OUT/engine.log"

# --- run it ---------------------------------------------------------------------------------------------
url=http://127.0.0.1:$PORT
wait_ready() {  # seconds from $1 until /readyz answers 200, or fail
    for _ in $(seq 1200); do
        if curl -fsS -o /dev/null "$url/readyz" 2>/dev/null; then elapsed "$1" "$(now)"; return; fi
        [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$NAME")" = true ] || { "$ENGINE" logs "$NAME" | tail -30; fail "container exited"; }
        sleep 0.25
    done
    "$ENGINE" logs "$NAME" | tail -30
    fail "not ready after 300 s"
}
# Docker runs the image's HEALTHCHECK on its interval. podman runs it from a systemd timer, and without
# systemd (as here) never by itself: then `podman healthcheck run` runs the same check and records it.
wait_healthy() {
    for _ in $(seq 300); do
        [ "$ENGINE" = docker ] || podman healthcheck run "$NAME" >/dev/null 2>&1 || true
        [ "$("$ENGINE" inspect -f '{{.State.Health.Status}}' "$NAME")" = healthy ] && return
        sleep 1
    done
    fail "health check never passed: $("$ENGINE" inspect -f '{{json .State.Health}}' "$NAME")"
}
# The engine's figure (cgroup usage: Docker leaves the page cache out, podman counts part of it) and the
# server process's own resident set, which compares across engines.
memory() {
    local rss
    rss=$("$ENGINE" exec "$NAME" sh -c 'for p in /proc/[0-9]*; do tr "\0" " " <$p/cmdline | grep -q "shotcache serve" && awk "/^VmRSS:/{print \$2}" $p/status; done' | sort -n | tail -1)
    echo "$("$ENGINE" stats --no-stream --format '{{.MemUsage}}' "$NAME" | awk '{print $1}') (server RSS $((rss / 1024)) MiB)"
}

"$ENGINE" volume create "$VOLUME" >/dev/null
log "run with volume $VOLUME on 127.0.0.1:$PORT"
t0=$(now)
# Host networking (this daemon has no bridge): the service must then bind loopback only.
# (podman, without systemd, logs an error for each health-check timer it cannot add: into engine.log)
"$ENGINE" run -d --name "$NAME" --network host --cpus 2 --memory 4g -v "$VOLUME:/data" \
    -e SHOTCACHE_HOST=127.0.0.1 -e SHOTCACHE_PORT="$PORT" --stop-timeout 30 "$IMAGE" >/dev/null 2>>"$OUT/engine.log" \
    || { tail -5 "$OUT/engine.log"; fail "$ENGINE run failed"; }
READY_FIRST=$(wait_ready "$t0")
log "ready in $READY_FIRST s (first start, empty volume)"
wait_healthy
log "healthy"

# Non-root, dumb-init as PID 1, code and model read-only for the service, volume writable.
[ "$("$ENGINE" exec "$NAME" id -u)" = 10001 ] || fail "the service does not run as uid 10001"
pid1=$("$ENGINE" exec "$NAME" sh -c 'tr "\0" " " </proc/1/cmdline')
case "$pid1" in */dumb-init*) ;; *) fail "PID 1 is not dumb-init: $pid1" ;; esac
server_uid=$("$ENGINE" exec "$NAME" sh -c 'for p in /proc/[0-9]*; do tr "\0" " " <$p/cmdline | grep -q "shotcache serve" && awk "/^Uid:/{print \$2}" $p/status; done' | sort -u)
[ "$server_uid" = 10001 ] || fail "the server process runs as uid '$server_uid'"
app_dir=$("$ENGINE" exec "$NAME" python -c 'import app, os; print(os.path.dirname(app.__file__))')
for target in "$app_dir/injected.py" /opt/venv/bin/injected /opt/shotcache/data/injected; do
    if "$ENGINE" exec "$NAME" sh -c "touch '$target'" 2>/dev/null; then fail "$target is writable by the service"; fi
done
"$ENGINE" exec "$NAME" sh -c 'touch /data/.write-test && rm /data/.write-test' || fail "/data is not writable"
for module in torch open_clip timm transformers torchvision; do
    if "$ENGINE" exec "$NAME" python -c "import $module" 2>/dev/null; then fail "the runtime image has $module"; fi
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
"$ENGINE" restart -t 30 "$NAME" >/dev/null 2>>"$OUT/engine.log" || { tail -5 "$OUT/engine.log"; fail "$ENGINE restart failed"; }
READY_RESTART=$(wait_ready "$t0")
log "ready again in $READY_RESTART s after $ENGINE restart"
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
# 30 s after which the engine would SIGKILL (exit code 137).
t0=$(now)
"$ENGINE" stop -t 30 "$NAME" >/dev/null 2>>"$OUT/engine.log" || { tail -5 "$OUT/engine.log"; fail "$ENGINE stop failed"; }
STOP=$(elapsed "$t0" "$(now)")
code=$("$ENGINE" inspect -f '{{.State.ExitCode}}' "$NAME")
"$ENGINE" logs "$NAME" >"$OUT/container.log" 2>&1
# uvicorn re-raises the SIGTERM it handled once it has shut down: 143 (128 + 15) is the clean exit.
case "$code" in 0 | 143) ;; *) fail "exit code $code after $ENGINE stop (137 = killed)" ;; esac
grep -q "Finished server process" "$OUT/container.log" || fail "uvicorn did not shut down cleanly"
log "stopped gracefully in $STOP s (exit $code)"

# Another CPU limit, so another thread count than the build's: no backend choice is cached for it (and the
# baked folder is read-only), so `auto` measures the baked exports at the start, without torch (a start
# like this one died on a missing torch before 22184be). The same volume: the task is restored and answers.
t0=$(now)
"$ENGINE" rm "$NAME" >/dev/null 2>>"$OUT/engine.log"
"$ENGINE" run -d --name "$NAME" --network host --cpus 1 --memory 4g -v "$VOLUME:/data" \
    -e SHOTCACHE_HOST=127.0.0.1 -e SHOTCACHE_PORT="$PORT" --stop-timeout 30 "$IMAGE" >/dev/null 2>>"$OUT/engine.log" \
    || { tail -5 "$OUT/engine.log"; fail "$ENGINE run --cpus 1 failed"; }
READY_CPUS1=$(wait_ready "$t0")
classify "$OUT/cpus1.json"
"$PYTHON" - "$OUT/before.json" "$OUT/cpus1.json" <<'EOF' || fail "other labels with --cpus 1"
import json, sys
before, after = (json.load(open(p)) for p in sys.argv[1:])
assert [r["label"] for r in before["results"]] == [r["label"] for r in after["results"]]
EOF
"$ENGINE" logs "$NAME" >"$OUT/container-cpus1.log" 2>&1
grep -q "auto: measured" "$OUT/container-cpus1.log" || fail "--cpus 1: auto did not measure the baked exports"
"$ENGINE" stop -t 30 "$NAME" >/dev/null 2>>"$OUT/engine.log"
log "--cpus 1: ready in $READY_CPUS1 s, $(grep -o 'chose [a-z0-9-]*' "$OUT/container-cpus1.log" | head -1), same labels"

cat >"$OUT/summary.txt" <<EOF
image $IMAGE (base $BASE): $SIZE bytes ($((SIZE / 1000000)) MB)
engine: $ENGINE_VERSION
builds: $(for b in $BUILDERS; do printf '%s %s s; ' "$b" "$(cat "$OUT/build-$b.seconds")"; done)
lowest free disk while building (MB): $(for b in $BUILDERS; do printf '%s %s; ' "$b" "$(cat "$OUT/build-$b.lowest-free-mb")"; done)
ready: first start $READY_FIRST s, after restart $READY_RESTART s, with --cpus 1 (auto measuring) $READY_CPUS1 s
memory ($ENGINE stats, and the server's RSS): after task create + classify $MEM_WARM, after restart + classify $MEM_RESTART
graceful stop: $STOP s
total: $(($(date +%s) - started)) s, load: $(cut -d' ' -f1-3 /proc/loadavg)
contents (MB):
$(cat "$OUT/contents.txt")
EOF
cat "$OUT/summary.txt"
log "PASS"
