"""CPU time and memory of a whole process tree, read from /proc.

Contract:
- `tree(root)` returns the PIDs of root and all its descendants alive now.
- `cpu_seconds(root)` returns user+system CPU seconds of the tree: for every live member its
  own time plus the time of the children it has already reaped (cutime/cstime), so a fork
  server's exited children stay counted and nothing is counted twice. Differences of two
  readings give the CPU spent in between.
- `machine_cpu_seconds()` returns (busy, total) CPU seconds of the whole machine, so a run
  can show how busy the machine was (other work on it distorts every number).
- `MemorySampler(root)` is a thread that samples the tree every `period` seconds until
  stopped and keeps the peak of the summed RSS (what `ps` shows, the issue's measure: shared
  library pages are counted once per process), the peak summed PSS (shared pages divided among
  the processes that share them, from smaps_rollup) and the peak number of processes.
Reading /proc costs the reader's CPU, not the server's.
"""

import os
import threading

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    return data[data.rindex(b")") + 2:].split()


def _children_map():
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ppid = int(_stat_fields(name)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    return children


def tree(root):
    children = _children_map()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(root):
    total = 0
    for pid in tree(root):
        try:
            fields = _stat_fields(pid)
        except OSError:
            continue
        # utime, stime, cutime, cstime are fields 14-17 of proc(5); index 11-14 after ')'.
        total += sum(int(x) for x in fields[11:15])
    return total / CLOCK_TICKS


def machine_cpu_seconds():
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / CLOCK_TICKS, sum(fields) / CLOCK_TICKS


def _memory_kib(pid):
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def memory_kib(root):
    """(summed RSS KiB, summed PSS KiB, process count) of the tree now."""
    pids = tree(root)
    rss = pss = 0
    for pid in pids:
        r, p = _memory_kib(pid)
        rss, pss = rss + r, pss + p
    return rss, pss, len(pids)


class MemorySampler(threading.Thread):
    def __init__(self, root, period=0.25):
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.peak_rss_kib = self.peak_pss_kib = self.peak_processes = 0
        self._stop_event = threading.Event()

    def sample(self):
        rss, pss, count = memory_kib(self.root)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.peak_processes = max(self.peak_processes, count)

    def run(self):
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.period)

    def stop(self):
        self._stop_event.set()
        self.join()
        self.sample()
