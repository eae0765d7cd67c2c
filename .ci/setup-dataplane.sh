#!/usr/bin/env bash
# Installs what the data-plane tests need beyond the Rust toolchain: the iceoryx2 Python
# binding (PyPI, 0.10, the version of the iceoryx2 crate) for the Python SDK (sdk/python)
# and its example workload; for the same workload in a container
# (examples/workloads/echo-python-docker), debootstrap (its Debian image is made here, no
# registry) and the iceoryx2 wheels in the example's wheels/ folder. The Rust side needs
# nothing from the system.
# Idempotent. Call it before the tests: `bash .ci/setup-dataplane.sh`.
# If the wheel cannot be installed, it says so and exits 0: the Python test then skips
# with a printed reason, and the Rust data-plane tests still run.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "setup-dataplane: installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq debootstrap >/dev/null 2>&1 || {
        apt-get update -qq >/dev/null 2>&1
        apt-get install -y -qq debootstrap >/dev/null
    } || echo "setup-dataplane: WARNING: could not install debootstrap; the Python-in-docker test will skip" >&2
fi
wheels=examples/workloads/echo-python-docker/wheels
if ! ls "$wheels"/iceoryx2-*.whl >/dev/null 2>&1; then
    python3 -m pip download --quiet --only-binary=:all: 'iceoryx2==0.10.*' -d "$wheels" \
        && echo "setup-dataplane: fetched the iceoryx2 wheels into $wheels" \
        || echo "setup-dataplane: WARNING: could not fetch the iceoryx2 wheels; the Python-in-docker test will try again, or skip" >&2
fi
if python3 -c 'import iceoryx2' 2>/dev/null; then
    echo "setup-dataplane: iceoryx2 for python3 is already installed"
    exit 0
fi
# Debian 12's system Python is "externally managed" (PEP 668): allow the install there.
python3 -m pip install --quiet 'iceoryx2==0.10.*' 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages 'iceoryx2==0.10.*'
if python3 -c 'import iceoryx2' 2>/dev/null; then
    echo "setup-dataplane: installed iceoryx2 for python3"
else
    echo "setup-dataplane: WARNING: could not install iceoryx2 for python3; the Python data-plane test will skip" >&2
fi
exit 0
