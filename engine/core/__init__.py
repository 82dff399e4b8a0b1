"""The bottom layer: errors, the plan type, numerics, quantized modules and the precision registry,
statistics, labels and the one tokenization (the data sets sit just above, in engine.data).
Nothing here knows a model family."""
