"""Traffic meters that run inside the guest's network namespaces: UDP echo, paced RTT/loss probes, a UDP rate test.

Why UDP rather than ping: a probe stream carries its own sequence numbers and send timestamps, so one pass of
2000 packets yields both a delay distribution and an exact loss count; probes can carry a DSCP mark (the echo
server reflects the mark it received, as the project's servers do) so per-class shaping is measured in both
directions; and loss does not stall the stream the way it stalls a TCP transfer.

Why kernel timestamps: under qemu TCG on a shared machine the emulated CPU is often starved, and a user-space
process may wake tens of milliseconds after its packet arrived. Arrival times therefore come from the kernel
(SO_TIMESTAMPNS), and the echo server reports how long it held each probe, so the figure compared with the
profile is the time spent in the network path (the qdiscs under test), not in the emulated scheduler. All the
namespaces share one kernel clock, so the one-way delays are meaningful too. The plain user-space RTT is reported
alongside for comparison.

Each role is a subcommand (`echo`, `probe`, `sink`, `blast`) started with `ip netns exec NS python vm_probes.py …`;
results are one JSON object on stdout. Every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass

# Linux values (include/uapi/asm-generic/socket.h); Python's socket module does not export them.
SO_TIMESTAMPNS = 35  # == SCM_TIMESTAMPNS: each datagram carries its kernel arrival time (struct timespec)
SO_RCVBUFFORCE = 33  # root may exceed rmem_max, so a starved receiver does not drop what it has not yet read
TIMESPEC = struct.Struct("@qq")
PROBE = struct.Struct("!IQ")  # sequence number, client send time (ns, CLOCK_REALTIME)
REPLY = struct.Struct("!IQQQ")  # + server kernel arrival time, server send time
STOP = b"STOP"
READY = "READY"


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


@dataclass(frozen=True)
class ProbeResult:
    sent: int
    received: int
    duplicates: int
    rtt_ms: list[float]  # network path: both one-way delays, server hold time excluded
    forward_ms: list[float]
    user_rtt_ms: list[float]  # what a user-space ping would see, scheduling delays included

    @property
    def lost(self) -> int:
        return self.sent - self.received

    def summary(self) -> dict[str, float | int]:
        """Headline figures for reports (the raw samples stay in the lists)."""
        r = sorted(self.rtt_ms)
        return {
            "sent": self.sent, "received": self.received, "lost": self.lost, "duplicates": self.duplicates,
            "loss_pct": 100.0 * self.lost / self.sent if self.sent else 0.0,
            "median_ms": _median(r), "p10_ms": r[len(r) // 10] if r else float("nan"),
            "p90_ms": r[(9 * len(r)) // 10] if r else float("nan"),
            "stdev_ms": statistics.pstdev(r) if len(r) > 1 else 0.0,
            "forward_median_ms": _median(self.forward_ms), "user_rtt_median_ms": _median(self.user_rtt_ms),
        }


@dataclass(frozen=True)
class RateResult:
    bytes_received: int
    packets_received: int
    seconds: float

    @property
    def mbit_s(self) -> float:
        return self.bytes_received * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


def _ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[int, int]:
    """(TOS byte, kernel arrival time in ns) from recvmsg's ancillary data; 0 for what is absent."""
    tos = arrival = 0
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == socket.IP_TOS and data:
            tos = data[0]
        elif level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= TIMESPEC.size:
            sec, nsec = TIMESPEC.unpack_from(data)
            arrival = sec * 1_000_000_000 + nsec
    return tos, arrival


def _udp(rcvbuf: int = 4 << 20) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return sock


ANC_SPACE = socket.CMSG_SPACE(TIMESPEC.size) + socket.CMSG_SPACE(4)


def echo(bind: str, port: int, max_seconds: float) -> int:
    """Reflect each probe with its DSCP, adding the kernel arrival time and the send time; stop on STOP/deadline."""
    sock = _udp()
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
    sock.bind((bind, port))
    sock.settimeout(0.5)
    print(READY, flush=True)
    deadline, current_tos, echoed = time.monotonic() + max_seconds, 0, 0
    while time.monotonic() < deadline:
        try:
            data, anc, _flags, addr = sock.recvmsg(2048, ANC_SPACE)
        except TimeoutError:
            continue
        if data == STOP:
            break
        if len(data) < PROBE.size:
            continue
        tos, arrival = _ancillary(anc)
        if tos != current_tos:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
            current_tos = tos
        seq, t_client = PROBE.unpack_from(data)
        reply = REPLY.pack(seq, t_client, arrival, time.time_ns())
        sock.sendto(reply + data[len(reply):], addr)
        echoed += 1
    sock.close()
    return echoed


def probe(host: str, port: int, count: int, interval_s: float, tos: int, size: int,
          drain_s: float) -> ProbeResult:
    """Send `count` probes every `interval_s`, collect echoes until all are back or `drain_s` after the last send."""
    if count < 1 or interval_s <= 0 or size < REPLY.size or drain_s <= 0:
        raise ValueError(f"count >= 1, interval > 0, size >= {REPLY.size} and drain > 0 are required")
    sock = _udp()
    if tos:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    sock.connect((host, port))
    sock.setblocking(False)
    pad = bytes(size - PROBE.size)
    rtt: dict[int, float] = {}
    fwd: list[float] = []
    user: list[float] = []
    dups = sent = 0
    start = last_send = last_recv = time.monotonic()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    hard_deadline = start + count * interval_s * 4 + drain_s + 5.0  # bounds the loop even if pacing slips
    while (now := time.monotonic()) < hard_deadline:
        while sent < count and now >= start + sent * interval_s:  # catch up in a burst if the VM stalled
            # A refusal reports an ICMP error for an earlier probe; this probe counts as sent (and maybe lost).
            with contextlib.suppress(ConnectionRefusedError):
                sock.send(PROBE.pack(sent, time.time_ns()) + pad)
            sent += 1
            last_send = now
        # Done when every echo is back, or after drain_s past the last send once echoes have stopped coming for
        # a second (a starved VM delivers late, not never; closing early would count late echoes as lost).
        if sent == count and (len(rtt) == count or now >= max(last_send + drain_s, last_recv + 1.0)):
            break
        wait = start + sent * interval_s - now if sent < count else 0.05
        for _ in sel.select(min(max(wait, 0.0), 0.05)):
            while True:
                try:
                    data, anc, _flags, _addr = sock.recvmsg(4096, ANC_SPACE)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if len(data) < REPLY.size:
                    continue
                last_recv = time.monotonic()
                seq, t_tx, t_srv_rx, t_srv_tx = REPLY.unpack_from(data)
                arrival = _ancillary(anc)[1] or time.time_ns()
                if seq in rtt:
                    dups += 1
                    continue
                rtt[seq] = ((t_srv_rx - t_tx) + (arrival - t_srv_tx)) / 1e6
                fwd.append((t_srv_rx - t_tx) / 1e6)
                user.append((time.time_ns() - t_tx) / 1e6)
    sel.close()
    sock.close()
    return ProbeResult(sent=sent, received=len(rtt), duplicates=dups, rtt_ms=[rtt[k] for k in sorted(rtt)],
                       forward_ms=fwd, user_rtt_ms=user)


def sink(bind: str, port: int, idle_s: float, max_seconds: float) -> RateResult:
    """Count what arrives; the rate runs from the first to the last kernel arrival time, ended by `idle_s` quiet."""
    sock = _udp(16 << 20)
    sock.bind((bind, port))
    sock.settimeout(idle_s)
    print(READY, flush=True)
    deadline = time.monotonic() + max_seconds
    first = last = 0
    nbytes = npkts = 0
    while time.monotonic() < deadline:
        try:
            data, anc, _flags, _addr = sock.recvmsg(65536, ANC_SPACE)
        except TimeoutError:
            if npkts:
                break
            continue
        arrival = _ancillary(anc)[1] or time.time_ns()
        if npkts == 0:
            first = arrival  # the first datagram opens the window; it is not counted in it
        else:
            nbytes += len(data) + 28  # IPv4 + UDP headers: htb shapes whole IP packets
        npkts += 1
        last = arrival
    sock.close()
    return RateResult(bytes_received=nbytes, packets_received=npkts, seconds=(last - first) / 1e9)


def blast(host: str, port: int, seconds: float, mbit_s: float, size: int) -> dict[str, float]:
    """Offer `size`-byte datagrams paced at `mbit_s` for `seconds`.

    The socket is non-blocking: a datagram refused because the shaper's queue is pushing back (EAGAIN) was still
    *offered* on time, so `offered_mbit` tells "the sender kept up" apart from "the emulated CPU could not".
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.setblocking(False)
    payload = bytes(size)
    wire = size + 28
    gap = wire * 8 / (mbit_s * 1e6)
    start = time.monotonic()
    end = start + seconds
    offered = sent = 0
    while (now := time.monotonic()) < end:
        due = start + offered * gap
        if now < due:
            time.sleep(min(due - now, 0.01))
            continue
        offered += 1
        try:
            sock.send(payload)
            sent += 1
        except (BlockingIOError, ConnectionRefusedError):
            pass  # back-pressure, or an ICMP error for an earlier datagram: offered, not sent
    elapsed = time.monotonic() - start
    sock.close()
    return {"offered_mbit": offered * wire * 8 / elapsed / 1e6, "sent_mbit": sent * wire * 8 / elapsed / 1e6,
            "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="role", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--bind", required=True)
    e.add_argument("--port", type=int, required=True)
    e.add_argument("--max-seconds", type=float, default=120.0)
    p = sub.add_parser("probe")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--interval-ms", type=float, default=2.0)
    p.add_argument("--tos", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--drain-s", type=float, default=3.0)
    p.add_argument("--stop", action="store_true", help="tell the echo server to exit afterwards")
    s = sub.add_parser("sink")
    s.add_argument("--bind", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--idle-s", type=float, default=1.5)
    s.add_argument("--max-seconds", type=float, default=60.0)
    b = sub.add_parser("blast")
    b.add_argument("--host", required=True)
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--seconds", type=float, default=3.0)
    b.add_argument("--mbit", type=float, required=True)
    b.add_argument("--size", type=int, default=1400, help="datagram payload bytes (keep it under the MTU)")
    a = ap.parse_args(argv)
    if a.role == "echo":
        out: dict[str, object] = {"echoed": echo(a.bind, a.port, a.max_seconds)}
    elif a.role == "probe":
        res = probe(a.host, a.port, a.count, a.interval_ms / 1000, a.tos, a.size, a.drain_s)
        if a.stop:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s_stop:
                s_stop.sendto(STOP, (a.host, a.port))
        out = {**asdict(res), **res.summary()}
    elif a.role == "sink":
        r = sink(a.bind, a.port, a.idle_s, a.max_seconds)
        out = {**asdict(r), "mbit_s": r.mbit_s}
    else:
        out = {**blast(a.host, a.port, a.seconds, a.mbit, a.size)}
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
