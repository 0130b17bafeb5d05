"""What the control plane needs from whichever engine simulates training (and a null one for `--rounds 0`).

Every hook is a timestamped fact: the control plane calls it at the virtual time the thing happens, and the
engine may apply it whenever it likes as long as it respects that time.
"""

from __future__ import annotations

from typing import Protocol


class DataPlane(Protocol):
    """What an engine offers the control plane."""

    def on_members(self, slots: list[int]) -> None: ...

    def on_death(self, slot: int) -> None: ...

    def activate(self, slot: int, first_request_at: float) -> None: ...

    def deactivate(self, slot: int) -> None: ...

    def telemetry(self) -> dict[int, float]: ...


class NoDataPlane:
    """For control-plane-only runs (rounds = 0, the seed's heartbeat/scheduling simulation)."""

    def on_members(self, slots: list[int]) -> None:
        pass

    def on_death(self, slot: int) -> None:
        pass

    def activate(self, slot: int, first_request_at: float) -> None:
        pass

    def deactivate(self, slot: int) -> None:
        pass

    def telemetry(self) -> dict[int, float]:
        return {}
