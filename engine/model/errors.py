"""The model layer's one error: a model name or folder that cannot be loaded or analysed, said in one line."""
from engine.core.errors import EngineError


class ModelError(EngineError):
    """A model name or folder that cannot be loaded or analysed; the message says why."""
