"""Analyses over the one evaluation path: sensitivity sweeps and search, precision comparison,
robustness to typos, SmoothQuant's alpha sweep, the layer map's toggle benchmark, the grid."""
