"""All per-image geometry columns in one pass: the single entry point the scoring stage calls.

At the clean point psi x (t = t_laplace): one forward gives eps (score_norm), then one pass of
quadratic forms v^T (d eps/dx) v over the trace directions (Hutchinson probes or the exact basis) with
e_hat = eps / |eps| packed into the last call gives every Delta_p and, for flipd_at "clean" with
t0 == t_laplace, FLIPD (docs/method.md §2, §5). flipd_at "noised" (the default) costs flipd_noises more forwards,
each with flipd_probes directions, at psi(t0) x + sigma z_j (docs/method.md §10); "clean" with another t0 one
more forward and trace pass. NB (cfg.nb) and
the CFG norm (conditional model + cond) are extra plain forwards, and so is score_norm_cal (one per mirror in
cfg.cal_refs, plus one at psi(t_cal) x when t_cal != t_laplace), and so is loss_cal (loss_noises x
(1 + len(cal_refs)) forwards at noised points; scanner/geometry/mirror.py).

Cost per image with P probes, in forward-equivalents of batch B (measured: benchmarks/results/geometry.md):
autograd 1 + (P + 1) JVPs (a CPU JVP ~4-5 forwards); vjp 1 + (P + 1) backwards; fd central 1 + 2 (P + 1);
fd forward-difference 1 + (P + 1). Geometry columns use `cond` when the model is conditional and one is
given (None -> the model's own default, the empty prompt for Stable Diffusion).
"""

from __future__ import annotations

from typing import Any

import torch

from scanner.config import GeometryConfig
from scanner.geometry.cfg_norm import cfg_norm
from scanner.geometry.flipd import flipd_from_parts, flipd_noised_from_parts, noised_traces
from scanner.geometry.mirror import mirror_calibrated_loss, mirror_calibrated_norm
from scanner.geometry.normal_bundle import nb_lid
from scanner.geometry.p_laplace import check_p_values, p_column, p_laplace_from_parts, unit_eps
from scanner.geometry.trace import FD_SCHEMES, QUAD_MODES, Linearization, bview, check_batch, check_choice, time_vector


def score_columns(cfg: GeometryConfig, conditional: bool) -> list[str]:
    """The column names `compute_scores(model, x, cfg, cond)` returns, in order (conditional: the model is
    text-conditional *and* a cond will be passed)."""
    cols = ["lid_flipd", "score_norm"] + [p_column(p) for p in check_p_values(cfg.p_values)]
    if cfg.cal_refs:
        cols += ["score_norm_cal"] + (["loss_cal"] if cfg.loss_noises else [])
    if cfg.nb:
        cols.append("lid_nb")
    if conditional:
        cols.append("cfg_norm")
    return cols


def compute_scores(model: Any, x: torch.Tensor, cfg: GeometryConfig, cond: Any = None, *,
                   chunk: int | None = None, jvp: str | None = None,
                   fd_scheme: str | None = None, seeds: torch.Tensor | None = None,
                   x_refs: dict[str, torch.Tensor] | None = None, only: str | None = None) -> dict[str, torch.Tensor]:
    """x: (B, *sample_shape) clean points in model space; cond: `model.encode_text(captions)` or None.

    Returns {column: (B,) float32 on the CPU} for `score_columns(cfg, model.conditional and cond is not
    None)`: lid_flipd (dimensions; at noised points unless cfg.flipd_at is "clean"), score_norm (|eps(psi x, t_laplace)|, eps units), p_laplace_* (Delta_p
    log p_t at psi x), lid_nb (dimensions), cfg_norm (eps units), score_norm_cal and loss_cal (ratios, ~1 unless
    memorized).
    chunk: (direction, image) pairs per model call, default 2B. jvp: overrides cfg.jvp ("autograd", "fd",
    or "vjp", reverse mode). fd_scheme: overrides cfg.fd_scheme ("central" or "forward").
    seeds: (B,) per-row seeds (trace.row_seeds(keys, cfg.seed)) for the Hutchinson probes and CFG noises, so that
    an image's scores do not depend on its batch; None: cfg.seed for the whole batch.
    x_refs: score_norm_cal's and loss_cal's mirrored points per cal_refs entry when they are not x mirrored in model space
    (a latent model: the images mirrored and encoded, `mirror.pixel_mirrors`); None: x mirrored.
    only: one column of score_columns, returned alone ({only: (B,)}): score_norm, score_norm_cal, loss_cal and cfg_norm
    then cost only their own forwards (the same values as in the full call); any other column computes them all.
    """
    cfg.validate("geometry")  # ConfigError is a ValueError naming the key, the value and the range
    check_batch(model, x)
    if only is not None:
        conditional = bool(getattr(model, "conditional", False)) and cond is not None
        if only not in score_columns(cfg, conditional):
            raise ValueError(f"only={only!r} is not a column of this model and config; columns: "
                             f"{score_columns(cfg, conditional)}")
        fast = _one_column(model, x, cfg, cond if conditional else None, only, seeds, x_refs)
        if fast is not None:
            return {only: fast.detach().to(device="cpu", dtype=torch.float32)}
        full = compute_scores(model, x, cfg, cond, chunk=chunk, jvp=jvp, fd_scheme=fd_scheme, seeds=seeds,
                              x_refs=x_refs)
        return {only: full[only]}
    mode = check_choice("jvp", cfg.jvp if jvp is None else jvp, QUAD_MODES)
    fd_scheme = check_choice("fd_scheme", cfg.fd_scheme if fd_scheme is None else fd_scheme, FD_SCHEMES)
    conditional = bool(getattr(model, "conditional", False)) and cond is not None
    geo_cond = cond if conditional else None
    lin_kw = {"jvp": mode, "fd_eps": cfg.fd_eps, "scheme": fd_scheme, "chunk": chunk}
    tr_kw = {"method": cfg.trace, "probes": cfg.probes, "probe_dist": cfg.probe_dist,
             "seed": cfg.seed if seeds is None else seeds}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        tl = time_vector(cfg.t_laplace, x)
        psi, sigma = model.psi_sigma(tl)
        lin = Linearization(model, bview(psi, x) * x, tl, geo_cond, **lin_kw)
        tr, quad = lin.trace(**tr_kw, extra=unit_eps(lin.eps))
        eps = lin.eps
        del lin  # frees the reverse-mode graph before anything else runs
        if cfg.flipd_at == "noised":
            t0 = time_vector(cfg.t0, x)
            psi0, sigma0 = model.psi_sigma(t0)
            traces = noised_traces(model, x, t0, psi0, sigma0, geo_cond, noises=cfg.flipd_noises, trace=cfg.trace,
                                   probes=cfg.flipd_probes, probe_dist=cfg.probe_dist, jvp=mode, fd_eps=cfg.fd_eps,
                                   scheme=fd_scheme, seed=tr_kw["seed"], chunk=chunk)
            out["lid_flipd"] = flipd_noised_from_parts(model.dim, sigma0, traces)
        elif cfg.t0 == cfg.t_laplace:
            out["lid_flipd"] = flipd_from_parts(model.dim, sigma, tr, eps)
        else:
            t0 = time_vector(cfg.t0, x)
            psi0, sigma0 = model.psi_sigma(t0)
            lin0 = Linearization(model, bview(psi0, x) * x, t0, geo_cond, **lin_kw)
            out["lid_flipd"] = flipd_from_parts(model.dim, sigma0, lin0.trace(**tr_kw)[0], lin0.eps)
            del lin0
        out["score_norm"] = eps.flatten(1).norm(dim=1)
        for p, v in p_laplace_from_parts(eps, sigma, tr, quad[0], cfg.p_values).items():
            out[p_column(p)] = v
        if cfg.cal_refs:
            out["score_norm_cal"] = mirror_calibrated_norm(
                model, x, cfg.t_cal, cfg.cal_refs, geo_cond,
                norm_x=out["score_norm"] if cfg.t_cal == cfg.t_laplace else None, x_refs=x_refs)
            if cfg.loss_noises:
                out["loss_cal"] = _loss_cal(model, x, cfg, geo_cond, seeds, x_refs)
        if cfg.nb:
            out["lid_nb"] = nb_lid(model, x, cfg.nb_t, geo_cond, samples=cfg.nb_samples, seed=cfg.seed + 1,
                                   rank=cfg.nb_rank, rel_threshold=cfg.nb_rel_threshold, chunk=chunk)
        if conditional:
            out["cfg_norm"] = _cfg_norm(model, x, cfg, cond, seeds)
    return {k: out[k].detach().to(device="cpu", dtype=torch.float32) for k in score_columns(cfg, conditional)}


@torch.no_grad()
def _one_column(model: Any, x: torch.Tensor, cfg: GeometryConfig, cond: Any, only: str,
                seeds: torch.Tensor | None, x_refs: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
    """compute_scores' value of `only` from that column's own forwards, or None when it needs the trace."""
    def norm_at(t: float) -> torch.Tensor:
        tv = time_vector(t, x)
        psi, _ = model.psi_sigma(tv)
        return model.eps(bview(psi, x) * x, tv, cond).flatten(1).norm(dim=1)

    if only == "score_norm":
        return norm_at(cfg.t_laplace)
    if only == "score_norm_cal":
        return mirror_calibrated_norm(model, x, cfg.t_cal, cfg.cal_refs, cond,
                                      norm_x=norm_at(cfg.t_laplace) if cfg.t_cal == cfg.t_laplace else None,
                                      x_refs=x_refs)
    if only == "loss_cal":
        return _loss_cal(model, x, cfg, cond, seeds, x_refs)
    if only == "cfg_norm":
        return _cfg_norm(model, x, cfg, cond, seeds)
    return None


def _cfg_norm(model: Any, x: torch.Tensor, cfg: GeometryConfig, cond: Any, seeds: torch.Tensor | None
              ) -> torch.Tensor:
    """The CFG norm with its own noise stream per row (seeds + 2; the config seed + 2 for a batch-wide seed)."""
    return cfg_norm(model, x, cfg.t_cfg, cond, noises=cfg.cfg_noises, seed=cfg.seed + 2 if seeds is None else seeds + 2)


def _loss_cal(model: Any, x: torch.Tensor, cfg: GeometryConfig, cond: Any, seeds: torch.Tensor | None,
              x_refs: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """loss_cal with its own noise stream per row (seeds + 3, like the CFG norm's seeds + 2)."""
    return mirror_calibrated_loss(model, x, cfg.t_loss, cfg.cal_refs, cond, noises=cfg.loss_noises,
                                  seed=cfg.seed + 3 if seeds is None else seeds + 3, x_refs=x_refs)
