"""Summarize py-spy ``--format raw`` profiles (folded stacks): where the time goes.

    /work/venv/bin/python bench/profile_summary.py bench/results/profile-<stamp>/*.txt

For each scenario: the share of samples idle in epoll, then, as percentages
of the busy samples, the functions and files with the most time of their own
("self") and securepub's own functions with the time of their callees.
Files recorded for the same scenario and server (``<scenario>-<target>-<time>.txt``)
are merged.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

#: Frames that mean the reactor was waiting, not working.
IDLE = ("doPoll (twisted/internet/epollreactor.py", "epoll_wait")

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
# py-spy frames look like "function (path/to/file.py:123)"; drop the line number
# so one function is one entry.
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    return f"{match['func']} ({path})"


def load(paths: list[Path]) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            match = _LINE.match(line.strip())
            if match is None:
                continue
            frames = tuple(
                frame_name(f) for f in match["stack"].split(";") if not f.startswith("process ")
            )
            frames = tuple(f for f in frames if not f.startswith("thread "))
            stacks[frames] += int(match["count"])
    return stacks


def _module(name: str) -> str:
    """The file part of a frame name: ``f (twisted/web/http.py)`` -> ``twisted/web/http.py``."""
    return name.rsplit(" (", 1)[-1].rstrip(")") if " (" in name else name


def summarize(stacks: Counter[tuple[str, ...]], top: int) -> str:
    total = sum(stacks.values())
    if not total:
        return "  no samples\n"

    def is_idle(frames: tuple[str, ...]) -> bool:
        return bool(frames) and any(m in frames[-1] for m in IDLE)

    idle = sum(n for frames, n in stacks.items() if is_idle(frames))
    busy = total - idle or 1
    own: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    for frames, n in stacks.items():
        if not frames or is_idle(frames):
            continue
        own[frames[-1]] += n
        modules[_module(frames[-1])] += n
        for name in set(frames):
            if "securepub/" in name:
                ours[name] += n
    out = [f"  {total} samples, {100 * idle / total:.1f}% idle in epoll; shares of busy time:"]
    out.append("  self time by function:")
    out += [f"    {100 * n / busy:5.1f}%  {name}" for name, n in own.most_common(top)]
    out.append("  self time by file:")
    out += [f"    {100 * n / busy:5.1f}%  {name}" for name, n in modules.most_common(top)]
    out.append("  securepub functions, with callees:")
    out += [f"    {100 * n / busy:5.1f}%  {name}" for name, n in ours.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    opts = parser.parse_args(argv)
    groups: defaultdict[str, list[Path]] = defaultdict(list)
    for path in opts.files:
        groups[re.sub(r"-\d+$", "", path.stem)].append(path)  # <scenario>-<target>-<time>
    for name, paths in sorted(groups.items()):
        sys.stdout.write(f"{name} ({len(paths)} file(s)):\n")
        sys.stdout.write(summarize(load(paths), opts.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
