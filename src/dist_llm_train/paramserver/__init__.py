"""paramserver package."""
