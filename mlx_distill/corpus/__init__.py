"""Stage 0: teacher clients, solver / verifier / rewriter agents and the append-only corpus store.

``python -m mlx_distill corpus build`` (see ``build.py``) turns problems into verified
chain-of-thought traces; ``clients.py`` is shared with the evaluator.
"""
