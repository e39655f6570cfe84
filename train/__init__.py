"""Command-line entry points for training."""
