#!/bin/sh
# Container entry point (under tini, which is PID 1 and forwards SIGTERM): prepare the data volume,
# size the thread pools to the container's CPU limit, then `exec` the command so the server is the
# process that receives the signals.
set -eu

baked="${SHOTCACHE_BAKED_DIR:-/opt/shotcache/data}"
data="${SHOTCACHE_DATA_DIR:-/data}"

fail() {
    echo "shotcache entrypoint: $*" >&2
    exit 1
}

# Tasks are written here; say so now rather than as a stack trace from the first task create.
if ! mkdir -p "$data" 2>/dev/null || [ ! -w "$data" ]; then
    fail "data dir $data is not writable by uid $(id -u): use a named volume, or chown the host directory to $(id -u):$(id -g)"
fi

# The service looks for models where a plain install keeps them: the stand-in under <data>/models/,
# open_clip weights in the hub cache <data>/hub-cache/. The image bakes its model read-only into
# $baked, laid out as a data dir, and each entry of each folder there is linked into the same folder
# of the volume. Linking, rather than pointing the settings at files under /opt, keeps
# SHOTCACHE_MODEL/SHOTCACHE_PRETRAINED (and so the model identity recorded in every task) the same as
# outside Docker, and lets open_clip apply the pretrained tag's own settings (QuickGELU for the openai
# weights), which a bare weights file would not carry. Dot-entries (the hub's .locks) stay behind.
for folder in "$baked"/*/; do
    [ -d "$folder" ] || continue
    sub=$(basename "$folder")
    mkdir -p "$data/$sub"
    # A link left by an image that baked a different model points nowhere now: drop it, or the
    # service would take it for a model that is there.
    for dst in "$data/$sub"/*; do
        if [ -L "$dst" ] && [ ! -e "$dst" ]; then
            case "$(readlink "$dst")" in "$baked"/*) rm -f "$dst" ;; esac
        fi
    done
    for src in "$folder"*; do
        [ -e "$src" ] || continue
        dst="$data/$sub/$(basename "$src")"
        # Whatever the volume already has under that name is its own (a model it built or
        # downloaded, or our link from an earlier start): leave it.
        [ -e "$dst" ] || [ -L "$dst" ] || ln -s "$src" "$dst"
    done
done

# In a container os.cpu_count() is the host's CPU count, not the --cpus limit, and threads beyond the
# limit only get throttled. Unless SHOTCACHE_THREADS is set, take the cgroup CPU quota (rounded down,
# at least 1) when there is one.
if [ -z "${SHOTCACHE_THREADS:-}" ]; then
    cgroup="${SHOTCACHE_CGROUP_ROOT:-/sys/fs/cgroup}"
    quota=""
    period=""
    if [ -r "$cgroup/cpu.max" ]; then  # cgroup v2: "<quota> <period>", or "max <period>" for no limit
        read -r quota period <"$cgroup/cpu.max" || true
    elif [ -r "$cgroup/cpu/cpu.cfs_quota_us" ]; then  # cgroup v1: -1 for no limit
        quota=$(cat "$cgroup/cpu/cpu.cfs_quota_us")
        period=$(cat "$cgroup/cpu/cpu.cfs_period_us")
    fi
    case "$quota$period" in
        '' | *[!0-9]*) ;;  # no limit, or nothing readable
        *)
            if [ "$quota" -gt 0 ] && [ "$period" -gt 0 ]; then
                threads=$((quota / period))
                [ "$threads" -ge 1 ] || threads=1
                SHOTCACHE_THREADS=$threads
                export SHOTCACHE_THREADS
            fi
            ;;
    esac
fi
# The service pins torch's and FAISS's pools to SHOTCACHE_THREADS itself; these cover the pools other
# libraries start on import (OpenMP, numpy's OpenBLAS, MKL) before it gets the chance.
if [ -n "${SHOTCACHE_THREADS:-}" ]; then
    : "${OMP_NUM_THREADS:=$SHOTCACHE_THREADS}"
    : "${OPENBLAS_NUM_THREADS:=$SHOTCACHE_THREADS}"
    : "${MKL_NUM_THREADS:=$SHOTCACHE_THREADS}"
    export OMP_NUM_THREADS OPENBLAS_NUM_THREADS MKL_NUM_THREADS
fi

exec "$@"
