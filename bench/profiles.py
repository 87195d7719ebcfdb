"""Summaries of py-spy profiles (``py-spy record -f raw``) for docs/performance.md.

A raw profile is one line per distinct stack, ``frame;frame;...;frame COUNT``. The summary
gives, per profile, the frames with the most samples on top of the stack (self) and anywhere in
it (inclusive), as percentages of all samples. Read-only; it never runs a profiler.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path


def top_frames(
    path: Path, limit: int = 15
) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """Total samples, the top ``limit`` self frames and inclusive frames (percent)."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count
    if not total:
        return 0, [], []
    return (
        total,
        [(f, 100.0 * n / total) for f, n in own.most_common(limit)],
        [(f, 100.0 * n / total) for f, n in anywhere.most_common(limit + 6)[6:]],
    )


def summarize_dir(directory: Path) -> str:
    """A markdown summary of every ``*.txt`` py-spy profile in ``directory``, also written to
    ``summary.md`` there."""
    parts = []
    for path in sorted(directory.glob("everruns-*.txt")):
        total, own, anywhere = top_frames(path)
        parts.append(f"### {path.stem} ({total} samples)\n")
        parts.append("self | frame\n---|---")
        parts += [f"{pct:.1f}% | `{frame}`" for frame, pct in own]
        parts.append("\ninclusive | frame\n---|---")
        parts += [f"{pct:.1f}% | `{frame}`" for frame, pct in anywhere]
        parts.append("")
    text = "\n".join(parts)
    (directory / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    print(summarize_dir(Path(sys.argv[1])))
