"""Compute that runs in-process or inside Ray actors: checkpoint I/O, merge math, planning."""
