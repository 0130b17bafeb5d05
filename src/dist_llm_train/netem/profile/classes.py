"""Traffic classes on the wire: every message is heartbeat, task, telemetry or ps_sync, marked by DSCP.

Why DSCP rather than ports: ports differ per run and per service (ephemeral client ports, configurable server
ports, embedded mode picks free ones), so a port-based filter would have to be rebuilt from every run's config.
A DSCP mark travels in the IP header of each packet whatever the port, both directions of a TCP connection can
carry it (each side marks its own socket), and it is matched identically by `tc u32` (`ip dsfield`), iptables
(`-m dscp`), and by the NFQUEUE delayer reading byte 1 of the IPv4 header. The userspace backend has no packets
to look at; it shapes per class by giving each class its own relay.

Code points are the standard PHBs whose meaning is closest (RFC 4594): heartbeat is network control (CS6) so a
failure detector sees liveness first, task is low-latency data (AF21), telemetry is OAM (CS2), ps_sync is
high-throughput bulk data (AF11). Unmarked traffic (DSCP 0) gets the profile's default link.
"""

from __future__ import annotations

import socket
from typing import Literal, get_args

TrafficClass = Literal["heartbeat", "task", "telemetry", "ps_sync"]
TRAFFIC_CLASSES: tuple[TrafficClass, ...] = get_args(TrafficClass)

DSCP: dict[TrafficClass, int] = {"heartbeat": 48, "task": 18, "telemetry": 16, "ps_sync": 10}
"""DSCP code point (6 bits) per class."""

# Per-class id used for htb class ids, queue marks and metric labels; 0 is the default (unmarked) class.
CLASS_INDEX: dict[TrafficClass, int] = {c: i + 1 for i, c in enumerate(TRAFFIC_CLASSES)}


def tos_byte(traffic_class: TrafficClass) -> int:
    """The IPv4 TOS / IPv6 traffic-class byte: DSCP in the top six bits, ECN bits left zero."""
    return DSCP[_check(traffic_class)] << 2


def class_of_dscp(dscp: int) -> TrafficClass | None:
    """Inverse of DSCP; None for unmarked or foreign code points."""
    for c, v in DSCP.items():
        if v == dscp:
            return c
    return None


def class_of_ipv4_packet(packet: bytes) -> TrafficClass | None:
    """Read the class from a raw IPv4 packet (byte 1 is TOS)."""
    if len(packet) < 2 or packet[0] >> 4 != 4:
        return None
    return class_of_dscp(packet[1] >> 2)


def mark_socket(sock: socket.socket, traffic_class: TrafficClass) -> None:
    """Set the DSCP of everything `sock` sends (IP_TOS for IPv4, IPV6_TCLASS for IPv6).

    Call it on both ends of a connection: a server marks its accepted sockets so replies carry the class too.
    """
    tos = tos_byte(traffic_class)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
        return
    if sock.family != socket.AF_INET:
        raise ValueError(f"mark_socket needs an AF_INET or AF_INET6 socket, got {sock.family!r}")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)


def _check(traffic_class: str) -> TrafficClass:
    if traffic_class not in DSCP:
        raise ValueError(f"unknown traffic class {traffic_class!r}; expected one of {', '.join(TRAFFIC_CLASSES)}")
    return traffic_class  # type: ignore[return-value]
