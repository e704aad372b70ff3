"""Imported by the grading forkserver only (``tasks.grading``), never by the package itself: math-verify's
parser and sympy's caches are built once here, before any worker is forked from the server, so a worker
(a replacement after a timeout included) is ready in milliseconds instead of seconds."""

from mlx_distill.tasks.equivalence import judge

judge("x+1", "1+x")
judge("\\frac{1}{2}", "0.5")
