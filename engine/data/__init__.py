"""Evaluation sets (the vendored and user data, their calibration holdout) and whether the HuggingFace Hub answers."""
