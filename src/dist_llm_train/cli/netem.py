"""`dist-llm-train netem …`: list profiles, show the exact commands, apply, show, clear, probe.

Every command works inside any network namespace (`ip netns exec NS dist-llm-train netem apply …`): state is
kept per (namespace, device), and output says exactly what changed on which interface, like Pumba/Toxiproxy.
`python -m dist_llm_train.netem …` runs this same app through `main` without importing the rest of the CLI
(containers shape their interface with it before their service starts).
"""

from __future__ import annotations

import asyncio
import json
import shlex
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dist_llm_train.netem.backends import ShapingBackend, ShapingError, choose_shaping_backend, get_shaping_backend
from dist_llm_train.netem.kernel import shell
from dist_llm_train.netem.profile.classes import TRAFFIC_CLASSES
from dist_llm_train.netem.profile.loading import available_profiles, load_profile
from dist_llm_train.netem.profile.resolve import egress_links
from dist_llm_train.netem.profile.schema import Link, Profile, ProfileError
from dist_llm_train.netem.userspace.backend import is_topology_spec

netem_app = typer.Typer(help="WAN emulation: shape links per profile and measure them.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="name, file, or inline JSON/YAML")]
DevOpt = Annotated[str, typer.Option("--dev", "-d", help="network interface to shape (userspace: topology JSON)")]
NodeOpt = Annotated[str | None, typer.Option("--node", "-n", help="this node's name (for node overrides)")]
WorkersOpt = Annotated[str | None, typer.Option("--workers", help="comma-separated worker names, in order")]
BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="auto, tc_netem, kernel_fallback or userspace")]
DirOpt = Annotated[str | None, typer.Option("--profile-dir", help="extra directory of <name>.yaml profiles")]


def main() -> None:
    """`python -m dist_llm_train.netem`: the netem commands alone, under the name users know them by."""
    netem_app(prog_name="dist-llm-train netem")


def _fail(msg: str) -> None:
    err.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)


def _load(spec: str, profile_dir: str | None) -> Profile:
    try:
        return load_profile(spec, profile_dir)
    except ProfileError as e:
        _fail(str(e))
        raise  # unreachable; keeps type checkers sure the function returns


def _workers(s: str | None) -> list[str] | None:
    return [w.strip() for w in s.split(",") if w.strip()] if s else None


def _backend(name: str, dev: str) -> tuple[ShapingBackend, list[str]]:
    if name == "auto":
        if is_topology_spec(dev):
            return get_shaping_backend("userspace"), [f"userspace: yes — {dev} is a topology; only relays shape those"]
        return choose_shaping_backend(kernel_only=True)
    return get_shaping_backend(name), []


@netem_app.command()
def profiles(profile_dir: DirOpt = None) -> None:
    """Table of every profile on the search path (round-trip figures as written in the files)."""
    table = Table("name", "figures", "delay ms", "jitter ms", "loss %", "rate Mbit/s", "classes", "nodes",
                  "schedule")
    for name, path in available_profiles(profile_dir).items():
        try:
            p = load_profile(str(path))
        except ProfileError as e:
            table.add_row(name, "[red]invalid[/red]", str(e)[:60], "", "", "", "", "", "")
            continue
        link = p.link
        table.add_row(name, p.figures, f"{link.delay_ms:g}", f"{link.jitter_ms:g}", f"{link.loss_pct:g}",
                      f"{link.rate_mbit:g}" if link.rate_mbit else "-", ",".join(p.classes) or "-",
                      ",".join(p.nodes) or "-", p.schedule.kind if p.schedule else "-")
    out.print(table)


@netem_app.command()
def plan(profile: ProfileOpt, dev: DevOpt, node: NodeOpt = None, workers: WorkersOpt = None,
         backend: BackendOpt = "tc_netem", profile_dir: DirOpt = None) -> None:
    """Print the exact commands `apply` would run (dry run; changes nothing)."""
    p = _load(profile, profile_dir)
    try:
        b = get_shaping_backend(backend)
        cmds = b.plan(p, node, dev, _workers(workers))
    except ShapingError as e:
        _fail(str(e))
        return
    for c in cmds:
        print(shlex.join(c))


@netem_app.command()
def apply(profile: ProfileOpt, dev: DevOpt, node: NodeOpt = None, workers: WorkersOpt = None,
          backend: BackendOpt = "auto", profile_dir: DirOpt = None,
          as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Shape DEV for NODE under PROFILE; prints the backend chosen, why, and every command run."""
    p = _load(profile, profile_dir)
    try:
        b, reasons = _backend(backend, dev)
        desc = b.apply(p, node, dev, _workers(workers))
    except ShapingError as e:
        _fail(str(e))
        return
    desc["why"] = reasons
    if as_json:
        print(json.dumps(desc))
        return
    out.print(f"applied profile [bold]{p.name}[/bold] on [bold]{dev}[/bold] with backend [bold]{b.name}[/bold]")
    for r in reasons:
        out.print(f"  {r}")
    for c in desc.get("commands", []):
        out.print(f"  $ {c}", markup=False, highlight=False)


def _state_backend(dev: str) -> ShapingBackend | None:
    if is_topology_spec(dev):
        b = get_shaping_backend("userspace")
        return b if b.describe(dev)["applied"] else None
    state = shell.read_state(dev)
    return get_shaping_backend(state["backend"]) if state else None


@netem_app.command()
def show(dev: DevOpt, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What is applied on DEV: backend, profile, per-class one-way links, live qdiscs."""
    try:
        topology = is_topology_spec(dev)
        if not topology:
            shell.ensure_device(dev)
        b = _state_backend(dev)
        desc: dict[str, Any] = b.describe(dev) if b else {"dev": dev, "applied": False,
                                                          "qdiscs": [] if topology else shell.qdisc_snapshot(dev)}
    except ShapingError as e:
        _fail(str(e))
        return
    if as_json:
        print(json.dumps(desc))
        return
    if not desc["applied"]:
        out.print(f"{dev}: nothing applied by dist-llm-train; qdiscs {desc['qdiscs']}")
        return
    out.print(f"{dev}: profile {desc['profile']} node {desc['node']} backend {desc['backend']}")
    if "relays" in desc:
        _print_relays(desc)
        return
    table = Table("class", "delay ms", "jitter ms", "loss %", "dup %", "rate Mbit/s")
    for cls in ("default", *TRAFFIC_CLASSES):
        link = desc["egress"][cls]
        loss = link["loss"].get("pct", "GE")
        table.add_row(cls, f"{link['delay_ms']:g}", f"{link['jitter_ms']:g}", str(loss),
                      f"{link['duplicate_pct']:g}", str(link["rate_mbit"] or "-"))
    out.print(table)
    for key in ("ingress", "daemon", "not_emulated", "delay_applied_at"):
        if desc.get(key):
            out.print(f"{key}: {desc[key]}")


def _print_relays(desc: dict[str, Any]) -> None:
    from dist_llm_train.netem.userspace.topology import summarise

    table = Table("relay", "listen", "target", "up (src→dst)", "down (dst→src)")
    for r in desc["relays"]:
        table.add_row(f"{r['link']}/{r['traffic_class']}", r["listen"], r["target"],
                      summarise(Link.model_validate(r["up"])), summarise(Link.model_validate(r["down"])))
    out.print(table)
    for key in ("daemon", "schedule", "not_emulated"):
        if desc.get(key):
            out.print(f"{key}: {desc[key]}")
    out.print("loss: modelled (recovery stalls; TCP cannot lose bytes)")


@netem_app.command()
def clear(dev: DevOpt) -> None:
    """Remove everything dist-llm-train applied on DEV and check the device is as it was before."""
    try:
        b = _state_backend(dev)
        if b is None:
            out.print(f"{dev}: nothing to clear")
            return
        ran = b.clear(dev)
    except ShapingError as e:
        _fail(str(e))
        return
    out.print(f"cleared {dev} ({b.name}); device restored to its state before apply")
    for c in ran:
        out.print(f"  $ {shlex.join(c)}", markup=False, highlight=False)


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        _fail(f"expected HOST:PORT, got {s!r}")
    return host, int(port)


@netem_app.command()
def probe(
    to: Annotated[str | None, typer.Option("--to", help="HOST:PORT of a `probe --listen` responder")] = None,
    listen: Annotated[str | None, typer.Option("--listen", help="run a responder on HOST:PORT")] = None,
    seconds: Annotated[float, typer.Option(help="responder lifetime (0 = forever) / rate test length")] = 3.0,
    count: Annotated[int, typer.Option(min=10, max=100_000)] = 500,
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="print configured vs measured")] = None,
    node: NodeOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Measure RTT, one-way delay, loss (UDP) and goodput (TCP) to a responder; compare with a profile."""
    from dist_llm_train.netem.measure import probe as pr

    if listen:
        host, port = _hostport(listen)

        async def run() -> None:
            stop = asyncio.Event()
            if seconds > 0:
                asyncio.get_running_loop().call_later(seconds, stop.set)
            await pr.serve(host, port, stop)

        asyncio.run(run())
        return
    if not to:
        _fail("give --to HOST:PORT (or --listen HOST:PORT to answer probes)")
        return
    host, port = _hostport(to)
    res = pr.measure_udp(host, port, count=count).summary()
    res["goodput_mbit"] = pr.measure_tcp_rate(host, port, seconds) if seconds > 0 else float("nan")
    configured = None
    if profile:
        link = egress_links(_load(profile, None), node)[None]
        configured = {"rtt_ms": 2 * link.delay_ms, "one_way_ms": link.delay_ms, "loss": link.loss_pct / 100,
                      "rate_mbit": link.rate_mbit}
    if as_json:
        print(json.dumps({"measured": res, "configured": configured}))
        return
    table = Table("quantity", "configured", "measured")
    cfg = configured or {}
    rows = [("RTT ms (median)", cfg.get("rtt_ms"), res["rtt_ms_median"]),
            ("one-way ms (median, same clock only)", cfg.get("one_way_ms"), res["one_way_ms_median"]),
            ("forward loss", cfg.get("loss"), res["forward_loss"]),
            ("round-trip loss", None, res["round_trip_loss"]),
            ("rate / TCP goodput Mbit/s", cfg.get("rate_mbit"), res["goodput_mbit"])]
    for name, c, m in rows:
        table.add_row(name, "-" if c is None else f"{c:.4g}", f"{m:.4g}")
    out.print(table)
