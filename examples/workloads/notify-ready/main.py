"""Warms up, tells the supervisor it is ready (sd_notify protocol), then idles."""
import os
import signal
import socket
import sys
import time


def sd_notify(message: str) -> None:
    """The sd_notify(3) wire protocol: one datagram to $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), path)


warmup = float(sys.argv[sys.argv.index("--warmup") + 1]) if "--warmup" in sys.argv else 0.0
sd_notify("STATUS=warming up")
time.sleep(warmup)
sd_notify("READY=1\nSTATUS=serving")
print(f"notify-ready: ready (session {os.environ.get('BULKHEAD_SESSION')})", flush=True)
signal.signal(signal.SIGTERM, lambda *_: (sd_notify("STOPPING=1"), sys.exit(0)))
while True:
    time.sleep(3600)
