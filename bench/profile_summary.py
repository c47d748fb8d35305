#!/usr/bin/python3
"""Summarise a py-spy collapsed-stack profile: where a server's time goes.

Contract: read the `--format raw` output of `py-spy record` (one line per distinct stack,
frames separated by ';', the sample count last) and print the top functions by self time
(the innermost frame) and by inclusive time (present anywhere in the stack, counted once per
sample), as shares of all samples. With --idle-filter, samples whose innermost frame is the
reactor waiting in epoll are reported as idle and left out of the shares of busy time.
Usage: bench/profile_summary.py PROFILE.txt [--top 25] [--match policyd_ipv6]
"""

import argparse
import collections
import re

IDLE = re.compile(r"\(epoll|poll \(|select \(|doPoll")


def frame_name(frame):
    # py-spy frames look like "function (path/module.py:123)"; keep function and file stem.
    m = re.match(r"(.*) \((.*?):\d+\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.groups()
    parts = path.split("/")
    return f"{func} ({'/'.join(parts[-2:])})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="inclusive table: only frames containing this")
    args = parser.parse_args(argv)
    self_time, inclusive = collections.Counter(), collections.Counter()
    total = idle = 0
    with open(args.profile) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [frame_name(x) for x in stack.split(";") if x]
            total += n
            if frames and IDLE.search(frames[-1]):
                idle += n
                continue
            self_time[frames[-1]] += n
            for name in set(frames):
                inclusive[name] += n
    busy = total - idle
    print(f"samples {total}, idle in poll {idle} ({idle * 100 / max(total, 1):.0f} %), "
          f"busy {busy}; shares below are of busy samples")
    print("\nself time:")
    for name, n in self_time.most_common(args.top):
        print(f"  {n * 100 / max(busy, 1):5.1f} %  {name}")
    print("\ninclusive time:")
    shown = 0
    for name, n in inclusive.most_common():
        if args.match in name:
            print(f"  {n * 100 / max(busy, 1):5.1f} %  {name}")
            shown += 1
            if shown >= args.top:
                break


if __name__ == "__main__":
    main()
