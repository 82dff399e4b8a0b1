"""Evaluation: the one path from a plan to accuracy, agreement, flips, KL and McNemar, incremental
from any cut of a previous plan's states, and the sessions that keep those states."""
