#!/usr/bin/env bash
# Installs the stock gRPC clients the interop tests use. Idempotent. If an install fails,
# it says so and exits 0: the tests then skip with a printed reason.
#
# - Python grpcio and grpcio-tools (PyPI; the tests compile the API's proto with
#   grpcio-tools, then call the daemon with grpcio's default options).
# - grpc-java: crates/cli/tests/interop/java/build.sh builds its client jar from Debian's
#   packages (grpc-java 1.41.3, Netty 4.1.48, protoc, grpc_java_plugin; Maven Central is not
#   reachable from CI) plus Netty's epoll JNI library, compiled from Debian's own source of
#   the installed libnetty-java (Debian ships the classes without it). Cost, measured on
#   2 cores: 12-14 s from nothing (apt-get install, Debian's source index and the 1.7 MB
#   Netty source, a 5 s build), 0.4 s when the jar is up to date.
# - grpc-go: crates/cli/tests/interop/go/build.sh builds its client binary offline from
#   Debian's packages (Go 1.19, grpc-go 1.33.3 and the protobuf runtimes as sources under
#   /usr/share/gocode, protoc-gen-go, protoc-gen-go-grpc; the Go module proxy is not
#   reachable from CI). Cost, measured on 2 cores (shared with other builds): about 30 s of
#   apt-get install (Go itself is most of it) and 40-55 s of compiling from nothing (grpc-go
#   and its dependencies; the build cache in the client's target/ makes a rebuild a few
#   seconds), under 0.1 s when the binary is up to date.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

setup_python() {
    if python3 -c 'import grpc, grpc_tools, grpc_health.v1, grpc_reflection.v1alpha' 2>/dev/null; then
        echo "setup-interop: grpcio and grpcio-tools are already installed"
        return
    fi
    # Debian 12's system Python is "externally managed" (PEP 668): allow the install there.
    python3 -m pip install --quiet grpcio grpcio-tools grpcio-health-checking grpcio-reflection 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages grpcio grpcio-tools grpcio-health-checking grpcio-reflection
    if python3 -c 'import grpc, grpc_tools, grpc_health.v1, grpc_reflection.v1alpha' 2>/dev/null; then
        echo "setup-interop: installed grpcio and grpcio-tools for python3"
    else
        echo "setup-interop: WARNING: could not install grpcio for python3; the interop tests will skip" >&2
    fi
}

java_pkgs=(libgrpc-java protobuf-compiler-grpc-java-plugin protobuf-compiler libprotobuf-java
    libnetty-java libperfmark-java libgoogle-gson-java)

# True when every named Debian package is installed.
installed() {
    [ -z "$(dpkg-query -W -f='${Status}\n' "$@" 2>&1 | grep -v '^install ok installed$')" ]
}

setup_java() {
    local dir="$root/crates/cli/tests/interop/java"
    local jar="$dir/target/bulkhead-interop-java.jar"
    if [ -f "$jar" ] && installed "${java_pkgs[@]}" \
        && [ -z "$(find "$dir/build.sh" "$dir/src" "$dir/proto" "$root/crates/api/proto" \
            -newer "$jar" -type f 2>/dev/null)" ]; then
        echo "setup-interop: the grpc-java client is up to date"
        return 0
    fi
    local need=("${java_pkgs[@]}")
    command -v javac >/dev/null 2>&1 || need+=(openjdk-17-jdk-headless)
    command -v gcc >/dev/null 2>&1 || need+=(gcc)
    export DEBIAN_FRONTEND=noninteractive
    if ! installed "${need[@]}"; then
        mkdir -p "$dir/target"
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } \
            >"$dir/target/apt-install.log" 2>&1; then
            echo "setup-interop: apt-get install ${need[*]} failed:" >&2
            tail -5 "$dir/target/apt-install.log" >&2
            return 1
        fi
    fi
    # Netty's C source, from Debian's source package of the installed version. The deb-src
    # entries mirror the machine's Debian ones (same mirror and suites) and live with their
    # lists and caches in our target dir: the machine's apt state is left as it is.
    local apt="$dir/target/apt" src="$dir/target/netty-src"
    rm -rf "$apt/sources" && mkdir -p "$apt/sources" "$apt/lists/partial" "$apt/cache"
    for f in /etc/apt/sources.list.d/*.sources; do
        grep -qE '^URIs:.*debian' "$f" 2>/dev/null \
            && sed 's/^Types: deb$/Types: deb-src/' "$f" >"$apt/sources/$(basename "$f")"
    done
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
        | sed -n 's/^deb \(.*debian.*\)$/deb-src \1/p' >"$apt/sources/debian-src.list"
    local opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt/sources"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
    local version
    version="$(dpkg-query -W -f='${Version}' libnetty-java)" || return 1
    rm -rf "$src" && mkdir -p "$src"
    # `update` may complain about one source and still fetch the rest: the download says.
    (cd "$src" && apt-get -qq "${opts[@]}" update >/dev/null 2>&1
        apt-get -qq "${opts[@]}" source --download-only "libnetty-java=$version" >/dev/null 2>&1)
    tar -xJf "$src"/netty_*.orig.tar.* -C "$src" --strip-components=1 --wildcards \
        '*/transport-native-epoll/src/main/c' '*/transport-native-unix-common/src/main/c' \
        || return 1
    # The source index (20 MB) and the tarballs are not needed again.
    rm -rf "$apt" "$src"/netty_*
    bash "$dir/build.sh" "$src" && echo "setup-interop: built the grpc-java client"
}

# protoc-gen-go is the APIv2 generator (the proto has proto3 `optional` fields); it and the
# protobuf 1.5 runtime replace Debian's 1.3 ones (golang-goprotobuf-dev) if those are there.
go_pkgs=(golang-go golang-google-grpc-dev golang-google-protobuf-dev
    golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc protobuf-compiler)

setup_go() {
    local dir="$root/crates/cli/tests/interop/go"
    local bin="$dir/target/bulkhead-interop-go"
    if [ -f "$bin" ] && installed "${go_pkgs[@]}" \
        && [ -z "$(find "$dir/build.sh" "$dir/client.go" "$root/crates/api/proto" \
            -newer "$bin" -type f 2>/dev/null)" ]; then
        echo "setup-interop: the grpc-go client is up to date"
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    if ! installed "${go_pkgs[@]}"; then
        mkdir -p "$dir/target"
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${go_pkgs[@]}"; } \
            >"$dir/target/apt-install.log" 2>&1; then
            echo "setup-interop: apt-get install ${go_pkgs[*]} failed:" >&2
            tail -5 "$dir/target/apt-install.log" >&2
            return 1
        fi
    fi
    bash "$dir/build.sh" && echo "setup-interop: built the grpc-go client"
}

setup_python
if ! setup_java; then
    echo "setup-interop: WARNING: could not build the grpc-java client; its interop test will skip" >&2
fi
if ! setup_go; then
    echo "setup-interop: WARNING: could not build the grpc-go client; its interop test will skip" >&2
fi
exit 0
