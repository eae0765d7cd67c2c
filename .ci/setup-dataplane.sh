#!/usr/bin/env bash
# Installs what the data-plane tests need beyond the Rust toolchain: the iceoryx2 Python
# binding (from PyPI) for the Python SDK and its example workload. The Rust side (the
# iceoryx2 crate) needs nothing from the system. Idempotent; safe to run on every CI run.
set -euo pipefail
if python3 -c 'import iceoryx2' 2>/dev/null; then
    exit 0
fi
# Debian 12's system Python is "externally managed" (PEP 668): allow the install there.
python3 -m pip install --quiet 'iceoryx2==0.10.*' \
    || python3 -m pip install --quiet --break-system-packages 'iceoryx2==0.10.*'
python3 -c 'import iceoryx2' 
