"""`python -m dist_llm_train.netem …` runs the netem CLI (`dist-llm-train netem …`) without the rest of the app."""

from dist_llm_train.cli.netem import main

main()
