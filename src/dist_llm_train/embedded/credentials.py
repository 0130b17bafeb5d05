"""Secure by default for local runs: every `run` / `demo-basic` makes a fresh cluster secret of its own.

The parameter server and the controller get the secret (in their environment, never on a command line);
each worker a join credential bound to its name, from which the controller issues it its own at
registration; the launcher itself an admin credential for the controller's API and the PS. Nothing is
written to disk: the secret dies with the run (docs/security.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dist_llm_train.core.credentials import TokenAuthority, generate_secret
from dist_llm_train.paramserver.transport.security import PSCredentials, curve_keypair

SECRET_ENV = "DLT_CLUSTER_SECRET"
TOKEN_ENV = "DLT_AUTH_TOKEN"


@dataclass
class RunCredentials:
    secret: str = field(default_factory=generate_secret, repr=False)

    def __post_init__(self) -> None:
        self.authority = TokenAuthority(self.secret)
        self.admin_token = self.authority.mint_for("admin", "launcher")

    def service_env(self) -> dict[str, str]:
        """For the PS and the controller."""
        return {SECRET_ENV: self.secret}

    def worker_env(self, name: str) -> dict[str, str]:
        """For worker `name`: a join credential that registers that name only, and no secret."""
        return {TOKEN_ENV: self.authority.mint_for("join", name), SECRET_ENV: ""}

    def ps_credentials(self, transport: str) -> PSCredentials:
        """The launcher's own PS client: admin, plus the PS's CURVE key on zmq."""
        curve = curve_keypair(self.authority.curve_seed)[0].decode() if transport == "zmq" else None
        return PSCredentials(token=self.admin_token, curve_server_key=curve)
