#!/usr/bin/env bash
# Installs the stock gRPC clients the interop tests use: Python grpcio and grpcio-tools
# (PyPI; the tests compile the API's proto with grpcio-tools, then call the daemon with
# grpcio's default options). Idempotent. If the install fails, it says so and exits 0:
# the tests then skip with a printed reason.
set -uo pipefail
if python3 -c 'import grpc, grpc_tools, grpc_health.v1, grpc_reflection.v1alpha' 2>/dev/null; then
    echo "setup-interop: grpcio and grpcio-tools are already installed"
    exit 0
fi
# Debian 12's system Python is "externally managed" (PEP 668): allow the install there.
python3 -m pip install --quiet grpcio grpcio-tools grpcio-health-checking grpcio-reflection 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages grpcio grpcio-tools grpcio-health-checking grpcio-reflection
if python3 -c 'import grpc, grpc_tools, grpc_health.v1, grpc_reflection.v1alpha' 2>/dev/null; then
    echo "setup-interop: installed grpcio and grpcio-tools for python3"
else
    echo "setup-interop: WARNING: could not install grpcio for python3; the interop tests will skip" >&2
fi
exit 0
