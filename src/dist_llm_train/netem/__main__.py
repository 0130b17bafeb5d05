"""`python -m dist_llm_train.netem …` runs the netem CLI."""

from dist_llm_train.netem.cli_entry import main

main()
