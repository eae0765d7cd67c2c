#!/usr/bin/env bash
# Builds target/bulkhead-interop-java.jar, the grpc-java interop client
# (src/main/java/bulkhead/interop/InteropClient.java), from Debian's packages: grpc-java
# 1.41.3 and Netty 4.1.48 (/usr/share/java), protoc and grpc_java_plugin. Usage:
# build.sh NETTY_SRC, where NETTY_SRC is the unpacked source of the installed
# libnetty-java (.ci/setup-interop.sh fetches it).
#
# Debian's Netty ships the epoll transport's classes without its JNI library (the only
# way Netty talks to a Unix socket): this compiles that library from the same source
# version, unmodified, into the jar's META-INF/native, where Netty loads it from.
# The jar's manifest puts Debian's jars on the class path: `java -jar` runs it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
netty_src="$1"
proto="$here/../../../../api/proto"
out="$here/target"
rm -rf "$out/gen" "$out/classes"
mkdir -p "$out/gen" "$out/classes/META-INF/native"

# Netty names its library after the machine (PlatformDependent.normalizedArch).
case "$(uname -m)" in
    x86_64) arch=x86_64 ;;
    aarch64) arch=aarch_64 ;;
    *) arch="$(uname -m)" ;;
esac
java_home="$(dirname "$(dirname "$(readlink -f "$(command -v javac)")")")"
gcc -O2 -shared -fPIC -fvisibility=hidden -w \
    -I"$java_home/include" -I"$java_home/include/linux" \
    -I"$netty_src/transport-native-unix-common/src/main/c" \
    "$netty_src"/transport-native-epoll/src/main/c/*.c \
    "$netty_src"/transport-native-unix-common/src/main/c/*.c \
    -ldl -o "$out/classes/META-INF/native/libnetty_transport_native_epoll_$arch.so"

# The API's stubs from its proto, and grpc.health.v1's from the canonical health.proto.
protoc -I "$proto" -I "$here/proto" \
    --java_out="$out/gen" \
    --plugin=protoc-gen-grpc-java=/usr/bin/grpc_java_plugin --grpc-java_out="$out/gen" \
    "$proto/bulkhead.proto" "$here/proto/grpc/health/v1/health.proto"

jars=(grpc-api grpc-context grpc-core grpc-netty grpc-protobuf grpc-protobuf-lite grpc-stub
    protobuf guava perfmark-api gson error_prone_annotations
    geronimo-annotation-1.3-spec
    netty-buffer netty-codec netty-codec-http netty-codec-http2 netty-common netty-handler
    netty-resolver netty-transport netty-transport-native-unix-common
    netty-transport-native-epoll)
cp=""
manifest_cp=""
for j in "${jars[@]}"; do
    f="/usr/share/java/$j.jar"
    if [ ! -e "$f" ]; then
        echo "build.sh: missing $f" >&2
        exit 1
    fi
    cp="$cp:$f"
    manifest_cp="$manifest_cp $f"
done
find "$out/gen" "$here/src/main/java" -name '*.java' >"$out/sources.txt"
javac -nowarn --release 17 -encoding UTF-8 -cp "${cp#:}" -d "$out/classes" @"$out/sources.txt"

# A manifest line is at most 72 bytes: one jar per continuation line (" " + " jar").
{
    echo "Main-Class: bulkhead.interop.InteropClient"
    first=1
    for f in $manifest_cp; do
        if [ "$first" = 1 ]; then echo "Class-Path: $f"; first=0; else echo "  $f"; fi
    done
} >"$out/manifest.txt"
jar --create --file "$out/bulkhead-interop-java.jar.tmp" --manifest "$out/manifest.txt" \
    -C "$out/classes" .
mv "$out/bulkhead-interop-java.jar.tmp" "$out/bulkhead-interop-java.jar"
echo "build.sh: built $out/bulkhead-interop-java.jar"
