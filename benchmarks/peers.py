"""causal-engine side by side with the tools users would pick instead, on data with known truth.

For each size (number of groups; rows = 5 × groups, long-tail group sizes) and family, simulate
one experiment (`engine.simulate`): Gaussian (effect mean 0.5, sd 0.3, noise sd 2) and binary
(baseline log odds N(−2.5, 1²), log odds ratio N(0.3, 0.3²), as benchmarks/glm.py). Then fit it
with each tool, every fit in its own process (`peers.py --child`), the same model and the
engine's default priors wherever the tool takes priors (benchmarks/peer_tools.py writes each):

    engine-exact, engine-nuts           causal-engine, Gaussian
    engine-laplace, engine-svi, engine-nuts   causal-engine, binary   ("engine" names them all)
    numpyro       full NUTS written as a user writes it: non-centred, likelihood over rows
    pymc          PyMC, pm.sample defaults         nutpie   the PyMC model through nutpie
    stan          Stan through PyStan 3 (cmdstanpy needs CmdStan, which it downloads from GitHub)
    statsmodels   MixedLM REML (Gaussian); BinomialBayesMixedGLM, variational (binary)
    pyfixest      no pooling: group fixed effects × treatment (binary: linear probability model)

Per tool and size: wall seconds with the tool's compile/build included and excluded (each
adapter measures its own compile; the child process's total is `process_s`), min bulk ESS
(rank-normalised, Vehtari et al. 2021) over the group-effect draws and per second of sampling,
max R-hat, RMSE of the group effects against the truth and 90% interval coverage (log odds
ratio for binary; `rmse_outcome`, `coverage_outcome` on the risk difference), and peak memory:
`peak_mib`, the child's own high-water mark or the largest of the descendants it waited for
(`own_peak_mib`), and `peak_tree_mib`, the largest sum over the child's process tree sampled
every 0.2 s (parallel chain workers add up there). A fit past
`--cap` seconds is stopped and marked "did not finish within N s", and the tool is skipped at
larger sizes; one past `--mem-cap` GiB (resident, whole process tree) likewise. A tool missing
from the environment is "not installed" (`pip install -e '.[bench]'`).

Usage:
    python benchmarks/peers.py --sizes 100,1000 --cap 300
    python benchmarks/peers.py --sizes 1e4 --tools engine,numpyro --families gaussian --merge
    python benchmarks/peers.py --sizes 50 --tools engine --draws 100 --warmup 100 --chains 2 --no-plot

Writes OUT/peers.json (machine, date, settings, records), OUT/peers.md (the table, also
printed) and OUT/peers.png (log-log time and ESS/s against groups); OUT defaults to
benchmarks/results.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROWS_PER_GROUP = 5
FAMILIES = ("gaussian", "binary")
SIMULATION = {
    "gaussian": {"family": "gaussian"},
    "binary": {"family": "bernoulli", "baseline_mean": -2.5, "baseline_scale": 1.0,
               "effect_mean": 0.3, "effect_scale": 0.3},
}


class Tool(NamedTuple):
    name: str
    families: tuple[str, ...]
    modules: tuple[str, ...]    # what must be importable; checked without importing
    label: str


TOOLS = (
    Tool("engine-exact", ("gaussian",), ("engine",), "causal-engine exact"),
    Tool("engine-laplace", ("binary",), ("engine",), "causal-engine laplace"),
    Tool("engine-svi", ("binary",), ("engine",), "causal-engine svi"),
    Tool("engine-nuts", FAMILIES, ("engine",), "causal-engine nuts"),
    Tool("numpyro", FAMILIES, ("numpyro",), "NumPyro NUTS (rows)"),
    Tool("pymc", FAMILIES, ("pymc",), "PyMC"),
    Tool("nutpie", FAMILIES, ("pymc", "nutpie"), "PyMC + nutpie"),
    Tool("stan", FAMILIES, ("stan", "httpstan"), "Stan (PyStan 3)"),
    Tool("statsmodels", FAMILIES, ("statsmodels",), "statsmodels mixed model"),
    Tool("pyfixest", FAMILIES, ("pyfixest",), "pyfixest no pooling"),
)
TOOL_BY_NAME = {tool.name: tool for tool in TOOLS}
PEER_MODULES = ("pymc", "nutpie", "pytensor", "stan", "httpstan", "cmdstanpy", "statsmodels", "pyfixest",
                "linearmodels", "matplotlib")


# --- the parent: simulate, run each tool in a child, score ----------------------------------


def default_priors(family: str, y: np.ndarray) -> dict:
    """The engine's default priors for these rows (README "The model"; engine/priors.py for the
    Gaussian, engine/models/glm.py for the binary family), as name -> [family, [args]]."""
    if family == "gaussian":
        centre, scale = float(np.mean(y)), float(np.std(y))
        return {"baseline_mean": ["normal", [centre, 5 * scale]], "effect_mean": ["normal", [0.0, 2.5 * scale]],
                "baseline_scale": ["halfnormal", [scale]], "effect_scale": ["halfnormal", [scale]],
                "noise": ["halfnormal", [2 * scale]]}
    rate = float(np.mean(y))
    return {"baseline_mean": ["normal", [round(float(np.log(rate / (1 - rate))), 6), 2.5]],
            "effect_mean": ["normal", [0.0, 1.0]], "baseline_scale": ["halfnormal", [1.0]],
            "effect_scale": ["halfnormal", [0.5]]}


def simulate(family: str, groups: int, seed: int, folder: Path) -> dict:
    """Write the experiment's arrays and priors into ``folder``; return the truth by group code."""
    import engine
    import polars as pl

    rows = ROWS_PER_GROUP * groups
    sim = engine.simulate(rows=rows, groups=groups, seed=seed, **SIMULATION[family])
    leaves = sim.truth.filter(pl.col("level") == "group").with_row_index("code")
    coded = sim.rows.join(leaves.select("group", "code"), on="group", how="left", maintain_order="left")
    y = coded["y"].to_numpy()
    np.savez(folder / "data.npz", y=y.astype(np.float64 if family == "gaussian" else np.int64),
             treated=coded["treated"].to_numpy().astype(np.float64), group=coded["code"].to_numpy().astype(np.int64),
             groups=np.int64(groups))
    (folder / "priors.json").write_text(json.dumps(default_priors(family, y)))
    truth = {"effect": leaves["effect"].to_numpy()}
    if family == "binary":
        truth["outcome"] = leaves["outcome_effect"].to_numpy()
    return truth


def run_child(tool: str, family: str, folder: Path, args) -> dict:
    """Run one tool in its own process group, within the time and memory caps."""
    cap, mem_cap_bytes = args.cap, args.mem_cap * 2**30
    out = folder / tool
    out.mkdir()
    command = [sys.executable, str(Path(__file__).resolve()), "--child", tool, "--family", family,
               "--data", str(folder), "--result", str(out), "--draws", str(args.draws),
               "--warmup", str(args.warmup), "--chains", str(args.chains), "--seed", str(args.seed)]
    # No shared JAX compilation cache: every fit compiles, as a first fit in a new process does.
    env = {k: v for k, v in os.environ.items() if k != "CAUSAL_ENGINE_CACHE"}
    env.update(CAUSAL_ENGINE_PROGRESS="0", PYTHONWARNINGS="ignore",
               XDG_CACHE_HOME=str(out / "cache"))   # PyStan's compiled models: build from scratch
    started = time.perf_counter()
    with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        # cwd: PyStan's build writes its object files under ./build.
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=out, start_new_session=True)
    stopped, tree_peak = None, 0.0
    while True:
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            break
        tree_peak = max(tree_peak, tree_rss(child.pid))
        if time.perf_counter() - started > cap:
            stopped = f"did not finish within {cap:.0f} s"
        elif tree_peak > mem_cap_bytes:
            stopped = f"stopped: resident memory over {mem_cap_bytes / 2**30:.0f} GiB"
        if stopped:
            os.killpg(child.pid, signal.SIGKILL)
            _, status = os.waitpid(child.pid, 0)
            break
        time.sleep(0.2)
    child.returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
    # The child reports its own peak (own_peak_mib); a stopped or failed one cannot.
    record = {"process_s": round(time.perf_counter() - started, 2), "peak_mib": None,
              "peak_tree_mib": round(tree_peak / 2**20, 1) if tree_peak else None}
    if stopped:
        return {**record, "status": stopped}
    if child.returncode != 0:
        tail = (out / "stderr.txt").read_text().strip().splitlines()[-3:]
        return {**record, "status": f"failed (exit {child.returncode}): {' | '.join(tail)[-400:]}"}
    return {**record, **json.loads((out / "result.json").read_text()), "estimates": out / "estimates.npz"}


def tree_rss(pid: int) -> float:
    """Resident bytes of a process and its descendants (0 without psutil: no memory cap)."""
    try:
        import psutil

        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except Exception:   # psutil missing, or the process ended between the calls
        return 0.0


def score(estimate: dict, truth: np.ndarray) -> dict:
    """RMSE of the means and 90% coverage over the groups the tool estimated."""
    mean, lower, upper = (np.asarray(estimate[k], dtype=np.float64) for k in ("mean", "lower", "upper"))
    scored = np.isfinite(mean) & np.isfinite(lower) & np.isfinite(upper)
    if not scored.any():
        return {"rmse": None, "coverage": None, "scored": 0.0}
    t = truth[scored]
    return {"rmse": round(float(np.sqrt(np.mean((mean[scored] - t) ** 2))), 5),
            "coverage": round(float(np.mean((lower[scored] <= t) & (t <= upper[scored]))), 4),
            "scored": round(float(scored.mean()), 4)}


def chain_diagnostics(draws: np.ndarray) -> dict:
    """Min bulk ESS and max R-hat over the group effects, (chains, draws, groups)."""
    from engine.infer.diagnostics import ess_bulk, rhat

    varying = np.ptp(draws.reshape(-1, draws.shape[-1]), axis=0) > 0
    if draws.shape[1] < 4 or not varying.any():
        return {}
    x = draws[:, :, varying].astype(np.float64)
    return {"min_ess_bulk": round(float(np.nanmin(ess_bulk(x))), 1), "max_rhat": round(float(np.nanmax(rhat(x))), 4)}


def measure(tool: Tool, family: str, groups: int, folder: Path, truth: dict, args) -> dict:
    record = {"family": family, "groups": groups, "rows": ROWS_PER_GROUP * groups, "tool": tool.name,
              "label": tool.label}
    missing = [m for m in tool.modules if importlib.util.find_spec(m) is None]
    if missing:
        return {**record, "status": f"not installed: {', '.join(missing)} (pip install -e '.[bench]')"}
    result = run_child(tool.name, family, folder, args)
    estimates = result.pop("estimates", None)
    record.update(result)
    if record["status"] != "ok":
        return record
    with np.load(estimates) as saved:
        arrays = dict(saved)
    if "effect_mean" in arrays:
        record.update(score({k: arrays[f"effect_{k}"] for k in ("mean", "lower", "upper")}, truth["effect"]))
    if "outcome_mean" in arrays:
        outcome = score({k: arrays[f"outcome_{k}"] for k in ("mean", "lower", "upper")}, truth["outcome"])
        record.update({f"{k}_outcome": v for k, v in outcome.items()})
    if "effect_draws" in arrays:
        record.update(chain_diagnostics(arrays["effect_draws"]))
    if tool.name.startswith("engine-"):
        record["priors_as_peers"] = same_priors(record.get("priors", {}), json.loads((folder / "priors.json").read_text()))
    if record.get("min_ess_bulk") is not None:
        run_s = record["wall_s"] - (record.get("compile_s") or 0.0)
        record["ess_per_s"] = round(record["min_ess_bulk"] / run_s, 2) if run_s > 0 else None
        record["ess_per_s_wall"] = round(record["min_ess_bulk"] / record["wall_s"], 2)
    return record


def same_priors(engine_priors: dict, given: dict) -> bool:
    """Whether the engine's recorded priors ("normal(10.24, 11.4)", to 6 significant digits) are
    the ones handed to the peers, so that a change of the engine's defaults shows here."""
    found = {}
    for name, text in engine_priors.items():
        family, _, rest = text.partition("(")
        found[name.split(".")[0]] = [family, [float(a) for a in rest.rstrip(")").split(",")]]
    return found.keys() == given.keys() and all(
        found[n][0] == given[n][0] and np.allclose(found[n][1], given[n][1], rtol=1e-5, atol=1e-6) for n in given)


def stopped_early(record: dict) -> bool:
    return record["status"].startswith(("did not finish", "stopped"))


def run(args) -> list[dict]:
    previous = {}
    out_json = Path(args.out) / "peers.json"
    if args.merge and out_json.exists():
        previous = {(r["family"], r["groups"], r["tool"]): r for r in json.loads(out_json.read_text())["records"]}
    records = []
    given_up: dict = {}   # (family, tool) -> the record that stopped it
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        for groups in args.sizes:
            for family in args.families:
                folder = Path(tmp) / f"{family}-{groups}"
                folder.mkdir()
                truth = simulate(family, groups, args.seed, folder)
                for tool in (t for t in args.tools if family in t.families):
                    if (family, tool.name) in given_up:
                        earlier = given_up[family, tool.name]
                        record = {"family": family, "groups": groups, "rows": ROWS_PER_GROUP * groups,
                                  "tool": tool.name, "label": tool.label,
                                  "status": f"skipped: {earlier['status']} at {earlier['groups']} groups"}
                    else:
                        record = measure(tool, family, groups, folder, truth, args)
                        if stopped_early(record):
                            given_up[family, tool.name] = record
                    records.append(record)
                    previous.pop((family, groups, tool.name), None)
                    print(json.dumps(record), flush=True)
    return sorted([*previous.values(), *records],
                  key=lambda r: (FAMILIES.index(r["family"]), r["groups"], list(TOOL_BY_NAME).index(r["tool"])))


# --- the report ---------------------------------------------------------------------------


def machine() -> dict:
    import jax

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "memory_gib": round(memory / 2**30, 1), "python": platform.python_version(),
            "jax_devices": [str(d) for d in jax.devices()], "load_average": [round(x, 2) for x in os.getloadavg()],
            "engine_commit": engine_commit()}


def engine_commit() -> str | None:
    """The commit the engine ran at, "+changes" when engine/ or kernels/ differ from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "engine", "kernels"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


def size_text(groups: int) -> str:
    """100 → 1e2, 50 → 5e1."""
    return f"{groups:.0e}".replace("e+0", "e").replace("e+", "e")


def cell(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


COLUMNS = (("tool", "tool"), ("wall_s", "wall s"), ("compile_s", "compile s"), ("run_s", "run s"),
           ("min_ess_bulk", "min ESS"), ("ess_per_s", "ESS/s"), ("max_rhat", "R-hat"), ("rmse", "RMSE"),
           ("coverage", "cov 90"), ("rmse_outcome", "RMSE RD"), ("coverage_outcome", "cov RD"),
           ("scored", "scored"), ("peak_mib", "peak MiB"))


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# causal-engine and its peers ({report['date']})", "",
             f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, "
             f"{report['machine']['memory_gib']} GiB, Python {report['machine']['python']}, load average at the "
             f"start {report['machine']['load_average']}. Sampling: {s['chains']} chains × {s['draws']} draws after "
             f"{s['warmup']} warm-up; cap {s['cap']:.0f} s per fit; rows = {ROWS_PER_GROUP} × groups, long tail; "
             f"engine at {report['machine'].get('engine_commit')}.", "",
             "wall s: from building the model (data in memory) to draws in hand, compile included; compile s: the "
             "tool's own build/compile part of it; run s: wall − compile. min ESS: bulk, over every group's effect; "
             "ESS/s: min ESS per run second. RMSE and cov 90 (90% interval coverage): group effects against the "
             "truth, on the link scale (binary: log odds ratio); RD: the risk difference. scored: share of groups "
             "the tool estimates (no pooling cannot estimate one-arm groups). peak MiB: the fit's process, or the "
             "largest process it waited for (Stan's C++ compiler, PyMC's chain workers); the JSON's peak_tree_mib "
             "adds up the processes alive at once."]
    for family in FAMILIES:
        rows = [r for r in report["records"] if r["family"] == family]
        if not rows:
            continue
        columns = [c for c in COLUMNS if family == "binary" or not c[0].endswith("_outcome")]
        lines += ["", f"## {family}", "", "| groups | " + " | ".join(h for _, h in columns) + " |",
                  "|---:|" + "|".join("---" if k == "tool" else "---:" for k, _ in columns) + "|"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {size_text(r['groups'])} | {r['tool']} | {r['status']} |" + " |" * (len(columns) - 2))
                continue
            values = {**r, "run_s": round(r["wall_s"] - (r.get("compile_s") or 0.0), 2),
                      "scored": r.get("scored", r.get("scored_outcome"))}
            lines.append(f"| {size_text(r['groups'])} | " + " | ".join(cell(values.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    colours = plt.get_cmap("tab10")
    for column, family in enumerate(FAMILIES):
        for index, tool in enumerate(TOOLS):
            # One colour per tool in every panel; the engine's methods solid, the peers dashed.
            style = {"marker": "o", "color": colours(index % 10), "label": tool.label,
                     "linestyle": "-" if tool.name.startswith("engine-") else "--"}
            done = [r for r in report["records"] if r["family"] == family and r["tool"] == tool.name
                    and r["status"] == "ok"]
            if not done:
                continue
            groups = [r["groups"] for r in done]
            axes[0, column].plot(groups, [r["wall_s"] for r in done], **style)
            with_ess = [r for r in done if r.get("ess_per_s")]
            if with_ess:
                axes[1, column].plot([r["groups"] for r in with_ess], [r["ess_per_s"] for r in with_ess], **style)
        axes[0, column].set_title(f"{family}: wall seconds, compile included")
        axes[1, column].set_title(f"{family}: min bulk ESS per run second (group effects)")
        axes[1, column].set_xlabel("groups")
        for ax in axes[:, column]:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- the child: one tool, one fit ----------------------------------------------------------


def own_peak_mib() -> float:
    """Peak resident memory of this process, or of the largest descendant it waited for.

    Not RUSAGE_SELF's ru_maxrss (nor os.wait4's in the parent): Linux carries the spawning
    process's high-water mark across exec, so a child of the harness (which holds the data and
    JAX) would report the harness's size. VmHWM is the high-water mark of this address space alone.
    """
    import resource

    children_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    try:
        with open("/proc/self/status") as status:
            own_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):   # no procfs: ru_maxrss, an upper bound
        own_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(own_kib, children_kib) / 1024


def child(args) -> None:
    """Fit one tool on the experiment in ``--data``; write result.json and estimates.npz."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peer_tools

    folder = Path(args.data)
    with np.load(folder / "data.npz") as saved:
        experiment = peer_tools.Experiment(args.family, saved["y"], saved["treated"], saved["group"],
                                           int(saved["groups"]), json.loads((folder / "priors.json").read_text()))
    settings = {"draws": args.draws, "warmup": args.warmup, "chains": args.chains, "seed": args.seed}
    if args.child.startswith("engine-"):
        fit = peer_tools.fit_engine(experiment, settings, args.child.removeprefix("engine-"))
    else:
        fit = getattr(peer_tools, f"fit_{args.child}")(experiment, settings)
    arrays = {}
    for prefix, estimate in (("effect", fit.effect), ("outcome", fit.outcome)):
        for key, values in (estimate or {}).items():
            arrays[f"{prefix}_{key}"] = np.asarray(values, dtype=np.float64)
    if fit.effect_draws is not None:
        arrays["effect_draws"] = np.asarray(fit.effect_draws, dtype=np.float32)
    result = Path(args.result)
    np.savez(result / "estimates.npz", **arrays)
    (result / "result.json").write_text(json.dumps(
        {"status": "ok", "wall_s": round(fit.wall_s, 3), "peak_mib": round(own_peak_mib(), 1),
         "compile_s": None if fit.compile_s is None else round(fit.compile_s, 3), **fit.info}, default=str))


# --- command line ---------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e2,1e3,1e4,1e5,1e6", help="comma-separated numbers of groups")
    parser.add_argument("--tools", default="all", help="comma list of " + ", ".join(TOOL_BY_NAME)
                        + "; 'engine' for every engine method, 'all' for everything")
    parser.add_argument("--families", default="gaussian,binary")
    parser.add_argument("--cap", type=float, default=3600.0, help="seconds per fit before it is stopped")
    parser.add_argument("--mem-cap", type=float, default=None,
                        help="GiB of resident memory per fit before it is stopped (default: half the machine's)")
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for peers.json/.md/.png")
    parser.add_argument("--merge", action="store_true", help="keep records of peers.json that this run does not redo")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    args.sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    expanded = []
    for name in names:
        if name == "all":
            expanded += list(TOOL_BY_NAME)
        elif name == "engine":
            expanded += [n for n in TOOL_BY_NAME if n.startswith("engine-")]
        elif name in TOOL_BY_NAME:
            expanded.append(name)
        else:
            parser.error(f"--tools: unknown tool {name!r}; expected one of {', '.join(TOOL_BY_NAME)}, engine or all")
    args.tools = [TOOL_BY_NAME[n] for n in dict.fromkeys(expanded)]
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"--families: unknown {sorted(unknown)}; expected gaussian and/or binary")
    if args.mem_cap is None:
        args.mem_cap = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**31
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return None
    host = machine()   # before the run: its load average is the other jobs'
    records = run(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "family", "data", "result", "tools")}
    settings["tools"] = [t.name for t in args.tools]
    report = {"machine": host, "date": time.strftime("%Y-%m-%d"), "settings": settings, "records": records}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    (out / "peers.md").write_text(table)
    print(table)
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            print("no plot: matplotlib not installed (pip install -e '.[bench]')")
        else:
            plot(report, out / "peers.png")
            print(f"wrote {out / 'peers.png'}")
    print(f"wrote {out / 'peers.json'} and {out / 'peers.md'}")
    return report


if __name__ == "__main__":
    main()
