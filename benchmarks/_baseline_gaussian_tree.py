"""Frozen copy of kernels/gaussian_tree.py before the structure-of-arrays rewrite.

Kept only so benchmarks/kernels.py can time old and new side by side on the
same machine; nothing else imports it. Original module docstring follows.

Exact integration, sampling and moments of a tree of 2-D Gaussians.

Each node ``v`` carries ``θ_v = (baseline, effect)`` with prior
``θ_v | θ_parent ~ N(θ_parent, Σ_ℓ)``; the top level's parent is the fixed
hyper-mean ``μ``. Leaves carry data in information form,
``exp(-½ θᵀ J_g θ + h_gᵀ θ)``. One upward pass integrates every node out
(messages are segment sums over a level); one downward pass draws a joint
posterior sample or the exact marginal moments. All 2×2 algebra is closed
form and batched, so each level costs O(nodes) and the only Python loop is
over the (few, static) levels. See ``/work/shared/MATH.md``, "Gaussian
outcome: the exact marginal likelihood".

Conventions shared by every function here:

- ``parents`` is a tuple of length ``L - 1``; ``parents[k]`` is an int array
  ``(nodes at level k+1,)`` holding each node's parent index at level ``k``.
  Level 0 is the top, level ``L - 1`` the leaves.
- ``prior_cov`` is ``(L, 2, 2)`` (``Σ_ℓ``, symmetric positive definite) and
  ``prior_mean`` is ``(2,)`` (``μ``).
- Results keep the floating dtype of the inputs (float32 unless x64 is on).

Nothing here calls ``jax.jit``: the caller compiles, and every node count is
taken from an array shape or an explicit static ``int`` argument.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Upward",
    "integrate",
    "sample",
    "conditional_mean",
    "posterior_moments",
    "gaussian_leaf_information",
    "gaussian_log_marginal",
]


class Upward(NamedTuple):
    """What the upward pass leaves for the downward pass (MATH.md, upward pass).

    ``precision[ℓ][v]`` is ``A_v = Λ_ℓ + J_v`` and ``potential[ℓ][v]`` is
    ``h_v``, where ``(J_v, h_v)`` is the node's own data (leaves) plus the
    summed messages of its children. Given its parent, a node's posterior is
    ``N(A_v⁻¹(Λ_ℓ θ_parent + h_v), A_v⁻¹)``.
    """

    precision: tuple  # per level ℓ = 0..L-1: (nodes_ℓ, 2, 2) float, A_v
    potential: tuple  # per level ℓ = 0..L-1: (nodes_ℓ, 2) float, h_v
    log_normaliser: jax.Array  # () float, log ∫ Π_g leaf factor · prior dθ


# --- closed-form batched 2×2 algebra ---------------------------------------


def _symmetrise(m):
    return 0.5 * (m + jnp.swapaxes(m, -1, -2))


def _det(m):
    return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]


def _from_entries(m00, m01, m10, m11):
    return jnp.stack([jnp.stack([m00, m01], -1), jnp.stack([m10, m11], -1)], -2)


def _inverse(m):
    # One shared off-diagonal keeps the inverse exactly symmetric, so
    # downstream quadratic forms and Cholesky factors see a symmetric matrix.
    off = -0.5 * (m[..., 0, 1] + m[..., 1, 0])
    return _from_entries(m[..., 1, 1], off, off, m[..., 0, 0]) / _det(m)[..., None, None]


def _matvec(m, v):
    return jnp.matmul(m, v[..., None])[..., 0]


def _quadratic(v, m):
    return jnp.sum(v * _matvec(m, v), axis=-1)


def _inverse_cholesky(a):
    """Lower-triangular ``L`` with ``L Lᵀ = a⁻¹``, built from ``a`` directly.

    Going through ``a`` avoids forming ``a⁻¹`` first; the (1, 1) entry is
    ``1/√a₁₁`` exactly, so the factor stays accurate for ill-conditioned
    ``a`` (a leaf with data on one arm only).
    """
    a00, a11 = a[..., 0, 0], a[..., 1, 1]
    a01 = 0.5 * (a[..., 0, 1] + a[..., 1, 0])
    det = a00 * a11 - a01 * a01
    l00 = jnp.sqrt(a11 / det)
    l10 = -a01 / jnp.sqrt(a11 * det)
    l11 = jax.lax.rsqrt(a11)
    return _from_entries(l00, jnp.zeros_like(l00), l10, l11)


# --- tree passes ------------------------------------------------------------


def _level_sizes(num_leaves, parents, num_top):
    """Static node count of every level, top first."""
    if not parents:
        return (num_leaves,)
    if num_top is None:
        try:
            num_top = int(np.max(np.asarray(parents[0]))) + 1
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            raise ValueError(
                "integrate: the number of top-level nodes must be a static int, but "
                "parents[0] is traced (it was passed through jax.jit); pass "
                "num_top=<number of top-level nodes> or close over parents as a NumPy array"
            ) from None
    return (int(num_top),) + tuple(int(p.shape[0]) for p in parents)


def _level_precision(prior_cov):
    return _inverse(_symmetrise(prior_cov))  # (L, 2, 2) Λ_ℓ


def integrate(
    leaf_precision,  # (G, 2, 2) float, J_g (PSD, may be singular or zero)
    leaf_potential,  # (G, 2) float, h_g
    parents,  # tuple of L-1 int arrays, parents[k]: (nodes_{k+1},)
    prior_cov,  # (L, 2, 2) float, Σ_ℓ
    prior_mean,  # (2,) float, μ
    *,
    num_top: Optional[int] = None,
) -> Upward:
    """Upward pass: integrate every node of the tree out (MATH.md, upward pass).

    For each level from the leaves up, ``A_v = Λ_ℓ + J_v``; the node sends
    ``J_msg = Λ A⁻¹ J_v`` and ``h_msg = Λ A⁻¹ h_v`` to its parent (a segment
    sum) and adds ``½ hᵀA⁻¹h − ½ log|A| + ½ log|Λ|`` to the log-normaliser.
    Top-level messages are evaluated at ``θ = μ``.

    Parameters
    ----------
    leaf_precision, leaf_potential : arrays (G, 2, 2), (G, 2)
        Leaf data in information form.
    parents : tuple of int arrays
        ``parents[k]`` maps level ``k+1`` nodes to their level ``k`` parent.
    prior_cov : array (L, 2, 2)
        Per-level increment covariance ``Σ_ℓ``; ``L = len(parents) + 1``.
    prior_mean : array (2,)
        Hyper-mean ``μ``.
    num_top : int, optional
        Number of top-level nodes (static). Needed when ``parents`` is traced;
        otherwise inferred as ``max(parents[0]) + 1``, which assumes the last
        top node has a child.

    Returns
    -------
    Upward
        Per-level ``A_v`` and ``h_v`` and the scalar log-normaliser
        ``log ∫ Π_g exp(-½θ_gᵀJ_gθ_g + h_gᵀθ_g) p(θ | μ, Σ) dθ``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> up = integrate(jnp.zeros((3, 2, 2)), jnp.zeros((3, 2)), (jnp.array([0, 0, 1]),),
    ...                jnp.stack([jnp.eye(2)] * 2), jnp.zeros(2), num_top=2)
    >>> float(up.log_normaliser), [a.shape for a in up.precision]
    (0.0, [(2, 2, 2), (3, 2, 2)])
    """
    num_levels = prior_cov.shape[0]
    if len(parents) != num_levels - 1:
        raise ValueError(
            f"integrate: parents has {len(parents)} levels of links but prior_cov has "
            f"{num_levels} levels; expected len(parents) == prior_cov.shape[0] - 1"
        )
    sizes = _level_sizes(leaf_precision.shape[0], parents, num_top)
    level_precision = _level_precision(prior_cov)
    log_det_level_precision = jnp.log(_det(level_precision))  # (L,)

    data_precision = _symmetrise(leaf_precision)
    data_potential = leaf_potential
    precisions = [None] * num_levels
    potentials = [None] * num_levels
    log_normaliser = jnp.zeros((), dtype=leaf_potential.dtype)
    for level in reversed(range(num_levels)):
        lam = level_precision[level]
        a = lam + data_precision
        a_inv = _inverse(a)
        precisions[level] = a
        potentials[level] = data_potential
        log_normaliser = log_normaliser + jnp.sum(
            0.5 * _quadratic(data_potential, a_inv) - 0.5 * jnp.log(_det(a))
        ) + 0.5 * sizes[level] * log_det_level_precision[level]

        gain = jnp.matmul(lam, a_inv)  # (nodes, 2, 2) Λ A⁻¹
        # Λ A⁻¹ J equals Λ − Λ A⁻¹ Λ but is exactly zero for a node without
        # data instead of the rounding residue of a cancellation.
        message_precision = _symmetrise(jnp.matmul(gain, data_precision))
        message_potential = _matvec(gain, data_potential)
        if level > 0:
            data_precision = jax.ops.segment_sum(
                message_precision, parents[level - 1], num_segments=sizes[level - 1]
            )
            data_potential = jax.ops.segment_sum(
                message_potential, parents[level - 1], num_segments=sizes[level - 1]
            )
        else:
            log_normaliser = log_normaliser + jnp.sum(
                message_potential @ prior_mean
                - 0.5 * _quadratic(jnp.broadcast_to(prior_mean, message_potential.shape),
                                   message_precision)
            )
    return Upward(tuple(precisions), tuple(potentials), log_normaliser)


def _parent_values(values, level, parents, prior_mean):
    """Each level-``level`` node's parent value; the top level's is ``μ``."""
    if level == 0:
        return prior_mean[None, :]
    return values[level - 1][parents[level - 1]]


def _conditional_means(upward, level, level_precision, parent_value):
    # A⁻¹(Λ θ_p + h): the node's posterior mean given its parent.
    a_inv = _inverse(upward.precision[level])
    return _matvec(a_inv, _matvec(level_precision[level], parent_value) + upward.potential[level])


def sample(rng_key, upward: Upward, parents, prior_cov, prior_mean) -> tuple:
    """Downward pass: one joint posterior draw of every node (MATH.md, downward pass).

    Top nodes are drawn from ``N(A⁻¹(Λμ + h), A⁻¹)``, then each child from
    ``N(A_v⁻¹(Λ_ℓ θ_parent + h_v), A_v⁻¹)`` given its drawn parent.

    Parameters
    ----------
    rng_key : jax.Array
        PRNG key.
    upward : Upward
        Result of :func:`integrate` with the same ``parents``, ``prior_cov``,
        ``prior_mean``.

    Returns
    -------
    tuple
        Per level ``(nodes_ℓ, 2)`` draws, top level first.
    """
    level_precision = _level_precision(prior_cov)
    keys = jax.random.split(rng_key, len(upward.precision))
    draws = []
    for level, key in enumerate(keys):
        mean = _conditional_means(
            upward, level, level_precision, _parent_values(draws, level, parents, prior_mean)
        )
        noise = jax.random.normal(key, mean.shape, dtype=mean.dtype)
        draws.append(mean + _matvec(_inverse_cholesky(upward.precision[level]), noise))
    return tuple(draws)


def conditional_mean(draws, upward: Upward, parents, prior_cov, prior_mean) -> tuple:
    """Posterior mean of each node given its drawn parent (MATH.md, downward pass).

    ``E[θ_v | θ_parent(v), data] = A_v⁻¹(Λ_ℓ θ_parent + h_v)``, with ``μ`` as
    the top level's parent. Averaged over draws these are Rao-Blackwellised
    posterior means.

    Parameters
    ----------
    draws : tuple
        Per level ``(nodes_ℓ, 2)``, e.g. from :func:`sample`. The leaf level
        is not read.

    Returns
    -------
    tuple
        Per level ``(nodes_ℓ, 2)`` conditional means.
    """
    level_precision = _level_precision(prior_cov)
    return tuple(
        _conditional_means(
            upward, level, level_precision, _parent_values(draws, level, parents, prior_mean)
        )
        for level in range(len(upward.precision))
    )


def posterior_moments(upward: Upward, parents, prior_cov, prior_mean) -> tuple:
    """Exact marginal posterior mean and covariance of every node.

    ``m_v = A_v⁻¹(Λ m_p + h_v)`` and ``C_v = A_v⁻¹ + A_v⁻¹Λ C_p Λ A_v⁻¹``,
    with ``m_p = μ`` and ``C_p = 0`` above the top level (the downward pass
    of MATH.md, taken in expectation).

    Returns
    -------
    (means, covariances) : tuple of tuples
        Per level ``(nodes_ℓ, 2)`` means and ``(nodes_ℓ, 2, 2)`` covariances.
    """
    level_precision = _level_precision(prior_cov)
    means, covariances = [], []
    for level in range(len(upward.precision)):
        a_inv = _inverse(upward.precision[level])
        means.append(
            _conditional_means(
                upward, level, level_precision, _parent_values(means, level, parents, prior_mean)
            )
        )
        if level == 0:
            covariances.append(a_inv)
        else:
            gain = jnp.matmul(a_inv, level_precision[level])  # A⁻¹ Λ
            parent_cov = covariances[level - 1][parents[level - 1]]
            spread = jnp.matmul(jnp.matmul(gain, parent_cov), jnp.swapaxes(gain, -1, -2))
            covariances.append(_symmetrise(a_inv + spread))
    return tuple(means), tuple(covariances)


# --- Gaussian outcome -------------------------------------------------------


def _float_dtype(x):
    x = jnp.asarray(x)
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)


def _observed_cells(n, mean, noise_var):
    """Counts, a mask of non-empty cells, and padding-safe mean and variance.

    Padding cells (``n = 0``) may hold anything, NaN or a zero variance
    included; they are replaced before any arithmetic (not masked after it),
    so neither their values nor their gradients leak into the result.
    """
    dtype = _float_dtype(mean)
    count = jnp.asarray(n).astype(dtype)
    observed = count > 0
    variance = jnp.broadcast_to(jnp.asarray(noise_var).astype(dtype), count.shape)
    safe_variance = jnp.where(observed, variance, 1)
    safe_mean = jnp.where(observed, jnp.asarray(mean), 0)
    return count, observed, safe_variance, safe_mean


def gaussian_leaf_information(n, mean, arm, leaf, num_leaves: int, noise_var):
    """Leaf information ``(J_g, h_g)`` of Gaussian cells (MATH.md, leaf likelihood).

    ``J_g = Σ_t n_gt/σ² x_t x_tᵀ`` and ``h_g = Σ_t n_gt ȳ_gt/σ² x_t`` with
    design row ``x_t = (1, t)``.

    Parameters
    ----------
    n : array (C,)
        Rows per cell; 0 marks padding, which contributes nothing.
    mean : array (C,) float
        Cell mean ``ȳ``.
    arm : array (C,)
        Treatment arm ``t`` (0 or 1).
    leaf : array (C,) int32
        Leaf index of each cell.
    num_leaves : int
        Number of leaves (static).
    noise_var : array (C,) or scalar
        Residual variance ``σ²`` of each cell.

    Returns
    -------
    (J, h) : arrays (num_leaves, 2, 2), (num_leaves, 2)
    """
    count, observed, safe_variance, safe_mean = _observed_cells(n, mean, noise_var)
    weight = jnp.where(observed, count / safe_variance, 0)
    t = jnp.asarray(arm).astype(count.dtype)
    one = jnp.ones_like(t)
    outer = _from_entries(one, t, t, t * t)  # x_t x_tᵀ
    design = jnp.stack([one, t], -1)  # x_t
    precision = jax.ops.segment_sum(weight[:, None, None] * outer, leaf, num_segments=num_leaves)
    potential = jax.ops.segment_sum(
        (weight * safe_mean)[:, None] * design, leaf, num_segments=num_leaves
    )
    return precision, potential


def gaussian_log_marginal(
    n,  # (C,) rows per cell, 0 = padding
    mean,  # (C,) float, cell mean ȳ
    m2,  # (C,) float, within-cell Σ(y − ȳ)²
    arm,  # (C,) 0/1
    leaf,  # (C,) int32 leaf index
    parents,  # tuple of L-1 int arrays
    prior_cov,  # (L, 2, 2) float
    prior_mean,  # (2,) float
    noise_var,  # (C,) or scalar float, σ²
    *,
    num_leaves: int,
    num_top: Optional[int] = None,
):
    """Exact ``log p(cell data | μ, Σ, σ²)`` for ``y ~ N(x_tᵀθ_g, σ²)`` (MATH.md).

    ``log_normaliser − ½ Σ n ȳ²/σ² − ½ Σ M2/σ² − ½ Σ n log(2πσ²)``, where the
    log-normaliser comes from :func:`integrate` on the cells' leaf
    information. Cells with ``n = 0`` contribute nothing.

    Parameters
    ----------
    num_leaves : int
        Number of leaves (static).
    num_top : int, optional
        Number of top-level nodes (static); see :func:`integrate`.

    Returns
    -------
    (log_marginal, upward) : (jax.Array, Upward)
        Scalar log marginal likelihood and the upward pass, reusable by
        :func:`sample` and :func:`posterior_moments`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> value, up = gaussian_log_marginal(
    ...     jnp.array([3.0, 2.0, 0.0]), jnp.array([0.5, 1.5, 0.0]), jnp.array([1.0, 0.2, 0.0]),
    ...     jnp.array([0, 1, 0]), jnp.array([0, 1, 0]), (), jnp.eye(2)[None], jnp.zeros(2), 1.0,
    ...     num_leaves=2)
    >>> value.shape, up.precision[0].shape
    ((), (2, 2, 2))
    """
    precision, potential = gaussian_leaf_information(n, mean, arm, leaf, num_leaves, noise_var)
    upward = integrate(precision, potential, parents, prior_cov, prior_mean, num_top=num_top)
    count, observed, safe_variance, safe_mean = _observed_cells(n, mean, noise_var)
    safe_m2 = jnp.where(observed, jnp.asarray(m2).astype(count.dtype), 0)
    per_cell = (count * safe_mean**2 + safe_m2) / safe_variance + count * jnp.log(
        2 * np.pi * safe_variance
    )
    return upward.log_normaliser - 0.5 * jnp.sum(jnp.where(observed, per_cell, 0)), upward
