"""Model knowledge: loading any sequence classifier, its classes, the layer inventory, the model's
structure as found by running it, and the staged forward that resumes inside the model's own forward."""
