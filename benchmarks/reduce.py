"""Rows → cells: throughput of each reduce backend, side by side.

For each size (rows × leaf groups) it times, on the same synthetic rows (an
int64 group key, ``arm`` int8, outcome ``y`` and one covariate ``x``, both
float64: 25 bytes a row):

- ``groupby``  plain Polars, ``lazy().group_by([key, arm]).agg(cell_aggregates)``
               in one shot: the same statistics, no batching, no determinism;
- ``polars``   engine.reduce.polars.reduce_polars (fixed batches, fixed merge tree);
- ``polars-no-codes`` the same with string keys grouped by Polars (``key_codes=False``), not
               coded to integers for the dense route (one integer key: the same as ``polars``);
- ``polars-two-pass`` the same without ``engine.reduce.fused``'s direct pass at many segments
               (``DIRECT_SEGMENTS`` out of reach): its two passes over the rows as they come;
- ``polars-ids`` the same with every batch through a segment-id array (``fused.keyed_sums``
               off: a later batch whose cells all have shifts is otherwise one pass over its key
               and arm columns);
- ``polars-numpy`` the same with ``CAUSAL_ENGINE_HOST_PASSES=numpy``: the NumPy ``bincount``
               passes of ``kernels.host`` instead of the compiled loops of ``engine.reduce.fused``;
- ``jax``      engine.reduce.jax.reduce_jax on the default JAX device, warm
               (its compile time is reported apart), keys encoded with Polars;
- ``jax-kernel`` only the kernel over already-encoded host arrays (no key encoding);
- ``dask``     engine.reduce.dask.reduce_dask on a LocalCluster of ``--workers``
               single-threaded worker processes, reading the rows from Parquet files
               of 2²⁰ rows (one partition each); cluster start and file writing are
               not timed.

and a memory-read bound: a NumPy sum over a float64 array of ``--bound-mib``
MiB (the best of three), in GB/s. "Effective GB/s" is 25 bytes × rows / seconds. Each method's
time is the best of ``--repeat`` runs (default 3).
Validation is not timed: every backend gets rows that already have ``arm``.

Usage::

    python benchmarks/reduce.py                       # 1e6 and 1e7 rows, 1e2…1e6 groups
    python benchmarks/reduce.py --rows 1e6 --groups 1e2,1e4
    python benchmarks/reduce.py --huge                # adds 1e8 rows (about 2.5 GB of rows)

Results go to benchmarks/results/reduce.json (and a table on stdout).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_ENABLE_X64", "1")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.reduce.polars import cell_aggregates, reduce_polars, sum_columns  # noqa: E402

BYTES_PER_ROW = 8 + 1 + 8 + 8
METHODS = ("groupby", "polars", "polars-no-codes", "polars-two-pass", "polars-ids", "polars-numpy", "jax", "jax-kernel",
           "dask")


def make_rows(rows: int, groups: int, seed: int = 0, keys: str = "int") -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    key = rng.integers(0, groups, rows)
    arm = rng.integers(0, 2, rows).astype(np.int8)
    x = rng.standard_normal(rows)
    y = 10.0 + 0.5 * x + 0.3 * arm + 0.01 * (key % 100) + rng.standard_normal(rows)
    frame = pl.DataFrame({"key": key, "arm": arm, "y": y, "x": x})
    if keys == "string":   # "g123": what group ids in users' tables usually are
        frame = frame.with_columns(pl.format("g{}", pl.col("key")).alias("key"))
    elif keys == "uuid":   # 36 characters, longer than the 12 an Arrow string view holds inline
        scrambled = (pl.col("key") * 7919 % 100000007).cast(pl.String).str.pad_start(12, "0")
        frame = frame.with_columns(pl.format("{}-4f3a-9c1b-{}", scrambled,
                                             pl.col("key").cast(pl.String).str.pad_start(12, "0")).alias("key"))
    elif keys == "nested":   # two levels: "c<key mod 97>" above "g<key>"
        frame = frame.with_columns(pl.format("c{}", pl.col("key") % 97).alias("country"),
                                   pl.format("g{}", pl.col("key")).alias("key"))
    return frame


def group_columns(keys: str) -> list[str]:
    return ["country", "key"] if keys == "nested" else ["key"]


def memory_read_bound(mib: int) -> float:
    array = np.ones(mib * (1 << 20) // 8)
    array.sum()
    best = min(_timed(array.sum)[1] for _ in range(3))
    return array.nbytes / best / 1e9


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def run_groupby(frame, groups=("key",)):
    # cell_aggregates reads the row-wise sums whose variances give the co-moments.
    return (frame.lazy().with_columns(sum_columns(["x"], "y")).group_by([*groups, "arm"])
            .agg(cell_aggregates("y", ["x"])).collect())


def run_jax(frame):
    from engine.reduce.jax import reduce_jax

    return reduce_jax(frame.lazy(), ["key"], "y", ["x"])


def run_jax_kernel(frame) -> float:
    from engine.reduce.jax import encode_cells, reduce_arrays

    keys, segment_ids = encode_cells(frame, ["key"])
    y, x = frame["y"].to_numpy(), frame.select("x").to_numpy(order="c")
    reduce_arrays(y, x, segment_ids, 2 * keys.height)  # compiled (and warm)
    return _timed(reduce_arrays, y, x, segment_ids, 2 * keys.height)[1]


def write_partitions(frame: pl.DataFrame, folder: Path, partition_rows: int = 1 << 20) -> list[str]:
    paths = []
    for i, start in enumerate(range(0, frame.height, partition_rows)):
        path = folder / f"part{i:05d}.parquet"
        frame.slice(start, partition_rows).write_parquet(path)
        paths.append(str(path))
    return paths


def run_dask(paths, client, groups=("key",)):
    from engine import validate
    from engine.reduce.dask import reduce_dask
    from engine.spec import Spec

    spec = Spec(outcome="y", treatment="arm", groups=tuple(groups), covariates=("x",), backend="dask")
    checked = validate.check(validate.resolve_source(paths), spec)  # not timed: see run()
    return lambda: reduce_dask(checked, spec, client=client, partition_rows=1 << 20)


def _best(repeat, fn, *args):
    """The fastest of ``repeat`` timed calls (the machine's noise only ever adds time)."""
    return min(_timed(fn, *args)[1] for _ in range(max(repeat, 1)))


def run(sizes, methods, workers, bound_mib, repeat=1, keys="int"):
    import jax

    results = []
    bound = memory_read_bound(bound_mib)
    print(f"memory-read bound: {bound:.1f} GB/s (NumPy sum over {bound_mib} MiB)", flush=True)
    client = cluster = None
    if "dask" in methods:
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster, set_as_default=False)
    try:
        # Once per process, before any timing: load the compiled loops from Numba's cache, start
        # the thread pools, make the thread-local buffers (a repeat-1 run would charge the first
        # method it times with all of it: 0.8 s against 0.3 s at 1e8 rows, session 10).
        for warm_groups in (100, 1 << 20):
            warm = make_rows(1 << 22, warm_groups, keys=keys)
            for method in ("polars", "polars-numpy"):
                if method in methods or (method == "polars" and {"polars-two-pass", "polars-ids"} & set(methods)):
                    os.environ["CAUSAL_ENGINE_HOST_PASSES"] = "numpy" if method == "polars-numpy" else "fused"
                    try:
                        reduce_polars(warm.lazy(), group_columns(keys), "y", ["x"])
                    finally:
                        del os.environ["CAUSAL_ENGINE_HOST_PASSES"]
        for rows, groups in sizes:
            frame = make_rows(rows, groups, keys=keys)
            record = {"rows": rows, "groups": groups, "keys": keys}
            for method in methods:
                extra = {}
                if method == "groupby":
                    seconds = _best(repeat, run_groupby, frame, group_columns(keys))
                elif method == "polars":
                    seconds = _best(repeat, reduce_polars, frame.lazy(), group_columns(keys), "y", ["x"])
                elif method == "polars-no-codes":
                    seconds = _best(repeat, lambda: reduce_polars(frame.lazy(), group_columns(keys), "y", ["x"],
                                                              key_codes=False))
                elif method == "polars-numpy":
                    os.environ["CAUSAL_ENGINE_HOST_PASSES"] = "numpy"
                    try:
                        seconds = _best(repeat, reduce_polars, frame.lazy(), group_columns(keys), "y", ["x"])
                    finally:
                        del os.environ["CAUSAL_ENGINE_HOST_PASSES"]
                elif method in ("polars-two-pass", "polars-ids"):
                    from engine.reduce import fused

                    saved = fused.DIRECT_SEGMENTS, fused.keyed_applies
                    if method == "polars-two-pass":
                        fused.DIRECT_SEGMENTS = 2**62
                    else:
                        fused.keyed_applies = lambda *a: False
                    try:
                        seconds = _best(repeat, reduce_polars, frame.lazy(), group_columns(keys), "y", ["x"])
                    finally:
                        fused.DIRECT_SEGMENTS, fused.keyed_applies = saved
                elif method == "jax":
                    _, first = _timed(run_jax, frame)
                    seconds = _best(repeat, run_jax, frame)
                    extra["compile_s"] = round(max(first - seconds, 0.0), 3)
                elif method == "jax-kernel":
                    seconds = min(run_jax_kernel(frame) for _ in range(max(repeat, 1)))
                else:
                    with tempfile.TemporaryDirectory() as folder:
                        paths = write_partitions(frame, Path(folder))
                        seconds = _best(repeat, run_dask(paths, client, group_columns(keys)))
                results.append({**record, "method": method, "seconds": round(seconds, 4),
                                "rows_per_s": rows / seconds, "gb_per_s": rows * BYTES_PER_ROW / seconds / 1e9,
                                **extra})
                r = results[-1]
                print(f"{rows:>11,d} {groups:>9,d} {method:<11s} {seconds:9.3f} s {r['rows_per_s'] / 1e6:9.1f} "
                      f"Mrow/s {r['gb_per_s']:7.2f} GB/s" + (f"  (compile {extra['compile_s']} s)" if extra else ""),
                      flush=True)
    finally:
        if client is not None:
            client.close()
            cluster.close()
    return {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "jax_backend": jax.default_backend(),
                    "jax_devices": [str(d) for d in jax.devices()], "polars": pl.__version__,
                    "load_average": os.getloadavg(), "dask_workers": workers, "repeat": repeat},
        "bytes_per_row": BYTES_PER_ROW, "memory_read_bound_gb_per_s": bound, "results": results,
    }


def table(report) -> str:
    lines = [f"memory-read bound {report['memory_read_bound_gb_per_s']:.1f} GB/s; "
             f"{report['bytes_per_row']} bytes a row; jax on {report['machine']['jax_backend']}",
             f"{'rows':>11} {'groups':>9} | " + " | ".join(f"{m:>18}" for m in METHODS if any(
                 r["method"] == m for r in report["results"])) + " | polars÷groupby",
             ]
    methods = [m for m in METHODS if any(r["method"] == m for r in report["results"])]
    cells = {(r["rows"], r["groups"], r["method"]): r for r in report["results"]}
    for rows, groups in dict.fromkeys((r["rows"], r["groups"]) for r in report["results"]):
        parts = []
        for m in methods:
            r = cells.get((rows, groups, m))
            parts.append(f"{r['rows_per_s'] / 1e6:7.1f} M/s {r['gb_per_s']:5.2f}GB" if r else " " * 18)
        ratio = ""
        if (rows, groups, "polars") in cells and (rows, groups, "groupby") in cells:
            ratio = f"{cells[rows, groups, 'polars']['seconds'] / cells[rows, groups, 'groupby']['seconds']:.2f}"
        lines.append(f"{rows:>11,d} {groups:>9,d} | " + " | ".join(parts) + f" | {ratio:>14}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1e6,1e7", help="comma-separated row counts")
    parser.add_argument("--groups", default="1e2,1e3,1e4,1e5,1e6", help="comma-separated leaf-group counts")
    parser.add_argument("--huge", action="store_true", help="add 1e8 rows")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="dask worker processes")
    parser.add_argument("--bound-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="time each method this many times, keep the best")
    parser.add_argument("--keys", choices=("int", "string", "uuid", "nested"), default="int",
                        help="group keys as int64, as strings 'g<int>', as 36-character UUID-like strings, or "
                             "nested: 'c<int mod 97>' above 'g<int>' (not the jax methods)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reduce.json"))
    args = parser.parse_args(argv)
    row_counts = [int(float(r)) for r in args.rows.split(",")] + ([10**8] if args.huge else [])
    group_counts = [int(float(g)) for g in args.groups.split(",")]
    sizes = [(r, g) for r in row_counts for g in group_counts if g <= r]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    report = run(sizes, methods, args.workers, args.bound_mib, args.repeat, args.keys)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print()
    print(table(report))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
