#!/usr/bin/env python3
"""The one prepared GPU run: correctness, bandwidth, kernel throughput and end-to-end fits.

Written for a session that is lent one GPU machine once (a 10-minute command, ~15 minutes of
device time in all): every section runs in its own child process with its own time budget, so a
section that fails, runs out of memory or hangs (a slow scatter loop, a slow NUTS) is recorded
and killed, and the rest still run. Results are written to ``$OUT/gpu.json`` after every section
(``OUT`` unset: ``./gpu-out``) with the whole log beside it (``gpu.log``), and a short table is
printed at the end.

Sections, in order (``--sections`` picks some):

- ``device``       jax.devices(), jax/jaxlib/numpyro versions, nvidia-smi, which optional packages
                   are importable; stops the run if there is no GPU (unless ``--allow-cpu``).
- ``correctness``  on the device: the segment reduction (kernels/segments.py) on rows with mean
                   1e9 and sd 1 against a float64 NumPy reference, in float64, in float32 after a
                   float64 shift (the engine's float32 route) and raw float32 (expected to fail),
                   unsorted and sorted; the Gaussian-tree log marginal and gradient
                   (kernels/gaussian_tree.py) in float32 against float64.
- ``bandwidth``    device-memory bandwidth: a large float32 sum (read) and scale (read + write),
                   timed with block_until_ready, median of repeats; host → device copy.
- ``reduce``       the segmented reduction rows → cells (``segments.reduce_blocks``, the engine's
                   block sizes) at 1e7 / 1e8 rows and 1e2 … 1e7 groups: rows/s, effective GB/s and
                   the fraction of the measured bandwidth, unsorted (scatter) and sorted paths; a
                   probe of plain ``segment_sum`` in float32 / float64 / sorted, because some JAX
                   releases compile float32 scatter-add on GPU to a slow loop.
- ``tree``         ms per ``value_and_grad`` of the Gaussian-tree log marginal at 1e5 … 1e7 leaves,
                   float32 and float64, cells in any order and stored leaf by leaf.
- ``fits``         ``engine.fit`` end to end: ``exact`` (Gaussian) and ``laplace`` (Bernoulli) at
                   1e5, 1e6, 1e7 groups as the budget allows (a size whose projected time exceeds
                   what is left is skipped, and says so): seconds, R-hat, ESS, and accuracy against
                   the simulated truth (RMSE, 90% coverage, ATE error). Rows come from a vectorised
                   simulation of the engine's model with integer group keys (engine.simulate builds
                   string keys in a Python loop: 2.7 s at 1e6 groups on the dev machine).
- ``nuts``         a small full-NUTS fit (``method="nuts"``) on the device, and the same fit on the
                   host CPU of the same machine, since NumPyro 0.21 was reported slow on GPU; ms
                   per iteration excludes compilation, which JAX's own log times (every fit
                   compiles NumPyro's sampling loop again).

Usage::

    python3 benchmarks/gpu/run.py                          # on the GPU machine, ~8.5 minutes
    python3 benchmarks/gpu/run.py --budget 300 --sections device,fits
    .venv/bin/python benchmarks/gpu/run.py --allow-cpu --smoke   # here: every section, tiny sizes

Only ``kernels`` (jax, numpy) is needed up to ``tree``; ``fits`` and ``nuts`` import ``engine``,
which needs polars (see benchmarks/gpu/README.md for the wheels). Nothing is installed here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("device", "correctness", "bandwidth", "reduce", "tree", "fits", "nuts")
# Packages whose presence is recorded at the end of every section (what it imported).
WATCHED = ("jax", "jaxlib", "numpy", "numpyro", "polars", "pyarrow", "optax", "dask", "distributed",
           "pandas", "scipy", "psutil", "engine", "kernels")

# As engine/reduce/jax.py: rows per block (CPU, elsewhere) and the smallest segment bucket.
CPU_BLOCK_ROWS = 1 << 18
BLOCK_ROWS = 1 << 22
MIN_SEGMENTS = 64

# Sizes. ``budget`` is each section's own cap in seconds (``fits`` gets what is left after the
# sections before it, less ``nuts``' cap); a child is killed ``GRACE`` seconds past its cap.
FULL = {
    "device": {"budget": 60},
    "correctness": {"budget": 60, "rows": 3_000_000, "block_rows": 1 << 20, "segments": [50, 20_000],
                    "tree_leaves": [100_000, 1_000_000]},
    "bandwidth": {"budget": 45, "elements": 1 << 28, "repeats": 10, "h2d_elements": 1 << 26,
                  "atomics_segments": [20_000, 200_000]},
    "reduce": {"budget": 110, "rows": [10**7, 10**8],
               "groups": {"10000000": [10**2, 10**4, 10**5, 10**6],
                          "100000000": [10**2, 10**4, 10**5, 10**7]},
               "paths": ["unsorted", "sums-fused", "atomic", "device", "atomic-b4096", "atomic-acqrel"],
               "float64_groups": [], "float64_rows": [], "float64_paths": [],
               "probe_rows": 10**7, "probe_segments": 10**4},
    "tree": {"budget": 60, "leaves": [10**5, 10**6, 10**7], "dtypes": ["float32", "float64"],
             "impls": ["current", "blocked"]},
    "fits": {"groups": [10**5, 10**6, 10**7], "methods": ["exact", "laplace"], "rows_per_group": 5,
             "draws": 500, "warmup": 500, "chains": 4, "hyper_devices": ["auto"], "repeat_last": 1},
    "nuts": {"budget": 90, "groups": 1000, "rows_per_group": 5, "draws": 300, "warmup": 300, "chains": 4,
             "cpu_compare": True},
}
SMOKE = {
    "device": {"budget": 60},
    "correctness": {"budget": 60, "rows": 20_000, "block_rows": 1 << 12, "segments": [300],
                    "tree_leaves": [1_000]},
    "bandwidth": {"budget": 30, "elements": 1 << 20, "repeats": 5, "h2d_elements": 1 << 18},
    "reduce": {"budget": 60, "rows": [1 << 14], "groups": {str(1 << 14): [10**2, 10**3]},
               "paths": ["unsorted", "sorted", "sums-fused", "sums-columns", "atomic", "device"],
               "float64_groups": [10**2], "probe_rows": 1 << 14, "probe_segments": 100},
    "tree": {"budget": 60, "leaves": [1_000], "dtypes": ["float32", "float64"], "impls": ["current", "blocked"]},
    "fits": {"groups": [100], "methods": ["exact", "laplace"], "rows_per_group": 5, "draws": 40, "warmup": 40,
             "chains": 2, "hyper_devices": ["auto"], "repeat_last": 1},
    "nuts": {"budget": 100, "groups": 12, "rows_per_group": 5, "draws": 30, "warmup": 30, "chains": 2,
             "cpu_compare": True},
}
GRACE = 20          # seconds a child may run past its budget before it is killed
FITS_MIN = 30       # below this many seconds left, fits are not started
NUTS_MIN = 20


# ============================================================================================
# Parent: runs each section in a child process, merges results, writes gpu.json, prints.
# ============================================================================================


class Log:
    """Echo to stdout (flushed) and append to ``gpu.log``."""

    def __init__(self, path: Path):
        self.handle = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            self.handle.write(text + "\n")


def _child_env(section: str, opts) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["CAUSAL_ENGINE_PROGRESS"] = "0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if section in ("fits", "nuts"):
        # The fit's precision: "engine" leaves the engine's own choice (float64 on CPU, and on GPU
        # whatever JAX_ENABLE_X64 says: float32 unless set); the others force it.
        if opts.fit_precision == "float32":
            env["JAX_ENABLE_X64"], env["CAUSAL_ENGINE_X64"] = "0", "0"
        elif opts.fit_precision == "float64":
            env["JAX_ENABLE_X64"], env["CAUSAL_ENGINE_X64"] = "1", "1"
    else:
        env["JAX_ENABLE_X64"] = "1"   # float64 references beside float32 (float32 is asked for by dtype)
    return env


def run_child(section: str, budget: float, config_path: Path, workdir: Path, log: Log, opts) -> dict:
    """Run one section in a child process; return its record (status ok/partial/error/timeout)."""
    result_path = workdir / f"{section}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", section, "--config", str(config_path),
               "--result", str(result_path), "--child-budget", f"{budget:.1f}"]
    started = time.monotonic()
    tail: deque = deque(maxlen=40)
    # The child stays in this process's session, so whoever stops this run stops it too.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=_child_env(section, opts), cwd=str(ROOT))
    _RUNNING["child"] = proc

    def pump():
        for raw in proc.stdout:
            text = raw.rstrip("\n")
            tail.append(text)
            log.line(text)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = interrupted = False
    try:
        proc.wait(timeout=budget + GRACE)
    except KeyboardInterrupt:   # SIGTERM/SIGINT to this run: keep what the section measured
        interrupted = True
        proc.kill()
        proc.wait()
    except subprocess.TimeoutExpired:
        timed_out = True
        log.line(f"[{section}] killed after {budget + GRACE:.0f} s (its budget {budget:.0f} s + {GRACE} s)")
        proc.kill()
        proc.wait()
    finally:
        _RUNNING.pop("child", None)
    reader.join(timeout=5)
    record = {}
    if result_path.exists():
        try:
            record = json.loads(result_path.read_text())
        except json.JSONDecodeError as error:
            record = {"result_file_error": str(error)}
    record["seconds"] = round(time.monotonic() - started, 2)
    record["budget_s"] = round(budget, 1)
    record["exit_code"] = proc.returncode
    during = record.pop("running", None)
    if interrupted:
        record["status"] = "interrupted"
        record["error"] = ("the run was stopped (signal)" + (f" during {during}" if during else "")
                           + "; results up to then are kept")
    elif timed_out:
        record["status"] = "timeout"
        record["error"] = (f"killed after {budget + GRACE:.0f} s" + (f" during {during}" if during else "")
                           + "; results up to then are kept")
    elif proc.returncode != 0 or record.get("status") in (None, "running"):
        record["status"] = "error"
        record.setdefault("error", f"child exited with {proc.returncode}")
        record["output_tail"] = list(tail)[-15:]
    return record


# The child in flight, for the signal handler.
_RUNNING: dict = {}


def _on_signal(signum, frame):
    child = _RUNNING.get("child")
    if child is not None and child.poll() is None:
        child.kill()
    raise KeyboardInterrupt(f"signal {signum}")


def parent_main(opts) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    out = Path(opts.out or os.environ.get("OUT") or "gpu-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "gpu.log"
    log_path.write_text("")
    log = Log(log_path)
    sizes = json.loads(json.dumps(SMOKE if opts.smoke else FULL))
    _apply_overrides(sizes, opts)
    sections = [s for s in (opts.sections.split(",") if opts.sections else SECTIONS) if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        log.line(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
        return 2
    sections = [s for s in SECTIONS if s in sections]
    if "device" not in sections:
        sections.insert(0, "device")   # always: it decides whether there is a GPU to run on
    started = time.monotonic()
    deadline = started + opts.budget
    report = {"meta": {"argv": sys.argv[1:], "budget_s": opts.budget, "smoke": opts.smoke,
                       "allow_cpu": opts.allow_cpu, "fit_precision": opts.fit_precision,
                       "fit_backend": opts.fit_backend, "sizes": sizes,
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.version.split()[0],
                       "env": {k: os.environ.get(k) for k in ("JAX_ENABLE_X64", "JAX_PLATFORMS", "XLA_FLAGS",
                                                              "XLA_PYTHON_CLIENT_PREALLOCATE", "PYTHONPATH")}},
              "sections": {}}
    json_path = out / "gpu.json"
    log.line(f"benchmarks/gpu/run.py: sections {','.join(sections)}; budget {opts.budget:.0f} s; "
             f"{'smoke sizes' if opts.smoke else 'full sizes'}; output {json_path}")
    try:
        return _run_sections(sections, sizes, report, json_path, log, opts, started, deadline)
    except KeyboardInterrupt as stop:
        log.line(f"STOP: interrupted ({stop}); writing what was measured")
        report["meta"]["stopped"] = f"interrupted: {stop}"
        return _finish(report, json_path, log, started, 130)


def _run_sections(sections, sizes, report, json_path, log, opts, started, deadline) -> int:
    with tempfile.TemporaryDirectory(prefix="gpu-run-") as tmp:
        workdir = Path(tmp)
        for section in sections:
            left = deadline - time.monotonic()
            if section == "fits":
                reserve = sizes["nuts"]["budget"] if "nuts" in sections else 0
                budget = left - min(reserve, max(left - FITS_MIN, 0))
                minimum = FITS_MIN
            else:
                budget = min(sizes[section]["budget"], left)
                minimum = NUTS_MIN if section == "nuts" else 5
            if budget < minimum:
                report["sections"][section] = {"status": "skipped",
                                               "reason": f"{max(left, 0):.0f} s of the budget left"}
                log.line(f"[{section}] skipped: {max(left, 0):.0f} s of the budget left")
                _write_json(json_path, report)
                continue
            config = {"section": section, "sizes": sizes[section], "smoke": opts.smoke,
                      "allow_cpu": opts.allow_cpu, "fit_backend": opts.fit_backend, "seed": opts.seed,
                      "context": {name: _context_of(name, rec) for name, rec in report["sections"].items()}}
            config_path = workdir / f"{section}.config.json"
            config_path.write_text(json.dumps(config))
            log.line(f"[{section}] start (budget {budget:.0f} s)")
            record = run_child(section, budget, config_path, workdir, log, opts)
            report["sections"][section] = record
            log.line(f"[{section}] {record['status']} in {record['seconds']:.1f} s")
            _write_json(json_path, report)
            if record["status"] == "interrupted":
                raise KeyboardInterrupt("signal")
            if section == "device" and not record.get("gpu"):
                if record.get("status") != "ok":
                    log.line("STOP: the device section failed; see the error above.")
                    return _finish(report, json_path, log, started, 3)
                if not opts.allow_cpu:
                    log.line(f"STOP: no GPU found (jax.devices() = {record.get('devices')}; default backend "
                             f"{record.get('backend')!r}). This script measures a GPU; pass --allow-cpu to "
                             "run it on CPU anyway (for testing).")
                    report["meta"]["stopped"] = "no GPU"
                    return _finish(report, json_path, log, started, 3)
                log.line("note: no GPU; running on CPU because of --allow-cpu")
    return _finish(report, json_path, log, started, 0)


def _apply_overrides(sizes: dict, opts) -> None:
    fits = sizes["fits"]
    if opts.fit_groups:
        fits["groups"] = [int(float(g)) for g in opts.fit_groups.split(",") if g]
    if opts.fit_methods:
        fits["methods"] = [m for m in opts.fit_methods.split(",") if m]
    if opts.hyper_devices:
        fits["hyper_devices"] = [d for d in opts.hyper_devices.split(",") if d]
    if opts.repeat_last:
        fits["repeat_last"] = opts.repeat_last
    for name in ("draws", "warmup", "chains"):
        value = getattr(opts, name)
        if value is not None:
            fits[name] = value
            sizes["nuts"][name] = value if name == "chains" else min(value, sizes["nuts"][name])
    if opts.reduce_rows:
        rows = [int(float(r)) for r in opts.reduce_rows.split(",") if r]
        groups = ([int(float(g)) for g in opts.reduce_groups.split(",") if g] if opts.reduce_groups
                  else sorted({g for gs in sizes["reduce"]["groups"].values() for g in gs}))
        sizes["reduce"]["rows"] = rows
        sizes["reduce"]["groups"] = {str(r): [g for g in groups if g <= r] for r in rows}
    elif opts.reduce_groups:
        groups = [int(float(g)) for g in opts.reduce_groups.split(",") if g]
        sizes["reduce"]["groups"] = {str(r): [g for g in groups if g <= r] for r in sizes["reduce"]["rows"]}
    if opts.reduce_paths:
        sizes["reduce"]["paths"] = [p for p in opts.reduce_paths.split(",") if p]
    if opts.reduce_budget:
        sizes["reduce"]["budget"] = opts.reduce_budget
    for name in ("float64_rows", "float64_groups"):
        if getattr(opts, name):
            sizes["reduce"][name] = [int(float(v)) for v in getattr(opts, name).split(",") if v]
    if opts.float64_paths:
        sizes["reduce"]["float64_paths"] = [p for p in opts.float64_paths.split(",") if p]
    if opts.tree_leaves:
        sizes["tree"]["leaves"] = [int(float(g)) for g in opts.tree_leaves.split(",") if g]
    if opts.nuts_groups:
        sizes["nuts"]["groups"] = int(float(opts.nuts_groups))
    if opts.no_nuts_cpu:
        sizes["nuts"]["cpu_compare"] = False


def _context_of(name: str, record: dict) -> dict:
    """What a later section may use from an earlier one (the measured bandwidth, the device)."""
    if name == "bandwidth":
        return {k: record.get(k) for k in ("read_gbs", "copy_gbs", "bandwidth_gbs", "rows_read_gbs")}
    if name == "device":
        return {k: record.get(k) for k in ("gpu", "backend", "memory_bytes")}
    return {}


def _write_json(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _finish(report: dict, json_path: Path, log: Log, started: float, code: int) -> int:
    report["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    report["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _write_json(json_path, report)
    for line in summary_table(report):
        log.line(line)
    log.line(f"wrote {json_path} and {json_path.with_name('gpu.log')} ({report['meta']['elapsed_s']:.0f} s)")
    return code


def _fmt(value, spec: str = ".3g", missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def summary_table(report: dict) -> list[str]:
    """The short table printed at the end (everything else is in gpu.json)."""
    sections = report["sections"]
    lines = ["", "=" * 96, "SUMMARY  (details: gpu.json)"]
    dev = sections.get("device", {})
    if dev:
        lines.append(f"device: {dev.get('device_kind') or dev.get('devices')} [{dev.get('backend')}], "
                     f"jax {dev.get('jax')}, jaxlib {dev.get('jaxlib')}, numpyro {dev.get('numpyro')}, "
                     f"polars {dev.get('packages', {}).get('polars')}")
    lines.append(f"{'section':<12} {'status':<11} {'seconds':>8}  notes")
    for name in SECTIONS:
        rec = sections.get(name)
        if rec is None:
            continue
        note = rec.get("headline") or rec.get("reason") or rec.get("error") or ""
        lines.append(f"{name:<12} {rec.get('status', '?'):<11} {_fmt(rec.get('seconds'), '.1f'):>8}  {note}"[:200])
    red = sections.get("reduce", {})
    if red.get("items"):
        lines.append("")
        lines.append(f"reduce: {'rows':>10} {'groups':>9} {'path':<13} {'dtype':<8} {'Mrow/s':>9} {'GB/s':>8} "
                     f"{'%bw':>6} {'%read':>6} {'compile s':>9}")
        for r in red["items"]:
            if r.get("status") != "ok":
                lines.append(f"        {r.get('rows', 0):>10.0e} {r.get('groups', 0):>9.0e} {r.get('path', ''):<13} "
                             f"{r.get('dtype', ''):<8} {r.get('status')}: {r.get('reason') or r.get('error', '')}"[:160])
                continue
            lines.append(f"        {r['rows']:>10.0e} {r['groups']:>9.0e} {r['path']:<13} {r['dtype']:<8} "
                         f"{r['rows_per_s'] / 1e6:>9.1f} {r['gb_per_s']:>8.1f} {_fmt(r.get('bandwidth_fraction'), '.1%'):>6} "
                         f"{_fmt(r.get('rows_read_fraction'), '.1%'):>6} {r['compile_s']:>9.2f}")
    tree = sections.get("tree", {})
    if tree.get("items"):
        lines.append("")
        lines.append(f"tree:   {'leaves':>9} {'dtype':<8} {'impl':<8} {'grad ms':>9} {'min ms':>8} {'compile s':>9}")
        for r in tree["items"]:
            if r.get("status") != "ok":
                lines.append(f"        {r.get('leaves', 0):>9.0e} {r.get('dtype', ''):<8} {r.get('impl', ''):<8} "
                             f"{r.get('status')}: {r.get('reason') or r.get('error', '')}"[:160])
                continue
            lines.append(f"        {r['leaves']:>9.0e} {r['dtype']:<8} {r['impl']:<8} {r['grad_ms_median']:>9.3f} "
                         f"{r['grad_ms_min']:>8.3f} {r['compile_s']:>9.2f}")
    fits = sections.get("fits", {})
    if fits.get("items"):
        lines.append("")
        lines.append(f"fits:   {'method':<8} {'groups':>8} {'hyper':<7} {'prec':<8} {'total s':>8} {'reduce':>6} "
                     f"{'fit s':>7} {'sample':>6} {'down':>6} {'compile':>7} {'R-hat':>6} "
                     f"{'ESS':>6} {'div':>4} {'rmse':>8} {'cover90':>7} {'ate err/sd':>10}")
        for r in fits["items"]:
            if r.get("status") != "ok":
                lines.append(f"        {r.get('method', ''):<8} {r.get('groups', 0):>8.0e} "
                             f"{r.get('status')}: {r.get('reason') or r.get('error', '')}"[:160])
                continue
            hyper = (r.get("sampler_device") or "-").split(":")[0] + ("+" if r.get("repeat") else "")
            lines.append(f"        {r['method']:<8} {r['groups']:>8.0e} {hyper:<7} {r.get('precision', ''):<8} "
                         f"{_fmt(r.get('wall_s'), '.1f'):>8} {_fmt(r.get('reduce_s'), '.1f'):>6} "
                         f"{_fmt(r.get('fit_s'), '.1f'):>7} {_fmt(r.get('sample_s'), '.1f'):>6} "
                         f"{_fmt(r.get('downward_s'), '.1f'):>6} {_fmt(r.get('compile_s'), '.1f'):>7} "
                         f"{_fmt(r.get('max_rhat'), '.3f'):>6} {_fmt(r.get('min_ess_bulk'), '.0f'):>6} "
                         f"{_fmt(r.get('divergences'), 'd'):>4} {_fmt(r.get('rmse'), '.4f'):>8} "
                         f"{_fmt(r.get('coverage'), '.3f'):>7} {_fmt(r.get('ate_z'), '+.2f'):>10}")
    nuts = sections.get("nuts", {})
    if nuts.get("items"):
        lines.append("")
        for r in nuts["items"]:
            if r.get("status") != "ok":
                lines.append(f"nuts:   {r.get('where', '')}: {r.get('status')}: {r.get('reason') or r.get('error', '')}"[:160])
                continue
            lines.append(f"nuts:   {r['where']:<8} {r['groups']} groups: {r['wall_s']:.1f} s wall, fit {r['fit_s']:.1f} s, "
                         f"compile {r['compile_s']:.1f} s, {r['ms_per_iteration']:.2f} ms/iteration, "
                         f"R-hat {_fmt(r.get('max_rhat'), '.3f')}, ESS {_fmt(r.get('min_ess_bulk'), '.0f')}")
    lines.append("=" * 96)
    return lines


# ============================================================================================
# Child: one section, results written incrementally to a JSON file.
# ============================================================================================


class Recorder:
    """A section's record, rewritten after every item so a killed child still leaves its results."""

    def __init__(self, path: Path, section: str, budget: float):
        self.path, self.section = path, section
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.data: dict = {"status": "running", "items": []}
        self.errors = 0
        self.save()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{self.section}] {text}", flush=True)

    def begin(self, what: str) -> None:
        """Say what runs now, so that a kill reports it."""
        self.data["running"] = what
        self.save()

    def add(self, item: dict) -> dict:
        self.data.pop("running", None)
        self.data["items"].append(item)
        if item.get("status") == "error":
            self.errors += 1
        self.save()
        return item

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=_json_default))
        os.replace(tmp, self.path)


def _json_default(value):
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(value)


def _error_item(error: BaseException, **fields) -> dict:
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    return {**fields, "status": "error", "error": text[-600:],
            "traceback": traceback.format_exc()[-2500:]}


def child_main(opts) -> int:
    config = json.loads(Path(opts.config).read_text())
    section = config["section"]
    rec = Recorder(Path(opts.result), section, opts.child_budget)
    try:
        SECTION_FUNCTIONS[section](config, rec)
        if rec.data.get("status") == "running":
            rec.data["status"] = "partial" if rec.errors else "ok"
    except Exception as error:  # the section itself broke: recorded, the parent goes on
        rec.data.update(_error_item(error))
        rec.say(f"ERROR {rec.data['error']}")
    finally:
        rec.data.pop("running", None)
        rec.data["imported"] = sorted(m for m in WATCHED if m in sys.modules)
        rec.data["elapsed_s"] = round(time.monotonic() - rec.started, 2)
        _device_memory(rec)
        rec.save()
    return 0


def _device_memory(rec: Recorder) -> None:
    if "jax" not in sys.modules:
        return
    try:
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if stats:
            rec.data["peak_device_bytes"] = stats.get("peak_bytes_in_use")
    except Exception:  # memory stats are a nicety
        pass


def _timed_calls(fn, args, *, min_calls=3, min_seconds=0.5, max_calls=50, long_call=2.0):
    """Median and minimum seconds of blocking calls after one warm-up call."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    warm = time.perf_counter() - t0
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
        if times[-1] > long_call or len(times) >= max_calls:
            break
        if len(times) >= min_calls and time.perf_counter() - start >= min_seconds:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "calls": len(times), "warm_s": warm}


def _header(rec: Recorder) -> None:
    import jax

    device = jax.devices()[0]
    rec.say(f"jax {jax.__version__} on {device.platform}:{device.id} {getattr(device, 'device_kind', '')}, "
            f"x64={bool(jax.config.jax_enable_x64)}, {rec.left():.0f} s budget")


# --------------------------------------------------------------------------------------------
# device


def section_device(config: dict, rec: Recorder) -> None:
    import importlib.metadata as metadata
    import importlib.util
    import platform

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    import jax
    import jax.numpy as jnp

    devices = jax.devices()
    device = devices[0]
    backend = jax.default_backend()
    check = float(jax.block_until_ready(jnp.arange(1000.0).sum()))
    packages = {}
    for name in ("polars", "polars-runtime-32", "pyarrow", "optax", "dask", "distributed", "pandas", "scipy",
                 "numpy", "ml_dtypes", "psutil"):
        packages[name] = version(name)
    importable = {name: importlib.util.find_spec(name) is not None
                  for name in ("polars", "pyarrow", "optax", "dask", "numpyro")}
    plugins = {}
    try:
        for dist in metadata.distributions():
            dist_name = (dist.metadata["Name"] or "").lower()
            if dist_name.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "nvidia-cuda-runtime")):
                plugins[dist_name] = dist.version
    except Exception:  # metadata of a broken distribution
        pass
    memory = None
    try:
        memory = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:
        pass
    smi = None
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                  "clocks.max.mem,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as error:  # nvidia-smi is a nicety
            smi = f"nvidia-smi failed: {error}"
    gpu = backend == "gpu" or device.platform in ("gpu", "cuda", "rocm")
    rec.data.update({
        "gpu": gpu, "backend": backend, "devices": [str(d) for d in devices],
        "device_kind": getattr(device, "device_kind", None), "device_count": len(devices),
        "memory_bytes": memory, "jax": jax.__version__, "jaxlib": version("jaxlib"),
        "numpyro": version("numpyro"), "plugins": plugins, "packages": packages, "importable": importable,
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "nvidia_smi": smi, "sanity_sum": check,
    })
    missing = [name for name in ("polars", "numpyro") if not importable[name]]
    rec.data["headline"] = (f"{len(devices)}× {getattr(device, 'device_kind', device.platform)}"
                            + (f", {memory / 2**30:.0f} GiB usable" if memory else "")
                            + (f"; MISSING {missing} (fits, nuts need them)" if missing else ""))
    rec.say(f"devices {rec.data['devices']}; backend {backend}; jax {jax.__version__}, jaxlib "
            f"{rec.data['jaxlib']}, numpyro {rec.data['numpyro']}, plugins {plugins}")
    rec.say(f"packages {packages}")
    if smi:
        rec.say(f"nvidia-smi: {smi}")
    if missing:
        rec.say(f"WARNING: {missing} not importable: the fits and nuts sections need them "
                "(carry the wheels, benchmarks/gpu/README.md)")


# --------------------------------------------------------------------------------------------
# correctness


def _segment_reference(y, x, ids, num_segments):
    """Float64 two-pass moments per segment (vectorised), each segment centred on its first row.

    The first row's value is subtracted exactly (Sterbenz), so sums are of deviations, and the
    mean is ``first + mean(deviation)``: the reference keeps the full float64 resolution at 1e9.
    """
    import numpy as np

    count = np.bincount(ids, minlength=num_segments)
    first = np.zeros(num_segments, np.int64)
    present, first_row = np.unique(ids, return_index=True)
    first[present] = first_row
    columns = np.column_stack([y, x])
    shift = columns[first]                               # (segments, 1 + k)
    d = columns - shift[ids]
    safe = np.maximum(count, 1)
    offset = np.stack([np.bincount(ids, d[:, j], num_segments) for j in range(d.shape[1])], 1) / safe[:, None]
    c = d - offset[ids]                                  # centred on the segment's mean
    k = x.shape[1]
    xy = np.stack([np.bincount(ids, c[:, 0] * c[:, 1 + j], num_segments) for j in range(k)], 1) if k else np.zeros((num_segments, 0))
    xx = np.zeros((num_segments, k, k))
    for a in range(k):
        for b in range(k):
            xx[:, a, b] = np.bincount(ids, c[:, 1 + a] * c[:, 1 + b], num_segments)
    means = np.where(count[:, None] > 0, shift + offset, 0.0)
    return {"count": count, "mean": means[:, 0], "x_mean": means[:, 1:],
            "m2": np.bincount(ids, c[:, 0] ** 2, num_segments), "xy_m2": xy, "xx_m2": xx}


def _moment_errors(got: dict, ref: dict) -> dict:
    """Worst errors: counts exactly, means in sd units, sums of squares in units of n·sd²."""
    import numpy as np

    count = ref["count"]
    scale = np.maximum(count, 1).astype(float)
    out = {"count_mismatch": int(np.sum(got["count"] != count)),
           "mean_abs_err": float(max(np.max(np.abs(got["mean"] - ref["mean"])),
                                     np.max(np.abs(got["x_mean"] - ref["x_mean"])) if ref["x_mean"].size else 0.0))}
    worst = 0.0
    for name in ("m2", "xy_m2", "xx_m2"):
        err = np.abs(got[name] - ref[name]) / scale.reshape((-1,) + (1,) * (ref[name].ndim - 1))
        worst = max(worst, float(err.max()) if err.size else 0.0)
    out["m2_rel_err"] = worst
    return out


def section_correctness(config: dict, rec: Recorder) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kernels import segments

    _header(rec)
    sizes = config["sizes"]
    rows, block = int(sizes["rows"]), int(sizes["block_rows"])
    rng = np.random.default_rng(config["seed"] + 11)
    k = 2
    reduce_fn = jax.jit(segments.reduce_blocks, static_argnums=(4, 5), static_argnames=("indices_are_sorted",))
    sums_fn = jax.jit(segments.reduce_sums, static_argnums=(4,), static_argnames=("scatter",))
    # Tolerances: float64 as tests/unit/test_segments.py at offset 1e9 (means to 2.5e-16·1e9, one ulp
    # there); float32 after a float64 shift as kernels/segments.py states (2e-5·sd, 2e-4·n·sd²).
    tolerances = {"float64": (1e-12 + 2.5e-16 * 1e9, 1e-11), "float32-shifted": (2e-5, 2e-4),
                  "float32-raw": (2e-5, 2e-4)}
    rec.data["tolerances"] = {name: {"mean_abs_sd": t[0], "m2_rel_n_sd2": t[1]} for name, t in tolerances.items()}
    verdicts = {}
    for num_segments in sizes["segments"]:
        ids = rng.integers(0, num_segments, rows)
        # Mean 1e9, sd 1 within a cell; cell means spread over 15 sd (0.3 per segment id, mod 50).
        y = 1e9 + rng.standard_normal(rows) + 0.3 * (ids % 50)
        x = 1e9 + rng.standard_normal((rows, k))
        for sort in (False, True):
            order = np.argsort(ids, kind="stable") if sort else np.arange(rows)
            ys, xs, idss = y[order], x[order], ids[order]
            ref = _segment_reference(ys, xs, idss, num_segments)
            padded = segments.bucket(num_segments, MIN_SEGMENTS)
            blocks = -(-rows // block)
            pad = blocks * block - rows
            ids_p = np.concatenate([idss, np.full(pad, padded)]).astype(np.int32)
            mask = np.arange(blocks * block) < rows
            for variant in ("float64", "float32-shifted", "float32-raw"):
                path = "sorted" if sort else "unsorted"
                try:
                    if variant == "float32-shifted":
                        centre_y, centre_x = ys.mean(), xs.mean(0)
                    else:
                        centre_y, centre_x = 0.0, np.zeros(k)
                    dtype = np.float64 if variant == "float64" else np.float32
                    y_in = np.concatenate([ys - centre_y, np.zeros(pad)]).astype(dtype)
                    x_in = np.concatenate([xs - centre_x, np.zeros((pad, k))]).astype(dtype)
                    t0 = time.perf_counter()
                    state = reduce_fn(jnp.asarray(y_in), jnp.asarray(x_in), jnp.asarray(ids_p), jnp.asarray(mask),
                                      padded, block, indices_are_sorted=sort)
                    state = jax.block_until_ready(state)
                    seconds = time.perf_counter() - t0
                    out_dtype = str(state.m2.dtype)
                    got = {"count": np.asarray(state.count)[:num_segments],
                           "mean": np.asarray(state.shift[:num_segments, 0], np.float64) + centre_y
                           + np.asarray(state.offset[:num_segments, 0], np.float64),
                           "x_mean": np.asarray(state.shift[:num_segments, 1:], np.float64) + centre_x
                           + np.asarray(state.offset[:num_segments, 1:], np.float64),
                           "m2": np.asarray(state.m2[:num_segments], np.float64),
                           "xy_m2": np.asarray(state.xy_m2[:num_segments], np.float64),
                           "xx_m2": np.asarray(state.xx_m2[:num_segments], np.float64)}
                    errors = _moment_errors(got, ref)
                    mean_tol, m2_tol = tolerances[variant]
                    passed = (errors["count_mismatch"] == 0 and errors["mean_abs_err"] <= mean_tol
                              and errors["m2_rel_err"] <= m2_tol)
                    item = {"check": "segments", "variant": variant, "path": path, "rows": rows,
                            "segments": num_segments, "block_rows": block, "dtype": out_dtype, **errors,
                            "pass": bool(passed), "expected_pass": variant != "float32-raw",
                            "seconds_incl_compile": round(seconds, 3), "status": "ok"}
                    verdicts.setdefault(variant, []).append(passed)
                    rec.say(f"segments {variant:<15} {path:<8} segments={num_segments:<6} dtype={out_dtype:<8} "
                            f"mean err {errors['mean_abs_err']:.2e} sd, M2 err {errors['m2_rel_err']:.2e} n·sd², "
                            f"counts off {errors['count_mismatch']}: {'PASS' if passed else 'FAIL'}"
                            + (" (expected: raw float32 at 1e9 has no spread left)" if variant == "float32-raw" else ""))
                    rec.add(item)
                except Exception as error:
                    rec.add(_error_item(error, check="segments", variant=variant, path=path, segments=num_segments))
                    rec.say(f"segments {variant} {path}: ERROR {error}")
            if jax.default_backend() != "gpu":
                rec.data["float32-atomic"] = "not run: the atomic kernel (kernels/atomic_sums.py) needs an NVIDIA GPU"
                continue
            for atomic_variant in ("float32-atomic", "float64-atomic"):
                _atomic_correctness(atomic_variant, ys, ids_p, mask, pad, padded, num_segments, ref, path,
                                    rows, sums_fn, tolerances, verdicts, rec)
    rec.data["segments_verdict"] = {v: bool(all(p)) for v, p in verdicts.items()}
    _tree_correctness(sizes, config, rec)


def _atomic_correctness(variant, ys, ids_p, mask, pad, padded, num_segments, ref, path, rows, sums_fn,
                        tolerances, verdicts, rec) -> None:
    """The Pallas atomic kernel against the float64 reference: outcome only. ``float32-atomic``:
    float32 rows about the float64 global mean (shifted before the kernel); ``float64-atomic``:
    the float64 rows as they are, the kernel subtracting a float64 shift (the sampled mean
    ``reduce_device`` uses, here the global mean) and rounding each difference to float32."""
    import jax.numpy as jnp
    import numpy as np

    try:
        centre_y = ys.mean()
        if variant == "float32-atomic":
            y_in = np.concatenate([ys - centre_y, np.zeros(pad)]).astype(np.float32)
            shift, added = jnp.zeros((1,), jnp.float32), centre_y
        else:
            y_in = np.concatenate([ys, np.full(pad, centre_y)])
            shift, added = jnp.full((1,), centre_y, jnp.float64), 0.0
        moments, cancellation = sums_fn(jnp.asarray(y_in), jnp.zeros((y_in.size, 0), y_in.dtype),
                                        jnp.asarray(ids_p), jnp.asarray(mask), padded, shift, scatter="atomic")
        ref0 = {"count": ref["count"], "mean": ref["mean"], "x_mean": np.zeros((num_segments, 0)),
                "m2": ref["m2"], "xy_m2": np.zeros((num_segments, 0)), "xx_m2": np.zeros((num_segments, 0, 0))}
        got = {"count": np.asarray(moments.count)[:num_segments],
               "mean": np.asarray(moments.mean[:num_segments], np.float64) + added,
               "x_mean": np.zeros((num_segments, 0)), "m2": np.asarray(moments.m2[:num_segments], np.float64),
               "xy_m2": np.zeros((num_segments, 0)), "xx_m2": np.zeros((num_segments, 0, 0))}
        errors = _moment_errors(got, ref0)
        mean_tol, m2_tol = tolerances["float32-shifted"]
        passed = (errors["count_mismatch"] == 0 and errors["mean_abs_err"] <= mean_tol
                  and errors["m2_rel_err"] <= m2_tol)
        worst = float(np.max(np.asarray(cancellation)[:num_segments]))
        verdicts.setdefault(variant, []).append(passed)
        rec.add({"check": "segments", "variant": variant, "path": path, "rows": rows,
                 "segments": num_segments, **errors, "max_cancellation": worst, "pass": bool(passed),
                 "expected_pass": True, "status": "ok"})
        rec.say(f"segments {variant:<15} {path:<8} segments={num_segments:<6} "
                f"mean err {errors['mean_abs_err']:.2e} sd, M2 err {errors['m2_rel_err']:.2e} n·sd², "
                f"counts off {errors['count_mismatch']}, cancellation ≤ {worst:.3g}: "
                f"{'PASS' if passed else 'FAIL'}")
    except Exception as error:
        rec.add(_error_item(error, check="segments", variant=variant, path=path, segments=num_segments))
        rec.say(f"segments {variant} {path}: ERROR {error}")


def _tree_correctness(sizes, config, rec) -> None:
    """The Gaussian-tree log marginal and gradient, float32 against float64."""
    import jax
    import numpy as np

    tree_verdicts = []
    for leaves in sizes["tree_leaves"]:
        if rec.left() < 10:
            rec.add({"check": "tree", "leaves": leaves, "status": "skipped", "reason": "budget"})
            continue
        try:
            data, num_top = _tree_data(int(leaves), config["seed"])
            results = {}
            for dtype in ("float64", "float32"):
                fn, args = _tree_gradient_fn(data, num_top, dtype, blocked=False)
                value, grad = jax.block_until_ready(jax.jit(fn)(*args))
                results[dtype] = (float(value), np.asarray(grad, np.float64), str(value.dtype))
            v64, g64, _ = results["float64"]
            v32, g32, dt32 = results["float32"]
            value_rel = abs(v32 - v64) / abs(v64)
            grad_rel = float(np.max(np.abs(g32 - g64)) / np.max(np.abs(g64)))
            grad_rel_each = float(np.max(np.abs(g32 - g64) / np.maximum(np.abs(g64), 1e-30)))
            passed = value_rel <= 1e-5 and grad_rel <= 1e-3
            tree_verdicts.append(passed)
            rec.add({"check": "tree", "leaves": int(leaves), "value64": v64, "value32": v32, "dtype32": dt32,
                     "value_abs_err": abs(v32 - v64), "value_rel_err": value_rel, "grad_rel_err": grad_rel,
                     "grad_rel_err_per_component": grad_rel_each, "pass": bool(passed), "status": "ok",
                     "criteria": "value rel ≤ 1e-5 and max|Δgrad|/max|grad| ≤ 1e-3; value_abs_err is in nats "
                                 "(NUTS needs it well below 1 for its accept step)"})
            rec.say(f"tree float32 vs float64, {int(leaves):.0e} leaves: value rel {value_rel:.1e} "
                    f"(abs {abs(v32 - v64):.3g} nats), grad rel {grad_rel:.1e} (per component {grad_rel_each:.1e}): "
                    f"{'PASS' if passed else 'FAIL'}")
        except Exception as error:
            rec.add(_error_item(error, check="tree", leaves=leaves))
            rec.say(f"tree {leaves}: ERROR {error}")
    rec.data["tree_verdict"] = bool(tree_verdicts) and all(tree_verdicts)
    seg = rec.data["segments_verdict"]
    rec.data["headline"] = (f"segments f64 {_pf(seg.get('float64'))}, f32-shifted {_pf(seg.get('float32-shifted'))}, "
                            f"f32-raw {_pf(seg.get('float32-raw'))} (fail expected), atomic f32 "
                            f"{_pf(seg.get('float32-atomic'))}, atomic f64 rows {_pf(seg.get('float64-atomic'))}; "
                            f"tree f32 {_pf(rec.data['tree_verdict'])}")


def _pf(flag) -> str:
    return "?" if flag is None else ("PASS" if flag else "FAIL")


# --------------------------------------------------------------------------------------------
# Gaussian tree data (as benchmarks/tree_kernel.py, which is not imported: it pins JAX to CPU)

THETA = [0.1, -0.2, 0.0, math.log(0.5), math.log(0.7), math.log(0.3), math.log(1.2)]
CORRELATION = 0.3


def _tree_data(num_leaves: int, seed: int):
    """Cells, two per leaf (arm 0 then arm 1), and random links to G // 100 top nodes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    num_cells = 2 * num_leaves
    num_top = max(num_leaves // 100, 1)
    n = rng.integers(1, 5, size=num_cells).astype(np.float64)
    data = dict(n=n, mean=rng.normal(size=num_cells), m2=rng.uniform(size=num_cells) * n,
                arm=np.tile([0.0, 1.0], num_leaves), leaf=np.repeat(np.arange(num_leaves, dtype=np.int32), 2),
                parent=rng.integers(0, num_top, size=num_leaves).astype(np.int32))
    return data, num_top


def _tree_gradient_fn(data: dict, num_top: int, dtype: str, blocked: bool):
    """(value_and_grad function of theta and the data, its arguments in ``dtype``)."""
    import jax
    import jax.numpy as jnp

    from kernels import gaussian_tree

    num_leaves = data["parent"].shape[0]
    options = {"cells_per_leaf": 2} if blocked else {}

    def covariances(theta):
        sd = jnp.exp(theta[2:6]).reshape(2, 2)
        off = CORRELATION * sd[:, 0] * sd[:, 1]
        return jnp.stack([jnp.stack([sd[:, 0] ** 2, off], -1), jnp.stack([off, sd[:, 1] ** 2], -1)], -2)

    def log_marginal(theta, n, mean, m2, arm, leaf, parents):
        value, _ = gaussian_tree.gaussian_log_marginal(
            n, mean, m2, arm, leaf, parents, covariances(theta), theta[:2], jnp.exp(theta[6]),
            num_leaves=num_leaves, num_top=num_top, **options)
        return value

    float_type = jnp.float32 if dtype == "float32" else jnp.float64
    args = (jnp.asarray(THETA, float_type),
            *(jnp.asarray(data[k], float_type) for k in ("n", "mean", "m2", "arm")),
            jnp.asarray(data["leaf"]), (jnp.asarray(data["parent"]),))
    return jax.value_and_grad(log_marginal), args


# --------------------------------------------------------------------------------------------
# bandwidth


def _bandwidth(elements: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    x = jax.block_until_ready(jax.random.normal(jax.random.PRNGKey(0), (elements,), jnp.float32))
    read = jax.jit(jnp.sum)
    copy = jax.jit(lambda a: a * 1.0001)
    out = {"elements": elements, "bytes": elements * 4}
    for name, fn, factor in (("read", read, 1), ("copy", copy, 2)):
        jax.block_until_ready(fn(x))
        jax.block_until_ready(fn(x))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x))
            times.append(time.perf_counter() - t0)
        out[f"{name}_ms_median"] = 1e3 * statistics.median(times)
        out[f"{name}_gbs"] = factor * elements * 4 / statistics.median(times) / 1e9
        out[f"{name}_gbs_best"] = factor * elements * 4 / min(times) / 1e9
    del x
    return out


def _rows_read_kernel(y_ref, id_ref, mask_ref, out_ref, *, rows, block_rows):
    """The atomic kernel's reads (float32 outcome, int32 id, mask) and nothing else: one total
    a program, so the loads cannot be dropped."""
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    program = pl.program_id(0)
    start = program * block_rows
    inside = start + jnp.arange(block_rows, dtype=jnp.int32) < rows
    window = pl.ds(start, block_rows)
    y = plt.load(y_ref.at[window], mask=inside, other=0.0)
    ids = plt.load(id_ref.at[window], mask=inside, other=0)
    keep = plt.load(mask_ref.at[window], mask=inside, other=False)
    total = jnp.sum(jnp.where(keep & inside, y + ids.astype(jnp.float32), 0.0))
    out_ref[pl.ds(program, 1)] = jnp.full((1,), total, jnp.float32)


def _rows_read_bandwidth(rows: int, repeats: int, *, interpret: bool = False) -> dict:
    """GB/s of a Pallas kernel that reads rows laid out as the reduction reads them (9 bytes a
    row) and only sums them: what a kernel over these arrays can reach on this card, the
    tighter denominator for the reduce items' share (a plain array sum reads one array)."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    key = jax.random.PRNGKey(1)
    y = jax.random.normal(key, (rows,), jnp.float32)
    ids = jax.random.randint(key, (rows,), 0, 1000, jnp.int32)
    mask = jnp.arange(rows) % 17 != 0
    out = {"rows": rows, "bytes_per_row": 9}
    for block_rows, warps in ((1024, 4), (4096, 8)):
        programs = -(-rows // block_rows)
        call = jax.jit(pl.pallas_call(
            functools.partial(_rows_read_kernel, rows=rows, block_rows=block_rows),
            out_shape=jax.ShapeDtypeStruct((programs,), jnp.float32), grid=(programs,), interpret=interpret,
            compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1)))
        total = float(jnp.sum(call(y, ids, mask)))
        expected = float(jnp.sum(jnp.where(mask, y + ids.astype(jnp.float32), 0.0)))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(call(y, ids, mask))
            times.append(time.perf_counter() - t0)
        out[f"b{block_rows}_gbs"] = 9 * rows / statistics.median(times) / 1e9
        out[f"b{block_rows}_checks"] = abs(total - expected) <= 1e-4 * max(abs(expected), 1.0)
    out["gbs"] = max(out["b1024_gbs"], out["b4096_gbs"])
    return out


def _atomics_only_kernel(table_ref, out_ref, *, block_rows, num_segments, width):
    """One relaxed atomic add a row and nothing read: ``width`` floats (4: the reduction's 16-byte
    slot; 1: a scalar) into slot ``hash(row) % num_segments``. What the atomics alone cost."""
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    from kernels import atomic_sums

    del table_ref   # the zeroed table, aliased to out_ref
    row = pl.program_id(0) * block_rows + jnp.arange(block_rows, dtype=jnp.int32)
    mixed = (row.astype(jnp.uint32) * jnp.uint32(2654435761)) >> jnp.uint32(7)
    slot = (mixed % jnp.uint32(num_segments)).astype(jnp.int32)
    column = jnp.arange(width, dtype=jnp.int32)[None, :]
    values = jnp.where(column == 0, 1.0, 0.5).astype(jnp.float32) * jnp.ones((block_rows, 1), jnp.float32)
    atomic_sums._RELAXED_ADD(out_ref, slot[:, None] * width + column, values)


def _atomics_only(rows: int, segment_counts, repeats: int, *, interpret: bool = False) -> dict:
    """Atomics per second with nothing read, at each segment count: the ceiling a kernel of one
    atomic a row can reach, whatever it reads. ``rows`` atomics a call; the table sits in L2."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    from kernels import atomic_sums

    out = {"rows": rows}
    if not atomic_sums.RELAXED:
        out["error"] = "relaxed atomics unavailable"
        return out
    block_rows = 1024
    for segments_ in segment_counts:
        for width in (4, 1):
            # The table starts at zero (aliased input): a pallas_call's own output is uninitialised
            # (session 14's runs had that, so their count checks were void; the rates stand).
            add = pl.pallas_call(
                functools.partial(_atomics_only_kernel, block_rows=block_rows, num_segments=segments_,
                                  width=width),
                out_shape=jax.ShapeDtypeStruct((segments_ * width,), jnp.float32), grid=(rows // block_rows,),
                input_output_aliases={0: 0}, interpret=interpret,
                compiler_params=plt.CompilerParams(num_warps=4, num_stages=1))
            call = jax.jit(lambda: add(jnp.zeros((segments_ * width,), jnp.float32)))
            counts = call()
            total = float(jnp.sum(counts[::width]))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                times.append(time.perf_counter() - t0)
            key = f"s{segments_}_w{width}"
            out[key + "_ms"] = 1e3 * statistics.median(times)
            out[key + "_per_s"] = rows // block_rows * block_rows / statistics.median(times)
            out[key + "_counts_ok"] = abs(total - rows // block_rows * block_rows) < 1e-3 * rows
    return out


def section_bandwidth(config: dict, rec: Recorder) -> None:
    import jax
    import numpy as np

    _header(rec)
    sizes = config["sizes"]
    result = _bandwidth(int(sizes["elements"]), int(sizes["repeats"]))
    result["bandwidth_gbs"] = max(result["read_gbs"], result["copy_gbs"])
    rec.data.update(result)
    rec.say(f"{result['bytes'] / 2**20:.0f} MiB float32: sum {result['read_gbs']:.0f} GB/s (read), "
            f"scale {result['copy_gbs']:.0f} GB/s (read + write), medians of {sizes['repeats']}")
    if jax.default_backend() == "gpu":
        rows_read = _rows_read_bandwidth(int(sizes.get("read_rows", 10**8)), int(sizes["repeats"]))
        rec.data["rows_read"] = rows_read
        rec.data["rows_read_gbs"] = rows_read["gbs"]
        rec.say(f"Pallas read of {rows_read['rows']:.0e} rows (float32, int32, bool): "
                f"{rows_read['gbs']:.0f} GB/s (1024-row programs {rows_read['b1024_gbs']:.0f}, "
                f"4096 {rows_read['b4096_gbs']:.0f}; totals check: {rows_read['b1024_checks']}, "
                f"{rows_read['b4096_checks']})")
    if jax.default_backend() == "gpu" and sizes.get("atomics_segments"):
        try:
            only = _atomics_only(int(sizes.get("read_rows", 10**8)), sizes["atomics_segments"],
                                 int(sizes["repeats"]))
            rec.data["atomics_only"] = only
            rec.say(f"atomics alone, {only['rows']:.0e} a call (16-byte vector / 4-byte scalar), per second: " + ", ".join(
                f"{g:.0e} segments {only.get(f's{g}_w4_per_s', 0) / 1e9:.1f}e9 / {only.get(f's{g}_w1_per_s', 0) / 1e9:.1f}e9"
                for g in sizes["atomics_segments"]))
        except Exception as error:
            rec.data["atomics_only"] = {"error": f"{type(error).__name__}: {str(error)[-400:]}"}
            rec.say(f"atomics alone: ERROR {error}")
    host = np.ones(int(sizes["h2d_elements"]), np.float32)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(host))
        times.append(time.perf_counter() - t0)
    rec.data["h2d_gbs"] = host.nbytes / statistics.median(times) / 1e9
    rec.say(f"host → device {host.nbytes / 2**20:.0f} MiB: {rec.data['h2d_gbs']:.1f} GB/s")
    rec.data["headline"] = (f"read {result['read_gbs']:.0f} GB/s, copy {result['copy_gbs']:.0f} GB/s, "
                            f"h2d {rec.data['h2d_gbs']:.1f} GB/s")


# --------------------------------------------------------------------------------------------
# reduce


def section_reduce(config: dict, rec: Recorder) -> None:
    import jax

    from kernels import segments

    _header(rec)
    sizes = config["sizes"]
    bandwidth = (config["context"].get("bandwidth") or {}).get("read_gbs")
    if not bandwidth:
        bandwidth = _bandwidth(1 << 24, 5)["read_gbs"]
        rec.say(f"(no bandwidth section result; measured read bandwidth {bandwidth:.0f} GB/s here)")
    rec.data["bandwidth_gbs"] = bandwidth
    rows_read_gbs = (config["context"].get("bandwidth") or {}).get("rows_read_gbs")
    cpu = jax.default_backend() == "cpu"
    target = CPU_BLOCK_ROWS if cpu else BLOCK_ROWS
    memory = (config["context"].get("device") or {}).get("memory_bytes")

    _scatter_probe(sizes, rec)
    from kernels import atomic_sums
    rec.data["atomic_relaxed"] = atomic_sums.RELAXED   # relaxed atomics available with this JAX

    reduce_fn = jax.jit(segments.reduce_blocks, static_argnums=(4, 5), static_argnames=("indices_are_sorted",))
    # One read and one float64-accumulated scatter of raw sums about a fixed shift (segments.reduce_sums).
    sums_fn = jax.jit(segments.reduce_sums, static_argnums=(4,),
                      static_argnames=("accumulate_dtype", "fused", "scatter"))
    rate: dict = {}   # (path, dtype) -> (rows/s, compile s) of the last run, for projections
    plan = [(int(r), int(g), dtype) for r in sizes["rows"] for g in sizes["groups"].get(str(int(r)), [])
            for dtype in ("float32",)]
    plan += [(int(r), int(g), "float64") for r in sizes.get("float64_rows") or sizes["rows"][:1]
             for g in sizes["float64_groups"]]
    for rows, groups, dtype in plan:
        num_segments = 2 * groups
        padded = segments.bucket(num_segments, MIN_SEGMENTS)
        block = segments.block_rows_for(rows, max_block_rows=min(max(target, padded), BLOCK_ROWS))
        blocks = -(-rows // block)
        itemsize = 4 if dtype == "float32" else 8
        need = blocks * block * (itemsize + 4 + 4 + 1) + padded * (8 + 4 * itemsize) * 3
        if memory and need > 0.7 * memory:
            rec.add({"rows": rows, "groups": groups, "dtype": dtype, "status": "skipped",
                     "reason": f"needs ~{need / 2**30:.1f} GiB of {memory / 2**30:.0f}"})
            continue
        data = None
        blocks_result = None
        paths = sizes.get("paths", ("unsorted", "sorted"))
        if dtype == "float64":
            paths = sizes.get("float64_paths") or paths
        for path in paths:
            item = {"rows": rows, "groups": groups, "segments": num_segments, "padded_segments": padded,
                    "block_rows": block, "blocks": blocks, "path": path, "dtype": dtype}
            known = rate.get((path, dtype))
            if known:
                projected = known[1] + 2.5 * rows / known[0]
                if projected > rec.left() - 5:
                    rec.add({**item, "status": "skipped",
                             "reason": f"projected {projected:.0f} s > {max(rec.left() - 5, 0):.0f} s left"})
                    rec.say(f"{rows:.0e} rows {groups:.0e} groups {path} {dtype}: skipped (projected {projected:.0f} s)")
                    continue
            try:
                if data is None:
                    data = _reduce_rows(rows, blocks * block, num_segments, padded, dtype, config["seed"])
                rec.begin(f"reduce {rows:.0e} rows {groups:.0e} groups {path} {dtype}")
                ids = data["sorted_ids"] if path == "sorted" else data["ids"]
                t0 = time.perf_counter()
                if path.startswith("atomic") and cpu:
                    # Not a measurement that failed: the kernel does not apply here.
                    rec.data.setdefault("not_applicable", {})[f"{path} {dtype}"] = (
                        "the atomic kernel needs an NVIDIA GPU")
                    continue
                if path.startswith("device"):   # the engine's entry point for device arrays, end to end
                    from engine.reduce.jax import reduce_device

                    args = (data["y"], jax.numpy.where(data["mask"], ids, 0), data["mask"])
                    info = {}
                    # "device-f32copy": float64 rows centred and copied to float32 first, as
                    # reduce_device did before it read float64 rows itself (session 14).
                    copy32 = jax.jit(lambda y_, mask_: (y_ - jax.numpy.sum(jax.numpy.where(mask_, y_, 0))
                                                        / jax.numpy.maximum(jax.numpy.sum(mask_), 1)
                                                        ).astype(jax.numpy.float32))

                    def call(y_, ids_, mask_, info=info, copy=path == "device-f32copy"):
                        moments, extra = reduce_device(copy32(y_, mask_) if copy else y_, None, ids_,
                                                       num_segments, mask=mask_, precision="float32")
                        info.update(extra)
                        return moments
                    compile_s = 0.0   # compiled by its first (timed, warm-up) call: see warm_s
                elif path.startswith(("sums", "atomic")):
                    args = (data["y"], data["x"], ids, data["mask"], padded,
                            jax.numpy.zeros((1,), data["y"].dtype))
                    with _atomic_variant(path):
                        compiled = sums_fn.lower(*args, accumulate_dtype=jax.numpy.float64,
                                                 fused=path == "sums-fused",
                                                 scatter="atomic" if path.startswith("atomic") else "xla").compile()
                    call = (lambda c: lambda *a: c(*a[:4], a[5]))(compiled)
                else:
                    args = (data["y"], data["x"], ids, data["mask"], padded, block)
                    compiled = reduce_fn.lower(*args, indices_are_sorted=path == "sorted").compile()
                    call = (lambda c: lambda *a: c(*a[:4]))(compiled)
                if not path.startswith("device"):
                    compile_s = time.perf_counter() - t0
                timing = _timed_calls(call, args, min_calls=3, min_seconds=0.5)
                result = call(*args)
                if path.startswith("device"):
                    item.update(device_method=info.get("method"), refined=info.get("refined"),
                                warm_s=timing["warm_s"])
                    count, mean, m2 = (jax.numpy.asarray(result[i][:padded]) for i in range(3))
                    result = types.SimpleNamespace(count=jax.numpy.pad(count, (0, padded - count.size)),
                                                   mean=jax.numpy.pad(mean, (0, padded - mean.size)),
                                                   m2=jax.numpy.pad(m2, (0, padded - m2.size)))
                if path.startswith(("sums", "atomic")):
                    item["fallback_segments"] = int(jax.numpy.sum(~jax.numpy.isfinite(result[1])))
                    result = result[0]
                if path == "unsorted":
                    blocks_result = result
                elif blocks_result is not None and path != "sorted":   # "sorted" reads other rows
                    # Agreement with the block scan's moments (same rows): means in sds, M2 relative.
                    item["vs_blocks_mean_abs"] = float(jax.numpy.max(jax.numpy.abs(
                        result.mean.astype(jax.numpy.float64) - blocks_result.mean.astype(jax.numpy.float64))))
                    ref_m2 = blocks_result.m2.astype(jax.numpy.float64)
                    item["vs_blocks_m2_rel"] = float(jax.numpy.max(jax.numpy.abs(
                        result.m2.astype(jax.numpy.float64) - ref_m2) / jax.numpy.maximum(ref_m2, 1e-30)))
                    item["vs_blocks_count_mismatch"] = int(jax.numpy.sum(result.count != blocks_result.count))
                    # The same difference in units of n·sd² (the rows are N(0, 1)): what the float32
                    # tolerances bound; the relative one is large where a cell's M2 is tiny.
                    item["vs_blocks_m2_per_row"] = float(jax.numpy.max(jax.numpy.abs(
                        result.m2.astype(jax.numpy.float64) - ref_m2)
                        / jax.numpy.maximum(blocks_result.count, 1)))
                seconds = timing["median_s"]
                bytes_per_row = itemsize + 4 + 1   # outcome, int32 segment id, mask
                item.update(status="ok", compile_s=compile_s, seconds=seconds, min_s=timing["min_s"],
                            calls=timing["calls"], rows_per_s=rows / seconds, bytes_per_row=bytes_per_row,
                            gb_per_s=rows * bytes_per_row / seconds / 1e9)
                item["bandwidth_fraction"] = item["gb_per_s"] / bandwidth if bandwidth else None
                if rows_read_gbs and dtype == "float32":   # against a kernel that only reads these rows
                    item["rows_read_fraction"] = item["gb_per_s"] / rows_read_gbs
                rate[(path, dtype)] = (rows / max(timing["warm_s"], seconds), compile_s)
                rec.say(f"{rows:.0e} rows {groups:.0e} groups {path:<12} {dtype}: {seconds * 1e3:9.2f} ms, "
                        f"{rows / seconds / 1e6:9.1f} Mrow/s, {item['gb_per_s']:7.1f} GB/s "
                        f"({_fmt(item['bandwidth_fraction'], '.1%')} of bw, "
                        f"{_fmt(item.get('rows_read_fraction'), '.1%')} of a read), compile {compile_s:.2f} s")
                rec.add(item)
            except Exception as error:
                rec.add(_error_item(error, **item))
                rec.say(f"{rows:.0e} rows {groups:.0e} groups {path} {dtype}: ERROR {error}")
        data = None
    if not cpu and rec.left() > 5:   # the card's bandwidth moves between runs: measure it again after
        rec.data["bandwidth_after_gbs"] = _bandwidth(1 << 28, 10)["read_gbs"]
        rec.say(f"read bandwidth after the reduce items: {rec.data['bandwidth_after_gbs']:.0f} GB/s "
                f"(before: {bandwidth:.0f} GB/s)")
    ok = [r for r in rec.data["items"] if r.get("status") == "ok" and "path" in r and "rows_per_s" in r]
    if ok:
        best = max(ok, key=lambda r: r["rows_per_s"])
        rec.data["headline"] = (f"best {best['rows_per_s'] / 1e6:.0f} Mrow/s ({best['path']}, {best['rows']:.0e} rows, "
                                f"{best['groups']:.0e} groups, {_fmt(best['bandwidth_fraction'], '.0%')} of bw); "
                                f"{len(ok)} configs")


# Variants of the atomic kernel, measured beside its defaults: keyword arguments of
# atomic_sums.segment_sums, and the table replicas.
ATOMIC_VARIANTS = {"atomic": {}, "atomic-acqrel": {"relaxed": False}, "atomic-r1": {"replicas": 1},
                   "atomic-r1024": {"replicas": 1024},
                   "atomic-b2048": {"block_rows": 2048, "num_warps": 8},
                   "atomic-b4096": {"block_rows": 4096, "num_warps": 8},
                   "atomic-w8": {"num_warps": 8}}


@contextlib.contextmanager
def _atomic_variant(path: str):
    """While a path compiles, ``segments.reduce_sums`` calls the atomic kernel with the variant's
    options (``ATOMIC_VARIANTS``)."""
    import functools

    import jax

    from kernels import atomic_sums

    original = atomic_sums.segment_sums
    jax.clear_caches()   # the variants trace and lower the same function: no cached program
    try:
        if path in ATOMIC_VARIANTS:
            atomic_sums.segment_sums = functools.partial(original, **ATOMIC_VARIANTS[path])
        yield
    finally:
        atomic_sums.segment_sums = original
        jax.clear_caches()


def _reduce_rows(rows: int, padded_rows: int, num_segments: int, padded_segments: int, dtype: str, seed: int):
    """Rows made on the device: y ~ N(0, 1) (already centred), random segment ids, sorted copy."""
    import jax
    import jax.numpy as jnp

    float_type = jnp.float32 if dtype == "float32" else jnp.float64

    @jax.jit
    def make(key):
        k1, k2 = jax.random.split(key)
        valid = jnp.arange(padded_rows) < rows
        ids = jnp.where(valid, jax.random.randint(k1, (padded_rows,), 0, num_segments, jnp.int32), padded_segments)
        y = jnp.where(valid, jax.random.normal(k2, (padded_rows,), float_type), 0)
        return y, ids, jnp.sort(ids), valid

    y, ids, sorted_ids, mask = jax.block_until_ready(make(jax.random.PRNGKey(seed)))
    return {"y": y, "x": jnp.zeros((padded_rows, 0), float_type), "ids": ids, "sorted_ids": sorted_ids, "mask": mask}


def _scatter_probe(sizes: dict, rec: Recorder) -> None:
    """Plain segment_sum, float32 vs float64 vs int32, unsorted vs sorted: the scatter hazard alone."""
    import jax
    import jax.numpy as jnp

    rows, segs = int(sizes["probe_rows"]), int(sizes["probe_segments"])
    key1, key2 = jax.random.split(jax.random.PRNGKey(3))
    ids = jax.random.randint(key1, (rows,), 0, segs, jnp.int32)
    sorted_ids = jnp.sort(ids)
    base = jax.random.normal(key2, (rows,), jnp.float32)
    probe = {}
    for name, values, index, is_sorted in (("float32", base, ids, False), ("float32-sorted", base, sorted_ids, True),
                                           ("float64", base.astype(jnp.float64), ids, False),
                                           ("int32", (base > 0).astype(jnp.int32), ids, False)):
        try:
            fn = jax.jit(lambda v, i, s=is_sorted: jax.ops.segment_sum(v, i, segs, indices_are_sorted=s))
            timing = _timed_calls(fn, (values, index), min_calls=3, min_seconds=0.3)
            probe[name] = {"ms": 1e3 * timing["median_s"], "rows_per_s": rows / timing["median_s"]}
        except Exception as error:
            probe[name] = {"error": str(error)[-300:]}
    f32, f64 = probe.get("float32", {}).get("ms"), probe.get("float64", {}).get("ms")
    probe["float32_over_float64"] = f32 / f64 if f32 and f64 else None
    probe["rows"], probe["segments"] = rows, segs
    probe["slow_float32_scatter_suspected"] = bool(probe["float32_over_float64"] and probe["float32_over_float64"] > 3)
    rec.data["scatter_probe"] = probe
    rec.save()
    rec.say("segment_sum probe, " + ", ".join(f"{k} {v['ms']:.2f} ms" for k, v in probe.items()
                                              if isinstance(v, dict) and "ms" in v)
            + (" -- float32 scatter much slower than float64: the slow-loop hazard" if
               probe["slow_float32_scatter_suspected"] else ""))


# --------------------------------------------------------------------------------------------
# tree


def section_tree(config: dict, rec: Recorder) -> None:
    import jax
    import numpy as np

    _header(rec)
    sizes = config["sizes"]
    history: dict = {}   # (dtype, impl) -> (leaves, per-call s, compile s)
    for leaves in sizes["leaves"]:
        leaves = int(leaves)
        data = None
        done = []
        for dtype in sizes["dtypes"]:
            for impl in sizes["impls"]:
                item = {"leaves": leaves, "cells": 2 * leaves, "dtype": dtype, "impl": impl}
                last = history.get((dtype, impl))
                if last:
                    per_call = last[1] * leaves / last[0]
                    projected = last[2] * 1.5 + 8 * per_call + 2
                    if projected > rec.left() - 3:
                        rec.add({**item, "status": "skipped",
                                 "reason": f"projected {projected:.0f} s > {max(rec.left() - 3, 0):.0f} s left"})
                        rec.say(f"{leaves:.0e} leaves {dtype} {impl}: skipped (projected {projected:.0f} s)")
                        continue
                try:
                    if data is None:
                        data = _tree_data(leaves, config["seed"])
                    rec.begin(f"tree {leaves:.0e} leaves {dtype} {impl}")
                    fn, args = _tree_gradient_fn(data[0], data[1], dtype, blocked=impl == "blocked")
                    t0 = time.perf_counter()
                    compiled = jax.jit(fn).lower(*args).compile()
                    compile_s = time.perf_counter() - t0
                    try:
                        temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
                    except Exception:
                        temp_mb = None
                    timing = _timed_calls(compiled, args, min_calls=5, min_seconds=0.5)
                    value, grad = compiled(*args)
                    item.update(status="ok", compile_s=compile_s, grad_ms_median=1e3 * timing["median_s"],
                                grad_ms_min=1e3 * timing["min_s"], calls=timing["calls"], temp_mb=temp_mb,
                                value=float(value), value_dtype=str(value.dtype))
                    done.append((item, np.asarray(grad, np.float64)))
                    history[(dtype, impl)] = (leaves, timing["median_s"], compile_s)
                    rec.say(f"{leaves:.0e} leaves {dtype} {impl:<8}: {item['grad_ms_median']:9.3f} ms/grad "
                            f"(min {item['grad_ms_min']:.3f}), compile {compile_s:.2f} s, temp {_fmt(temp_mb, '.1f')} MiB")
                    rec.add(item)
                except Exception as error:
                    rec.add(_error_item(error, **item))
                    rec.say(f"{leaves:.0e} leaves {dtype} {impl}: ERROR {error}")
        # Every result against float64 with cells in any order (the engine's call), so a faster
        # variant cannot hide a changed answer.
        reference = next(((r, g) for r, g in done if r["dtype"] == "float64" and r["impl"] == "current"), None)
        if reference is not None:
            for item, grad in done:
                item["value_rel_diff"] = abs(item["value"] - reference[0]["value"]) / abs(reference[0]["value"])
                item["grad_rel_diff"] = float(np.max(np.abs(grad - reference[1])) / np.max(np.abs(reference[1])))
            rec.save()
        data = None
    ok = {(r["leaves"], r["dtype"], r["impl"]): r["grad_ms_median"] for r in rec.data["items"] if r.get("status") == "ok"}
    if ok:
        rec.data["headline"] = "; ".join(f"{leaves:.0e} {dtype[-2:]} {impl[:3]} {ms:.2f} ms"
                                         for (leaves, dtype, impl), ms in ok.items() if impl == "current")


# --------------------------------------------------------------------------------------------
# fits


class CompileClock:
    """Seconds JAX spends lowering and compiling, read from its own log records.

    JAX logs "Finished jaxpr to MLIR module conversion … in T sec" and "Finished XLA compilation
    of … in T sec" at DEBUG (WARNING with jax_log_compiles); the sum over a fit is its compile
    time, and the rest is running. Needed because every ``engine.fit`` compiles NumPyro's
    sampling loop again (a second identical NUTS fit recompiled ``_fori_collect_loop`` here).
    """

    PATTERN = None

    def __init__(self):
        import logging
        import re

        CompileClock.PATTERN = re.compile(r"^Finished (jaxpr to MLIR module conversion|XLA compilation of|"
                                          r"tracing \+ transforming) (.*) in ([0-9.eE+-]+) sec")
        clock = self

        class Handler(logging.Handler):
            def emit(self, record):
                match = CompileClock.PATTERN.match(record.getMessage())
                if match:
                    clock.seconds += float(match.group(3))
                    name = match.group(2).split(" ")[0][:60]
                    clock.by_name[name] = clock.by_name.get(name, 0.0) + float(match.group(3))

        self.seconds, self.by_name = 0.0, {}
        logger = logging.getLogger("jax")
        logger.addHandler(Handler(logging.DEBUG))
        logger.setLevel(logging.DEBUG)   # no handler prints DEBUG records: only this one reads them

    def reset(self) -> None:
        self.seconds, self.by_name = 0.0, {}

    def top(self, count: int = 3) -> dict:
        return {k: round(v, 2) for k, v in sorted(self.by_name.items(), key=lambda kv: -kv[1])[:count]}


_CLOCK: list = []


def _compile_clock() -> CompileClock:
    if not _CLOCK:
        _CLOCK.append(CompileClock())
    return _CLOCK[0]


def simulate_rows(groups: int, rows: int, family: str, seed: int):
    """The engine's one-level model (engine.simulate), vectorised, integer group keys.

    Leaf sizes follow the same Zipf-like long tail (every leaf at least one row); Gaussian:
    α ~ N(10, 1), τ ~ N(0.5, 0.3), noise 2 (engine.simulate's defaults); Bernoulli: base rates
    1%–30% as benchmarks/glm.py (α ~ N(−2.5, 1), τ ~ N(0.3, 0.3) on the log-odds scale).
    Returns (rows DataFrame: group int64, treated int8, y; truth DataFrame: group, effect, n,
    and outcome_effect for Bernoulli; the true row-weighted ATE on the outcome scale).
    """
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    if family == "gaussian":
        baseline_mean, baseline_scale, effect_mean, effect_scale = 10.0, 1.0, 0.5, 0.3
    else:
        baseline_mean, baseline_scale, effect_mean, effect_scale = -2.5, 1.0, 0.3, 0.3
    alpha = baseline_mean + baseline_scale * rng.standard_normal(groups)
    tau = effect_mean + effect_scale * rng.standard_normal(groups)
    weights = 1.0 / np.arange(1, groups + 1) ** 1.1
    weights = rng.permutation(weights / weights.sum())
    leaf_n = 1 + rng.multinomial(rows - groups, weights)
    leaf = np.repeat(np.arange(groups, dtype=np.int64), leaf_n)
    treated = rng.random(rows) < 0.5
    mu = alpha[leaf] + tau[leaf] * treated
    if family == "gaussian":
        y = mu + 2.0 * rng.standard_normal(rows)
        effect_outcome = tau
    else:
        y = (rng.random(rows) < 1 / (1 + np.exp(-mu))).astype(np.int8)
        effect_outcome = 1 / (1 + np.exp(-(alpha + tau))) - 1 / (1 + np.exp(-alpha))
    frame = pl.DataFrame({"group": leaf, "treated": treated.astype(np.int8), "y": y})
    truth = pl.DataFrame({"group": np.arange(groups, dtype=np.int64), "effect": tau, "n": leaf_n,
                          "outcome_effect": effect_outcome})
    ate = float(np.dot(effect_outcome, leaf_n) / rows)
    return frame, truth, ate


def score_fit(result, truth, true_ate: float, family: str) -> dict:
    """Accuracy of the leaf effects against the truth: RMSE and 90%-interval coverage."""
    import polars as pl

    effects = result.effects("group").with_columns(pl.col("group").cast(pl.Int64)).join(truth, on="group")

    def rmse(estimate, target):
        return float(effects.select(((pl.col(estimate) - pl.col(target)) ** 2).mean().sqrt()).item())

    def coverage(lower, upper, target):
        return float(effects.select(((pl.col(lower) <= pl.col(target)) & (pl.col(target) <= pl.col(upper)))
                                    .mean()).item())

    ate = result.ate()
    out = {"scored_groups": effects.height, "ate": ate, "true_ate": true_ate,
           "ate_error": ate["mean"] - true_ate, "ate_z": (ate["mean"] - true_ate) / ate["sd"] if ate["sd"] else None}
    if family == "gaussian":
        out.update(rmse=rmse("mean", "effect"), coverage=coverage("lower", "upper", "effect"))
    else:
        out.update(rmse=rmse("mean", "outcome_effect"), coverage=coverage("lower", "upper", "outcome_effect"),
                   rmse_link=rmse("link_mean", "effect"),
                   coverage_link=coverage("link_lower", "link_upper", "effect"))
    return out


def _fit_once(frame, truth, true_ate, family, method, sizes, backend, seed):
    import warnings

    import jax

    import engine

    clock = _compile_clock()
    clock.reset()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # convergence trouble is recorded from the diagnostics
        result = engine.fit(frame, outcome="y", treatment="treated", groups=["group"], family=family,
                            method=method, draws=int(sizes["draws"]), warmup=int(sizes["warmup"]),
                            chains=int(sizes["chains"]), seed=seed, backend=backend)
    wall = time.perf_counter() - t0
    compile_s, compile_top = clock.seconds, clock.top()
    summary = result.summary
    diagnostics, timings = summary["diagnostics"], summary["timings"]
    sampler = result.posterior.sampler
    out = {"wall_s": wall, "reduce_s": timings.get("reduce_s"), "fit_s": timings.get("fit_s"),
           "total_s": timings.get("total_s"), "sample_s": timings.get("sample_s"),
           "downward_s": timings.get("downward_s"), "max_rhat": diagnostics.get("max_rhat"),
           "min_ess_bulk": diagnostics.get("min_ess_bulk"), "divergences": diagnostics.get("divergences"),
           "diagnostics_ok": diagnostics.get("ok"), "messages": diagnostics.get("messages"),
           "precision": "float64" if jax.config.jax_enable_x64 else "float32",
           "chain_method": sampler.get("chain_method"), "downward_batch": sampler.get("downward_batch"),
           "marginal": sampler.get("marginal"), "group_intervals": sampler.get("group_intervals"),
           "sampler_device": sampler.get("sampler_device"),
           "devices": sampler.get("devices"), "cells": result.cells.table.height,
           "compile_s": compile_s, "compile_top": compile_top, "wall_minus_compile_s": wall - compile_s}
    if out["min_ess_bulk"] and wall:
        out["ess_per_s"] = out["min_ess_bulk"] / wall
    out.update(score_fit(result, truth, true_ate, family))
    return out


def section_fits(config: dict, rec: Recorder) -> None:
    import gc
    import importlib.util

    if importlib.util.find_spec("polars") is None:
        rec.data.update(status="skipped", reason="polars is not importable here: engine needs it; carry the "
                                                 "polars wheels (benchmarks/gpu/README.md)")
        rec.say(rec.data["reason"])
        return
    import engine  # noqa: F401  (import time is not fit time)

    _header(rec)
    sizes = config["sizes"]
    families = {"exact": "gaussian", "laplace": "bernoulli", "nuts": "gaussian", "svi": "bernoulli"}
    history: dict = {}   # method -> [(groups, seconds incl. simulation, of which compiling)]
    cache: dict = {}
    # Each method through every size before the next method: `exact` at the largest size is the
    # headline (issue 4's GPU target), so a slow `laplace` must not take its budget.
    hyper_devices = list(sizes.get("hyper_devices") or ["auto"])
    all_groups = [int(g) for g in sizes["groups"]]
    for method in sizes["methods"]:
        family = families[method]
        best: dict = {}   # hyper device -> wall seconds at the first size
        runs = []
        for index, groups in enumerate(all_groups):
            choices = hyper_devices if index == 0 else [None]   # None: the fastest at the first size
            repeats = int(sizes.get("repeat_last") or 1) if index == len(all_groups) - 1 else 1
            runs += [(groups, choice, repeat) for choice in choices for repeat in range(repeats)]
        for groups, choice, repeat in runs:
            if choice is None:
                choice = min(best, key=best.get) if best else hyper_devices[0]
            os.environ["CAUSAL_ENGINE_HYPER_DEVICE"] = choice
            rows = int(sizes["rows_per_group"]) * groups
            item = {"method": method, "family": family, "groups": groups, "rows": rows,
                    "draws": sizes["draws"], "warmup": sizes["warmup"], "chains": sizes["chains"],
                    "backend": config["fit_backend"], "hyper_device": choice, "repeat": repeat}
            projected = _projection(history, method, groups)
            if repeat and history.get(method):
                projected = history[method][-1][1] - history[method][-1][2]   # warm: no compiling
            if projected is not None:
                if projected > rec.left() - 5:
                    rec.add({**item, "status": "skipped",
                             "reason": f"projected {projected:.0f} s > {max(rec.left() - 5, 0):.0f} s left of the budget"})
                    rec.say(f"{method} {groups:.0e} groups: skipped, projected {projected:.0f} s > "
                            f"{max(rec.left() - 5, 0):.0f} s left")
                    continue
            try:
                t0 = time.perf_counter()
                if (family, groups) not in cache:
                    cache.clear()
                    gc.collect()
                    cache[(family, groups)] = simulate_rows(groups, rows, family, config["seed"] + groups)
                frame, truth, true_ate = cache[(family, groups)]
                sim_s = time.perf_counter() - t0
                rec.begin(f"{method} at {groups:.0e} groups")
                rec.say(f"{method} {groups:.0e} groups, {rows:.0e} rows ({family}): simulated in {sim_s:.1f} s; fitting")
                out = _fit_once(frame, truth, true_ate, family, method, sizes, config["fit_backend"], config["seed"])
                item.update(status="ok", sim_s=sim_s, **out)
                history.setdefault(method, []).append((groups, sim_s + out["wall_s"], out["compile_s"]))
                if groups == all_groups[0] and not repeat:
                    best[choice] = out["wall_s"]
                rec.say(f"{method} {groups:.0e} groups [hyper {choice} -> {out['sampler_device']}, run {repeat + 1}]: "
                        f"{out['wall_s']:.1f} s (reduce {_fmt(out['reduce_s'], '.1f')}, "
                        f"fit {_fmt(out['fit_s'], '.1f')}, sample {_fmt(out['sample_s'], '.1f')}, downward "
                        f"{_fmt(out['downward_s'], '.1f')}, compiling {out['compile_s']:.1f}), {out['precision']}, R-hat {_fmt(out['max_rhat'], '.3f')}, "
                        f"ESS {_fmt(out['min_ess_bulk'], '.0f')}, div {out['divergences']}, RMSE {out['rmse']:.4f}, "
                        f"coverage {out['coverage']:.3f}, ATE {out['ate']['mean']:.4f} vs {true_ate:.4f} "
                        f"(z {_fmt(out['ate_z'], '+.2f')})")
                rec.add(item)
            except Exception as error:
                rec.add(_error_item(error, **item))
                rec.say(f"{method} {groups:.0e} groups: ERROR {error}")
                history.setdefault(method, []).append((groups, time.perf_counter() - t0, 0.0))
            gc.collect()
    ok = [r for r in rec.data["items"] if r.get("status") == "ok"]
    if ok:
        rec.data["headline"] = "; ".join(f"{r['method']} {r['groups']:.0e}: {r['wall_s']:.0f} s" for r in ok)


def _projection(history: dict, method: str, groups: int):
    """Projected seconds of ``method`` at ``groups``: from its own earlier sizes, else the slowest
    other method's projection (``laplace`` has no history before its first fit, ``exact`` does)."""
    if history.get(method):
        return _project(history[method], groups)
    others = [_project(past, groups) for name, past in history.items() if past]
    return max(others) if others else None


def _project(past: list, groups: int) -> float:
    """Seconds at ``groups``: compiling as last time (×1.2), the rest by a power law in the group
    count, its exponent from the last two sizes (clipped to [0.5, 1.2]), else 0.8."""
    g1, t1, c1 = past[-1]
    run1 = max(t1 - c1, 1e-3)
    exponent = 0.8
    if len(past) >= 2:
        g0, t0, c0 = past[-2]
        run0 = max(t0 - c0, 1e-3)
        if g1 != g0:
            exponent = min(max(math.log(run1 / run0) / math.log(g1 / g0), 0.5), 1.2)
    return 1.2 * c1 + run1 * (groups / g1) ** exponent


# --------------------------------------------------------------------------------------------
# nuts


def section_nuts(config: dict, rec: Recorder) -> None:
    """Full NUTS on a small problem on the device, then on the host CPU; ms per iteration is
    (fit seconds − compile seconds) / iterations, compile seconds read from JAX's log."""
    import importlib.util

    if importlib.util.find_spec("polars") is None:
        rec.data.update(status="skipped", reason="polars is not importable here: engine needs it; carry the "
                                                 "polars wheels (benchmarks/gpu/README.md)")
        rec.say(rec.data["reason"])
        return
    import contextlib

    import jax

    import engine  # noqa: F401

    _header(rec)
    sizes = config["sizes"]
    groups = int(sizes["groups"])
    rows = int(sizes["rows_per_group"]) * groups
    iterations = int(sizes["draws"]) + int(sizes["warmup"])
    frame, truth, true_ate = simulate_rows(groups, rows, "gaussian", config["seed"] + 5)
    places = [("device", contextlib.nullcontext)]
    if sizes.get("cpu_compare") and jax.default_backend() != "cpu":
        cpu = jax.devices("cpu")[0]
        places.append(("host-cpu", lambda: jax.default_device(cpu)))
    elif sizes.get("cpu_compare"):
        rec.data["cpu_compare"] = "skipped: the default device is the CPU already"
    for where, context in places:
        item = {"where": where, "groups": groups, "rows": rows, "draws": sizes["draws"], "warmup": sizes["warmup"],
                "chains": sizes["chains"]}
        done = [r for r in rec.data["items"] if r.get("status") == "ok"]
        if done and done[0]["wall_s"] > rec.left() - 5:
            rec.add({**item, "status": "skipped",
                     "reason": f"{max(rec.left(), 0):.0f} s left; the device run took {done[0]['wall_s']:.0f} s"})
            rec.say(f"{where}: skipped ({rec.left():.0f} s left)")
            continue
        try:
            rec.begin(f"nuts on {where}")
            with context():
                out = _fit_once(frame, truth, true_ate, "gaussian", "nuts", sizes, "polars", config["seed"])
            running = max(out["fit_s"] - out["compile_s"], 0.0)
            item.update(status="ok", ms_per_iteration=1e3 * running / iterations, **out)
            rec.say(f"{where} ({', '.join(out.get('devices') or [])}): {out['wall_s']:.1f} s wall, fit {out['fit_s']:.1f} s "
                    f"of which compiling {out['compile_s']:.1f} s; {item['ms_per_iteration']:.2f} ms/iteration; "
                    f"R-hat {_fmt(out['max_rhat'], '.3f')}, ESS {_fmt(out['min_ess_bulk'], '.0f')}, div {out['divergences']}")
            rec.add(item)
        except Exception as error:
            rec.add(_error_item(error, **item))
            rec.say(f"{where}: ERROR {error}")
    ok = [r for r in rec.data["items"] if r.get("status") == "ok"]
    if ok:
        rec.data["headline"] = "; ".join(f"{r['where']} {r['ms_per_iteration']:.2f} ms/iteration "
                                         f"(+{r['compile_s']:.0f} s compile)" for r in ok)


SECTION_FUNCTIONS = {"device": section_device, "correctness": section_correctness, "bandwidth": section_bandwidth,
                     "reduce": section_reduce, "tree": section_tree, "fits": section_fits, "nuts": section_nuts}


# ============================================================================================


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--allow-cpu", action="store_true", help="run even when JAX finds no GPU (testing)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: every section in about a minute on CPU")
    parser.add_argument("--budget", type=float, default=510.0,
                        help="seconds for the whole run (default 510: fits a 600-second command)")
    parser.add_argument("--out", default=None, help="output folder (default $OUT, else ./gpu-out)")
    parser.add_argument("--sections", default="", help=f"comma-separated, from {','.join(SECTIONS)} (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-groups", default="", help="comma-separated group counts for fits (default 1e5,1e6,1e7)")
    parser.add_argument("--fit-methods", default="", help="comma-separated, from exact,laplace (default both)")
    parser.add_argument("--draws", type=int, default=None, help="draws per chain for fits (default 500; smoke 40)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up per chain for fits (default 500; smoke 40)")
    parser.add_argument("--chains", type=int, default=None, help="chains for fits and nuts (default 4; smoke 2)")
    parser.add_argument("--fit-precision", choices=("engine", "float32", "float64"), default="engine",
                        help="fits and nuts: 'engine' leaves the engine's choice (float64 unless "
                             "CAUSAL_ENGINE_X64=0); float32/float64 force it")
    parser.add_argument("--hyper-devices", default="",
                        help="comma-separated CAUSAL_ENGINE_HYPER_DEVICE values (auto, cpu, default) to fit at the "
                             "first size; later sizes use the fastest (default: auto only)")
    parser.add_argument("--repeat-last", type=int, default=None,
                        help="fit the largest size this many times in the same process: the later fits reuse the "
                             "compiled programs (a warm batch job)")
    parser.add_argument("--fit-backend", choices=("polars", "jax"), default="polars",
                        help="the engine's reduce backend for fits (jax: kernels/segments.py on the device)")
    parser.add_argument("--reduce-rows", default="", help="comma-separated row counts for the reduce section")
    parser.add_argument("--reduce-groups", default="", help="comma-separated group counts for the reduce section")
    parser.add_argument("--reduce-paths", default="",
                        help="comma-separated reduce paths: unsorted, sorted, sums-fused, sums-columns, atomic and "
                             "its variants (ATOMIC_VARIANTS)")
    parser.add_argument("--reduce-budget", type=float, default=None, help="seconds for the reduce section")
    parser.add_argument("--float64-rows", default="",
                        help="comma-separated row counts for float64 rows in the reduce section (default: its first)")
    parser.add_argument("--float64-groups", default="", help="comma-separated group counts for float64 rows")
    parser.add_argument("--float64-paths", default="",
                        help="paths for float64 rows (default --reduce-paths); device-f32copy: the rows centred "
                             "and copied to float32 before reduce_device, its route before session 14")
    parser.add_argument("--tree-leaves", default="", help="comma-separated leaf counts for the tree section")
    parser.add_argument("--nuts-groups", default="", help="groups of the small full-NUTS fit (default 1000)")
    parser.add_argument("--no-nuts-cpu", action="store_true", help="skip the NUTS fit on the host CPU")
    # Internal: one section in this process (the parent runs these).
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        sys.path.insert(0, str(ROOT))
        return child_main(opts)
    return parent_main(opts)


if __name__ == "__main__":
    sys.exit(main())
