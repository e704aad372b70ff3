"""Imported by the grading forkserver only (``tasks.grading``), never by the package itself: math-verify's
parser and sympy's caches are built once here, before any worker is forked from the server, so a worker
(a replacement after a timeout included) is ready in milliseconds and its first cases do not pay for
first-use initialisation (a first ``\\sum`` once took seconds, enough to meet the time limit on a loaded
machine)."""

from mlx_distill.tasks.equivalence import judge

for _pred, _gold in (("x+1", "1+x"), ("\\frac{1}{2}", "0.5"), ("a_n = \\sum_{k=0}^{n-1} a_k a_{n-k}", "a_n=1"),
                     ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)"), ("(1,2]", "\\{1,2\\}"),
                     ("x \\in [1,2]", "[1,2]"), ("\\sin(x)^2", "1-\\cos^2 x"), ("2i", "i+i"), ("x>3", "(3,\\infty)")):
    judge(_pred, _gold)
