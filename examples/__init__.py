"""Runnable examples for sapa-jax (not part of the installed package)."""
