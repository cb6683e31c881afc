"""Convergence diagnostics: rank-normalised split R-hat and bulk ESS.

Vehtari, Gelman, Simpson, Carpenter & Bürkner (2021), "Rank-normalization,
folding, and localization: an improved R-hat". Vectorised over parameters.
"""
from __future__ import annotations

import numpy as np

RHAT_MAX = 1.01
ESS_MIN = 400


def _normal_quantile(p: np.ndarray) -> np.ndarray:
    # SciPy, not jax.scipy: on NumPy arrays each eager JAX op compiles a program of its own
    # (~15 of them here, ~0.5 s a fit).
    from scipy.special import ndtri

    return ndtri(p)


def _rank_normalise(x: np.ndarray) -> np.ndarray:
    """x (chains, draws, P) → normal scores of the pooled ranks, same shape."""
    chains, draws = x.shape[:2]
    flat = x.reshape(chains * draws, -1)
    ranks = np.empty_like(flat)
    order = np.argsort(flat, axis=0, kind="stable")
    np.put_along_axis(ranks, order, np.arange(1, flat.shape[0] + 1, dtype=flat.dtype)[:, None], axis=0)
    scores = _normal_quantile((ranks - 0.375) / (flat.shape[0] + 0.25))
    return scores.reshape(x.shape)


def _split(x: np.ndarray) -> np.ndarray:
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half:]], axis=0)


def rhat(x: np.ndarray) -> np.ndarray:
    """max(bulk, folded) rank-normalised split R-hat; x (chains, draws, P) → (P,)."""
    from numpyro.diagnostics import split_gelman_rubin

    if x.shape[1] < 4:
        return np.full(x.shape[2:], np.nan)
    bulk = split_gelman_rubin(_rank_normalise(x))
    folded = split_gelman_rubin(_rank_normalise(np.abs(x - np.median(x, axis=(0, 1)))))
    return np.maximum(bulk, folded)


def ess_bulk(x: np.ndarray) -> np.ndarray:
    """Bulk effective sample size; x (chains, draws, P) → (P,).

    Capped as Stan caps it: the integrated autocorrelation time is at least 1/log10(n), so
    ESS ≤ n·log10(n) for n draws. NumPyro's estimate alone goes negative or far past n on
    short chains (4 chains × 8 draws of iid normals: below 0 for 5% of parameters)."""
    from numpyro.diagnostics import effective_sample_size

    if x.shape[1] < 4:
        return np.full(x.shape[2:], np.nan)
    ess = np.asarray(effective_sample_size(_rank_normalise(_split(x))))
    n = x.shape[0] * x.shape[1]
    cap = n * np.log10(n)
    return np.where((ess < 0) | (ess > cap), cap, ess)


def summarise(named: dict[str, np.ndarray], divergences: int, extra_messages=()) -> dict:
    """Diagnostics over named draws, each (chains, draws) or (chains, draws, P)."""
    worst_rhat, worst_ess = ("", -np.inf), ("", np.inf)
    for name, draws in named.items():
        x = draws.reshape(draws.shape[0], draws.shape[1], -1).astype(np.float64)
        # A constant parameter (e.g. a fixed-size group's padding) has no R-hat.
        varying = np.ptp(x.reshape(-1, x.shape[2]), axis=0) > 0
        if not varying.any():
            continue
        x = x[:, :, varying]
        r, e = rhat(x), ess_bulk(x)
        if np.nanmax(r) > worst_rhat[1]:
            worst_rhat = (name, float(np.nanmax(r)))
        if np.nanmin(e) < worst_ess[1]:
            worst_ess = (name, float(np.nanmin(e)))
    messages = list(extra_messages)
    if worst_rhat[1] > RHAT_MAX:
        messages.append(f"R-hat {worst_rhat[1]:.3f} > {RHAT_MAX} for {worst_rhat[0]}: chains disagree; "
                        "run more draws or warm-up")
    if worst_ess[1] < ESS_MIN:
        messages.append(f"bulk ESS {worst_ess[1]:.0f} < {ESS_MIN} for {worst_ess[0]}: too few effective "
                        "draws; run more draws or chains")
    if divergences:
        messages.append(f"{divergences} divergent transition(s): the posterior geometry is hard for NUTS; "
                        "results may be biased")
    return {
        "ok": not messages,
        "max_rhat": worst_rhat[1] if np.isfinite(worst_rhat[1]) else None,
        "min_ess_bulk": worst_ess[1] if np.isfinite(worst_ess[1]) else None,
        "divergences": int(divergences),
        "messages": messages,
    }
