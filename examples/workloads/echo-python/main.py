"""A Python data-plane workload: every message on its input channel comes back on its
output channel. Uses the bulkhead SDK under sdk/python (pure Python over iceoryx2 from
PyPI: `pip install iceoryx2`). `main.py [INPUT] [OUTPUT]` (defaults input, output)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../sdk/python"))

import bulkhead_sdk as bh  # noqa: E402


def main() -> None:
    inp = sys.argv[1] if len(sys.argv) > 1 else "input"
    out = sys.argv[2] if len(sys.argv) > 2 else "output"
    w = bh.Workload.from_env()
    rx, tx = w.input(inp), w.output(out)
    bh.notify_ready()
    print(f"echo-python: {inp} -> {out}", file=sys.stderr, flush=True)
    while True:
        msg = rx.recv(timeout=0.02)
        if msg is None:
            tx.update_connections()  # idle: late subscribers get the history
            continue
        with tx.loan(len(msg)) as buf:  # shared memory to shared memory
            buf[:] = msg
        rx.release()


if __name__ == "__main__":
    main()
