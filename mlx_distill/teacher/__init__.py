"""teacher wing (docstring to be written)."""
