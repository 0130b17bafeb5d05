"""The `dist-llm-train` command: every subcommand, registered in one place.

Each command lives in its own module under `dist_llm_train.cli` and is a thin call into its package.
"""

from __future__ import annotations

import typer

from dist_llm_train.cli.client_cmds import register_client_commands
from dist_llm_train.cli.config_cmds import config_app, validate_config
from dist_llm_train.cli.experiments import run_experiments
from dist_llm_train.cli.netem import netem_app
from dist_llm_train.cli.run import demo_basic, demo_ml, run
from dist_llm_train.cli.security import certs, secret, token
from dist_llm_train.cli.serve import serve_app
from dist_llm_train.cli.simulate import simulate

app = typer.Typer(
    help="A lab for training language models across bad networks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(serve_app, name="serve")
app.add_typer(config_app, name="config")
app.add_typer(netem_app, name="netem")
app.command("validate-config")(validate_config)
register_client_commands(app)
app.command("simulate")(simulate)
app.command("run-experiments")(run_experiments)
app.command("run")(run)
app.command("demo-ml")(demo_ml)
app.command("demo-basic")(demo_basic)
app.command("secret")(secret)
app.command("token")(token)
app.command("certs")(certs)
