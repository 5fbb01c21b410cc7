"""Geometry estimators, one per file, each checked against closed-form truth (docs/method.md §2-§6).

`compute_scores(model, x, cfg, cond)` is the one entry point the scoring stage needs; the estimator
functions are exported for tests, benchmarks and notebooks.
"""

from scanner.geometry.cfg_norm import cfg_norm
from scanner.geometry.flipd import find_knee, flipd, flipd_sweep
from scanner.geometry.local_pca import local_pca
from scanner.geometry.normal_bundle import nb_lid
from scanner.geometry.p_laplace import p_column, p_laplace, p_laplace_flux
from scanner.geometry.scores import compute_scores, score_columns
from scanner.geometry.trace import Linearization, eps_jvp, eps_trace

__all__ = ["Linearization", "cfg_norm", "compute_scores", "eps_jvp", "eps_trace", "find_knee", "flipd", "flipd_sweep",
           "local_pca", "nb_lid", "p_column", "p_laplace", "p_laplace_flux", "score_columns"]
