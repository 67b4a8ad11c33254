"""Figures of the benchmark harness: each a measurement, the baseline it is a ratio against (measured
in the same run), and the target it is held to."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
README_BEGIN, README_END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


@dataclasses.dataclass
class Figure:
    section: str
    name: str
    measured: str  # the measurement and its baseline, in words with units
    ratio: float | None = None  # the figure held to the target (a ratio, a fraction, or seconds)
    target: str = ""  # e.g. ">= 1.3", "< 30"; empty: reported, no target
    note: str = ""

    @property
    def met(self) -> bool | None:
        match = re.fullmatch(r"(>=|<=|<|>)\s*([0-9.]+)", self.target)
        if not match or self.ratio is None:
            return None
        op, bound = match.group(1), float(match.group(2))
        return {">=": self.ratio >= bound, "<=": self.ratio <= bound, "<": self.ratio < bound,
                ">": self.ratio > bound}[op]

    def row(self) -> dict:
        return {**dataclasses.asdict(self), "met": self.met}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}"


def today() -> str:
    return datetime.date.today().isoformat()


def markdown(figures: list[Figure], header: str) -> str:
    verdict = {True: "yes", False: "**no**", None: ""}
    lines = [header, "", "| section | figure | measured (baseline in the same run) | ratio | target | met |",
             "| --- | --- | --- | --- | --- | --- |"]
    for f in figures:
        ratio = "" if f.ratio is None else f"{f.ratio:.3g}"
        measured = f.measured + (f" ({f.note})" if f.note else "")
        lines.append(f"| {f.section} | {f.name} | {measured} | {ratio} | {f.target} | {verdict[f.met]} |")
    return "\n".join(lines) + "\n"


def update_readme(table: str, readme: Path = README) -> None:
    """Replaces the README's benchmark block (between the two markers) with `table`."""
    text = readme.read_text()
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    readme.write_text(text[:start] + "\n" + table + text[end:])
