"""Measured vs configured for the kernel backends, across a veth pair between two throwaway namespaces (tests and
benchmarks/shaping.py; judged with stats.py).

`NetnsPair` creates namespaces `<prefix>a`/`<prefix>b` joined by a veth pair and, on exit — also after a failure
— clears shaping on both ends (which stops any delayer daemon) and deletes the namespaces, taking every qdisc,
iptables rule and device inside them along. Shaping is applied with the CLI inside each namespace, exactly as a
user would. Measurements: one-way delay and forward loss from a UDP probe stream (same host, same clock), rate
from the bytes leaving the shaped sender interface during a saturating paced UDP flood (wire bytes, what htb
meters).

Forward loss is the responder's count of probes it received, so it is only right for the first probe session
against a responder: the count is kept per client address, and a later session that happens to get the same
ephemeral port adds to it (seen: 3,962 "received" of 2,000 sent). Start a responder per loss measurement.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

PY = sys.executable
# Probe client and responder run at a low real-time priority (as the delayer does) so that CPU contention from
# whatever else the machine runs is not measured as link delay.
RT = ["chrt", "-f", "5"] if shutil.which("chrt") and os.geteuid() == 0 else []


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@dataclass
class NetnsPair:
    prefix: str = field(default_factory=lambda: f"dlt{os.getpid() % 100000}")
    subnet: str = "10.77.0"
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    offered_mbit: float | None = None  # what the last `flood_rate` really offered (see there)

    @property
    def ns(self) -> tuple[str, str]:
        return f"{self.prefix}a", f"{self.prefix}b"

    @property
    def dev(self) -> tuple[str, str]:
        return f"{self.prefix}va", f"{self.prefix}vb"

    @property
    def ip(self) -> tuple[str, str]:
        return f"{self.subnet}.1", f"{self.subnet}.2"

    def __enter__(self) -> NetnsPair:
        try:
            for ns in self.ns:
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", self.dev[0], "netns", self.ns[0], "type", "veth", "peer", "name", self.dev[1],
               "netns", self.ns[1])
            for ns, dev, ip in zip(self.ns, self.dev, self.ip, strict=True):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        for ns, dev in zip(self.ns, self.dev, strict=True):
            if ns in sh("ip", "netns", "list", check=False):
                self.netem(ns, "clear", "--dev", dev, check=False)
                sh("ip", "netns", "del", ns, check=False)

    def exec(self, ns: str, *cmd: str, check: bool = True, timeout: float = 120) -> str:
        env = {**os.environ, **self.env}
        proc = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout,
                              env=env)
        if check and proc.returncode:
            raise RuntimeError(f"[{ns}] {' '.join(cmd)} failed: {proc.stderr.strip()[-800:]}")
        return proc.stdout

    def netem(self, ns: str, *args: str, check: bool = True) -> str:
        return self.exec(ns, PY, "-m", "dist_llm_train.netem", *args, check=check)

    def responder(self, port: int = 7777, seconds: float = 300, ready_timeout: float = 60.0) -> None:
        """Probe responder in namespace b; returns once it listens.

        A fixed start-up sleep is not enough on a loaded machine: probes that arrive before the UDP socket is
        bound are lost (counted as link loss) and the ICMP port-unreachable they trigger fails the client's
        connected socket. The responder binds its UDP socket before its TCP listener, so a TCP listener on
        the port means both are up.
        """
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[1], *RT, PY, "-m", "dist_llm_train.netem", "probe",
                              "--listen", f"{self.ip[1]}:{port}", "--seconds", str(seconds)],
                             env={**os.environ, **self.env})
        self.procs.append(p)
        deadline = time.monotonic() + ready_timeout
        while not self.exec(self.ns[1], "ss", "-Hltn", f"sport = :{port}").strip():
            if p.poll() is not None:
                raise RuntimeError(f"probe responder on {self.ip[1]}:{port} exited ({p.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"probe responder on {self.ip[1]}:{port} not up after {ready_timeout} s")
            time.sleep(0.05)

    def py(self, ns: str, code: str) -> Any:
        return json.loads(self.exec(ns, *RT, PY, "-c", code).strip().splitlines()[-1])

    def udp(self, count: int, interval_s: float = 0.002, traffic_class: str | None = None,
            port: int = 7777) -> dict[str, Any]:
        """Probe stream a→b: one-way delays (ms), forward loss."""
        tc = repr(traffic_class)
        return dict(self.py(self.ns[0], (
            "import json; from dist_llm_train.netem.measure.probe import measure_udp as m; "
            f"r = m({self.ip[1]!r}, {port}, count={count}, interval_s={interval_s}, traffic_class={tc}); "
            "print(json.dumps({'one_way_ms': r.one_way_ms, 'rtt_ms': r.rtt_ms, 'sent': r.sent, "
            "'forward_received': r.forward_received}))")))

    def tx_bytes(self) -> int:
        info = json.loads(sh("ip", "-n", self.ns[0], "-s", "-j", "link", "show", "dev", self.dev[0]))
        return int(info[0]["stats64"]["tx"]["bytes"])

    def flood_rate(self, rate_mbit: float, seconds: float = 3.0, port: int = 7778) -> float:
        """Wire rate (Mbit/s) leaving a's interface while offering 1.5× `rate_mbit`, after 1.5 s of queue fill.

        `offered_mbit` is set to what the flood really offered over the same window (headers included): a
        sender held back by a busy CPU can offer less than the link's rate, and then the wire rate says
        nothing about the shaper beyond "it passed what it got".

        The flood and the byte counter's sampler run in one real-time process inside namespace a; each sample
        is stamped right after its read, and the window opens 1.5 s after the flood really started. Timed from
        here instead (a fixed sleep, counters read through `ip` subprocesses, a flooder without real-time
        priority), a 100 Mbit/s link read 93-100 in five runs beside four busy processes and once 85 in CI-like
        load, where this reads 99.4-100.
        """
        out = self.py(self.ns[0], _FLOOD_SAMPLER.format(dev=self.dev[0], host=self.ip[1], port=port,
                                                        mbit=rate_mbit * 1.5, seconds=seconds + 1.5))
        window = [(t, b, n) for t, b, n in out["samples"] if t >= out["start"] + 1.5]
        if len(window) < 2:
            raise RuntimeError(f"flood sampler returned {len(window)} samples after the warm-up")
        (t0, b0, n0), (t1, b1, n1) = window[0], window[-1]
        self.offered_mbit = (n1 - n0) * (out["size"] + 42) * 8 / (t1 - t0) / 1e6
        return (b1 - b0) * 8 / (t1 - t0) / 1e6


_FLOOD_SAMPLER = """
import json, threading, time
from dist_llm_train.netem.measure.probe import udp_flood
samples, stop, sent = [], threading.Event(), [0]

def sample():
    while not stop.is_set():
        with open("/sys/class/net/{dev}/statistics/tx_bytes") as f:
            value = int(f.read())
        samples.append((time.monotonic(), value, sent[0]))  # stamped right after the read: a consistent pair
        stop.wait(0.05)

sampler = threading.Thread(target=sample)
start = time.monotonic()
sampler.start()
udp_flood({host!r}, {port}, {mbit}, {seconds}, size=1400, progress=sent)
stop.set()
sampler.join()
print(json.dumps({{"start": start, "samples": samples, "size": 1400}}))
"""

