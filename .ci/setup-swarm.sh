#!/usr/bin/env bash
# Starts a real three-node Docker Swarm on this machine for the swarm driver's tests
# (idempotent; prints what it does).
#
# Topology (nothing of it lives in the root network namespace, where a Docker engine for
# the docker driver's tests may run: two engines in one namespace fight over docker0):
#
#   netns bh-sw-net: bridge bhsw0 ──veth── netns bh-sw-mgr (10.213.0.1, the manager)
#                               ├─veth── netns bh-sw-w1  (10.213.0.2, worker)
#                               └─veth── netns bh-sw-w2  (10.213.0.3, worker)
#
# Each node is a dockerd of its own (own --data-root, --exec-root, --pidfile, UTS name and
# API socket, --iptables=false) started with `nsenter --net` in its namespace. The API
# sockets are Unix sockets, reachable from the root namespace:
#
#   /run/bulkhead-swarm/mgr.sock   the manager: what bulkhead's --swarm-host points at
#   /run/bulkhead-swarm/w1.sock    worker 1     (tests `docker kill` its containers)
#   /run/bulkhead-swarm/w2.sock    worker 2
#
# Every node carries the label bulkhead.engine=unix:///run/bulkhead-swarm/<node>.sock: the
# swarm driver reaches a task's node through it (exec, fencing). No registry is reachable:
# the image bulkhead-test/busybox:latest is imported on every node (`docker import`), and
# the engines run with DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 so that no task tries a pull.
# No IPVS in this kernel: no routing mesh, no published ports.
#
# Tests find the swarm by the manager's socket (or $BULKHEAD_SWARM_HOST). Cutting a node
# off: `ip -n bh-sw-net link set bhsw-w1 down` (and `up` to bring it back).
#
# Usage: bash .ci/setup-swarm.sh          (as root)
#        bash .ci/setup-swarm.sh --down   (stops the engines, removes the namespaces)
set -euo pipefail

run=/run/bulkhead-swarm
data=/var/lib/bulkhead-swarm
net=bh-sw-net
nodes=(mgr w1 w2)
timeout=${BULKHEAD_SWARM_TIMEOUT:-60}
image=bulkhead-test/busybox:latest

say() { echo "setup-swarm: $*"; }
addr() { case "$1" in mgr) echo 10.213.0.1 ;; w1) echo 10.213.0.2 ;; w2) echo 10.213.0.3 ;; esac; }
d() { local n=$1; shift; docker -H "unix://$run/$n.sock" "$@"; }

if [ "${1:-}" = "--down" ]; then
    for n in "${nodes[@]}"; do
        if [ -f "$run/$n/docker.pid" ]; then
            pid=$(cat "$run/$n/docker.pid")
            say "stopping the engine of $n (pid $pid)"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
        ip netns del "bh-sw-$n" 2>/dev/null || true
    done
    ip netns del "$net" 2>/dev/null || true
    say "down"
    exit 0
fi

need=""
command -v dockerd >/dev/null 2>&1 || need="$need docker.io"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v nsenter >/dev/null 2>&1 || need="$need util-linux"
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need="$need busybox-static"
if [ -n "$need" ]; then
    say "installing$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq $need >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        apt-get install -y -qq $need >/dev/null
    }
fi

mkdir -p "$run" "$data"

# --- the network: one bridge namespace, one namespace per node, veth pairs between ----
if ! ip netns list | grep -qw "$net"; then
    say "creating network namespace $net with bridge bhsw0"
    ip netns add "$net"
    ip -n "$net" link set lo up
    ip -n "$net" link add bhsw0 type bridge
    ip -n "$net" link set bhsw0 up
fi
for n in "${nodes[@]}"; do
    ns="bh-sw-$n"
    if ! ip netns list | grep -qw "$ns"; then
        say "creating network namespace $ns ($(addr "$n")/24)"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    fi
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
        ip link add "bhsw-$n" type veth peer name "bhsw-$n-in"
        ip link set "bhsw-$n" netns "$net"
        ip link set "bhsw-$n-in" netns "$ns"
        ip -n "$ns" link set "bhsw-$n-in" name eth0
        ip -n "$ns" addr add "$(addr "$n")/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$net" link set "bhsw-$n" master bhsw0
    fi
    # A node left cut off by an interrupted test is joined again.
    ip -n "$net" link set "bhsw-$n" up
done

# --- the engines ------------------------------------------------------------------
start_engine() {
    local n=$1 ns="bh-sw-$1"
    mkdir -p "$run/$n" "$data/$n"
    say "starting the engine of $n in $ns (socket $run/$n.sock, log $run/$n/dockerd.log)"
    rm -f "$run/$n.sock"
    # Its own UTS namespace too: the swarm names nodes after the host name.
    DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 setsid nohup \
        nsenter --net="/var/run/netns/$ns" unshare --uts sh -c "hostname bh-sw-$n && exec dockerd \
            --data-root '$data/$n' --exec-root '$run/$n/exec' --pidfile '$run/$n/docker.pid' \
            -H 'unix://$run/$n.sock' --iptables=false --ip6tables=false --ip-forward=false \
            --bip 172.31.250.1/24 --default-address-pool base=172.31.0.0/17,size=24 \
            --log-driver json-file" \
        >"$run/$n/dockerd.log" 2>&1 </dev/null &
}
for n in "${nodes[@]}"; do
    d "$n" info >/dev/null 2>&1 || start_engine "$n"
done
for n in "${nodes[@]}"; do
    i=0
    until d "$n" info >/dev/null 2>&1; do
        i=$((i + 1))
        if [ "$i" -gt "$((timeout * 5))" ]; then
            say "the engine of $n did not answer within ${timeout} s; last log lines:" >&2
            tail -n 30 "$run/$n/dockerd.log" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
done

# --- the image, on every node (no registry) -------------------------------------------
rootfs=""
for n in "${nodes[@]}"; do
    if ! d "$n" image inspect "$image" >/dev/null 2>&1; then
        if [ -z "$rootfs" ]; then
            rootfs=$(mktemp -d)
            trap 'rm -rf "$rootfs"' EXIT
            mkdir -p "$rootfs/root/bin" "$rootfs/root/tmp" "$rootfs/root/etc" \
                "$rootfs/root/proc" "$rootfs/root/sys" "$rootfs/root/dev"
            bb=$(command -v busybox)
            cp "$bb" "$rootfs/root/bin/busybox"
            for app in $("$rootfs/root/bin/busybox" --list); do
                [ "$app" = busybox ] || ln -s busybox "$rootfs/root/bin/$app"
            done
            echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/root/etc/passwd"
            echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >>"$rootfs/root/etc/passwd"
            printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/root/etc/group"
            chmod 1777 "$rootfs/root/tmp"
            tar -C "$rootfs/root" -cf "$rootfs/busybox.tar" .
        fi
        say "importing $image on $n"
        d "$n" import -c 'ENV PATH=/bin' "$rootfs/busybox.tar" "$image" >/dev/null
    fi
done

# --- the swarm ----------------------------------------------------------------------
state() { d "$1" info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo unknown; }
if [ "$(state mgr)" != active ]; then
    say "initialising the swarm on mgr ($(addr mgr))"
    d mgr swarm init --advertise-addr "$(addr mgr)" --listen-addr "$(addr mgr):2377" \
        --dispatcher-heartbeat 2s >/dev/null
fi
token=$(d mgr swarm join-token -q worker)
for n in w1 w2; do
    if [ "$(state "$n")" != active ]; then
        # A worker of an earlier swarm (the manager's data was reset) leaves it first.
        d "$n" swarm leave --force >/dev/null 2>&1 || true
        say "joining $n to the swarm"
        d "$n" swarm join --token "$token" --advertise-addr "$(addr "$n")" \
            --listen-addr "$(addr "$n"):2377" "$(addr mgr):2377" >/dev/null
    fi
done
# Nodes of an earlier join that are gone (down, never coming back under that id).
for id in $(d mgr node ls --filter role=worker --format '{{.ID}} {{.Status}}' | awk '$2=="Down"{print $1}'); do
    say "removing stale node $id"
    d mgr node rm --force "$id" >/dev/null || true
done
i=0
until [ "$(d mgr node ls --format '{{.Status}}' | grep -c Ready)" -ge 3 ]; do
    i=$((i + 1))
    if [ "$i" -gt "$((timeout * 5))" ]; then
        say "the swarm did not reach 3 ready nodes within ${timeout} s:" >&2
        d mgr node ls >&2 || true
        exit 1
    fi
    sleep 0.2
done
for n in "${nodes[@]}"; do
    id=$(d "$n" info --format '{{.Swarm.NodeID}}')
    d mgr node update --label-add "bulkhead.engine=unix://$run/$n.sock" "$id" >/dev/null
done
# Tasks run on the workers only: cutting a worker off leaves the manager (and bulkhead's
# view of the swarm) whole.
d mgr node update --availability drain "$(d mgr info --format '{{.Swarm.NodeID}}')" >/dev/null
say "swarm ready: $(d mgr node ls --format '{{.Hostname}}({{.Status}},{{.ManagerStatus}})' | tr '\n' ' ')"
say "manager socket: unix://$run/mgr.sock"
