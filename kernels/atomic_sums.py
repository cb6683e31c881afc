"""Per-segment sums of (1, d, d²) on an NVIDIA GPU: one Pallas (Triton) kernel of vector atomics.

Why a kernel of its own
-----------------------
``segments.reduce_sums`` adds each row's ``(1, d, d²)`` into its segment with XLA's scatter.
On an H100 (session 7, ``benchmarks/RESULTS.md``) that ran at 38·10⁹ rows/s at best, 17% of the
card's memory bandwidth, in float32 or float64: XLA issues one atomic per row and column, and
the atomics, not the reads, set the pace. Here the three sums of a segment sit side by side in
one aligned 16-byte slot ``(count, Σd, Σd², 0)``, and each row adds its four floats to the slot
in one atomic add over four contiguous, 16-byte-aligned float32 addresses, the pattern Triton
compiles to Hopper's vector atomic (``.v4.f32``, Triton PR 4971); the PTX itself was not
inspected, only the speed. H100, 10⁸ rows on the device (session 9, three runs): 489–607 GB/s
of rows read at 10²–10⁵ groups, 22–32% of the 1.9–2.2 TB/s the same runs measured, against
62 (10² groups) to 340 GB/s for XLA's scatter; at 10⁷ groups, where the table leaves the L2
cache, 102 GB/s against 84.

Replicas
--------
Program ``i`` (``block_rows`` rows) adds into replica ``i % replicas`` of the table, and the
replicas are summed afterwards (in float64 with x64). Replicas spread the atomics of few
segments over more addresses (few segments: every row contends for the same slots) and cap the
rows any one float32 partial sums: a count is exact while it stays below 2²⁴, and Σd, Σd² of
fewer rows round less. ``default_replicas`` keeps the table (replicas × segments × 16 bytes)
under 32 MiB, inside the card's L2 cache, where the atomics resolve.

Precision
---------
Each partial is a float32 sum in whatever order the atomics land (not deterministic run to
run), of ``d = y − shift``, the shift subtracted in the kernel in the rows' own precision: float32
rows get a float32 ``shift`` near them, exact where a row lies within a factor of two of it
(Sterbenz); float64 rows a float64 shift, each ``d`` then rounded to float32 once. Either way
the rows are read once, with no pass to centre or convert them first
(``engine.reduce.jax.reduce_device``).
The relative error of a partial Σd² grows like √m·2⁻²⁴ for m rows in it (typically;
m·2⁻²⁴ at worst). ``M2 = Σd² − (Σd)²/n`` then amplifies it by ``segments.reduce_sums``'
cancellation factor, which the caller checks (``reduce_sums(..., scatter="atomic")``). A partial count that reached 2²⁴ may have lost
increments: its segment's cancellation is set to infinity, so the caller falls back.

Memory order
------------
Pallas' ``atomic_add`` lowers with acquire-release semantics, which orders every atomic against
the thread's other memory operations; sums need atomicity only (XLA's own scatter is relaxed).
On the H100 (session 9) relaxed atomics ran 1.3–1.8× faster at 10⁸ rows (10²–10⁵ groups). So the kernel binds a
primitive of its own, ``relaxed_atomic_add``, lowered by Pallas' own atomic rule with the
semantics set to relaxed. That reaches into Pallas' private Triton lowering; where a JAX release
lacks those pieces, ``RELAXED`` is False and the kernel uses the public ``atomic_add``.

Only the outcome (no covariates). Runs on the GPU; ``interpret=True`` runs it on any backend
through Pallas' interpreter, whose atomics are *not* atomic: rows of one program that share a
segment keep only one row's values (the tests use ids that are distinct within a program, and
the GPU run checks the kernel itself against a float64 reference).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["segment_sums", "default_replicas", "lowers_for_cuda", "RELAXED", "SLOT", "SPILL"]

SLOT = 4          # floats per segment: count, Σd, Σd², padding to 16 bytes
SPILL = 32        # extra slots per replica that masked rows add into, spread
EXACT_COUNT = 2 ** 24
TABLE_BYTES = 32 << 20
#: H100, 1e8 rows over 200 segments: 1.71 ms with 256 replicas, 1.61 ms with 1024 (run 3 of
#: session 9). A table past the L2 cache is far slower: 1024 replicas of 2·10⁴ segments
#: (537 MB) took 8.05 ms against 1.50 ms for the default 64.
MAX_REPLICAS = 1024


def _relaxed_atomic_add():
    """A Pallas atomic add lowered with relaxed memory semantics, or None where this JAX lacks
    the private pieces it is built from (then the public, acquire-release ``atomic_add``)."""
    try:
        from jax._src import core as jax_core
        from jax._src.pallas.triton import lowering as triton_lowering
        from jax._src.pallas.triton import primitives as triton_primitives
        from jax._src.state import discharge as state_discharge
        from jax._src.state import primitives as state_primitives
        from jax._src import tree_util

        relaxed = triton_lowering.tt_dialect.MemSemantic.RELAXED
        rule = triton_primitives._atomic_lowering_rule
        add = triton_primitives.AtomicOpType.ADD
    except (ImportError, AttributeError):
        return None

    primitive = jax_core.Primitive("relaxed_atomic_add")
    primitive.def_effectful_abstract_eval(triton_primitives._atomic_abstract_eval)
    state_discharge.register_discharge_rule(primitive)(triton_primitives._atomic_rmw_discharge_rule)

    @triton_lowering.register_lowering(primitive)
    def _lower(ctx, *args_flat, args_tree, atomic_type):
        # Pallas' own rule, with its atomic helper told "relaxed" for the length of this call.
        helper = triton_lowering._atomic_rmw
        triton_lowering._atomic_rmw = functools.partial(helper, semantic=relaxed)
        try:
            return rule(ctx, *args_flat, args_tree=args_tree, atomic_type=atomic_type)
        finally:
            triton_lowering._atomic_rmw = helper

    def atomic_add(ref, idx, val):
        x_ref, transforms = state_primitives.get_ref_and_transforms(ref, idx, "atomic_rmw")
        args_flat, args_tree = tree_util.tree_flatten((x_ref, transforms, val, None))
        return primitive.bind(*args_flat, args_tree=args_tree, atomic_type=add)

    return atomic_add


_RELAXED_ADD = _relaxed_atomic_add()
RELAXED = _RELAXED_ADD is not None


def default_replicas(num_segments: int) -> int:
    """The largest power of two (≤ ``MAX_REPLICAS``) whose table of slots fits in ``TABLE_BYTES``."""
    slots = (num_segments + SPILL + 1) * SLOT * 4
    replicas = 1
    while replicas < MAX_REPLICAS and 2 * replicas * slots <= TABLE_BYTES:
        replicas *= 2
    return replicas


def _kernel(y_ref, id_ref, mask_ref, shift_ref, table_ref, out_ref, *, rows, block_rows,
            num_segments, replicas, relaxed):
    del table_ref   # the zeroed table, aliased to out_ref
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    program = pl.program_id(0)
    start = program * block_rows
    local = jnp.arange(block_rows, dtype=jnp.int32)
    inside = start + local < rows
    window = pl.ds(start, block_rows)
    y = plt.load(y_ref.at[window], mask=inside, other=0.0)
    ids = plt.load(id_ref.at[window], mask=inside, other=0)
    keep = plt.load(mask_ref.at[window], mask=inside, other=False)
    outside = (ids < 0) | (ids >= num_segments)
    # Masked rows add into one of SPILL slots past the segments, by position, not into one slot;
    # kept rows with an id out of range into the slot after those, which counts them.
    slot = jnp.where(keep & inside, jnp.where(outside, num_segments + SPILL, ids), num_segments + local % SPILL)
    base = (program % replicas) * (num_segments + SPILL + 1)
    d = (y - shift_ref[0]).astype(jnp.float32)   # float64 rows: subtracted in float64, then rounded
    column = jnp.arange(SLOT, dtype=jnp.int32)[None, :]
    flat = (base + slot)[:, None] * SLOT + column
    values = jnp.where(column == 0, jnp.ones((), d.dtype),
                       jnp.where(column == 1, d[:, None],
                                 jnp.where(column == 2, (d * d)[:, None], jnp.zeros((), d.dtype))))
    if relaxed:
        _RELAXED_ADD(out_ref, flat, values)
    else:
        plt.atomic_add(out_ref, flat, values)


def segment_sums(y, segment_ids, mask, num_segments: int, shift, *, block_rows: int = 1024,
                 replicas: int | None = None, num_warps: int = 4, relaxed: bool | None = None,
                 interpret: bool = False):
    """Per segment ``(n, Σd, Σd²)`` of ``d = y − shift`` over the masked rows, the row counts,
    the most rows any one float32 partial of the segment added, and how many rows were dropped.

    ``y`` (rows,) float32 or float64, ``segment_ids`` (rows,) int32 (rows the mask keeps whose id
    is out of range are dropped and counted), ``mask`` (rows,) bool, ``shift`` a scalar,
    subtracted in ``y``'s precision (for float32 rows exact where a row is within a factor of two
    of it; float64 rows are read as they are, no float32 copy first, and each ``d`` is rounded
    to float32 once). ``relaxed``: relaxed atomics
    (default: where available). Returns ``(sums, count, largest, dropped)``: ``sums``
    (num_segments, 3) in float64 with x64 (else float32), the replicas' float32 partials added;
    ``count`` (num_segments,) int64 with x64 (else int32), the partial counts added as integers;
    ``largest`` (num_segments,) the largest partial count: the sums' rounding grows with it, and
    a partial count of 2²⁴ (``EXACT_COUNT``) or more may have lost increments; ``dropped`` the
    number of kept rows whose id was out of range (a caller's validation, at no extra pass).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    if y.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"atomic_sums.segment_sums reads float32 or float64 rows, got {y.dtype}")
    if block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two, got {block_rows}")
    rows = y.shape[0]
    replicas = replicas or default_replicas(num_segments)
    width = num_segments + SPILL + 1     # the segments, the spill slots, the dropped-row slot
    programs = max(1, -(-rows // block_rows))
    table = jnp.zeros((replicas * width * SLOT,), jnp.float32)
    relaxed = RELAXED if relaxed is None else relaxed
    if relaxed and not RELAXED:
        raise ValueError("relaxed atomics are not available with this JAX release (see RELAXED)")
    kernel = functools.partial(_kernel, rows=rows, block_rows=block_rows, num_segments=num_segments,
                               replicas=replicas, relaxed=relaxed)
    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(table.shape, table.dtype), grid=(programs,),
        input_output_aliases={4: 0}, interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1))
    shift = jnp.reshape(jnp.asarray(shift, y.dtype), (1,))
    out = call(y, segment_ids.astype(jnp.int32), mask.astype(jnp.bool_), shift, table)
    table = out.reshape(replicas, width, SLOT)
    partials = table[:, :num_segments, :3]
    x64 = jax.config.jax_enable_x64
    integer = jnp.int64 if x64 else jnp.int32
    counts = jnp.round(partials[:, :, 0]).astype(integer)
    dropped = jnp.sum(jnp.round(table[:, width - 1, 0]).astype(integer))
    return (jnp.sum(partials.astype(jnp.float64 if x64 else jnp.float32), axis=0), jnp.sum(counts, axis=0),
            jnp.max(counts, axis=0), dropped)


def lowers_for_cuda(num_segments: int = 256, rows: int = 4096, dtype=jnp.float32, **options) -> str:
    """The kernel lowered for CUDA from any host (no GPU needed) for rows of ``dtype``: the
    StableHLO text, which embeds the Triton IR. Raises where Pallas cannot lower it."""
    spec = (jax.ShapeDtypeStruct((rows,), dtype), jax.ShapeDtypeStruct((rows,), jnp.int32),
            jax.ShapeDtypeStruct((rows,), jnp.bool_))
    fn = jax.jit(lambda y, ids, mask: segment_sums(y, ids, mask, num_segments, 0.0, **options))
    return fn.trace(*spec).lower(lowering_platforms=("cuda",)).as_text()

