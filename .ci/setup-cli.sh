#!/bin/sh
# Prerequisites of the CLI tests (crates/cli/tests/it/cli_ux.rs): `man` renders the
# generated man pages (man -l), zsh and fish check their completion scripts, util-linux
# `script` gives the colour test a terminal, tmux drives `bulkhead top` in a real
# terminal (crates/cli/tests/it/top.rs). Each test skips with a printed reason when
# its tool is missing; this installs them. Idempotent; a failed install only warns.
set -u
need=""
command -v man >/dev/null 2>&1 || need="$need man-db"
command -v zsh >/dev/null 2>&1 || need="$need zsh"
command -v fish >/dev/null 2>&1 || need="$need fish"
command -v script >/dev/null 2>&1 || need="$need bsdutils"
command -v tmux >/dev/null 2>&1 || need="$need tmux"
if [ -n "$need" ]; then
    echo "== installing$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need ||
        echo "== WARNING: could not install$need; the tests that need them will skip" >&2
fi
exit 0
