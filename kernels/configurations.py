"""One-level Gaussian hierarchies compressed to leaf configurations.

With a single grouping level and no covariates, every leaf ``g`` observes its
arm means ``z_g = (ȳ_g0, ȳ_g1)`` with noise ``diag(σ_0²/n_g0, σ_1²/n_g1)``,
and its ``θ_g = (α_g, τ_g) ~ N(μ, Σ)`` independently of every other leaf. So

    z_g ~ N(A μ, A Σ Aᵀ + diag(σ_0²/n_g0, σ_1²/n_g1)),   A = [[1, 0], [1, 1]],

whose covariance depends on the leaf only through its *configuration*
``(n_g0, n_g1)``. Summed over the ``m_k`` leaves of configuration ``k`` the
marginal needs only their mean ``z̄_k`` and centred scatter
``S_k = Σ (z_g − z̄_k)(z_g − z̄_k)ᵀ``:

    Σ_{g∈k} log N(z_g | Aμ, V_k) = −m_k log 2π − ½ m_k log det V_k
                                    − ½ tr(V_k⁻¹ (S_k + m_k d_k d_kᵀ)),  d_k = z̄_k − Aμ.

Leaves with one arm observed are the same in one dimension (``x = (1, t)``).
The rows themselves add ``Σ_a [−½ (N_a − C_a) log 2πσ_a² − W_a / 2σ_a²] − ½ Σ log n``
(``N_a`` rows, ``C_a`` observed (leaf, arm) pairs and ``W_a`` within-pair sum of
squares in arm ``a``), because ``Π_i N(y_i | m, σ²) = N(ȳ | m, σ²/n) ·
(2πσ²)^{−(n−1)/2} n^{−½} exp(−M2 / 2σ²)``.

The result equals :func:`kernels.gaussian_tree.gaussian_log_marginal` on the
same cells (a test checks value and gradient), but each evaluation costs
O(configurations) instead of O(cells): in a long tail, millions of leaves
with one to a few rows share a few thousand configurations, so NUTS over the
hyperparameters no longer touches the groups at all. The statistics are
formed once, in float64, by :func:`leaf_configurations` (NumPy).

Only jax and numpy are imported; nothing here calls ``jax.jit``.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

__all__ = ["LeafArms", "LeafConfigurations", "leaf_arms", "leaf_configurations", "one_level", "configuration_log_marginal",
           "effect_coefficients", "effect_mean", "leaf_effect_draw", "effect_sums"]


class LeafConfigurations(NamedTuple):
    """Sufficient statistics of a one-level Gaussian hierarchy; padded entries have m = 0."""

    both_count: np.ndarray    # (K2,) float  leaves with both arms observed in this configuration
    both_rows: np.ndarray     # (K2, 2) float  rows per arm (n_0, n_1), 1 for padding
    both_mean: np.ndarray     # (K2, 2) float  mean over those leaves of z = (ȳ_0, ȳ_1)
    both_scatter: np.ndarray  # (K2, 3) float  Σ (z − z̄)(z − z̄)ᵀ entries (00, 01, 11)
    one_count: np.ndarray     # (K1,) float  leaves with one arm observed
    one_arm: np.ndarray       # (K1,) float  that arm, 0 or 1
    one_rows: np.ndarray      # (K1,) float  its rows, 1 for padding
    one_mean: np.ndarray      # (K1,) float  mean of ȳ over those leaves
    one_scatter: np.ndarray   # (K1,) float  Σ (ȳ − mean)²
    arm_rows: np.ndarray      # (2,) float  N_a
    arm_pairs: np.ndarray     # (2,) float  C_a, observed (leaf, arm) pairs
    arm_within: np.ndarray    # (2,) float  W_a, Σ within-pair sums of squares
    log_rows: np.ndarray      # () float  Σ over observed pairs of log n


# Pairs with both members below this are coded through a presence table (no sort).
SMALL_PAIR = 1 << 11


def _codes(a: np.ndarray, b: np.ndarray):
    """Dense codes of the distinct pairs ``(a, b)`` of non-negative integers (leaves,):
    ``(index (leaves,), first (K,), K)``, ``first`` one member leaf of each code.

    Pairs with both members below ``SMALL_PAIR`` (nearly every leaf of a long tail) are
    numbered through a presence table in their (a, b) order, the others after them by
    ``np.unique``: its sort of 10⁷ leaves took 2.7 s on machine A, this 0.4–1.1 s.
    """
    a, b = np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64)
    small = (a < SMALL_PAIR) & (b < SMALL_PAIR)
    # The table spans the small pairs present, not SMALL_PAIR² (4M entries for a 100-leaf fit).
    width = int(b[small].max(initial=0)) + 1
    key = a[small] * width + b[small]
    present = np.bincount(key) > 0
    index = np.empty(a.size, np.int64)
    index[small] = (np.cumsum(present) - 1)[key]
    size = int(present.sum())
    if not small.all():
        big = ~small
        wide = a[big] * (int(b[big].max()) + 1) + b[big]
        _, inverse = np.unique(wide, return_inverse=True)
        index[big] = size + inverse.reshape(-1)
        size += int(inverse.max()) + 1
    first = np.empty(size, np.int64)
    first[index] = np.arange(a.size)    # any member will do: they share the pair
    return index, first, size


def _group(a: np.ndarray, b: np.ndarray, values: np.ndarray):
    """Per configuration, the distinct pairs ``(a, b)`` (leaves,): one member leaf's index,
    the leaf count, and the mean and centred scatter of ``values`` (leaves, d) — two
    passes, float64."""
    index, first, size = _codes(a, b)
    count = np.bincount(index, minlength=size).astype(np.float64)
    mean = np.stack([np.bincount(index, v, size) for v in values.T], axis=1) / count[:, None]
    centred = values - mean[index]
    d = values.shape[1]
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    scatter = np.stack([np.bincount(index, centred[:, i] * centred[:, j], size) for i, j in pairs], axis=1)
    return first, count, mean, scatter


def _padded(values: np.ndarray, size: int, fill: float) -> np.ndarray:
    out = np.full((size,) + values.shape[1:], fill, dtype=np.float64)
    out[: values.shape[0]] = values
    return out


class LeafArms(NamedTuple):
    """Each leaf's mean per arm (0 where the arm has no rows) and its arm configuration: the
    distinct ``(n_0, n_1)`` pairs, which fix a leaf's conditional posterior up to its arm
    means (:func:`effect_coefficients`). A leaf's rows are ``config_rows[config]``."""

    mean: np.ndarray         # (leaves, 2) float  ȳ_g0, ȳ_g1
    config: np.ndarray       # (leaves,) int32  the leaf's row of config_rows
    config_rows: np.ndarray  # (K, 2) float  distinct (n_0, n_1), padded with (0, 0)


def _arms(rows, pair_mean, pad_fn) -> LeafArms:
    index, first, _ = _codes(rows[:, 0], rows[:, 1])
    config_rows = _padded(rows[first], (pad_fn or (lambda k: max(k, 1)))(first.size), 0.0)
    return LeafArms(pair_mean, index.astype(np.int32).reshape(-1), config_rows)


def _pairs(n, mean, m2, arm, leaf, num_leaves: int):
    """Pool the cells of each (leaf, arm) pair: rows, mean and within-pair sum of squares,
    each (leaves, 2), float64; padding cells (n = 0) are dropped."""
    n = np.asarray(n, dtype=np.float64)
    keep = n > 0
    every = bool(keep.all())            # no padding cells: skip five copies

    def kept(values, dtype):
        values = np.asarray(values).astype(dtype, copy=False)
        return values if every else values[keep]

    n = kept(n, np.float64)
    mean, m2 = kept(mean, np.float64), kept(m2, np.float64)
    pair = kept(leaf, np.int64) * 2 + kept(arm, np.int64)
    size = 2 * num_leaves
    rows = np.bincount(pair, n, size)
    sums = np.bincount(pair, n * mean, size)
    pair_mean = np.divide(sums, rows, out=np.zeros(size), where=rows > 0)
    within = np.bincount(pair, m2 + n * (mean - pair_mean[pair]) ** 2, size)
    return rows.reshape(num_leaves, 2), pair_mean.reshape(num_leaves, 2), within.reshape(num_leaves, 2)


def leaf_arms(n, mean, arm, leaf, num_leaves: int, *, pad_fn=None) -> LeafArms:
    """Cells (any order, any number per (leaf, arm)) pooled to each leaf's arms, float64."""
    rows, pair_mean, _ = _pairs(n, mean, np.zeros(np.shape(n)), arm, leaf, num_leaves)
    return _arms(rows, pair_mean, pad_fn)


def one_level(n, mean, m2, arm, leaf, num_leaves: int, *, pad_fn=None) -> tuple[LeafConfigurations, LeafArms]:
    """``leaf_configurations`` and ``leaf_arms`` of the same cells from one pooling pass."""
    rows, pair_mean, within = _pairs(n, mean, m2, arm, leaf, num_leaves)
    return _configurations(rows, pair_mean, within, pad_fn), _arms(rows, pair_mean, pad_fn)


def leaf_configurations(n, mean, m2, arm, leaf, num_leaves: int, *,
                        pad_fn=None) -> LeafConfigurations:
    """Compress cells (any order, any number per (leaf, arm)) to configuration statistics.

    Parameters
    ----------
    n, mean, m2, arm, leaf : array_like (C,)
        Cell rows (0 = padding), mean, within-cell Σ(y − ȳ)², arm 0/1 and leaf index.
    num_leaves : int
        Number of leaves.
    pad_fn : callable, optional
        Maps a configuration count to the padded size (a shape bucket), so that a
        compiled caller rarely sees a new shape. Default: no padding beyond 1.

    Examples
    --------
    >>> c = leaf_configurations([2, 1, 3, 0], [0.5, 1.0, -0.2, 0.0], [0.1, 0.0, 0.4, 0.0],
    ...                         [0, 1, 0, 0], [0, 0, 1, 0], num_leaves=2)
    >>> c.both_count.tolist(), c.one_count.tolist(), c.arm_rows.tolist()
    ([1.0], [1.0], [5.0, 1.0])
    """
    return _configurations(*_pairs(n, mean, m2, arm, leaf, num_leaves), pad_fn)


def _configurations(rows, pair_mean, within, pad_fn) -> LeafConfigurations:
    observed = rows > 0
    both = observed.all(axis=1)
    one = observed.any(axis=1) & ~both
    pad = pad_fn or (lambda k: max(k, 1))

    if both.any():
        first, count, z_mean, scatter = _group(rows[both, 0], rows[both, 1], pair_mean[both])
        both_rows = rows[both][first]
    else:
        count, z_mean, scatter, both_rows = np.zeros(0), np.zeros((0, 2)), np.zeros((0, 3)), np.ones((0, 2))
    k2 = pad(count.size)

    if one.any():
        one_arm_of = observed[one, 1].astype(np.int64)
        one_rows_of = rows[one][np.arange(one.sum()), one_arm_of]
        one_mean_of = pair_mean[one][np.arange(one.sum()), one_arm_of]
        first, count1, mean1, scatter1 = _group(one_rows_of, one_arm_of, one_mean_of[:, None])
        arm1, rows1 = one_arm_of[first].astype(np.float64), one_rows_of[first]
    else:
        count1, mean1, scatter1, arm1, rows1 = np.zeros(0), np.zeros((0, 1)), np.zeros((0, 1)), np.zeros(0), np.ones(0)
    k1 = pad(count1.size)

    return LeafConfigurations(
        both_count=_padded(count, k2, 0.0), both_rows=_padded(both_rows, k2, 1.0),
        both_mean=_padded(z_mean, k2, 0.0), both_scatter=_padded(scatter, k2, 0.0),
        one_count=_padded(count1, k1, 0.0), one_arm=_padded(arm1, k1, 0.0), one_rows=_padded(rows1, k1, 1.0),
        one_mean=_padded(mean1[:, 0], k1, 0.0), one_scatter=_padded(scatter1[:, 0], k1, 0.0),
        arm_rows=rows.sum(axis=0), arm_pairs=observed.sum(axis=0).astype(np.float64),
        arm_within=within.sum(axis=0), log_rows=np.asarray(np.log(rows[observed]).sum()),
    )


def configuration_log_marginal(configs: LeafConfigurations, prior_cov, prior_mean, noise_var):
    """``log p(cell data | μ, Σ, σ²)`` of a one-level hierarchy from its configurations.

    Parameters
    ----------
    configs : LeafConfigurations
        From :func:`leaf_configurations` (arrays may be on a device, any float dtype).
    prior_cov : (2, 2) or (1, 2, 2) float
        ``Σ``, the covariance of (α_g, τ_g).
    prior_mean : (2,) float
        ``μ``.
    noise_var : scalar or (2,) float
        ``σ²``, shared or (control, treated).

    Returns
    -------
    jax.Array
        The scalar log marginal likelihood; its gradient costs O(configurations), in one
        fused pass (``_log_marginal``'s JVP rule), not the ~20 passes reverse-mode
        differentiation of the formula makes.
    """
    cov = jnp.reshape(prior_cov, (2, 2))
    dtype = jnp.result_type(configs.both_mean)
    variance = jnp.broadcast_to(jnp.asarray(noise_var, dtype), (2,))
    mean = jnp.asarray(prior_mean, dtype)
    return _log_marginal(configs, cov[0, 0], cov[0, 1], cov[1, 1], mean[0], mean[1], variance[0], variance[1])


def _log_marginal_terms(c: LeafConfigurations, s00, s01, s11, mu0, mu1, var0, var1, *, partials: bool):
    """The log marginal and, with ``partials``, its derivatives in (s00, s01, s11, μ0, μ1, σ0², σ1²).

    Per both-arm configuration, with V = AΣAᵀ + diag(σ²/n), W = V⁻¹, S = scatter + m d dᵀ:
    ℓ = −m log 2π − ½ m log det V − ½ tr(W S), ∂ℓ/∂V = −½ m W + ½ W S W (the off-diagonal
    entry counted twice, V being symmetric), ∂ℓ/∂d = −m W d. One-arm configurations are the
    scalar case. Every per-configuration term is one row of a stack summed once.
    """
    dtype = jnp.result_type(c.both_mean)
    log_2pi = jnp.log(2 * jnp.pi).astype(dtype)
    # Both arms.
    m, inv0, inv1 = c.both_count, 1.0 / c.both_rows[:, 0], 1.0 / c.both_rows[:, 1]
    v00 = s00 + var0 * inv0
    v01 = s00 + s01
    v11 = s00 + 2 * s01 + s11 + var1 * inv1
    det = v00 * v11 - v01 * v01
    inv_det = 1.0 / det
    w00, w01, w11 = v11 * inv_det, -v01 * inv_det, v00 * inv_det
    d0 = c.both_mean[:, 0] - mu0
    d1 = c.both_mean[:, 1] - mu0 - mu1
    a = c.both_scatter[:, 0] + m * d0 * d0
    b = c.both_scatter[:, 1] + m * d0 * d1
    cc = c.both_scatter[:, 2] + m * d1 * d1
    both = [-m * log_2pi - 0.5 * m * jnp.log(det) - 0.5 * (w00 * a + 2 * w01 * b + w11 * cc)]
    # One arm t: v = xᵀ Σ x + σ_t²/n with x = (1, t).
    t, m1, inv = c.one_arm, c.one_count, 1.0 / c.one_rows
    v = s00 + 2 * t * s01 + t * s11 + jnp.where(t > 0.5, var1, var0) * inv
    d = c.one_mean - mu0 - t * mu1
    q = c.one_scatter + m1 * d * d
    one = [-0.5 * m1 * (log_2pi + jnp.log(v)) - 0.5 * q / v]
    # The rows within each (leaf, arm).
    extra = c.arm_rows - c.arm_pairs
    rows = (-0.5 * extra[0] * (log_2pi + jnp.log(var0)) - 0.5 * c.arm_within[0] / var0
            - 0.5 * extra[1] * (log_2pi + jnp.log(var1)) - 0.5 * c.arm_within[1] / var1 - 0.5 * c.log_rows)
    if not partials:
        return jnp.sum(both[0]) + jnp.sum(one[0]) + rows

    # ∂ℓ/∂V = G = −½ m W + ½ W S W.
    ws00, ws01 = w00 * a + w01 * b, w00 * b + w01 * cc
    ws10, ws11 = w01 * a + w11 * b, w01 * b + w11 * cc
    g00 = -0.5 * m * w00 + 0.5 * (ws00 * w00 + ws01 * w01)
    g01 = 2 * (-0.5 * m * w01 + 0.5 * (ws00 * w01 + ws01 * w11))
    g11 = -0.5 * m * w11 + 0.5 * (ws10 * w01 + ws11 * w11)
    e0 = -m * (w00 * d0 + w01 * d1)          # ∂ℓ/∂d0
    e1 = -m * (w01 * d0 + w11 * d1)          # ∂ℓ/∂d1
    both += [g00 + g01 + g11, g01 + 2 * g11, g11, -e0 - e1, -e1, g00 * inv0, g11 * inv1]
    inv_v = 1.0 / v
    gv = (-0.5 * m1 + 0.5 * q * inv_v) * inv_v   # ∂ℓ/∂v
    ed = m1 * d * inv_v                          # −∂ℓ/∂d
    one += [gv, 2 * t * gv, t * gv, ed, t * ed, (1 - t) * gv * inv, t * gv * inv]
    sums = jnp.sum(jnp.stack(both), axis=1) + jnp.sum(jnp.stack(one), axis=1)
    d_var0 = -0.5 * extra[0] / var0 + 0.5 * c.arm_within[0] / (var0 * var0)
    d_var1 = -0.5 * extra[1] / var1 + 0.5 * c.arm_within[1] / (var1 * var1)
    return sums[0] + rows, sums[1:] + jnp.stack([0, 0, 0, 0, 0, d_var0, d_var1]).astype(dtype)


@jax.custom_jvp
def _log_marginal(c, s00, s01, s11, mu0, mu1, var0, var1):
    return _log_marginal_terms(c, s00, s01, s11, mu0, mu1, var0, var1, partials=False)


def _is_zero(x):
    return isinstance(x, SymbolicZero)


@partial(_log_marginal.defjvp, symbolic_zeros=True)
def _log_marginal_jvp(primals, tangents):
    if not all(_is_zero(t) for t in jax.tree.leaves(tangents[0], is_leaf=_is_zero)):
        # A tangent in the data themselves (never in NUTS): differentiate the formula.
        concrete = jax.tree.map(lambda t: jnp.zeros(t.aval.shape, t.aval.dtype) if _is_zero(t) else t,
                                tangents, is_leaf=_is_zero)
        plain = partial(_log_marginal_terms, partials=False)
        return jax.jvp(plain, primals, concrete)
    value, grad = _log_marginal_terms(*primals, partials=True)
    tangent = jnp.zeros_like(value)
    for i, t in enumerate(tangents[1:]):
        if not _is_zero(t):
            tangent = tangent + grad[i] * t
    return value, tangent


def configuration_count(configs: LeafConfigurations) -> int:
    """Configurations actually present (padding excluded)."""
    return int((np.asarray(configs.both_count) > 0).sum() + (np.asarray(configs.one_count) > 0).sum())


def effect_coefficients(rows, prior_cov, prior_mean, noise_var):
    """Each arm configuration's conditional posterior of the effect, as a linear map.

    Given ``(μ, Σ, σ²)``, a leaf with rows ``(n_0, n_1)`` and arm means ``z = (ȳ_0, ȳ_1)``
    has ``θ | z ~ N(P⁻¹ (h + Σ⁻¹μ), P⁻¹)`` with ``P = J + Σ⁻¹``, ``J`` and ``h`` from its
    rows. Its effect ``τ`` is therefore ``N(a_0 ȳ_0 + a_1 ȳ_1 + k, v)`` where ``a``, ``k``
    and ``v`` depend on the leaf only through ``(n_0, n_1)``: a configuration's
    coefficients serve all its leaves (an arm without rows has ``a = 0``).

    Parameters
    ----------
    rows : (K, 2) float
        ``(n_0, n_1)`` per configuration (or per leaf).
    prior_cov, prior_mean, noise_var
        ``Σ`` (2, 2) or (1, 2, 2), ``μ`` (2,), ``σ²`` scalar or (control, treated).

    Returns
    -------
    (coef, var) : ((K, 3), (K,))
        ``(a_0, a_1, k)`` and ``v``.
    """
    cov = jnp.reshape(prior_cov, (2, 2))
    dtype = jnp.result_type(rows)
    variance = jnp.broadcast_to(jnp.asarray(noise_var, dtype), (2,))
    det_prior = cov[0, 0] * cov[1, 1] - cov[0, 1] ** 2
    l00, l01, l11 = cov[1, 1] / det_prior, -cov[0, 1] / det_prior, cov[0, 0] / det_prior  # Σ⁻¹
    w0 = rows[:, 0] / variance[0]
    w1 = rows[:, 1] / variance[1]
    p00, p01, p11 = w0 + w1 + l00, w1 + l01, w1 + l11
    det = p00 * p11 - p01 * p01
    c01, c11 = -p01 / det, p00 / det                                   # (P⁻¹)₀₁, (P⁻¹)₁₁
    q0, q1 = l00 * prior_mean[0] + l01 * prior_mean[1], l01 * prior_mean[0] + l11 * prior_mean[1]
    # E[τ] = c01 b0 + c11 b1 with b0 = w0 ȳ0 + w1 ȳ1 + q0 and b1 = w1 ȳ1 + q1.
    coef = jnp.stack([c01 * w0, (c01 + c11) * w1, c01 * q0 + c11 * q1], axis=-1)
    return coef, c11


def effect_mean(coef, mean):
    """``a_0 ȳ_0 + a_1 ȳ_1 + k`` for coefficients and arm means of matching leading shape."""
    return coef[..., 0] * mean[..., 0] + coef[..., 1] * mean[..., 1] + coef[..., 2]


def leaf_effect_draw(rng_key, arms: LeafArms, prior_cov, prior_mean, noise_var):
    """One posterior draw of every leaf's effect ``τ_g`` given ``(μ, Σ, σ²)``, one level.

    Leaves are independent given the hyperparameters, so this is elementwise over
    leaves (no scatter), through their configurations' :func:`effect_coefficients`.
    The normals are drawn in float32 (ample for Monte Carlo noise) and cast.

    Returns
    -------
    (draw, mean, var) : each (leaves,)
        The effect draw and its conditional mean and variance.
    """
    import jax

    coef, var = effect_coefficients(arms.config_rows, prior_cov, prior_mean, noise_var)
    mean = effect_mean(coef[arms.config], arms.mean)
    var = var[arms.config]
    eps = jax.random.normal(rng_key, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.sqrt(var) * eps, mean, var


def effect_sums(arms: LeafArms, weights) -> np.ndarray:
    """Per configuration ``(Σ w ȳ_0, Σ w ȳ_1, Σ w, Σ w²)`` over its leaves (K, 4), float64.

    With them a draw of ``Σ_g w_g τ_g`` given ``(μ, Σ, σ²)`` costs O(configurations): the
    leaves are conditionally independent, so it is normal with mean
    ``Σ_k (a_0 Σ w ȳ_0 + a_1 Σ w ȳ_1 + k Σ w)`` and variance ``Σ_k v_k Σ w²``.
    """
    index = np.asarray(arms.config)
    size = np.shape(arms.config_rows)[0]
    w = np.asarray(weights, dtype=np.float64)
    mean = np.asarray(arms.mean, dtype=np.float64)
    return np.stack([np.bincount(index, w * mean[:, 0], size), np.bincount(index, w * mean[:, 1], size),
                     np.bincount(index, w, size), np.bincount(index, w * w, size)], axis=1)


# P(τ_g > 0) over the posterior is the mean over hyperparameter draws d of Φ(s_d · x_g), with
# s_d = (a_0, a_1, k)/√v of the leaf's configuration and x_g = (ȳ_g0, ȳ_g1, 1): one Φ per
# leaf and draw (10⁹ at 10⁶ groups × 1000 draws). Around a reference s̄ (the draws' mean),
# with δ_d = (s_d − s̄) · x and z̄ = s̄ · x, Taylor's theorem (Lagrange remainder) gives
#
#     mean_d Φ(z̄ + δ_d) = Φ(z̄) + φ(z̄) Σ_{k=1..K} (−1)^{k−1} He_{k−1}(z̄) E[δ^k] / k!  + R,
#     |R| ≤ sup|Φ^{(K+1)}| · E[δ^{K+1}] / (K+1)!      (K odd, so δ^{K+1} = |δ|^{K+1}),
#
# He the probabilists' Hermite polynomials (Φ^{(k)} = (−1)^{k−1} He_{k−1} φ) and E over the
# draws. Each E[δ^k] is a polynomial in (ȳ_0, ȳ_1) whose coefficients are the configuration's
# moments of s_d − s̄. So O(draws × configurations) moments and O(leaves) once replace the
# O(draws × leaves) Φ, for every leaf whose bound is within tolerance; the others take the
# exact mean. The bound is computed, not assumed: no approximation enters unchecked.
EXPANSION_ORDER = 5


def expansion_terms(order: int = EXPANSION_ORDER) -> tuple:
    """``(k, a, b, c, multinomial)`` for every monomial ``Δ_0^a Δ_1^b Δ_2^c`` of degree
    ``k = 1..order + 1`` in the powers of ``(s_d − s̄) · x``, ``x = (ȳ_0, ȳ_1, 1)``: the
    series' moments and, last, the remainder's."""
    from math import factorial

    return tuple((k, a, b, k - a - b, factorial(k) // (factorial(a) * factorial(b) * factorial(k - a - b)))
                 for k in range(1, order + 2) for a in range(k + 1) for b in range(k - a + 1))


def expansion_remainder(order: int = EXPANSION_ORDER) -> float:
    """``sup_t |Φ^{(order+1)}(t)| / (order+1)!``: the remainder's bound is this × E[δ^{order+1}].

    ``Φ^{(K+1)} = ±He_K φ``; its supremum is taken on a grid of step h over [−40, 40] (beyond,
    |He_K φ| < 1e-300) plus h/2 · sup|He_{K+1} φ|, which bounds what the grid can miss."""
    from math import factorial

    if order % 2 == 0:
        raise ValueError(f"expansion order {order}: expected an odd order (the remainder needs an even moment)")
    step = 1e-3
    t = np.arange(-40.0, 40.0, step)
    phi = np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)
    hermite = [np.ones_like(t), t.copy()]                # He_0, He_1
    for n in range(1, order + 1):
        hermite.append(t * hermite[-1] - n * hermite[-2])
    sup = np.abs(hermite[order] * phi).max() + 0.5 * step * np.abs(hermite[order + 1] * phi).max()
    return float(sup / factorial(order + 1))


def deviation_powers(delta, terms):
    """``Δ_0^a Δ_1^b Δ_2^c`` per term and configuration (T, K): one draw's contribution to
    the expansion's moment table, ``delta = s_d − s̄`` (K, 3).

    Powers by a cumulative product, the (a, b) products as one outer product, then one
    gather of rows by static indices: rows are terms, so every product runs along the
    configurations (vectorised). At 3,584 configurations × 1000 draws: 0.07 s and 0.12 s to
    compile, against 0.15–0.39 s and 0.67 s for one product per term."""
    top = max(t[0] for t in terms)
    size = delta.shape[0]
    powers = jnp.cumprod(jnp.broadcast_to(delta.T[:, None, :], (3, top, size)), axis=1)
    powers = jnp.concatenate([jnp.ones((3, 1, size), delta.dtype), powers], axis=1)     # (3, top + 1, K)
    pairs = (powers[0][:, None, :] * powers[1][None, :, :]).reshape((top + 1) ** 2, size)
    return pairs[np.array([a * (top + 1) + b for _, a, b, _, _ in terms])] * powers[2][np.array([t[3] for t in terms])]


def expanded_positive(reference, moments, config, mean, *, terms, remainder: float, tolerance: float):
    """Each leaf's mean over draws of ``Φ(s_d · x)`` by the expansion above, and whether its
    remainder bound is within ``tolerance`` (leaves where it is not need the exact mean).

    Parameters
    ----------
    reference : (K, 3)  s̄ per configuration.
    moments : (T, K)  mean over draws of ``deviation_powers`` (``terms`` order).
    config, mean : the leaves' ``LeafArms.config`` (leaves,) and ``LeafArms.mean`` (leaves, 2).

    Returns
    -------
    (prob, within) : (leaves,) float, (leaves,) bool
    """
    from jax.scipy.special import ndtr

    x0, x1 = mean[:, 0], mean[:, 1]
    z = reference[:, 0][config] * x0 + reference[:, 1][config] * x1 + reference[:, 2][config]
    top = max(t[0] for t in terms)
    p0, p1 = [jnp.ones_like(x0)], [jnp.ones_like(x1)]
    for _ in range(top):
        p0.append(p0[-1] * x0)
        p1.append(p1[-1] * x1)
    moment = [jnp.zeros_like(z) for _ in range(top + 1)]
    for t, (k, a, b, _, multinomial) in enumerate(terms):
        moment[k] = moment[k] + (multinomial * moments[t])[config] * p0[a] * p1[b]
    # Σ_{k<top} (−1)^{k−1} He_{k−1}(z) E[δ^k] / k!, He by its recurrence.
    series, factorial = jnp.zeros_like(z), 1.0
    he_prev, he = jnp.zeros_like(z), jnp.ones_like(z)       # He_{−1} (unused), He_0
    for k in range(1, top):
        factorial *= k
        series = series + (-1.0) ** (k - 1) * he * moment[k] / factorial
        he_prev, he = he, z * he - (k - 1) * he_prev
    density = jnp.exp(-0.5 * z * z) * (1.0 / np.sqrt(2 * np.pi))
    prob = jnp.clip(ndtr(z) + density * series, 0.0, 1.0)
    return prob, remainder * jnp.abs(moment[top]) <= tolerance
