"""Shaping an embedded run (`dist-llm-train run --profile P`): what the launcher starts and hands each worker.

Userspace (the default, no root): the launcher starts the shaper service (`serve shaper`) after the controller
and the parameter server and before the workers, with a star topology — each worker → controller for
heartbeat, task and telemetry (three relays, same target) and → parameter server for ps_sync, one relay per
shard with `--ps-shards P` (the relays of a worker share its rate: topology.py, shaper.py). Each worker then
gets its per-class controller URLs, its PS relays (replacing the addresses the assignment carries, in shard
order) and the ports file, from which it learns the configured links it measures against. A node override's
`compute_slowdown` (the straggler) becomes that worker's `--compute-slowdown`.

`--shaping kernel` would put every worker in its own network namespace behind a veth pair shaped by the kernel
backends; embedded mode does not do that (yet) and refuses with a pointer to Compose mode, which does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from dist_llm_train.netem.profile.loading import load_profile
from dist_llm_train.netem.profile.schema import Profile, ProfileError
from dist_llm_train.netem.userspace.topology import ShapingTopology

SHAPING_MODES = ("userspace", "kernel")
# Short runs need samples, and a probe every 2 s keeps each class's connection warm (uvicorn drops idle ones
# after 5 s; a sample over a fresh connection includes the handshake and is discarded). Four tiny requests.
PROBE_INTERVAL_S = 2.0
KERNEL_REFUSAL = (
    "--shaping kernel is not available for embedded runs: it needs every worker in its own network namespace "
    "behind a veth pair, which `run` does not set up. Use --shaping userspace (the default), or Compose mode "
    "(make up PROFILE=...), where each container shapes its own interface with the kernel backends."
)


def validate(profile: str, shaping: str) -> Profile:
    """Load and check `--profile`/`--shaping` before anything starts; ProfileError names the problem."""
    if shaping not in SHAPING_MODES:
        raise ProfileError(f"--shaping must be one of {', '.join(SHAPING_MODES)}, got {shaping!r}")
    if shaping == "kernel":
        raise ProfileError(KERNEL_REFUSAL)
    return load_profile(profile)


@dataclass
class EmbeddedShaping:
    profile: Profile
    profile_spec: str
    topology: ShapingTopology
    workdir: Path

    @classmethod
    def prepare(
        cls,
        profile: str,
        shaping: str,
        workers: list[str],
        controller_url: str,
        ps_address: str,
        workdir: Path,
    ) -> EmbeddedShaping:
        p = validate(profile, shaping)
        controller = controller_url.split("://", 1)[-1].rstrip("/")
        topo = ShapingTopology.star(workers, controller, ps_address)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "topology.json").write_text(topo.model_dump_json(indent=1))
        # The profile goes to the child as validated JSON, so a name resolves once, here.
        (workdir / "profile.json").write_text(json.dumps(p.model_dump(mode="json")))
        return cls(p, profile, topo, workdir)

    @property
    def ports_file(self) -> Path:
        return self.workdir / "ports.json"

    def shaper_argv(self) -> list[str]:
        return [
            "serve",
            "shaper",
            "--profile",
            str(self.workdir / "profile.json"),
            "--topology",
            str(self.workdir / "topology.json"),
            "--ports-out",
            str(self.ports_file),
        ]

    def ready(self) -> bool:
        return self.ports_file.is_file()

    def _relays(self) -> dict[tuple[str, str], str]:
        """(src, class) -> relay address; ps_sync: every shard's relay, comma-separated in shard order."""
        info = json.loads(self.ports_file.read_text())
        by_dst = {(r["src"], r["traffic_class"], r["dst"]): r["listen"] for r in info["relays"]}
        relays = {(src, cls): addr for (src, cls, _), addr in by_dst.items() if cls != "ps_sync"}
        for w in self.topology.workers:
            relays[(w, "ps_sync")] = ",".join(by_dst[(w, "ps_sync", n)] for n in self.topology.ps_nodes)
        return relays

    def worker_argv(self, name: str) -> list[str]:
        """The `serve worker` options that route `name`'s traffic through its relays."""
        relays = self._relays()
        return [
            "--controller",
            f"http://{relays[(name, 'task')]}",
            "--controller-heartbeat-url",
            f"http://{relays[(name, 'heartbeat')]}",
            "--controller-telemetry-url",
            f"http://{relays[(name, 'telemetry')]}",
            "--ps-address-override",
            relays[(name, "ps_sync")],
            "--links-file",
            str(self.ports_file),
            "--link-probe-interval",
            str(PROBE_INTERVAL_S),
        ]

    def compute_slowdown(self, name: str) -> float | None:
        override = self.profile.node_override(name, self.topology.workers)
        return override.compute_slowdown if override and override.compute_slowdown > 1 else None
