"""Measuring a link: RTT, one-way delay, loss (UDP echo) and rate (TCP bulk or a paced UDP flood).

The responder (`serve`) answers UDP probes with its own receive time and how many probes it has seen from that
client, so one probe stream yields round-trip times, forward one-way delays (meaningful when both ends share a
clock — namespaces on one host do) and forward loss separately from return loss. On the same port a TCP sink
counts bulk bytes and reports them, for goodput. Everything is bounded by timeouts; nothing here needs root.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import struct
import time
from dataclasses import dataclass, field

from dist_llm_train.netem.profile.classes import TrafficClass, mark_socket

_PROBE = struct.Struct("!Id")  # seq, client send time
_REPLY = struct.Struct("!IddI")  # seq, client send time, server receive time, server's count for this client
_STATS_SEQ = 0xFFFFFFFF


@dataclass
class UdpResult:
    sent: int
    rtt_ms: list[float] = field(default_factory=list)
    one_way_ms: list[float] = field(default_factory=list)
    forward_received: int = 0

    @property
    def forward_loss(self) -> float:
        return 1 - self.forward_received / self.sent if self.sent else 0.0

    @property
    def round_trip_loss(self) -> float:
        return 1 - len(self.rtt_ms) / self.sent if self.sent else 0.0

    def summary(self) -> dict[str, float]:
        med = statistics.median
        return {"sent": self.sent, "rtt_ms_median": med(self.rtt_ms) if self.rtt_ms else float("nan"),
                "one_way_ms_median": med(self.one_way_ms) if self.one_way_ms else float("nan"),
                "forward_loss": self.forward_loss, "round_trip_loss": self.round_trip_loss}


class _Echo:
    """UDP echo stamping replies with the time it read the probe. Not the kernel's SO_TIMESTAMPNS: that stamp
    is taken when the device receives the packet, *before* an ingress shaper (the fallback's NFQUEUE) holds it,
    so it would hide exactly the delay being measured."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.counts: dict[tuple[str, int], int] = {}

    def on_readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            now = time.time()
            if len(data) < _PROBE.size:
                continue
            seq, t_send = _PROBE.unpack_from(data)
            if seq != _STATS_SEQ:
                self.counts[addr] = self.counts.get(addr, 0) + 1
            with contextlib.suppress(OSError):
                self.sock.sendto(_REPLY.pack(seq, t_send, now, self.counts.get(addr, 0)), addr)


def _udp(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    if port or host:
        sock.bind((host, port))
    return sock


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total, first, last = 0, 0.0, 0.0
    while chunk := await reader.read(1 << 16):
        last = time.monotonic()
        first = first or last
        total += len(chunk)
    writer.write(struct.pack("!Qd", total, last - first))
    await writer.drain()
    writer.close()


async def serve(host: str, port: int, stop: asyncio.Event | None = None) -> None:
    """UDP echo + TCP sink on (host, port) until `stop` is set (forever when None)."""
    loop = asyncio.get_running_loop()
    sock = _udp(host, port)
    echo = _Echo(sock)
    loop.add_reader(sock.fileno(), echo.on_readable)
    server = await asyncio.start_server(_sink, host, port)
    try:
        await (stop.wait() if stop else asyncio.Event().wait())
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
        server.close()


def measure_udp(host: str, port: int, count: int = 500, interval_s: float = 0.002, size: int = 64,
                traffic_class: TrafficClass | None = None, drain_s: float = 1.2) -> UdpResult:
    """Send `count` probes paced `interval_s` apart; collect echoes until `drain_s` after the last."""
    sock = _udp("")
    if traffic_class:
        mark_socket(sock, traffic_class)
    pad = b"\0" * max(0, size - _PROBE.size)
    res, seen, fwd = UdpResult(sent=count), set(), 0

    def drain() -> None:
        nonlocal fwd
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            now = time.time()
            seq, t_send, t_srv, n = _REPLY.unpack_from(data)
            fwd = max(fwd, n)
            if seq != _STATS_SEQ and seq not in seen:
                seen.add(seq)
                res.rtt_ms.append((now - t_send) * 1000)
                res.one_way_ms.append((t_srv - t_send) * 1000)

    try:
        sock.connect((host, port))
        start = time.monotonic()
        for seq in range(count):
            while time.monotonic() < start + seq * interval_s:
                drain()
                time.sleep(min(0.0005, interval_s))
            sock.send(_PROBE.pack(seq, time.time()) + pad)
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:  # stats requests, repeated so some survive loss
            sock.send(_PROBE.pack(_STATS_SEQ, time.time()))
            time.sleep(0.05)
            drain()
    finally:
        sock.close()
    res.forward_received = fwd
    return res


def measure_tcp_rate(host: str, port: int, duration_s: float = 3.0,
                     traffic_class: TrafficClass | None = None) -> float:
    """Goodput in Mbit/s of one TCP bulk transfer, as counted by the sink."""
    with socket.create_connection((host, port), timeout=10) as sock:
        if traffic_class:
            mark_socket(sock, traffic_class)
        buf, end = b"\0" * (1 << 16), time.monotonic() + duration_s
        while time.monotonic() < end:
            sock.sendall(buf)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        data = b""
        while len(data) < 16 and (chunk := sock.recv(16 - len(data))):
            data += chunk
    total, span = struct.unpack("!Qd", data)
    return total * 8 / span / 1e6 if span > 0 else 0.0


def udp_flood(host: str, port: int, rate_mbit: float, duration_s: float, size: int = 1400,
              traffic_class: TrafficClass | None = None, progress: list[int] | None = None) -> int:
    """Offer `rate_mbit` of UDP for `duration_s` (paced in 1 ms slices); returns datagrams handed to the kernel.

    `progress`, when given, holds one number that the flood keeps equal to the datagrams sent so far, so a
    sampler in another thread can tell what was really offered (a busy CPU can hold the pacing back)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if traffic_class:
        mark_socket(sock, traffic_class)
    sock.setblocking(False)
    payload, sent = b"\0" * size, 0
    per_s = rate_mbit * 1e6 / 8 / (size + 42)
    try:
        sock.connect((host, port))
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < duration_s:
            due = int(elapsed * per_s) + 1
            while sent < due:
                with contextlib.suppress(OSError):  # queue full: the shaper drops, which is the point
                    sock.send(payload)
                sent += 1
            if progress is not None:
                progress[0] = sent
            time.sleep(0.001)
    finally:
        sock.close()
    return sent
