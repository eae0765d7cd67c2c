#!/bin/sh
# Prerequisites of the sandbox driver's tests (crates/sandbox/tests, crates/cli/tests/it/sandbox.rs).
#
# The tests need root (namespaces, cgroups) and skip with a printed reason without it.
# They use perl (the fork bomb) and python3 (the notify workload), which skip likewise.
# `--bench`: also install bubblewrap for `cargo bench -p bulkhead-bench --bench sandbox`
# (not needed by the tests).
set -eu
need=""
command -v perl >/dev/null 2>&1 || need="$need perl"
command -v unshare >/dev/null 2>&1 || need="$need util-linux"
if [ "${1:-}" = "--bench" ] && ! command -v bwrap >/dev/null 2>&1; then
    need="$need bubblewrap"
fi
if [ -n "$need" ]; then
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y -q $need
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup-sandbox: not root: the sandbox tests will skip" >&2
fi
