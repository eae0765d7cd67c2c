#!/usr/bin/env bash
# Builds target/bulkhead-interop-go, the grpc-go interop client (client.go), offline, from
# Debian's packages only: Go 1.19 (golang-go), grpc-go 1.33.3 (golang-google-grpc-dev),
# the protobuf runtimes (golang-google-protobuf-dev, golang-github-golang-protobuf-1-5-dev;
# all sources under /usr/share/gocode), protoc, protoc-gen-go and protoc-gen-go-grpc.
# Neither the Go module proxy nor GitHub is needed: GOPATH mode (GO111MODULE=off) with
# Debian's /usr/share/gocode, plus a GOPATH in target/ for the generated stubs and the
# client. The binary is static (CGO_ENABLED=0).
#
# protoc-gen-go is Debian's APIv2 one (1.28): the API's proto has proto3 `optional`
# fields, which the 1.3 generator (protoc-gen-go-1-3) refuses.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
proto="$here/../../../../api/proto"
out="$here/target"
gopath="$out/gopath"
pkg="$gopath/src/bulkhead/interop"
rm -rf "$gopath"
mkdir -p "$pkg/bulkheadv1" "$pkg/client"

# The API's stubs; grpc.health.v1's are grpc-go's own (google.golang.org/grpc/health).
m="Mbulkhead.proto=bulkhead/interop/bulkheadv1"
protoc -I "$proto" \
    --go_out="$m,paths=source_relative:$pkg/bulkheadv1" \
    --go-grpc_out="$m,paths=source_relative:$pkg/bulkheadv1" \
    "$proto/bulkhead.proto"
cp "$here/client.go" "$pkg/client/"

GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOCACHE="$out/gocache" GOFLAGS= \
    CGO_ENABLED=0 go build -trimpath -o "$out/bulkhead-interop-go.tmp" bulkhead/interop/client
mv "$out/bulkhead-interop-go.tmp" "$out/bulkhead-interop-go"
echo "build.sh: built $out/bulkhead-interop-go"
