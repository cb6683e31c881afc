"""Exact integration, sampling and moments of a tree of 2-D Gaussians.

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

How the log-likelihood and its gradient are computed: they are the inner
loop of NUTS, so each choice below was measured on XLA's CPU backend
(``benchmarks/kernels.py``).

- Structure of arrays. A symmetric 2×2 per node is three flat ``(nodes,)``
  arrays (:class:`_Sym`), a 2-vector two (:class:`_Pair`): XLA on CPU is
  several times slower on ``(nodes, 2, 2)`` arrays, elementwise and in
  segment sums alike. The public layout of :class:`Upward` is assembled at
  the end only, and ``jit`` drops it when only the value is used.
- The gradient of the log-normaliser is one downward pass (Fisher's
  identity, :func:`_log_normaliser_gradient`) instead of reverse-mode
  differentiation of the upward pass, which keeps every intermediate of
  every node alive until the backward sweep.
- Large levels are folded in chunks (:func:`_fold_chunks`), and each chunk's
  sums are one fused loop (:func:`_sums`). XLA on CPU places all
  intermediates of a call in one buffer that is mapped afresh on every call
  once it is large; at a million leaves the page faults of touching it cost
  more than the arithmetic.
- Cells stored leaf by leaf (``cells_per_leaf``) need no scatter at all.
"""
from functools import partial, reduce
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

__all__ = [
    "Upward",
    "integrate",
    "sample",
    "conditional_mean",
    "posterior_moments",
    "posterior_means",
    "gaussian_leaf_information",
    "gaussian_log_marginal",
]

# Nodes (or cells) per chunk of a folded level on CPU: intermediates of
# 512 KiB per float64 array stay in cache and in memory that the allocator
# reuses between calls. See _fold_chunks.
CHUNK_SIZE = 1 << 16


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


# --- structure of arrays: symmetric 2×2 and 2-vectors as flat arrays --------


class _Sym(NamedTuple):
    """Symmetric 2×2 matrices, one array per distinct entry."""

    xx: jax.Array  # (N,) float, entry (0, 0)
    xy: jax.Array  # (N,) float, entries (0, 1) and (1, 0)
    yy: jax.Array  # (N,) float, entry (1, 1)


class _Pair(NamedTuple):
    """2-vectors, one array per component."""

    x: jax.Array  # (N,) float, component 0 (baseline)
    y: jax.Array  # (N,) float, component 1 (effect)


def _sym_of(m):
    """(..., 2, 2) → :class:`_Sym`, symmetrising the off-diagonal."""
    return _Sym(m[..., 0, 0], 0.5 * (m[..., 0, 1] + m[..., 1, 0]), m[..., 1, 1])


def _matrix_of(s):
    return _from_entries(s.xx, s.xy, s.xy, s.yy)


def _vector_of(p):
    return jnp.stack([p.x, p.y], -1)


def _entry(tree, index):
    """Entry ``index`` of every array of a pytree (e.g. one level's ``Λ_ℓ``)."""
    return jax.tree.map(lambda x: x[index], tree)


def _scale(tree, factor):
    return jax.tree.map(lambda x: factor * x, tree)


def _sym_add(s, t):
    return _Sym(s.xx + t.xx, s.xy + t.xy, s.yy + t.yy)


def _pair_add(u, v):
    return _Pair(u.x + v.x, u.y + v.y)


def _pair_sub(u, v):
    return _Pair(u.x - v.x, u.y - v.y)


def _sym_det(s):
    return s.xx * s.yy - s.xy * s.xy


def _sym_inverse(s):
    # adj(S) / |S|; one reciprocal of the determinant serves every entry.
    inv_det = 1 / _sym_det(s)
    return _Sym(s.yy * inv_det, -s.xy * inv_det, s.xx * inv_det)


def _sym_matvec(s, v):
    return _Pair(s.xx * v.x + s.xy * v.y, s.xy * v.x + s.yy * v.y)


def _product(s, t):
    """``S T`` of two symmetric matrices, a general 2×2 as (00, 01, 10, 11)."""
    return (
        s.xx * t.xx + s.xy * t.xy,
        s.xx * t.xy + s.xy * t.yy,
        s.xy * t.xx + s.yy * t.xy,
        s.xy * t.xy + s.yy * t.yy,
    )


def _congruence(k, c):
    """``K C Kᵀ`` for a general ``K`` (as from :func:`_product`) and symmetric ``C``."""
    k00, k01, k10, k11 = k
    return _Sym(
        k00 * k00 * c.xx + 2 * k00 * k01 * c.xy + k01 * k01 * c.yy,
        k00 * k10 * c.xx + (k00 * k11 + k01 * k10) * c.xy + k01 * k11 * c.yy,
        k10 * k10 * c.xx + 2 * k10 * k11 * c.xy + k11 * k11 * c.yy,
    )


def _outer(v):
    return _Sym(v.x * v.x, v.x * v.y, v.y * v.y)


# Longest run of elements summed in order before the runs are added pairwise.
_SUM_BLOCK = 1024


@jax.custom_jvp
def _sums(tree):
    """Sum of every array of a pytree (all of one shape), in one fused pass.

    A plain ``jnp.sum`` of an expression becomes a library reduction on XLA's
    CPU backend that evaluates large expressions slowly and materialises every
    broadcast scalar as a full array; one variadic reduce is a single loop over
    the elements for all the sums. For rounding, the elements are split into
    equal blocks (the longest that divides their number, at most
    ``_SUM_BLOCK``) summed in order, and the block sums are added pairwise.
    """
    leaves, treedef = jax.tree.flatten(tree)
    size = int(np.prod(jnp.shape(leaves[0])))
    block = next(b for b in range(min(size, _SUM_BLOCK), 0, -1) if size % b == 0)
    leaves = tuple(x.reshape(size // block, block) for x in leaves)
    zeros = tuple(jnp.zeros((), x.dtype) for x in leaves)
    totals = jax.lax.reduce(leaves, zeros, lambda u, v: tuple(a + b for a, b in zip(u, v)), (1,))
    return jax.tree.unflatten(treedef, [jnp.sum(x) for x in totals])


@_sums.defjvp
def _sums_jvp(primals, tangents):
    # A sum is linear; plain sums of the tangents can also be transposed, which
    # JAX's variadic reduce cannot (reverse mode through the cell sums needs it).
    (tree,), (tangent,) = primals, tangents
    return _sums(tree), jax.tree.map(jnp.sum, tangent)


def _result_dtype(*trees):
    """The floating dtype that arithmetic on all these arrays produces (loop carries need it)."""
    return jnp.result_type(*jax.tree.leaves(trees))


# --- chunked folds ----------------------------------------------------------


def _fold_chunks(body, carry, size: int, chunk_size: int):
    """``carry = body(carry, start, length)`` over consecutive chunks of ``range(size)``.

    Chunks have the static length ``chunk_size`` (a ``fori_loop``) and one
    shorter remainder; a level no longer than a chunk is a single call. Why:
    XLA on CPU places all intermediates of a call in one temporary buffer,
    mapped fresh on each call once it exceeds the allocator's reuse threshold
    (32 MiB); the page faults of touching it then cost more than the
    arithmetic. Folding bounds the intermediates to one chunk.
    """
    full, rest = divmod(size, chunk_size)
    if full == 1:
        carry = body(carry, 0, chunk_size)
    elif full > 1:
        carry = jax.lax.fori_loop(
            0, full, lambda i, c: body(c, i * chunk_size, chunk_size), carry
        )
    if rest:
        carry = body(carry, full * chunk_size, rest)
    return carry


def _resolve_chunk_size(chunk_size: Optional[int]) -> int:
    """``chunk_size``, or the default: :data:`CHUNK_SIZE` on CPU, no folding elsewhere.

    The folding works around the CPU allocator; an accelerator runs a whole
    level as one kernel better than as a sequence of chunks.
    """
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive int, found {chunk_size}")
        return int(chunk_size)
    return CHUNK_SIZE if jax.default_backend() == "cpu" else 2**62


def _chunk(tree, start, length: int):
    """Rows ``[start, start + length)`` of every array of a pytree."""
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, length), tree)


# --- leaf data ----------------------------------------------------------------


class _LeafSums(NamedTuple):
    """Leaf information already summed per leaf (``J_g, h_g`` over the leaf scale)."""

    precision: _Sym  # (G,) arrays
    potential: _Pair  # (G,) arrays

    def sums(self):
        return self.precision, self.potential


class _CellBlocks(NamedTuple):
    """Gaussian cells stored leaf by leaf, ``k`` per leaf, as ``(G, k)`` arrays.

    A leaf's sums are then ``k − 1`` elementwise adds instead of a scatter,
    and padding is masked inside each chunk, so no per-cell intermediate is
    ever stored.
    """

    n: jax.Array  # (G, k) float, rows per cell, 0 = padding
    mean: jax.Array  # (G, k) float, cell mean ȳ
    arm: jax.Array  # (G, k) float, t ∈ {0, 1}
    variance: Optional[jax.Array]  # (G, k) float σ² per cell; None: shared (the leaf scale)

    def sums(self):
        terms = _cell_information(*_observed_cells(self.n, self.mean, self.arm, self.variance))
        # Unrolled adds over the short trailing axis: XLA's CPU reductions over
        # a trailing axis of 2 are several times slower.
        weight, weight_treated, weighted_mean, weighted_treated_mean = (
            reduce(jnp.add, (x[:, i] for i in range(x.shape[1]))) for x in terms
        )
        return (
            _Sym(weight, weight_treated, weight_treated),
            _Pair(weighted_mean, weighted_treated_mean),
        )


def _leaf_chunk(leaf_scale, leaf_data, start, length):
    """``(J, h)`` of leaves ``[start, start + length)``, and the unscaled sums."""
    sums = _chunk(leaf_data, start, length).sums()
    return _scale(sums[0], leaf_scale), _scale(sums[1], leaf_scale), sums


# --- upward pass and its gradient ---------------------------------------------


def _integrate_nodes(lam, j, h):
    """Integrate nodes out against their prior ``Λ`` (MATH.md, upward pass).

    Returns each node's ``h_vᵀA_v⁻¹h_v`` and ``log|A_v|`` (its term of the
    log-normaliser is half their difference) and its message
    ``(Λ A_v⁻¹ J_v, Λ A_v⁻¹ h_v)`` to its parent.
    """
    a = _sym_add(lam, j)
    det = _sym_det(a)
    inv_det = 1 / det
    quadratic = (a.yy * h.x * h.x - 2 * a.xy * h.x * h.y + a.xx * h.y * h.y) * inv_det
    terms = (quadratic, jnp.log(det))
    # gain = Λ A⁻¹ (not symmetric), entry by entry.
    g_xx = (lam.xx * a.yy - lam.xy * a.xy) * inv_det
    g_xy = (lam.xy * a.xx - lam.xx * a.xy) * inv_det
    g_yx = (lam.xy * a.yy - lam.yy * a.xy) * inv_det
    g_yy = (lam.yy * a.xx - lam.xy * a.xy) * inv_det
    # Λ A⁻¹ J equals Λ − Λ A⁻¹ Λ but is exactly zero for a node without
    # data instead of the rounding residue of a cancellation.
    message_precision = _Sym(
        g_xx * j.xx + g_xy * j.xy,
        0.5 * (g_xx * j.xy + g_xy * j.yy + g_yx * j.xx + g_yy * j.xy),
        g_yx * j.xy + g_yy * j.yy,
    )
    message_potential = _Pair(g_xx * h.x + g_xy * h.y, g_yx * h.x + g_yy * h.y)
    return terms, message_precision, message_potential


def _upward_messages(
    level_precision, prior_mean, leaf_scale, leaf_data, parents, sizes, chunk_size
):
    """Upward pass (MATH.md): the log-normaliser and every inner level's ``(J, h)``.

    ``level_precision`` is a :class:`_Sym` of ``(L,)`` arrays (``Λ_ℓ``); the
    leaves' ``(J, h)`` are ``leaf_scale`` times ``leaf_data.sums()``. Returns
    ``(log_normaliser, data)`` with ``data[ℓ] = (J_ℓ, h_ℓ)``, the summed
    messages of level ``ℓ``'s children, for every level but the leaves.
    """
    num_levels = len(sizes)
    dtype = _result_dtype(level_precision, prior_mean, leaf_scale, leaf_data)
    log_det_level_precision = jnp.log(_sym_det(level_precision))  # (L,)
    log_normaliser = 0.5 * jnp.sum(jnp.asarray(sizes, dtype) * log_det_level_precision)
    mu = _Pair(prior_mean[0], prior_mean[1])
    data = [None] * num_levels
    for level in reversed(range(num_levels)):
        lam = _entry(level_precision, level)

        def body(carry, start, length, level=level, lam=lam):
            terms, messages = carry
            if level == num_levels - 1:
                j, h, _ = _leaf_chunk(leaf_scale, leaf_data, start, length)
            else:
                j, h = _chunk(data[level], start, length)
            node_terms, message_precision, message_potential = _integrate_nodes(lam, j, h)
            if level > 0:
                index = _chunk(parents[level - 1], start, length)
                messages = jax.tree.map(
                    lambda total, x: total.at[index].add(x),
                    messages,
                    (message_precision, message_potential),
                )
            else:
                # The top level's parent is the constant μ: evaluate its message
                # there, 2 h_msgᵀμ − μᵀJ_msgμ, halved with the node terms below.
                quadratic, log_det = node_terms
                mp = message_precision
                node_terms = (
                    quadratic
                    + 2 * (message_potential.x * mu.x + message_potential.y * mu.y)
                    - (mp.xx * mu.x * mu.x + 2 * mp.xy * mu.x * mu.y + mp.yy * mu.y * mu.y),
                    log_det,
                )
            quadratic, log_det = _sums(node_terms)
            return terms + 0.5 * (quadratic - log_det), messages

        if level > 0:
            zeros = jnp.zeros(sizes[level - 1], dtype)
            messages = (_Sym(zeros, zeros, zeros), _Pair(zeros, zeros))
        else:
            messages = ()
        terms, messages = _fold_chunks(
            body, (jnp.zeros((), dtype), messages), sizes[level], chunk_size
        )
        log_normaliser = log_normaliser + terms
        if level > 0:
            data[level - 1] = messages
    return log_normaliser, data


def _node_moments(lam, j, h, parent_mean, parent_cov):
    """Posterior moments of nodes and of their step from the parent.

    Given the parent's marginal posterior ``N(m_p, C_p)`` (``parent_cov`` None:
    a constant parent), with ``A = Λ + J``:

    - ``m = A⁻¹(Λ m_p + h)`` and ``C = A⁻¹ + W C_p Wᵀ``, ``W = A⁻¹Λ``;
    - ``θ − θ_p`` has mean ``δ = A⁻¹(h − J m_p)`` and second moment
      ``A⁻¹ + K C_p Kᵀ + δδᵀ`` with ``K = I − W = A⁻¹J``, exactly zero for a
      node without data.

    Returns ``(m, C, δ, E[(θ − θ_p)(θ − θ_p)ᵀ])``.
    """
    a_inv = _sym_inverse(_sym_add(lam, j))
    mean = _sym_matvec(a_inv, _pair_add(_sym_matvec(lam, parent_mean), h))
    step = _sym_matvec(a_inv, _pair_sub(h, _sym_matvec(j, parent_mean)))
    step_moment = _sym_add(a_inv, _outer(step))
    cov = a_inv
    if parent_cov is not None:
        step_moment = _sym_add(step_moment, _congruence(_product(a_inv, j), parent_cov))
        cov = _sym_add(a_inv, _congruence(_product(a_inv, lam), parent_cov))
    return mean, cov, step, step_moment


def _leaf_information_gradient(mean, cov):
    """``∂ log Z / ∂J_g = −½ E[θθᵀ]`` and ``∂ log Z / ∂h_g = E[θ] = m``.

    The off-diagonal entry of the :class:`_Sym` stands for both elements, so
    its derivative counts twice.
    """
    second = _sym_add(cov, _outer(mean))
    return _Sym(-0.5 * second.xx, -second.xy, -0.5 * second.yy), mean


def _log_normaliser_gradient(
    level_precision, prior_mean, leaf_scale, leaf_data, parents, data, sizes, chunk_size,
    *, want_scale: bool, want_leaves: bool,
):
    """Gradient of the log-normaliser by one downward pass (Fisher's identity).

    ``∇_φ log Z = E[∇_φ log p(θ, data | φ) | data]``, and the downward pass of
    MATH.md gives the posterior moments level by level
    (:func:`_node_moments`), so

    - ``∂/∂Λ_ℓ = ½ Σ_v (Λ_ℓ⁻¹ − E[(θ_v − θ_p)(θ_v − θ_p)ᵀ])``,
    - ``∂/∂μ = Λ_0 Σ_top E[θ_v − μ]``,
    - ``∂/∂J_g = −½ E[θ_g θ_gᵀ]``, ``∂/∂h_g = E[θ_g]``, hence for the leaf
      scale ``s`` (``J_g = s S_g``, ``h_g = s T_g``)
      ``∂/∂s = Σ_g −½ tr(S_g E[θ_g θ_gᵀ]) + T_gᵀ E[θ_g]``.

    Unlike reverse-mode through the upward pass, this stores nothing per node
    but the parents' moments, and it folds large levels in chunks.

    Returns ``(d level_precision, d prior_mean, d leaf_scale, leaf gradients)``:
    a :class:`_Sym` of ``(L,)`` arrays (the off-diagonal entry counts for both
    elements), ``(2,)``, a scalar (zero unless ``want_scale``), and, when
    ``want_leaves``, ``(∂/∂J, ∂/∂h)`` per leaf (else None).
    """
    num_levels = len(sizes)
    dtype = _result_dtype(level_precision, prior_mean, leaf_scale, leaf_data)
    parent_mean = _Pair(prior_mean[0], prior_mean[1])
    parent_cov = None  # the top level's parent μ is a constant
    grad_precision = []
    grad_scale = jnp.zeros((), dtype)
    grad_leaves = None
    for level in range(num_levels):
        lam = _entry(level_precision, level)
        is_leaf = level == num_levels - 1

        def node_data(start, length, level=level, is_leaf=is_leaf):
            if is_leaf:
                return _leaf_chunk(leaf_scale, leaf_data, start, length)
            return (*_chunk(data[level], start, length), None)

        def parent_moments(start, length, level=level, parent_mean=parent_mean,
                           parent_cov=parent_cov):
            if level == 0:
                return parent_mean, None
            index = _chunk(parents[level - 1], start, length)
            return _entry(parent_mean, index), _entry(parent_cov, index)

        def body(carry, start, length, lam=lam, is_leaf=is_leaf,
                 node_data=node_data, parent_moments=parent_moments):
            step_total, step_moment_total, scale_total = carry
            j, h, sums = node_data(start, length)
            mean, cov, step, step_moment = _node_moments(
                lam, j, h, *parent_moments(start, length)
            )
            terms = (step, step_moment)
            if is_leaf and want_scale:
                grad_j, grad_h = _leaf_information_gradient(mean, cov)
                terms += (
                    grad_j.xx * sums[0].xx + grad_j.xy * sums[0].xy + grad_j.yy * sums[0].yy
                    + grad_h.x * sums[1].x + grad_h.y * sums[1].y,
                )
            totals = _sums(terms)
            step_total = _pair_add(step_total, totals[0])
            step_moment_total = _sym_add(step_moment_total, totals[1])
            if len(totals) > 2:
                scale_total = scale_total + totals[2]
            return step_total, step_moment_total, scale_total

        zero = jnp.zeros((), dtype)
        step_total, step_moment_total, scale_total = _fold_chunks(
            body, (_Pair(zero, zero), _Sym(zero, zero, zero), zero), sizes[level], chunk_size
        )
        sigma = _sym_inverse(lam)  # Λ_ℓ⁻¹ = Σ_ℓ
        count = sizes[level]
        grad_precision.append(
            _Sym(
                0.5 * (count * sigma.xx - step_moment_total.xx),
                count * sigma.xy - step_moment_total.xy,
                0.5 * (count * sigma.yy - step_moment_total.yy),
            )
        )
        if level == 0:
            grad_mean = _sym_matvec(lam, step_total)
        if is_leaf:
            grad_scale = scale_total
        # The children need this level's moments as whole arrays.
        if not is_leaf or want_leaves:
            j, h, _ = node_data(0, count)
            mean, cov, _, _ = _node_moments(lam, j, h, *parent_moments(0, count))
            if is_leaf:
                grad_leaves = _leaf_information_gradient(mean, cov)
            parent_mean, parent_cov = mean, cov
    grad_level_precision = _Sym(*(jnp.stack(entry) for entry in zip(*grad_precision)))
    return grad_level_precision, jnp.stack(grad_mean), grad_scale, grad_leaves


@partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _log_normaliser(sizes, chunk_size, level_precision, prior_mean, leaf_scale, leaf_data, parents):
    """``log Z`` of the tree (MATH.md); its derivative is the downward pass below."""
    log_normaliser, _ = _upward_messages(
        level_precision, prior_mean, leaf_scale, leaf_data, parents, sizes, chunk_size
    )
    return log_normaliser


def _is_zero(x):
    return isinstance(x, SymbolicZero)


@partial(_log_normaliser.defjvp, symbolic_zeros=True)
def _log_normaliser_jvp(sizes, chunk_size, primals, tangents):
    level_precision, prior_mean, leaf_scale, leaf_data, parents = primals
    d_precision, d_mean, d_scale, d_data, _ = tangents
    data_tangents = jax.tree.leaves(d_data, is_leaf=_is_zero)
    want_leaves = not all(_is_zero(t) for t in data_tangents)
    log_normaliser, data = _upward_messages(
        level_precision, prior_mean, leaf_scale, leaf_data, parents, sizes, chunk_size
    )
    grad_precision, grad_mean, grad_scale, grad_leaves = _log_normaliser_gradient(
        level_precision, prior_mean, leaf_scale, leaf_data, parents, data, sizes, chunk_size,
        want_scale=not _is_zero(d_scale), want_leaves=want_leaves,
    )
    # The tangent is linear in the input tangents, so reverse mode transposes
    # it into (cotangent × gradient) without another pass over the tree.
    tangent = jnp.zeros_like(log_normaliser)
    for grad, tan in [
        *zip(grad_precision, jax.tree.leaves(d_precision, is_leaf=_is_zero)),
        (grad_mean, d_mean),
        (grad_scale, d_scale),
    ]:
        if not _is_zero(tan):
            tangent = tangent + jnp.sum(grad * tan)
    if want_leaves:
        # Leaf data enter through leaf_data.sums(); push the data tangents through it.
        d_data = jax.tree.map(
            lambda t: jnp.zeros(t.aval.shape, t.aval.dtype) if _is_zero(t) else t,
            d_data, is_leaf=_is_zero,
        )
        _, (d_j, d_h) = jax.jvp(lambda d: d.sums(), (leaf_data,), (d_data,))
        grad_j, grad_h = grad_leaves
        tangent = tangent + leaf_scale * jnp.sum(
            grad_j.xx * d_j.xx + grad_j.xy * d_j.xy + grad_j.yy * d_j.yy
            + grad_h.x * d_h.x + grad_h.y * d_h.y
        )
    return log_normaliser, tangent


def _integrate_flat(leaf_scale, leaf_data, parents, prior_cov, prior_mean, sizes, chunk_size):
    """The :class:`Upward` of leaves ``leaf_scale · leaf_data.sums()``.

    The log-normaliser goes through :func:`_log_normaliser` (its gradient is
    a downward pass); the per-level ``A_v, h_v`` come from the plain upward
    pass, which ``jit`` removes as dead code when only the log-normaliser is
    used. (A caller using both, undifferentiated, pays for the upward pass
    twice where a level is folded: XLA does not merge the two loops.)
    """
    level_precision = _sym_of(_level_precision(prior_cov))
    prior_mean = jnp.asarray(prior_mean)
    parents = tuple(parents)
    log_normaliser = _log_normaliser(
        sizes, chunk_size, level_precision, prior_mean, leaf_scale, leaf_data, parents
    )
    _, data = _upward_messages(
        level_precision, prior_mean, leaf_scale, leaf_data, parents, sizes, chunk_size
    )
    leaf_precision, leaf_potential = leaf_data.sums()
    data[-1] = (_scale(leaf_precision, leaf_scale), _scale(leaf_potential, leaf_scale))
    return Upward(
        tuple(
            _matrix_of(_sym_add(_entry(level_precision, level), j))
            for level, (j, _) in enumerate(data)
        ),
        tuple(_vector_of(h) for _, h in data),
        log_normaliser,
    )


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
    chunk_size: Optional[int] = None,
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
    chunk_size : int, optional
        Nodes per chunk of a folded level (static); the default is
        :data:`CHUNK_SIZE` on CPU and no folding on accelerators (see
        :func:`_fold_chunks`). Results do not depend on it beyond rounding.

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
    leaf_potential = jnp.asarray(leaf_potential)
    leaf_data = _LeafSums(
        _sym_of(jnp.asarray(leaf_precision)), _Pair(leaf_potential[:, 0], leaf_potential[:, 1])
    )
    return _integrate_flat(
        jnp.ones((), leaf_potential.dtype), leaf_data, parents, prior_cov, prior_mean, sizes,
        _resolve_chunk_size(chunk_size),
    )


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


def posterior_means(upward: Upward, parents, prior_cov, prior_mean) -> tuple:
    """Exact posterior mean (= mode) of every node: ``m_v = A_v⁻¹(Λ m_p + h_v)``, top down.

    The means of :func:`posterior_moments` without the covariances; one
    Newton step of the ``laplace`` method is this solve (MATH.md).

    Returns
    -------
    tuple
        Per level ``(nodes_ℓ, 2)`` means, top level first.
    """
    level_precision = _level_precision(prior_cov)
    means = []
    for level in range(len(upward.precision)):
        means.append(_conditional_means(upward, level, level_precision,
                                        _parent_values(means, level, parents, prior_mean)))
    return tuple(means)


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


def _observed_cells(n, mean, arm, variance):
    """Padding-safe ``(count, mean, arm, variance)`` of cells (any shape).

    Padding cells (``n = 0``) may hold anything, NaN or a zero variance
    included; they are replaced before any arithmetic (not masked after it),
    so neither their values nor their gradients leak into the result. After
    the replacement (count 0, mean 0, variance 1) every term of a padding cell
    is an exact zero, so nothing needs masking afterwards. ``variance`` None
    means a shared ``σ²`` applied elsewhere.
    """
    dtype = _float_dtype(mean)
    count = jnp.asarray(n).astype(dtype)
    observed = count > 0
    if variance is not None:
        variance = jnp.where(observed, variance, 1)
    return (
        jnp.where(observed, count, 0),
        jnp.where(observed, jnp.asarray(mean), 0),
        jnp.asarray(arm).astype(dtype),
        variance,
    )


def _cell_information(count, mean, arm, variance):
    """Each cell's share of its leaf's ``(J_xx, J_xy = J_yy, h_x, h_y)``.

    ``x_t x_tᵀ`` with ``x_t = (1, t)`` and ``t ∈ {0, 1}`` has ``t² = t``, so the
    off-diagonal and the (1, 1) entry of ``J`` are one sum.
    """
    weight = count if variance is None else count / variance  # n / σ²
    weight_treated = weight * arm
    return weight, weight_treated, weight * mean, weight_treated * mean


def _cell_constants(count, mean, m2, variance):
    """Sums over cells for ``−½ Σ (n ȳ² + M2)/σ² − ½ Σ n log(2πσ²)``.

    With a shared ``σ²`` (``variance`` None) they are data only:
    ``(Σ n ȳ² + M2, Σ n)``; otherwise the whole per-cell sum.
    """
    squares = count * mean * mean + m2
    if variance is None:
        return _sums((squares, count))
    return _sums((squares / variance + count * jnp.log(2 * np.pi * variance),))


def _gaussian_cells(n, mean, m2, arm, leaf, num_leaves, variance, chunk_size):
    """Leaf sums (scatter over cells in any order) and the cell constants, in chunks."""
    dtype = _float_dtype(mean)
    cells = (n, mean, m2, arm, variance)

    def body(carry, start, length):
        leaf_sums, constants = carry
        n, mean, m2, arm, variance = _chunk(cells, start, length)
        count, mean, arm, variance = _observed_cells(n, mean, arm, variance)
        m2 = jnp.where(count > 0, m2.astype(dtype), 0)
        index = jax.lax.dynamic_slice_in_dim(leaf, start, length)
        leaf_sums = tuple(
            total.at[index].add(x)
            for total, x in zip(leaf_sums, _cell_information(count, mean, arm, variance))
        )
        constants = tuple(
            total + x for total, x in zip(constants, _cell_constants(count, mean, m2, variance))
        )
        return leaf_sums, constants

    zero = jnp.zeros((), dtype)
    init = (
        (jnp.zeros(num_leaves, dtype),) * 4,
        (zero,) if variance is not None else (zero, zero),
    )
    (weight, weight_treated, weighted_mean, weighted_treated_mean), constants = _fold_chunks(
        body, init, jnp.shape(n)[0], chunk_size
    )
    leaf_data = _LeafSums(
        _Sym(weight, weight_treated, weight_treated), _Pair(weighted_mean, weighted_treated_mean)
    )
    return leaf_data, constants


def _blocked_cells(n, mean, m2, arm, num_leaves, cells_per_leaf, variance, chunk_size):
    """Cells stored leaf by leaf: :class:`_CellBlocks`, and the cell constants."""
    num_cells = jnp.shape(n)[0]
    if num_cells != num_leaves * cells_per_leaf:
        raise ValueError(
            f"gaussian_log_marginal: cells_per_leaf={cells_per_leaf} needs "
            f"num_leaves × cells_per_leaf = {num_leaves * cells_per_leaf} cells, found "
            f"{num_cells}; pad every leaf to {cells_per_leaf} cells with n = 0, or leave "
            "cells_per_leaf unset"
        )
    dtype = _float_dtype(mean)
    shape = (num_leaves, cells_per_leaf)
    blocks = _CellBlocks(
        jnp.asarray(n).astype(dtype).reshape(shape),
        jnp.asarray(mean).reshape(shape),
        jnp.asarray(arm).astype(dtype).reshape(shape),
        None if variance is None else variance.reshape(shape),
    )
    m2 = jnp.asarray(m2).reshape(shape)

    def body(constants, start, length):
        block, block_m2 = _chunk((blocks, m2), start, length)
        count, mean, _, variance = _observed_cells(*block)
        block_m2 = jnp.where(count > 0, block_m2.astype(dtype), 0)
        sums = _cell_constants(count, mean, block_m2, variance)
        return tuple(total + x for total, x in zip(constants, sums))

    zero = jnp.zeros((), dtype)
    constants = _fold_chunks(
        body, (zero,) if variance is not None else (zero, zero), num_leaves, chunk_size
    )
    return blocks, constants


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
        Treatment arm ``t``, 0 or 1 (the sums use ``t² = t``).
    leaf : array (C,) int32
        Leaf index of each cell; any order, any number of cells per leaf.
    num_leaves : int
        Number of leaves (static).
    noise_var : array (C,) or scalar
        Residual variance ``σ²`` of each cell.

    Returns
    -------
    (J, h) : arrays (num_leaves, 2, 2), (num_leaves, 2)

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> j, h = gaussian_leaf_information(jnp.array([2.0, 1.0]), jnp.array([0.5, 3.0]),
    ...                                  jnp.array([0, 1]), jnp.array([0, 0]), 1, 1.0)
    >>> j.tolist(), h.tolist()
    ([[[3.0, 1.0], [1.0, 1.0]]], [[4.0, 3.0]])
    """
    dtype = _float_dtype(mean)
    variance = jnp.asarray(noise_var).astype(dtype)
    n = jnp.asarray(n)
    shared = variance.ndim == 0
    leaf_data, _ = _gaussian_cells(
        n, jnp.asarray(mean), jnp.zeros(n.shape, dtype), jnp.asarray(arm), jnp.asarray(leaf),
        num_leaves, None if shared else jnp.broadcast_to(variance, n.shape),
        _resolve_chunk_size(None),
    )
    precision, potential = leaf_data.sums()
    if shared:
        precision, potential = _scale(precision, 1 / variance), _scale(potential, 1 / variance)
    return _matrix_of(precision), _vector_of(potential)


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
    cells_per_leaf: Optional[int] = None,
    chunk_size: Optional[int] = None,
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
    cells_per_leaf : int, optional
        Promise that the cells are stored leaf by leaf, ``cells_per_leaf`` per
        leaf: cell ``c`` belongs to leaf ``c // cells_per_leaf`` (so
        ``C = num_leaves · cells_per_leaf``; pad short leaves with ``n = 0``
        cells, in any arm order). ``leaf`` is then not read, and the leaf sums
        are elementwise adds instead of a scatter: the fastest layout.
    chunk_size : int, optional
        Nodes (or cells) per chunk of a folded level (static); see
        :func:`integrate`.

    Returns
    -------
    (log_marginal, upward) : (jax.Array, Upward)
        Scalar log marginal likelihood and the upward pass, reusable by
        :func:`sample` and :func:`posterior_moments`. Under ``jit``, a caller
        that uses only the value (or its gradient) pays nothing for ``upward``.

    Notes
    -----
    A scalar ``noise_var`` is the fast path: ``σ²`` then scales every leaf's
    information, the sums over cells are data only, and the gradient with
    respect to ``σ²`` is one more sum in the downward pass.

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
    num_levels = jnp.shape(prior_cov)[0]
    if len(parents) != num_levels - 1:
        raise ValueError(
            f"gaussian_log_marginal: parents has {len(parents)} levels of links but prior_cov "
            f"has {num_levels} levels; expected len(parents) == prior_cov.shape[0] - 1"
        )
    dtype = _float_dtype(mean)
    n = jnp.asarray(n)
    variance = jnp.asarray(noise_var).astype(dtype)
    shared = variance.ndim == 0
    cell_variance = None if shared else jnp.broadcast_to(variance, n.shape)
    chunk_size = _resolve_chunk_size(chunk_size)
    if cells_per_leaf is None:
        leaf_data, constants = _gaussian_cells(
            n, jnp.asarray(mean), jnp.asarray(m2), jnp.asarray(arm), jnp.asarray(leaf),
            num_leaves, cell_variance, chunk_size,
        )
    else:
        leaf_data, constants = _blocked_cells(
            n, mean, m2, arm, num_leaves, cells_per_leaf, cell_variance, chunk_size
        )
    upward = _integrate_flat(
        1 / variance if shared else jnp.ones((), dtype),
        leaf_data, parents, prior_cov, prior_mean,
        _level_sizes(num_leaves, parents, num_top), chunk_size,
    )
    if shared:
        squares, count = constants
        constant = squares / variance + count * jnp.log(2 * np.pi * variance)
    else:
        (constant,) = constants
    return upward.log_normaliser - 0.5 * constant, upward
