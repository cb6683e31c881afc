"""Where ``engine.reduce.jax.reduce_device``'s time goes on a GPU, stage by stage.

The reduce section of ``run.py`` times the atomic kernel alone (path ``atomic``) and the engine's
``reduce_device`` around it (path ``device``); this splits the difference: the jitted program
(the sampled shift, the kernel, the moments and the refinement flags, packed into one array),
the same with that array's one copy to the host, and the whole call, each the median of ``--calls``,
plus a cProfile of the whole call; and first, each shape's first call (compiles by name from
JAX's log, and a profile). Writes ``$OUT/device_stages.json``.

    python3 benchmarks/gpu/device_stages.py --rows 1e8 --groups 1e2,1e4,1e5
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_ENABLE_X64", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def median_ms(fn, calls):
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1e8")
    parser.add_argument("--groups", default="1e2,1e4,1e5")
    parser.add_argument("--calls", type=int, default=20)
    opts = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from engine.reduce import jax as jb
    from kernels import segments

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import CompileClock

    clock = CompileClock()
    rows = int(float(opts.rows))
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": rows, "items": []}
    for groups in (int(float(g)) for g in opts.groups.split(",")):
        num_segments = 2 * groups
        key1, key2 = jax.random.split(jax.random.PRNGKey(0))
        ids = jax.random.randint(key1, (rows,), 0, num_segments, jnp.int32)
        y = jax.random.normal(key2, (rows,), jnp.float32)
        mask = jnp.ones((rows,), bool)
        jax.block_until_ready((ids, y, mask))
        padded = segments.bucket(num_segments, jb.MIN_SEGMENTS)
        _, atomic, _ = jb._device_programs()
        item = {"groups": groups, "padded_segments": padded}
        # The first call of a shape: on the H100 (session 10) it took ~17 s against 0.4 s for
        # the kernel path's compile. JAX's compile log and a profile say where it goes.
        clock.reset()
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        jb.reduce_device(y, None, ids, num_segments, mask=mask, precision="float32")
        profile.disable()
        item["first_call_s"] = time.perf_counter() - t0
        item["first_call_compile_s"] = clock.seconds
        item["first_call_compiles"] = clock.top(8)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(25)
        item["first_call_profile"] = text.getvalue()[-6000:]
        print(f"{groups:>9.0e} groups: first call {item['first_call_s']:.2f} s, of which compiling "
              f"{clock.seconds:.2f} s: {item['first_call_compiles']}", flush=True)

        def program():
            return jax.block_until_ready(atomic(y, ids, mask, num_segments, segments_=padded))

        item["program_ms"] = median_ms(program, opts.calls)
        item["program_and_copy_ms"] = median_ms(lambda: np.asarray(program()[0]), opts.calls)
        item["whole_ms"] = median_ms(lambda: jb.reduce_device(y, None, ids, num_segments, mask=mask,
                                                               precision="float32"), opts.calls)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(opts.calls):
            jb.reduce_device(y, None, ids, num_segments, mask=mask, precision="float32")
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
        item["profile_top"] = text.getvalue()[-4000:]
        out["items"].append(item)
        print(f"{groups:>9.0e} groups: program {item['program_ms']:.2f} ms, with its one copy to the host "
              f"{item['program_and_copy_ms']:.2f} ms, whole reduce_device {item['whole_ms']:.2f} ms", flush=True)
        print(item["profile_top"][-2500:], flush=True)
    target = Path(os.environ.get("OUT", ".")) / "device_stages.json"
    target.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
