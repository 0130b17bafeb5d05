"""Every typer command of `dist-llm-train`, each a thin call into the package that does the work.

`main.app` is the entry point; `run` (run, demo-ml, demo-basic), `serve` (+ `serve_shaper`), `simulate`,
`experiments` (run-experiments), `netem`, `client_cmds` (submit-job, status, metrics), `config_cmds`;
`options` holds the options several commands share, so one idea has one name everywhere.
"""

__all__ = ["client_cmds", "config_cmds", "experiments", "main", "netem", "options", "run", "serve", "simulate"]
