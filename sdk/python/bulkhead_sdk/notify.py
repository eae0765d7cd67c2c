"""The sd_notify protocol, as bulkhead (and systemd) understand it: readiness, status,
the watchdog, deadline extensions and reloads. Every function does nothing when
``$NOTIFY_SOCKET`` is not set (the manifest does not ask for notify readiness), so a
program can call them unconditionally. No dependency beyond the standard library.
"""

from __future__ import annotations

import os
import socket
from typing import Optional


def notify(message: str) -> bool:
    """Sends one sd_notify message (``KEY=VALUE`` lines); False if there is no socket."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), path)
    return True


def notify_ready() -> None:
    """``READY=1``: the instance serves (also after a reload)."""
    notify("READY=1")


def notify_status(text: str) -> None:
    """``STATUS=...``: shown by ``bulkhead get`` (256 bytes at most)."""
    notify("STATUS=" + text.replace("\n", " "))


def notify_stopping() -> None:
    """``STOPPING=1``: the instance is shutting down by itself."""
    notify("STOPPING=1")


def notify_reloading() -> None:
    """``RELOADING=1``: not ready until the next ``notify_ready()``."""
    notify("RELOADING=1")


def notify_watchdog(trigger: bool = False) -> None:
    """``WATCHDOG=1``: alive. With ``trigger``, ``WATCHDOG=trigger``: treat this
    instance as having missed its watchdog (it is stopped and its restart policy
    applies)."""
    notify("WATCHDOG=trigger" if trigger else "WATCHDOG=1")


def extend_timeout(seconds: float) -> None:
    """``EXTEND_TIMEOUT_USEC=``: while starting, the readiness deadline is at least this
    far away."""
    notify("EXTEND_TIMEOUT_USEC=%d" % int(seconds * 1e6))


def notify_main_pid(pid: int) -> None:
    """``MAINPID=``: from now on ``pid`` (a process of this instance, e.g. the child a
    daemonizing program forked) is the instance's main process: the run ends when it
    exits, with its status."""
    notify("MAINPID=%d" % int(pid))


def watchdog_interval() -> Optional[float]:
    """The watchdog interval in seconds (``$WATCHDOG_USEC``), or None without one. Send
    ``notify_watchdog()`` at least twice per interval."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None
