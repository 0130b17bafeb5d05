"""netem package."""
