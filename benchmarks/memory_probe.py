"""This process's memory as Linux accounts it, for the benchmarks' tables.

The peak is VmHWM, not getrusage's ru_maxrss: Linux carries a parent's peak over fork and exec into
ru_maxrss, and a benchmark's parent may just have written a checkpoint of several GB."""


def _status_gib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


def peak_gib():
    """Peak resident memory of this process so far (VmHWM), GiB."""
    return _status_gib("VmHWM")


def rss_gib():
    """Resident memory of this process now (VmRSS), GiB."""
    return _status_gib("VmRSS")


def reset_peak():
    """Resets the peak (VmHWM) to the current RSS: writing 5 to clear_refs. False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def watch_rss(proc, limit_gib, seen):
    """Kills `proc` (a subprocess.Popen) once its resident memory passes `limit_gib`: an overrun ends this run,
    not another process the machine's OOM killer might pick. `seen[0]`: the largest RSS sampled, GiB. Returns
    when the process ends; run it in a thread."""
    import time

    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 2 ** 20
        except (OSError, StopIteration):
            break
        seen[0] = max(seen[0], rss)
        if rss > limit_gib:
            proc.kill()
            break
        time.sleep(0.2)
