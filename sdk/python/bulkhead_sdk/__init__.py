"""bulkhead's data plane for Python workloads (and hosts): zero-copy shared-memory
channels over iceoryx2.

The daemon creates a workload's channels before it starts it and passes them in the
environment:

- ``BULKHEAD_CHANNEL_IN_<NAME>`` / ``BULKHEAD_CHANNEL_OUT_<NAME>``:
  ``<service>;max_payload=<bytes>;depth=<n>``
- ``BULKHEAD_IOX2_PREFIX`` / ``BULKHEAD_IOX2_ROOT``: the iceoryx2 installation (file
  prefix in /dev/shm, root directory) the daemon uses.

Messages are byte slices (``[u8]`` in Rust), so Rust and Python ends interoperate.
Received messages are ``memoryview`` objects into shared memory (no copy); loans are
writable ``memoryview`` objects into shared memory.
"""

from __future__ import annotations

import ctypes
import os
import socket
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Mapping, Optional, Tuple

try:
    import iceoryx2 as iox2
except ImportError:  # the sd_notify helpers work without the data plane
    iox2 = None

from .notify import (  # noqa: F401  (re-exported)
    extend_timeout,
    notify,
    notify_main_pid,
    notify_ready,
    notify_reloading,
    notify_status,
    notify_stopping,
    notify_watchdog,
    watchdog_interval,
)

__all__ = [
    "Workload",
    "Host",
    "Publisher",
    "Subscriber",
    "parse_channel",
    "notify",
    "notify_main_pid",
    "notify_ready",
    "notify_reloading",
    "notify_status",
    "notify_stopping",
    "notify_watchdog",
    "extend_timeout",
    "watchdog_interval",
]

ENV_PREFIX = "BULKHEAD_CHANNEL_"
_BYTES = iox2.Slice[ctypes.c_uint8] if iox2 is not None else None


def parse_channel(value: str) -> Tuple[str, int, int]:
    """Parses a channel variable's value into (service, max_payload, depth)."""
    parts = value.split(";")
    service, max_payload, depth = parts[0], 64 * 1024, 4
    if not service:
        raise ValueError("the service name is empty")
    for p in parts[1:]:
        k, _, v = p.partition("=")
        if k == "max_payload":
            max_payload = int(v)
        elif k == "depth":
            depth = int(v)
        else:
            raise ValueError(f"unknown setting {p!r}")
    return service, max_payload, depth


def _config(env: Mapping[str, str]):
    if iox2 is None:
        raise ImportError("the data plane needs iceoryx2: pip install iceoryx2")
    cfg = iox2.config.default()
    prefix = env.get("BULKHEAD_IOX2_PREFIX")
    if prefix:
        cfg.global_cfg.prefix = iox2.FileName.new(prefix)
    root = env.get("BULKHEAD_IOX2_ROOT")
    if root:
        cfg.global_cfg.root_path = iox2.Path.new(root)
    return cfg


def _node(env: Mapping[str, str], name: str):
    return (
        iox2.NodeBuilder.new()
        .config(_config(env))
        .name(iox2.NodeName.new(name))
        .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
        .create(iox2.ServiceType.Ipc)
    )


def _open(node, service: str):
    return node.service_builder(iox2.ServiceName.new(service)).publish_subscribe(_BYTES).open()


def _wake(node, service: str):
    """The event service a channel's publishers wake its subscribers with (same name as
    the channel; the daemon creates both)."""
    return node.service_builder(iox2.ServiceName.new(service)).event().open()


class Publisher:
    """Publishes byte messages on one channel. A sent message lives in this publisher's
    shared memory: keep the publisher until the receiver had its chance."""

    def __init__(self, node, service: str, max_payload: int):
        self.service = service
        self.max_payload = max_payload
        self._port = _open(node, service).publisher_builder().initial_max_slice_len(max_payload).create()
        self._wake = _wake(node, service).notifier_builder().create()

    @contextmanager
    def loan(self, length: int) -> Iterator[memoryview]:
        """A writable memoryview of ``length`` bytes in shared memory, sent when the
        ``with`` block ends without an exception."""
        if length > self.max_payload:
            raise ValueError(f"message of {length} bytes is larger than max_payload {self.max_payload}")
        sample = self._port.loan_slice_uninit(length)
        buf = (ctypes.c_uint8 * length).from_address(sample.payload_ptr)
        view = memoryview(buf).cast("B")
        try:
            yield view
        except BaseException:
            view.release()
            sample.delete()
            raise
        view.release()
        if sample.assume_init().send() > 0:
            # Queued first, then woken: a subscriber that checks and then waits sees one.
            self._wake.notify()

    def send(self, data: bytes) -> None:
        """Copies ``data`` into a loan and sends it."""
        with self.loan(len(data)) as buf:
            buf[:] = data

    def update_connections(self) -> None:
        """Connects late subscribers and hands them the history; call it while idle."""
        self._port.update_connections()


class Subscriber:
    """Receives byte messages from one channel."""

    def __init__(self, node, service: str, depth: int):
        self.service = service
        self._port = _open(node, service).subscriber_builder().buffer_size(max(1, depth)).create()
        self._wake = _wake(node, service).listener_builder().create()
        self._held = None

    def release(self) -> None:
        """Hands the last received message's slot back."""
        if self._held is not None:
            self._held.delete()
            self._held = None

    def try_recv(self) -> Optional[memoryview]:
        """The next message as a read-only memoryview into shared memory, or None. It is
        valid until the next receive or ``release()``."""
        self.release()
        sample = self._port.receive()
        if sample is None:
            return None
        self._held = sample
        n = sample.payload().len()
        buf = (ctypes.c_uint8 * n).from_address(sample.payload_ptr)
        return memoryview(buf).cast("B").toreadonly()

    def recv(self, timeout: float) -> Optional[memoryview]:
        """Waits up to ``timeout`` seconds, blocked on the channel's wake-up event (an idle
        subscriber costs no CPU); None at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.try_recv()
            if m is not None:
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._wake.timed_wait(iox2.Duration.from_micros(max(1, int(left * 1e6))))


class Workload:
    """A workload's channels, read from its environment, on a node named after its
    instance (so that the daemon can tell whose node died)."""

    def __init__(self, env: Mapping[str, str]):
        self.inputs: Dict[str, Tuple[str, int, int]] = {}
        self.outputs: Dict[str, Tuple[str, int, int]] = {}
        for k, v in env.items():
            if k.startswith(ENV_PREFIX + "IN_"):
                self.inputs[k[len(ENV_PREFIX) + 3 :].lower()] = parse_channel(v)
            elif k.startswith(ENV_PREFIX + "OUT_"):
                self.outputs[k[len(ENV_PREFIX) + 4 :].lower()] = parse_channel(v)
        inst = env.get("BULKHEAD_INSTANCE")
        # Named after the instance, cut to iceoryx2's 128 bytes, as the Rust SDK does.
        name = f"bulkhead:{inst}"[:128] if inst else f"bulkhead-workload:{os.getpid()}"
        self._node = _node(env, name)

    @classmethod
    def from_env(cls) -> "Workload":
        return cls(os.environ)

    def input(self, name: str) -> Subscriber:
        if name not in self.inputs:
            raise KeyError(f"this workload has no input channel {name!r} (declared: {', '.join(self.inputs)})")
        service, _, depth = self.inputs[name]
        return Subscriber(self._node, service, depth)

    def output(self, name: str) -> Publisher:
        if name not in self.outputs:
            raise KeyError(f"this workload has no output channel {name!r} (declared: {', '.join(self.outputs)})")
        service, max_payload, _ = self.outputs[name]
        return Publisher(self._node, service, max_payload)


class Host:
    """The host's end: open an instance's input for publishing and its output for
    subscribing (service names from ``bulkhead get ID -o json``)."""

    def __init__(self, prefix: Optional[str] = None, root: Optional[str] = None):
        env = {}
        if prefix:
            env["BULKHEAD_IOX2_PREFIX"] = prefix
        if root:
            env["BULKHEAD_IOX2_ROOT"] = root
        self._node = _node(env, f"bulkhead-host:{os.getpid()}")

    def publisher(self, service: str, max_payload: int) -> Publisher:
        return Publisher(self._node, service, max_payload)

    def subscriber(self, service: str, depth: int) -> Subscriber:
        return Subscriber(self._node, service, depth)
