"""The bottom layer: errors, the plan type, numerics, quantized modules and the precision registry,
statistics, labels, data sets and the one tokenization. Nothing here knows a model family."""
