"""Composition: `apply_plan` builds a model from a plan and explicit inputs; calibration and
SmoothQuant's smoothing are their own steps that compute those inputs (prepare, then convert)."""
