"""`python -m dist_llm_train.netem.cli_entry …` — the netem CLI without the rest of the application."""

from dist_llm_train.netem.cli import netem_app


def main() -> None:
    netem_app(prog_name="dist-llm-train netem")


if __name__ == "__main__":
    main()
