#!/usr/bin/env bash
# Build the cnnserve images from the unchanged Dockerfile with whichever engine this machine has:
# docker when a daemon answers, else podman (Debian's podman 4.3 with runc, see README "Deploy").
#
#   deploy/image.sh engine           the engine's command line, e.g. "podman --runtime runc"
#   deploy/image.sh base             the Python base to build on: python:3.11-slim-bookworm when it
#                                    is here or can be pulled, else the stand-in below (built once)
#   deploy/image.sh build [TARGET]   build TARGET (cpu) as cnnserve:TARGET; prints the base, the
#                                    time and the size, and the tag last
#   deploy/image.sh arm64            the cpu image for linux/arm64 (cnnserve:cpu-arm64) under
#                                    qemu-user-static, run once: ready, and a photo classified
#
# When no registry can be reached, the official base is stood in for by Debian bookworm made with
# debootstrap (minbase) plus Debian's python3 (3.11, as in the official image), python3-venv,
# python-is-python3 and ca-certificates (as the official image has), imported under a local name of its own (never the official image's name) and
# passed in through the Dockerfile's PYTHON_IMAGE build argument. It is cached in the engine's image
# store: built once per machine (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."

OFFICIAL_BASE=python:3.11-slim-bookworm
ARCH=${ARCH:-amd64}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Debian's podman: crun refuses this kind of host's hybrid cgroups, runc does not; the default
# RLIMIT_NOFILE and RLIMIT_NPROC are above what such a host allows a container.
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)

engine() {
    if [[ -n "${CNNSERVE_ENGINE:-}" ]]; then
        echo "$CNNSERVE_ENGINE"
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        echo docker
    elif command -v podman >/dev/null; then
        echo "podman --runtime runc"
    else
        echo "neither a docker daemon nor podman: make tools installs podman (Debian, needs root)" >&2
        return 1
    fi
}

base() {
    local e stand_in=localhost/cnnserve-stand-in/python:3.11-bookworm-debootstrap
    [[ $ARCH == amd64 ]] || stand_in+="-$ARCH"
    e=$(engine)
    if [[ -n "${PYTHON_IMAGE:-}" ]]; then
        echo "$PYTHON_IMAGE"
        return
    fi
    if [[ $ARCH == amd64 ]] && { $e image inspect "$OFFICIAL_BASE" >/dev/null 2>&1 ||
        timeout 60 $e pull -q "docker.io/library/$OFFICIAL_BASE" >/dev/null 2>&1; }; then
        echo "base: $OFFICIAL_BASE" >&2
        echo "$OFFICIAL_BASE"
        return
    fi
    if ! $e image inspect "$stand_in" >/dev/null 2>&1; then
        echo "base: $OFFICIAL_BASE cannot be pulled; building the stand-in $stand_in (debootstrap bookworm + Debian's python3, once)" >&2
        command -v debootstrap >/dev/null || { echo "debootstrap is missing: make tools installs it" >&2; return 1; }
        local root
        root=$(mktemp -d /var/tmp/cnnserve-base.XXXXXX)
        # shellcheck disable=SC2064
        trap "rm -rf '$root'" RETURN
        debootstrap --arch="$ARCH" --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
            bookworm "$root" "$DEBIAN_MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; return 1; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root.log"
        tar -C "$root" --numeric-owner -c . | $e import --arch "$ARCH" \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
            --message "stand-in for $OFFICIAL_BASE: debootstrap --variant=minbase bookworm, python3 python3-venv" \
            - "$stand_in" >/dev/null
    else
        echo "base: $OFFICIAL_BASE cannot be pulled; using the cached stand-in $stand_in" >&2
    fi
    echo "$stand_in"
}

build() {
    local target=${1:-cpu} e python_image tag start args=()
    e=$(engine)
    python_image=$(base)
    tag=${IMAGE_TAG:-cnnserve:$target}
    args=(--target "$target" -t "$tag" --build-arg "PYTHON_IMAGE=$python_image")
    [[ -n "${CUDA_IMAGE:-}" ]] && args+=(--build-arg "CUDA_IMAGE=$CUDA_IMAGE")
    [[ $ARCH != amd64 ]] && args+=(--platform "linux/$ARCH")
    if [[ $e == podman* ]]; then
        # the docker image format: OCI's has no HEALTHCHECK, which podman would drop
        args+=(--format docker --network host "${ULIMITS[@]}")
        # pip in the build reaches PyPI through this host's TLS set-up: its CA bundle, mounted over
        # the base's own for the RUN steps only (Debian's pip reads that file; nothing stays in a
        # layer, the mount point being a file every base has).
        local ca=/etc/ssl/certs/ca-certificates.crt
        [[ -f $ca ]] && args+=(-v "$ca:$ca:ro")
    fi
    echo "building $tag (target $target) with $e on $python_image" >&2
    start=$(date +%s)
    $e build "${args[@]}" . >&2
    echo "built $tag in $(($(date +%s) - start)) s" >&2
    sizes "$tag" "$python_image" >&2
    echo "$tag"
}

sizes() {
    local e image=$1 base=$2 total base_size
    e=$(engine)
    total=$($e image inspect --format '{{.Size}}' "$image")
    base_size=$($e image inspect --format '{{.Size}}' "$base")
    echo "size: $image $((total / 1000000)) MB, $(((total - base_size) / 1000000)) MB above its base $base ($((base_size / 1000000)) MB)"
}

# linux/arm64 under emulation: Debian's qemu-user-static registers itself with binfmt_misc (the F
# flag: the interpreter is found inside containers too), once binfmt_misc is mounted.
arm64() {
    local e tag url name
    e=$(engine)
    if [[ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]]; then
        command -v qemu-aarch64-static >/dev/null || {
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user-static binfmt-support
        }
        [[ -e /proc/sys/fs/binfmt_misc/register ]] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        update-binfmts --enable qemu-aarch64 || true
    fi
    [[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]] || { echo "arm64: binfmt_misc has no qemu-aarch64 handler" >&2; return 1; }
    tag=$(ARCH=arm64 IMAGE_TAG=cnnserve:cpu-arm64 build cpu)
    name=cnnserve-arm64-$$
    # shellcheck disable=SC2064
    trap "$e rm -f $name >/dev/null 2>&1" EXIT
    $e run -d --platform linux/arm64 --name "$name" "${ULIMITS[@]}" --read-only --tmpfs /tmp --cap-drop ALL \
        -p 127.0.0.1::8000 "$tag" >/dev/null
    url=http://$($e port "$name" 8000/tcp)
    local start=$SECONDS
    until [[ $(curl -s -o /dev/null -w '%{http_code}' "$url/readyz") == 200 ]]; do
        [[ $($e inspect --format '{{.State.Status}}' "$name") == running ]] || { $e logs "$name" | tail -20 >&2; return 1; }
        # a server process killed by a signal under the emulator is replaced, and dies again
        if $e logs "$name" 2>&1 | grep -q 'uncaught target signal'; then
            $e logs "$name" 2>&1 | grep -v systemd | tail -5 >&2
            echo "arm64: a server process died under qemu-user (above); try: $e run --rm --platform linux/arm64 $tag python -X faulthandler -c 'import onnxruntime'" >&2
            return 1
        fi
        ((SECONDS - start < 900)) || { echo "arm64: not ready after 900 s" >&2; return 1; }
        sleep 2
    done
    echo "arm64: $($e exec "$name" uname -m), ready after $((SECONDS - start)) s" >&2
    curl -s -H 'content-type: image/png' --data-binary @"${PHOTO:?PHOTO=a photo to classify}" "$url/classify" >&2
    echo >&2
}

main() {
    case "${1:-}" in
    engine) engine ;;
    base) base ;;
    build) build "${2:-cpu}" ;;
    arm64) arm64 ;;
    *)
        echo "usage: $0 engine|base|build [TARGET]|arm64" >&2
        exit 2
        ;;
    esac
}

# on one line: bash has read the whole file before anything runs, so editing it meanwhile is safe
main "$@"; exit
