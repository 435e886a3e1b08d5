"""Sweeps: a grid of jobs launched as subprocesses, their state and summary."""
