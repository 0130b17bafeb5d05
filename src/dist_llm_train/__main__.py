"""`python -m dist_llm_train` is the `dist-llm-train` command (and how embedded mode starts its children)."""

from dist_llm_train.embedded.processes import die_with_parent_if_asked

die_with_parent_if_asked()

from dist_llm_train.cli.main import app  # noqa: E402  (after the parent-death hook, before heavy imports)

if __name__ == "__main__":
    app()
