"""Time the gradient of the Gaussian-tree log marginal likelihood (kernels/gaussian_tree.py).

NUTS over the hyperparameters calls ``value_and_grad`` of
``gaussian_log_marginal`` thousands of times, so its per-call cost is the
cost of the `exact` method. This script builds a two-level tree (``G`` leaves
with one cell per arm, ``G // 100`` top nodes with random parents), compiles
``jax.jit(jax.value_and_grad(f))`` with every data array passed as a jit
argument (never closed over, so nothing is constant-folded), and reports the
compile time, the per-gradient wall time (median and minimum; the
implementations are called in turn, so load from other processes affects
them alike), the process CPU time per gradient, and the size of XLA's
temporary buffer (above ~32 MiB the allocator maps it afresh on every call,
and its page faults show up as time).

Usage::

    python benchmarks/tree_kernel.py --sizes 1000,10000,100000,1000000
    python benchmarks/tree_kernel.py --sizes 100000 --impls baseline,current

``baseline`` is the kernel as it was before the structure-of-arrays rewrite
(read from git history at BASELINE_REV, not kept as a copy);
``current`` is kernels/gaussian_tree.py called exactly as the baseline (cells
in any order, a scatter per leaf sum); ``blocked`` is the same kernel told
that the cells are stored leaf by leaf (``cells_per_leaf=2``), which they are
here. Each size also checks that all agree with the first (value and
gradient) so a speed-up cannot hide a changed result. Results go to
benchmarks/results/kernels.json.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_ENABLE_X64", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from kernels import gaussian_tree  # noqa: E402

# The kernel before the CPU rewrite, read from git history rather than kept as a copy.
BASELINE_REV = "4c3e7c9"


def _baseline_module():
    import importlib.util
    import subprocess
    import tempfile

    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE_REV}:kernels/gaussian_tree.py"],
                                check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        print(f"baseline skipped: git revision {BASELINE_REV} is not available here", file=sys.stderr)
        return None
    path = Path(tempfile.mkdtemp()) / "baseline_gaussian_tree.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_gaussian_tree", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_baseline = _baseline_module()
# name: (module, extra keyword arguments of gaussian_log_marginal)
IMPLS = {
    **({"baseline": (_baseline, {})} if _baseline is not None else {}),
    "current": (gaussian_tree, {}),
    "blocked": (gaussian_tree, {"cells_per_leaf": 2}),
}

# Hyperparameters: μ (2), log sd per level and component (4), log σ² (1).
THETA = np.array([0.1, -0.2, np.log(1.0), np.log(0.5), np.log(0.7), np.log(0.3), np.log(1.2)])
CORRELATION = 0.3  # off-diagonal prior covariance, so the 2×2 algebra is not diagonal


def make_data(num_leaves, seed=0):
    """Cells, two per leaf (arm 0 then arm 1), and random links to G // 100 top nodes."""
    rng = np.random.default_rng(seed)
    num_cells = 2 * num_leaves
    num_top = max(num_leaves // 100, 1)
    n = rng.integers(1, 5, size=num_cells).astype(np.float64)
    data = dict(
        n=n,
        mean=rng.normal(size=num_cells),
        m2=rng.uniform(size=num_cells) * n,
        arm=np.tile([0.0, 1.0], num_leaves),
        leaf=np.repeat(np.arange(num_leaves, dtype=np.int32), 2),
        parents=(rng.integers(0, num_top, size=num_leaves).astype(np.int32),),
    )
    return data, num_top


def level_covariances(theta):
    """(2, 2, 2) prior covariance per level from log standard deviations."""
    sd = jnp.exp(theta[2:6]).reshape(2, 2)
    off = CORRELATION * sd[:, 0] * sd[:, 1]
    return jnp.stack(
        [jnp.stack([sd[:, 0] ** 2, off], -1), jnp.stack([off, sd[:, 1] ** 2], -1)], -2
    )


def gradient_fn(impl, num_leaves, num_top):
    module, options = IMPLS[impl]

    def log_marginal(theta, n, mean, m2, arm, leaf, parents):
        value, _ = module.gaussian_log_marginal(
            n, mean, m2, arm, leaf, parents, level_covariances(theta), theta[:2],
            jnp.exp(theta[6]), num_leaves=num_leaves, num_top=num_top, **options,
        )
        return value

    return jax.jit(jax.value_and_grad(log_marginal))


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_calls(fns, args, min_time, min_calls):
    """Per function: median and minimum wall ms, and median CPU ms, of blocking calls.

    The functions are called in turn (after two warm-up calls each), so a
    change in the machine's load during the run affects them alike.
    """
    for fn in fns:
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    start = time.perf_counter()
    while len(wall[0]) < min_calls or time.perf_counter() - start < min_time * len(fns):
        for i, fn in enumerate(fns):
            c0, t0 = _cpu_seconds(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            wall[i].append(1e3 * (time.perf_counter() - t0))
            cpu[i].append(1e3 * (_cpu_seconds() - c0))
    return [
        dict(grad_ms_median=statistics.median(w), grad_ms_min=min(w),
             cpu_ms_median=statistics.median(c), calls=len(w))
        for w, c in zip(wall, cpu)
    ]


def bench_size(num_leaves, impls, min_time, min_calls, seed=0):
    data, num_top = make_data(num_leaves, seed)
    args = (
        jnp.asarray(THETA),
        *(jnp.asarray(data[k]) for k in ("n", "mean", "m2", "arm", "leaf")),
        tuple(jnp.asarray(p) for p in data["parents"]),
    )
    compiled, rows = [], []
    for name in impls:
        t0 = time.perf_counter()
        compiled.append(gradient_fn(name, num_leaves, num_top).lower(*args).compile())
        rows.append(dict(impl=name, leaves=num_leaves, cells=2 * num_leaves, top=num_top,
                         compile_s=time.perf_counter() - t0,
                         temp_mb=compiled[-1].memory_analysis().temp_size_in_bytes / 2**20))
    for row, timing in zip(rows, time_calls(compiled, args, min_time, min_calls)):
        row.update(timing)
    outputs = [tuple(np.asarray(x) for x in fn(*args)) for fn in compiled]
    ref_value, ref_grad = outputs[0]
    for row, (value, grad) in zip(rows, outputs):
        row["value"] = float(value)
        row["value_rel_diff"] = float(abs(value - ref_value) / abs(ref_value))
        row["grad_rel_diff"] = float(np.max(np.abs(grad - ref_grad) / np.abs(ref_grad)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000",
                        help="comma-separated leaf counts (cells = 2 × leaves)")
    parser.add_argument("--impls", default="baseline,current,blocked",
                        help=f"comma-separated, from {sorted(IMPLS)}; the first is the reference")
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="seconds of timed calls per size and implementation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-calls", type=int, default=5)
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "kernels.json"))
    opts = parser.parse_args(argv)
    sizes = [int(float(s)) for s in opts.sizes.split(",")]
    impls = opts.impls.split(",")

    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, x64={jax.config.jax_enable_x64}, "
          f"{os.cpu_count()} cpus")
    header = (f"{'leaves':>9} {'impl':>9} {'compile s':>10} {'grad ms':>9} {'min ms':>8} "
              f"{'cpu ms':>8} {'temp MiB':>9} {'calls':>6} {'rel diff':>9}")
    print(header)
    rows = []
    for size in sizes:
        for row in bench_size(size, impls, opts.min_time, opts.min_calls, opts.seed):
            rows.append(row)
            diff = max(row["value_rel_diff"], row["grad_rel_diff"])
            print(f"{row['leaves']:>9} {row['impl']:>9} {row['compile_s']:>10.2f} "
                  f"{row['grad_ms_median']:>9.2f} {row['grad_ms_min']:>8.2f} "
                  f"{row['cpu_ms_median']:>8.2f} {row['temp_mb']:>9.1f} {row['calls']:>6} "
                  f"{diff:>9.1e}", flush=True)
    out = Path(opts.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(jax=jax.__version__, platform=platform.platform(), cpus=os.cpu_count(),
                device=str(jax.devices()[0]), x64=bool(jax.config.jax_enable_x64))
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
