"""The userspace backend's engine: an asyncio TCP relay that shapes each direction like a one-way link.

A relay listens on a local port and forwards every accepted connection to one target. Each direction of each
connection is a `Pipe` with three stages, mirroring what a packet meets on a real path:

  1. arrival — bytes are timestamped as the relay reads them; above a high-water mark the relay stops reading,
     so the sender's own TCP flow control pushes back (a relay cannot tail-drop);
  2. bottleneck — a token bucket per relay direction, shared by every connection of that relay, releases
     bytes at the link rate (rate changes from a schedule take effect at the next piece);
  3. propagation — each piece is due at departure + a delay drawn like netem's (`LinkSampler`, the same
     sampler the kernel fallback's delayer uses) + a loss stall, and pieces are released in order.

Order is kept because TCP delivers a byte stream: a piece never overtakes its predecessor. That is also what
an application sees through netem with jitter — the kernel reorders packets, TCP reassembles them, and a byte
is delivered only once every earlier byte has arrived — so back-to-back data sees the running maximum of the
drawn delays, while spaced-out messages (heartbeats, probes) see the configured distribution.

Loss is **modelled**, never real: TCP cannot lose bytes, so each MSS-sized segment is drawn lost with the
link's loss model and a lost segment stalls its piece by what the sender's recovery would cost — one RTT when
at least three segments follow it (fast retransmit, RFC 5681), else a retransmission timeout of RTT + 200 ms
(Linux's floor for the RTO's variance term). Every fidelity report labels this backend's loss "modelled".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dist_llm_train.netem.profile.schema import Link
from dist_llm_train.netem.sampling import LinkSampler

log = logging.getLogger(__name__)

# -- pacing: shared by every connection of a relay direction ---------------------------------------------------
MSS_BYTES = 1448
RTO_FLOOR_S = 0.2
BURST_S = 0.005  # token-bucket depth in seconds of rate: absorbs timer overshoot without visible bursts
QUANTUM_S = 0.005  # a rate-limited piece is about this long on the wire, so rate changes apply promptly
MAX_PIECE_BYTES = 256 << 10
INFLIGHT_CAP_BYTES = 8 << 20  # bytes "on the wire" per pipe before the relay stops taking more
HIGH_WATER_BYTES = 1 << 20
LATE_S = 0.005  # a release later than this counts in `DirectionStats.late_releases`


def rto_s(rtt_s: float) -> float:
    """Retransmission timeout the loss model charges for a tail loss."""
    return rtt_s + RTO_FLOOR_S


class LinkState:
    """The current one-way link of one relay direction; a schedule replaces it while connections run."""

    def __init__(self, link: Link, rtt_s: float) -> None:
        self.link, self.rtt_s, self.version = link, rtt_s, 0

    def set(self, link: Link, rtt_s: float) -> None:
        if link != self.link or rtt_s != self.rtt_s:
            self.link, self.rtt_s = link, rtt_s
            self.version += 1

    @property
    def rate_bps(self) -> float | None:
        return self.link.rate_mbit * 1e6 if self.link.rate_mbit else None

    def quantum(self) -> int:
        rate = self.rate_bps
        if rate is None:
            return MAX_PIECE_BYTES
        return int(min(max(rate / 8 * QUANTUM_S, MSS_BYTES), MAX_PIECE_BYTES))


class TokenBucket:
    """Serialisation at the link rate: `reserve` returns when the last of `nbytes` leaves the bottleneck."""

    def __init__(self) -> None:
        self.t_free = -math.inf

    def reserve(self, nbytes: int, rate_bps: float, now: float) -> float:
        start = max(self.t_free, now - BURST_S)
        self.t_free = start + nbytes * 8 / rate_bps
        return self.t_free


MAX_AIM_EARLY_S = 0.002
"""The most a `Timer` aims early, so the most a piece can leave before it is due (a bound tests rely on)."""


class Timer:
    """Sleeps until loop-time deadlines, aiming early by what it learnt about its own lateness (epoll rounds
    timeouts up to whole milliseconds, and a busy loop adds more). A wake-up that is then on time releases
    pieces up to that much early: at most `MAX_AIM_EARLY_S` per direction."""

    def __init__(self) -> None:
        self.lateness = 0.0

    async def sleep_until(self, due: float) -> None:
        loop = asyncio.get_running_loop()
        wait = due - self.lateness - loop.time()
        if wait <= 0:
            return
        await asyncio.sleep(wait)
        late = loop.time() - due
        self.lateness = min(max(self.lateness + 0.05 * late, 0.0), MAX_AIM_EARLY_S)


@dataclass
class DirectionStats:
    bytes: int = 0
    pieces: int = 0
    segments: int = 0
    segments_lost: int = 0  # modelled
    stalls: int = 0
    stall_seconds: float = 0.0
    # How late pieces left against their due time (the relay's own timing error, added to the link's delay):
    # a busy CPU shows up here. Arrival lateness (data read late) is not visible from inside the process.
    late_releases: int = 0  # pieces released more than LATE_S after they were due
    max_late_ms: float = 0.0


def sampler_for(link: Link, rng: random.Random) -> LinkSampler:
    """The delay and loss sampler for one direction of one connection, drawing from `rng`."""
    loss = link.loss.model_dump() if link.loss_pct > 0 else None
    return LinkSampler(
        link.delay_ms, link.jitter_ms, link.distribution, link.delay_correlation_pct / 100.0, loss, rng
    )


# -- the relay ------------------------------------------------------------------------------------------------
class Endpoint(asyncio.Protocol):
    """One socket of a relayed connection: feeds what it reads to `inbound`; the other pipe writes to it."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.inbound: Pipe | None = None
        self.ready = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Pausing at asyncio's default 64 KiB would stall every few pieces at high rates; 1 MiB keeps a bulk
        # stream flowing while still bounding what waits in userspace.
        transport.set_write_buffer_limits(high=1 << 20)
        self.ready.set()
        self.conn.made(self)

    def data_received(self, data: bytes) -> None:
        if self.inbound is not None:
            self.inbound.feed(data)

    def eof_received(self) -> bool:
        if self.inbound is not None:
            self.inbound.feed_eof()
        return True  # keep the other half open: the reply may still be on its way

    def connection_lost(self, exc: Exception | None) -> None:
        self.writable.set()
        self.conn.lost(self)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.paused and not self.transport.is_closing():
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.paused and not self.transport.is_closing():
            self.paused = False
            self.transport.resume_reading()


class Pipe:
    """One direction of one connection: arrival → bottleneck → propagation, in order."""

    def __init__(
        self,
        state: LinkState,
        bucket: TokenBucket,
        timer: Timer,
        rng: random.Random,
        stats: DirectionStats,
        src: Endpoint,
        dst: Endpoint,
        not_before: float = 0.0,
    ) -> None:
        self.state, self.bucket, self.timer, self.rng, self.stats = state, bucket, timer, rng, stats
        self.src, self.dst = src, dst
        self.pending: deque[tuple[float, bytes]] = deque()
        self.pending_bytes = 0
        self.eof = self.aborted = False
        self.inflight: deque[tuple[float, bytes | None]] = deque()
        self.inflight_bytes = 0
        self.last_due = not_before
        self._data, self._sent, self._space = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._shaper_version = -1  # the LinkState version `_shaper` draws for; a schedule change bumps it
        self._shaper = sampler_for(state.link, rng)

    def feed(self, data: bytes) -> None:
        self.pending.append((asyncio.get_running_loop().time(), data))
        self.pending_bytes += len(data)
        if self.pending_bytes > HIGH_WATER_BYTES:
            self.src.pause_reading()
        self._data.set()

    def feed_eof(self) -> None:
        self.eof = True
        self._data.set()

    def abort(self) -> None:
        """The destination is gone: drop everything queued and let both stages finish."""
        self.aborted = self.eof = True
        self.pending.clear()
        self.inflight.clear()
        self.pending_bytes = self.inflight_bytes = 0
        for ev in (self._data, self._sent, self._space):
            ev.set()

    async def run(self) -> None:
        deliver = asyncio.create_task(self._deliver())
        try:
            await self._serialize()
            await deliver
        finally:
            deliver.cancel()

    def _take(self, quantum: int) -> tuple[bytes, float]:
        """Up to `quantum` bytes from the head of the arrival queue, and the arrival time of the newest."""
        parts, size, newest = [], 0, 0.0
        while self.pending and size < quantum:
            t, data = self.pending[0]
            room = quantum - size
            if len(data) > room:
                self.pending[0] = (t, data[room:])
                data = data[:room]
            else:
                self.pending.popleft()
            parts.append(data)
            size += len(data)
            newest = t
        self.pending_bytes -= size
        if self.pending_bytes < HIGH_WATER_BYTES // 2:
            self.src.resume_reading()
        return b"".join(parts), newest

    def _stall_s(self, nbytes: int) -> float:
        """Modelled recovery time for the segments of this piece the loss model drops (0 when none)."""
        if self._shaper.loss is None:
            return 0.0
        segs = -(-nbytes // MSS_BYTES)
        backlog = self.pending_bytes // MSS_BYTES
        rtt = self.state.rtt_s
        worst = 0.0
        for k in range(segs):
            if self._shaper.lost():
                self.stats.segments_lost += 1
                worst = max(worst, rtt if segs - 1 - k + backlog >= 3 else rto_s(rtt))
        self.stats.segments += segs
        if worst:
            self.stats.stalls += 1
            self.stats.stall_seconds += worst
        return worst

    async def _serialize(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending and not self.eof:
                self._data.clear()
                await self._data.wait()
            if self.aborted:
                return
            if not self.pending:  # EOF after everything was taken: pass it on in order
                self.inflight.append((self.last_due, None))
                self._sent.set()
                return
            if self._shaper_version != self.state.version:
                self._shaper = sampler_for(self.state.link, self.rng)
                self._shaper_version = self.state.version
            piece, arrived = self._take(self.state.quantum())
            base = arrived
            rate = self.state.rate_bps
            if rate is not None:
                departs = self.bucket.reserve(len(piece), rate, loop.time())
                await self.timer.sleep_until(departs)
                base = max(base, departs)
            due = max(base + self._shaper.delay_s() + self._stall_s(len(piece)), self.last_due)
            self.last_due = due
            self.inflight.append((due, piece))
            self.inflight_bytes += len(piece)
            self.stats.pieces += 1
            self._sent.set()
            while self.inflight_bytes > INFLIGHT_CAP_BYTES and not self.aborted:
                self._space.clear()
                await self._space.wait()

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        await self.dst.ready.wait()
        while True:
            while not self.inflight and not self.aborted:
                self._sent.clear()
                await self._sent.wait()
            if self.aborted:
                return
            due, head = self.inflight[0]
            await self.timer.sleep_until(due)
            late = loop.time() - due
            if late > LATE_S and head is not None:  # an EOF is due with the last data, however long ago
                self.stats.late_releases += 1
                self.stats.max_late_ms = max(self.stats.max_late_ms, round(late * 1000, 3))
            horizon = loop.time() + self.timer.lateness
            out: list[bytes] = []
            eof = False
            while self.inflight and self.inflight[0][0] <= horizon:
                _, data = self.inflight.popleft()
                if data is None:
                    eof = True
                    break
                out.append(data)
                self.inflight_bytes -= len(data)
            self._space.set()
            transport = self.dst.transport
            if transport is None or transport.is_closing():
                return
            if out:
                await self.dst.writable.wait()
                buf = b"".join(out)
                transport.write(buf)
                self.stats.bytes += len(buf)
            if eof:
                if transport.can_write_eof():
                    # The peer may be gone already (reset, or never finished connecting): then there is
                    # nothing to half-close, and `Connection._run` closes both sockets anyway.
                    with contextlib.suppress(OSError):
                        transport.write_eof()
                return


class Connection:
    """One accepted client connection and its upstream twin, joined by two pipes."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.client = Endpoint(self)
        self.upstream = Endpoint(self)
        self.task: asyncio.Task[None] | None = None

    def made(self, endpoint: Endpoint) -> None:
        if endpoint is not self.client:
            return
        relay, loop = self.relay, asyncio.get_running_loop()
        n = relay.connections
        relay.connections += 1
        # The client's connect completed locally, at once. Through a real path it would have taken one RTT
        # (SYN, SYN-ACK), so its first data reaches the target no earlier than RTT + one-way delay from now.
        not_before = loop.time() + relay.up.rtt_s + relay.up.link.delay_ms / 1000
        self.client.inbound = Pipe(
            relay.up,
            relay.buckets[0],
            relay.timer,
            random.Random(f"{relay.seed}:{n}:up"),
            relay.stats["up"],
            self.client,
            self.upstream,
            not_before,
        )
        self.upstream.inbound = Pipe(
            relay.down,
            relay.buckets[1],
            relay.timer,
            random.Random(f"{relay.seed}:{n}:down"),
            relay.stats["down"],
            self.upstream,
            self.client,
        )
        self.task = loop.create_task(self._run())

    async def _run(self) -> None:
        relay = self.relay
        assert self.client.inbound is not None and self.upstream.inbound is not None
        pipes = asyncio.gather(self.client.inbound.run(), self.upstream.inbound.run())
        try:
            try:
                await asyncio.get_running_loop().create_connection(lambda: self.upstream, *relay.target)
            except OSError as err:
                log.warning("relay %s: cannot reach %s:%d: %s", relay.name, *relay.target, err)
                pipes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pipes
        finally:  # also when the relay closes and cancels this task: no pipe outlives its connection
            pipes.cancel()
            self.close()
            with contextlib.suppress(ValueError):
                relay.conns.remove(self)

    def lost(self, endpoint: Endpoint) -> None:
        """A socket closed or was reset: what it sent is still delivered, then EOF; nothing more goes in."""
        if endpoint.inbound is not None:
            endpoint.inbound.feed_eof()
        other = self.upstream if endpoint is self.client else self.client
        if other.inbound is not None:
            other.inbound.abort()

    def close(self) -> None:
        for ep in (self.client, self.upstream):
            if ep.transport is not None and not ep.transport.is_closing():
                ep.transport.close()


@dataclass
class Relay:
    """Listens on (host, port) and relays to `target`, shaping client→target with `up`, back with `down`."""

    name: str
    target: tuple[str, int]
    up: LinkState
    down: LinkState
    seed: str = "0"
    host: str = "127.0.0.1"
    port: int = 0
    timer: Timer = field(default_factory=Timer)
    buckets: tuple[TokenBucket, TokenBucket] = field(default_factory=lambda: (TokenBucket(), TokenBucket()))
    stats: dict[str, DirectionStats] = field(
        default_factory=lambda: {"up": DirectionStats(), "down": DirectionStats()}
    )
    connections: int = 0
    conns: list[Connection] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def start(self) -> int:
        """Bind and listen; returns the port (chosen by the OS when 0)."""

        def factory() -> Endpoint:
            conn = Connection(self)
            self.conns.append(conn)
            return conn.client

        self._server = await asyncio.get_running_loop().create_server(factory, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def set_links(self, up: Link, down: Link) -> None:
        rtt = (up.delay_ms + down.delay_ms) / 1000.0
        self.up.set(up, rtt)
        self.down.set(down, rtt)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [c.task for c in self.conns if c.task is not None]
        for conn in list(self.conns):
            if conn.task is not None:
                conn.task.cancel()
            conn.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": f"{self.host}:{self.port}",
            "target": f"{self.target[0]}:{self.target[1]}",
            "connections": self.connections,
            "stats": {k: vars(v).copy() for k, v in self.stats.items()},
        }


def make_relay(
    name: str,
    target: tuple[str, int],
    up: Link,
    down: Link,
    seed: str = "0",
    host: str = "127.0.0.1",
    port: int = 0,
) -> Relay:
    rtt = (up.delay_ms + down.delay_ms) / 1000.0
    return Relay(
        name=name,
        target=target,
        up=LinkState(up, rtt),
        down=LinkState(down, rtt),
        seed=seed,
        host=host,
        port=port,
    )
