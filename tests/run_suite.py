"""The whole test suite, each test module in a process of its own (the README's test command; `.ci/run`).

MindSpore's memory pool keeps a process's high-water mark: in one process the suite's heaviest tests add
up (21 GiB on a 24 GB machine). One process per module bounds each process by its own module's peak. The
release-width tests (`-m slow`) run in processes of their own too. Each process's peak RSS and time are
printed, and a process above `--max-rss-gib` (12 by default) fails the run, so the suite keeps its room.

    python tests/run_suite.py [--max-rss-gib 12] [pytest options...]
"""
import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SLOW = ("test_parity_model.py", "test_memory_paths.py")  # modules with release-width tests (`-m slow`)


def _run(args):
    """Run one pytest process; returns (exit status, peak RSS in bytes, seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, time.monotonic() - t0  # ru_maxrss: KiB on Linux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-rss-gib", type=float, default=12.0, help="most peak RSS a test process may reach")
    args, extra = p.parse_known_args(argv)
    modules = sorted(os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(HERE, "test_*.py")))
    runs = [(m, ["-q", m, "-m", "not slow", *extra]) for m in modules]
    runs += [(f"{os.path.join('tests', m)} -m slow", ["-q", os.path.join("tests", m), "-m", "slow", *extra])
             for m in SLOW]
    results = []
    t0 = time.monotonic()
    for name, pytest_args in runs:
        print(f"\n=== {name}", flush=True)
        code, peak, seconds = _run(pytest_args)
        results.append((name, code, peak, seconds))
        print(f"=== {name}: exit {code}, peak RSS {peak / 2**30:.2f} GiB, {seconds:.0f} s", flush=True)
    total = time.monotonic() - t0
    print(f"\n{'process':<52} {'exit':>4} {'peak GiB':>9} {'s':>6}")
    for name, code, peak, seconds in results:
        print(f"{name:<52} {code:>4} {peak / 2**30:>9.2f} {seconds:>6.0f}")
    print(f"{'total':<52} {'':>4} {max(r[2] for r in results) / 2**30:>9.2f} {total:>6.0f}")
    # exit status 5: every test of the module was deselected (the slow ones), not a failure
    failed = [name for name, code, _, _ in results if code not in (0, 5)]
    heavy = [name for name, _, peak, _ in results if peak > args.max_rss_gib * 2**30]
    if failed:
        print(f"failed: {', '.join(failed)}")
    if heavy:
        print(f"above {args.max_rss_gib:g} GiB peak RSS: {', '.join(heavy)}")
    return 1 if failed or heavy else 0


if __name__ == "__main__":
    sys.exit(main())
