"""evaluation wing (docstring to be written)."""
