"""The product pipeline: bootstrap, pull, run, export, health."""
