"""Per-cell log-likelihood, gradient and curvature of the GLM families, and each
leaf's second-order expansion in the information form of ``gaussian_tree``.

A cell (leaf g, arm t) holds ``successes`` s = Σy and ``size`` m: the trials
Σtrials for the logit link (bernoulli: m = n), the exposure ΣE for the log
link (exposure 1 per row unless given). With η = α_g + τ_g·t and x_t = (1, t):

    logit:  ℓ = s η − m log(1 + eᵑ)     ℓ' = s − m p          −ℓ'' = m p (1 − p)
    log:    ℓ = s η − m eᵑ              ℓ' = s − m eᵑ         −ℓ'' = m eᵑ

up to constants that do not depend on η (the binomial coefficients, Σ y log E − log y!).
Both are concave in η, so the joint log posterior of the tree is concave and
its Hessian is tree-structured (MATH.md, "Binary and count outcomes").

Imports jax and numpy only; nothing here calls ``jax.jit``.
"""
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LINKS", "cell_terms", "leaf_expansion", "inverse_link", "independent_newton_step",
           "independent_log_marginal", "hermite_rule"]

LINKS = {"bernoulli": "logit", "binomial": "logit", "poisson": "log"}

# exp(η) is evaluated at min(η, _ETA_MAX): a Newton iterate far out in the tail must not overflow.
_ETA_MAX = 60.0


def inverse_link(link: str, eta):
    """Mean per unit size: the probability (logit) or the rate per unit exposure (log)."""
    return jax.nn.sigmoid(eta) if link == "logit" else jnp.exp(jnp.minimum(eta, _ETA_MAX))


def cell_terms(link: str, eta, successes, size):
    """(ℓ, dℓ/dη, −d²ℓ/dη²) per cell; cells with size 0 (padding) give zeros."""
    if link == "logit":
        p = jax.nn.sigmoid(eta)
        return successes * eta - size * jax.nn.softplus(eta), successes - size * p, size * p * (1.0 - p)
    if link == "log":
        rate = size * jnp.exp(jnp.minimum(eta, _ETA_MAX))
        return successes * eta - rate, successes - rate, rate
    raise ValueError(f"unknown link {link!r}; expected logit or log")


def leaf_expansion(link: str, theta, successes, size):
    """Second-order expansion of every leaf's log-likelihood at ``theta`` (G, 2).

    ``successes`` and ``size`` are (G, 2): each leaf's totals in the control (column 0) and
    treated (column 1) arm, zeros for a missing arm. A leaf holds at most one cell per
    arm, so this dense layout is exact and needs no scatter: η_g0 = α_g, η_g1 = α_g + τ_g.

    ℓ_g(θ) ≈ c_g + h_gᵀθ − ½ θᵀ W_g θ with W_g = Σ_t w_gt x_t x_tᵀ (the curvature),
    h_g = ∇ℓ_g(θ̂) + W_g θ̂ and c_g = ℓ_g(θ̂) − ∇ℓ_g(θ̂)ᵀθ̂ − ½ θ̂ᵀ W_g θ̂, exact at θ̂.

    Returns
    -------
    (W (G, 2, 2), h (G, 2), c) with ``c`` the scalar Σ_g c_g.
    """
    a, b = theta[:, 0], theta[:, 1]
    ll0, g_0, w_0 = cell_terms(link, a, successes[:, 0], size[:, 0])
    ll1, g_1, w_1 = cell_terms(link, a + b, successes[:, 1], size[:, 1])
    g0, g1 = g_0 + g_1, g_1
    w00, w11 = w_0 + w_1, w_1  # x_1 = (1, 1): the treated cell fills every entry, so w01 = w11
    w = jnp.stack([jnp.stack([w00, w11], -1), jnp.stack([w11, w11], -1)], -2)
    wa, wb = w00 * a + w11 * b, w11 * (a + b)   # W θ
    h = jnp.stack([g0 + wa, g1 + wb], -1)
    constant = jnp.sum(ll0 + ll1) - jnp.sum(g0 * a + g1 * b) - 0.5 * jnp.sum(a * wa + b * wb)
    return w, h, constant


# --- one level: leaves independent given the hyperparameters ---------------------------------
#
# With a single grouping level every leaf's prior is N(μ, Σ) and the leaves are independent
# given (μ, Σ): the Newton step and the marginal likelihood are elementwise over leaves, with
# no tree pass and cheap reverse-mode derivatives.


def _arm_terms(link, theta, successes, size):
    a, b = theta[:, 0], theta[:, 1]
    ll0, g0, w0 = cell_terms(link, a, successes[:, 0], size[:, 0])
    ll1, g1, w1 = cell_terms(link, a + b, successes[:, 1], size[:, 1])
    return ll0 + ll1, g0 + g1, g1, w0 + w1, w1


def independent_newton_step(link: str, theta, successes, size, prior_cov, prior_mean):
    """One Newton step for every leaf's (α, τ) under the prior N(μ, Σ), elementwise.

    θ' = (Λ + W)⁻¹ (Λμ + Wθ + ∇ℓ(θ)) with Λ = Σ⁻¹ and W the curvature at θ.
    """
    lam = jnp.linalg.inv(prior_cov)
    lam_mu = lam @ prior_mean
    a, b = theta[:, 0], theta[:, 1]
    _, g0, g1, w00, w11 = _arm_terms(link, theta, successes, size)
    a00, a01, a11 = lam[0, 0] + w00, lam[0, 1] + w11, lam[1, 1] + w11
    r0 = lam_mu[0] + w00 * a + w11 * b + g0
    r1 = lam_mu[1] + w11 * (a + b) + g1
    det = a00 * a11 - a01 * a01
    return jnp.stack([(a11 * r0 - a01 * r1) / det, (a00 * r1 - a01 * r0) / det], -1)


def hermite_rule(nodes_per_dim: int):
    """2-D Gauss–Hermite rule for the weight exp(−|z|²/2): (points (k², 2), log weights (k²,))."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes_per_dim)
    za, zb = np.meshgrid(z, z, indexing="ij")
    points = np.stack([za.ravel(), zb.ravel()], -1)
    return points, np.log(np.outer(w, w).ravel())


def independent_log_marginal(link: str, mode, successes, size, prior_cov, prior_mean, nodes_per_dim: int = 1):
    """log ∫ p(y_g | θ) N(θ; μ, Σ) dθ of every leaf (G,), by adaptive Gauss–Hermite quadrature at
    each leaf's mode.

    With f_g(θ) = log p(y_g | θ) + log N(θ; μ, Σ), H_g = −∇²f_g(θ̂_g) = Λ + W_g and
    H_g⁻¹ = L Lᵀ: ∫ e^f ≈ |L| Σ_k w_k exp(f(θ̂ + L z_k) + |z_k|²/2) (Liu & Pierce 1994).
    One node per dimension is the Laplace approximation; a leaf without data (f Gaussian)
    integrates to exactly one for any node count.
    """
    lam = jnp.linalg.inv(prior_cov)
    _, _, _, w00, w11 = _arm_terms(link, mode, successes, size)
    a00, a01, a11 = lam[0, 0] + w00, lam[0, 1] + w11, lam[1, 1] + w11
    det = a00 * a11 - a01 * a01
    c00, c01, c11 = a11 / det, -a01 / det, a00 / det        # H⁻¹
    l00 = jnp.sqrt(c00)
    l10 = c01 / l00
    l11 = jnp.sqrt(c11 - l10 * l10)
    points, log_weights = hermite_rule(nodes_per_dim)
    za, zb = jnp.asarray(points[:, 0]), jnp.asarray(points[:, 1])
    # Every array below is (G, k²): leaves by nodes, elementwise (no gathers, no einsum).
    a = mode[:, 0:1] + l00[:, None] * za
    b = mode[:, 1:2] + l10[:, None] * za + l11[:, None] * zb
    ll = (cell_terms(link, a, successes[:, 0:1], size[:, 0:1])[0]
          + cell_terms(link, a + b, successes[:, 1:2], size[:, 1:2])[0])
    da, db = a - prior_mean[0], b - prior_mean[1]
    quad = lam[0, 0] * da * da + 2.0 * lam[0, 1] * da * db + lam[1, 1] * db * db
    log_det_cov = jnp.log(prior_cov[0, 0] * prior_cov[1, 1] - prior_cov[0, 1] * prior_cov[1, 0])
    terms = (jnp.asarray(log_weights + 0.5 * (points**2).sum(-1)) + ll - 0.5 * quad)
    constant = -0.5 * log_det_cov - jnp.log(2 * jnp.pi)
    return jnp.log(l00 * l11) + jax.scipy.special.logsumexp(terms, axis=-1) + constant

