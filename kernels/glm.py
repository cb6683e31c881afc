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

Imports jax only; nothing here calls ``jax.jit``.
"""
import jax
import jax.numpy as jnp

__all__ = ["LINKS", "cell_terms", "leaf_expansion", "inverse_link"]

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


def leaf_expansion(link: str, theta, successes, size, arm, leaf, num_leaves: int):
    """Second-order expansion of every leaf's log-likelihood at ``theta`` (G, 2).

    ℓ_g(θ) ≈ c_g + h_gᵀθ − ½ θᵀ W_g θ with W_g = Σ_t w_gt x_t x_tᵀ (the curvature),
    h_g = ∇ℓ_g(θ̂) + W_g θ̂ and c_g = ℓ_g(θ̂) − ∇ℓ_g(θ̂)ᵀθ̂ − ½ θ̂ᵀ W_g θ̂, exact at θ̂.

    Returns
    -------
    (W (G, 2, 2), h (G, 2), c) with ``c`` the scalar Σ_g c_g.
    """
    eta = theta[leaf, 0] + arm * theta[leaf, 1]
    ll, grad, curv = cell_terms(link, eta, successes, size)

    def per_leaf(v):
        return jax.ops.segment_sum(v, leaf, num_segments=num_leaves)

    g0, g1 = per_leaf(grad), per_leaf(grad * arm)
    w00, w11 = per_leaf(curv), per_leaf(curv * arm)  # arm ∈ {0, 1}: w01 = w11
    w = jnp.stack([jnp.stack([w00, w11], -1), jnp.stack([w11, w11], -1)], -2)
    a, b = theta[:, 0], theta[:, 1]
    wa, wb = w00 * a + w11 * b, w11 * (a + b)   # W θ
    h = jnp.stack([g0 + wa, g1 + wb], -1)
    constant = ll.sum() - jnp.sum(g0 * a + g1 * b) - 0.5 * jnp.sum(a * wa + b * wb)
    return w, h, constant
