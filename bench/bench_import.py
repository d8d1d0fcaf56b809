"""`fcn import` of a full-size FCN-8s caffemodel: seconds and peak memory, against computing the
file's sha1 and md5 alone (and numpy.fromfile of the same bytes) in the same run.

    .venv/bin/python bench/bench_import.py            # prints the table, updates docs/BENCHMARKS.md
    .venv/bin/python bench/bench_import.py --no-write --repeat 1

The caffemodel (VGG16 FCN-8s, width 1.0, 21 classes, seeded random weights, packed floats, the
reference's layer names: about 538 MB) is written into a temporary directory with the tests'
encoder (tests/support/caffe_writer.py). Every measurement runs in a fresh Python process, so its peak
resident set (VmHWM) is its own; the operation is timed inside that process, after its
imports. Runs alternate (read, import, phases, read, import, ...) so that load from other
processes falls on all of them alike, and the best of `repeat` runs is reported. The file is read
once before the first run, so every run finds it in the page cache. The load average before and
after is printed with the table: on a shared machine it says how much the numbers can be trusted.

The import computes the sums it records (sha1 and md5) in two threads while it parses, converts
and writes, so its floor is the time of the two sums alone. That baseline is timed at its best,
both ways: one thread updating both hashes from one read of the file, and two threads, one per
hash, each reading the file (hashlib releases the GIL on large updates, so on two or more cores
the time is about md5's alone); the faster of the two counts as "sha1 + md5 alone".
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchdoc import DOC, publish  # noqa: E402

SECTION = "## Importing reference weights (bench/bench_import.py)"
BENCH_NAME = "bench_import"
GOAL_TIME, GOAL_GROWTH = 1.3, 1.1  # x the sums alone; what the import adds, x the file's size


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _rss_now() -> int:
    return _status("VmRSS")


def _sums_one_thread(path: str) -> dict:
    import hashlib
    hashes = [hashlib.sha1(), hashlib.md5()]
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            for h in hashes:
                h.update(view[:n])
    return {h.name: h.hexdigest() for h in hashes}


def child(what: str, path: str, out: str) -> dict:
    """One measurement, in this (fresh) process: {phase: seconds}, peak and starting RSS."""
    import numpy as np
    times = {}
    if what not in ("fromfile", "sums-1", "sums-2"):
        from fcn_models import reference
        from fcn_models.checkpoint import save_checkpoint
    before = _rss_now()
    start = time.perf_counter()
    if what == "fromfile":
        data = np.fromfile(path, dtype=np.uint8)
        times["numpy.fromfile"] = time.perf_counter() - start
        assert data.size == os.path.getsize(path)
    elif what == "sums-1":
        _sums_one_thread(path)
        times["sums, one thread"] = time.perf_counter() - start
    elif what == "sums-2":
        from fcn_models.reference import file_digests  # its threads: one per hash, each reading the file
        before, start = _rss_now(), time.perf_counter()
        file_digests(path)
        times["sums, two threads"] = time.perf_counter() - start
    elif what == "import":
        result = reference.import_weights(path, out)
        times["fcn import"] = time.perf_counter() - start
        assert result.values > 134e6
    elif what == "phases":
        src = reference.open_source(path)
        model, _, _ = reference._fcn_from_source(src, None, None)
        src.close()
        times["parse + copy into the model"] = time.perf_counter() - start
        t = time.perf_counter()
        save_checkpoint(out, model, {})
        times["write the checkpoint"] = time.perf_counter() - t
    # VmHWM, the peak of this process's own memory map: ru_maxrss would carry over the
    # parent's peak (writing the model) through the exec that started this process.
    peak = _status("VmHWM")
    return {"times": times, "peak": peak, "before": before}


def _run_child(what: str, path: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, "--child", what, str(path), str(out)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{what} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_model(path: Path) -> None:
    import numpy as np
    sys.path.insert(0, str(ROOT / "tests"))
    from support import caffe_writer as cw
    net = cw.vgg16_fcn("fcn8s", 1.0)
    rng = np.random.default_rng(0)
    weights = {layer.name: [rng.standard_normal(shape, dtype=np.float32) for shape in layer.blob_shapes]
               for layer in net if layer.blob_shapes}
    cw.write_caffemodel(path, cw.model_layers(net, weights))


def _cpu_pressure() -> str:
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[2].split("=")[1]  # "some" avg60, in percent
    except (OSError, IndexError):
        return "n/a"


def run(repeat: int, directory: Path) -> dict:
    path, out = directory / "fcn8s-bench.caffemodel", directory / "checkpoint"
    start = time.perf_counter()
    write_model(path)
    print(f"wrote {path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s", flush=True)
    _run_child("fromfile", path, out)  # page cache warm-up
    load_before, pressure_before = os.getloadavg(), _cpu_pressure()
    best: dict = {}
    for i in range(repeat):
        for what in ("sums-2", "import", "sums-1", "fromfile", "phases"):
            r = _run_child(what, path, out)
            for phase, seconds in r["times"].items():
                entry = best.setdefault(phase, {"seconds": [], "peak": [], "growth": [], "before": [], "what": what})
                entry["seconds"].append(seconds)
                entry["before"].append(r["before"])
                entry["peak"].append(r["peak"])
                entry["growth"].append(r["peak"] - r["before"])
            print(f"run {i + 1}: {what}: " + ", ".join(f"{p} {s:.2f} s" for p, s in r["times"].items())
                  + f"; peak RSS {r['peak'] / 1e6:.0f} MB ({(r['peak'] - r['before']) / 1e6:.0f} MB above the "
                  "process's RSS before the operation)", flush=True)
    return {"file_bytes": path.stat().st_size, "results": best, "load": (load_before, os.getloadavg()),
            "pressure": (pressure_before, _cpu_pressure())}


def format_report(report: dict, repeat: int) -> str:
    from fcn_models.summary import machine
    size = report["file_bytes"]
    results = report["results"]
    ways = {phase: min(results[phase]["seconds"]) for phase in ("sums, one thread", "sums, two threads")}
    base_phase = min(ways, key=ways.get)
    base = ways[base_phase]
    (l1, l5, _), (a1, a5, _) = report["load"]
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {machine()}.",
        f"Load average (1 min / 5 min) {l1:.1f} / {l5:.1f} before the runs and {a1:.1f} / {a5:.1f} after; "
        f"CPU pressure (share of time some task waited for a CPU, 60 s average) {report['pressure'][0]}% / "
        f"{report['pressure'][1]}%." + (" The machine was shared and busy: other processes used most of its "
                                         "CPUs, so the absolute seconds are inflated and noisy; the "
                                         "ratios are the better guide." if max(l1, a1) > 1.5 * (os.cpu_count() or 1) else ""),
        f"VGG16 FCN-8s caffemodel (width 1.0, 21 classes), {size / 1e6:.0f} MB, in the page cache; each row is "
        f"the best of {repeat} runs, each run a fresh process, the runs interleaved. Baseline: the file's sha1 "
        f"and md5 alone, the faster way ({'two threads, one per hash' if base_phase.endswith('two threads') else 'one thread, one read'}). "
        "Peak RSS is the process's VmHWM; \"growth\" subtracts its RSS just before the operation "
        "(after `import torch` where the operation imports it).",
        "",
        "| operation | seconds (best) | all runs | x sha1 + md5 alone | peak RSS (MB) | x file | growth (MB) | "
        "growth x file |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "sums, two threads": "sha1 + md5 alone, two threads (one per hash, each reading the file)",
        "sums, one thread": "sha1 + md5 alone, one thread (one read, both hashes updated)",
        "fcn import": "`fcn import` (import_weights): sums in two threads while it parses, converts and writes",
        "numpy.fromfile": "numpy.fromfile of the file",
        "parse + copy into the model": "phase alone: parse + copy into the model",
        "write the checkpoint": "phase alone: write the checkpoint",
    }
    for phase, label in labels.items():
        r = results[phase]
        seconds, peak, growth = min(r["seconds"]), min(r["peak"]), min(r["growth"])
        if phase == base_phase:
            label += " (baseline)"
        spread = ", ".join(f"{t:.2f}" for t in r["seconds"])
        lines.append(f"| {label} | {seconds:.2f} | {spread} | {seconds / base:.2f} | "
                     + (f"{peak / 1e6:.0f} | {peak / size:.2f} | {growth / 1e6:.0f} | {growth / size:.2f} |"
                        if r["what"] != "phases" else "(one process for both phases) | | | |"))
    imp = results["fcn import"]
    t_ratio = min(imp["seconds"]) / base
    growth_ratio, peak_ratio = min(imp["growth"]) / size, min(imp["peak"]) / size

    def verdict(ratio, goal):
        return "met" if ratio <= goal else "not met"
    lines += [
        "",
        f"Goals: the import within {GOAL_TIME:g}x of the sums alone: {t_ratio:.2f}x ({verdict(t_ratio, GOAL_TIME)}). "
        f"What the import adds to the process's RSS at most {GOAL_GROWTH:g}x the file: {growth_ratio:.2f}x "
        f"({verdict(growth_ratio, GOAL_GROWTH)}); the whole process, `import torch` included, peaks at "
        f"{peak_ratio:.2f}x the file.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        print(json.dumps(child(*argv[1:4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where to write the 538 MB model (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {DOC.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        report = run(args.repeat, Path(tmp))
    text = format_report(report, args.repeat)
    publish(SECTION, BENCH_NAME, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
