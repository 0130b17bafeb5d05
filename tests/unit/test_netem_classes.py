"""Traffic classes: DSCP marks on real sockets and parsing them back from packets."""

from __future__ import annotations

import socket

import pytest

from dist_llm_train.netem.profile.classes import DSCP, TRAFFIC_CLASSES, class_of_ipv4_packet, mark_socket, tos_byte


def test_codepoints_distinct_and_nonzero() -> None:
    assert len(set(DSCP.values())) == len(TRAFFIC_CLASSES) == 4
    assert all(0 < v < 64 for v in DSCP.values())


@pytest.mark.parametrize("tc", TRAFFIC_CLASSES)
def test_mark_socket_sets_tos(tc: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        mark_socket(s, tc)  # type: ignore[arg-type]
        assert s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == DSCP[tc] << 2  # type: ignore[index]


def test_mark_socket_ipv6_and_errors() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        mark_socket(s, "ps_sync")
        assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS) == tos_byte("ps_sync")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(ValueError, match="unknown traffic"):
        mark_socket(s, "bulk")  # type: ignore[arg-type]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, pytest.raises(ValueError, match="AF_INET"):
        mark_socket(s, "task")


def test_class_of_packet_roundtrip_over_loopback() -> None:
    assert class_of_ipv4_packet(bytes([0x45, tos_byte("heartbeat")])) == "heartbeat"
    assert class_of_ipv4_packet(bytes([0x45, 0])) is None
    assert class_of_ipv4_packet(bytes([0x60, tos_byte("task")])) is None  # IPv6 header: not parsed here
