#!/bin/sh
# Makes a Docker engine available for the docker driver's tests (idempotent).
#
# - installs docker.io and busybox-static when missing (Debian);
# - starts dockerd in the background when `docker info` fails, logging to
#   ${BULKHEAD_DOCKERD_LOG:-/tmp/bulkhead-dockerd.log};
# - waits up to ${BULKHEAD_DOCKERD_TIMEOUT:-60} s for the engine to answer;
# - imports the base test image `bulkhead-test/busybox:latest` (a busybox rootfs) when
#   missing, so that tests and benchmarks need no registry.
#
# Usage: sh .ci/setup-docker.sh   (as root)
set -eu

log=${BULKHEAD_DOCKERD_LOG:-/tmp/bulkhead-dockerd.log}
timeout=${BULKHEAD_DOCKERD_TIMEOUT:-60}

need_install=""
command -v dockerd >/dev/null 2>&1 || need_install="$need_install docker.io"
command -v docker >/dev/null 2>&1 || need_install="$need_install docker.io"
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need_install="$need_install busybox-static"
if [ -n "$need_install" ]; then
    echo "setup-docker: installing$need_install"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y $need_install >/dev/null 2>&1 || {
        apt-get update >/dev/null 2>&1
        apt-get install -y $need_install >/dev/null
    }
fi

if ! docker info >/dev/null 2>&1; then
    echo "setup-docker: starting dockerd (log: $log)"
    # No registry is reachable; the default bridge gives containers an address that the
    # host reaches directly (probes), and no NAT rules are needed for that.
    nohup dockerd --iptables=false --ip6tables=false >"$log" 2>&1 &
    i=0
    until docker info >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt "$((timeout * 5))" ]; then
            echo "setup-docker: dockerd did not answer within ${timeout} s; last log lines:" >&2
            tail -n 30 "$log" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
fi

if ! docker image inspect bulkhead-test/busybox:latest >/dev/null 2>&1; then
    echo "setup-docker: importing bulkhead-test/busybox:latest"
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/proc" "$root/sys" "$root/dev"
    bb=$(command -v busybox)
    cp "$bb" "$root/bin/busybox"
    for app in $("$root/bin/busybox" --list); do
        [ "$app" = busybox ] || ln -s busybox "$root/bin/$app"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    chmod 1777 "$root/tmp"
    tar -C "$root" -c . | docker import -c 'ENV PATH=/bin' - bulkhead-test/busybox:latest >/dev/null
fi
echo "setup-docker: engine ready ($(docker version --format '{{.Server.Version}}'))"
