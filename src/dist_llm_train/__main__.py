"""`python -m dist_llm_train` is the `dist-llm-train` command."""

from dist_llm_train.cli.main import app

if __name__ == "__main__":
    app()
