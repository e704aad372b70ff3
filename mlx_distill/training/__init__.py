"""training wing (docstring to be written)."""
