"""The quantization engine: models, data, layer inventory, plans, quantizers, evaluation, measurement.

A pure library (no Streamlit, no disk cache), used by the dashboard's pages and by `python -m engine`.
"""
from engine.data import load_dataset
from engine.evaluation import evaluate
from engine.layers import inventory, list_layers
from engine.models import load_model
from engine.plan import Plan, parse_plan
from engine.quantize import apply_plan

__all__ = ["Plan", "apply_plan", "evaluate", "inventory", "list_layers", "load_dataset", "load_model", "parse_plan"]
