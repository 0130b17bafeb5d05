"""What the two kernel backends share: refuse a device someone else shapes, record state before touching it,
run the plan, roll back on the first failure, and on `clear` remove exactly what was added and check that the
device's qdiscs are back to the recorded snapshot."""

from __future__ import annotations

import shlex
import time
from abc import abstractmethod
from typing import Any

from dist_llm_train.netem.backends import ShapingBackend, ShapingError
from dist_llm_train.netem.kernel import shell
from dist_llm_train.netem.kernel.tc_tree import clear_commands
from dist_llm_train.netem.profile.resolve import egress_links, ingress_link
from dist_llm_train.netem.profile.schema import Profile


class KernelBackend(ShapingBackend):
    """Template for tc-based backends; subclasses provide `plan` and may add `_start` / `_stop` hooks."""

    @abstractmethod
    def _ifb_for(self, profile: Profile, node: str | None, dev: str, workers: list[str] | None) -> str | None:
        """The IFB device this backend shapes `dev`'s ingress on, or None when the profile needs none."""

    def _start(self, state: dict[str, Any], profile: Profile, node: str | None, dev: str,
               workers: list[str] | None) -> None:
        """Hook run after the commands succeed (e.g. start a daemon); may add keys to `state`."""

    def _stop(self, state: dict[str, Any]) -> list[list[str]]:
        """Hook run first on clear; returns extra commands to run (e.g. iptables deletions)."""
        return []

    def apply(self, profile: Profile, node: str | None, dev: str, workers: list[str] | None = None) -> dict[str, Any]:
        shell.ensure_device(dev)
        commands = self.plan(profile, node, dev, workers)  # validates before anything changes
        if shell.read_state(dev) is not None:
            self.clear(dev)
        snapshot = shell.qdisc_snapshot(dev)
        foreign = shell.foreign_qdiscs(snapshot)
        if foreign:
            raise ShapingError(
                f"{dev} already has qdiscs this tool did not add ({foreign}); remove them first "
                f"(e.g. tc qdisc del dev {dev} root) so that clear can restore the device exactly"
            )
        state: dict[str, Any] = {
            "backend": self.name, "dev": dev, "profile": profile.name, "node": node, "workers": workers,
            "snapshot": snapshot, "ifb": self._ifb_for(profile, node, dev, workers), "commands": commands,
            "applied_at": time.time(), "profile_data": profile.model_dump(mode="json"),
        }
        shell.write_state(dev, state)  # written first, so a crash half-way can still be cleared
        try:
            for cmd in commands:
                shell.run(cmd)
            self._start(state, profile, node, dev, workers)
        except BaseException:
            self.clear(dev)
            raise
        shell.write_state(dev, state)
        return self.describe(dev)

    def clear(self, dev: str) -> list[list[str]]:
        state = shell.read_state(dev)
        if state is None:
            return []
        ran = self._stop(state)
        for cmd in clear_commands(dev, state.get("ifb")):
            shell.run(cmd, check=False)
            ran.append(cmd)
        if shell.device_exists(dev):
            after = shell.qdisc_snapshot(dev)
            if after != state["snapshot"]:
                raise ShapingError(f"{dev}: qdiscs after clear {after} differ from before apply {state['snapshot']}")
        shell.drop_state(dev)
        return ran

    def describe(self, dev: str) -> dict[str, Any]:
        state = shell.read_state(dev)
        out: dict[str, Any] = {"backend": self.name, "dev": dev, "applied": state is not None}
        if state is None:
            return out
        profile = Profile.model_validate(state["profile_data"])
        links = egress_links(profile, state["node"], state["workers"])
        out.update(
            profile=state["profile"], node=state["node"], other_backend=state["backend"] != self.name,
            egress={str(k or "default"): v.model_dump(mode="json") for k, v in links.items()},
            ingress=(lambda x: x.model_dump(mode="json") if x else None)(
                ingress_link(profile, state["node"], state["workers"])),
            commands=[shlex.join(c) for c in state["commands"]],
        )
        if shell.device_exists(dev):
            out["qdiscs"] = shell.qdisc_snapshot(dev)
        return out
