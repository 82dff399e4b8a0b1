"""The engine's one error base: an input it cannot use, said in one line.

The CLI prints such an error as one line on stderr and exits 2; the pages show it and keep running.
Anything else that escapes is a bug, and shows as one.
"""


class EngineError(ValueError):
    """Something a user gave (a plan, a model, a data set, an option) cannot be used; the message says why."""
