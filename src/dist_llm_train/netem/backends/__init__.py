"""netem/backends package."""
