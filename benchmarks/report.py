"""Machine description, the plain-text table and the JSON file."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from benchmarks.common import Section, Settings, Slot

PACKAGES = ("pipe_rpc", "attrs", "cloudpickle", "numpy", "psutil", "rpyc", "Pyro5", "serpent")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if versions["pipe_rpc"] is None:
        module = sys.modules.get("pipe_rpc")
        version = getattr(module, "__version__", None)
        versions["pipe_rpc"] = f"{version} (from source tree)" if version else None
    return versions


def git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def machine_info(root: Path) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "git_revision": git_revision(root),
    }


def render_section(section: Section, width: int = 100) -> list[str]:
    lines = textwrap.wrap(section.title, width=width) or [section.title]
    table = [section.columns, *section.rows]
    ncols = max(len(row) for row in table)
    widths = [0] * ncols
    for row in table:
        if len(row) > 2 and row[1] and not any(row[2:]):  # a status row spans the table
            widths[0] = max(widths[0], len(row[0]))
            continue
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    out = ["", *lines]
    for n, row in enumerate(table):
        if n > 0 and len(row) > 2 and row[1] and not any(row[2:]):
            out.append(f"  {row[0].ljust(widths[0])}  {row[1]}")
            continue
        cells = [row[0].ljust(widths[0])] + [
            cell.rjust(widths[i + 1]) for i, cell in enumerate(row[1:])
        ]
        out.append("  " + "  ".join(cells).rstrip())
        if n == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    for note in dict.fromkeys(section.notes):  # keep order, drop repeats
        out.extend(
            textwrap.wrap(note, width=width, initial_indent="  * ", subsequent_indent="    ")
        )
    return out


def render(
    sections: list[Section],
    slots: list[Slot],
    info: dict[str, Any],
    settings: Settings,
    elapsed: float,
) -> str:
    mode = "quick" if settings.quick else "full"
    lines = [
        f"pipe_rpc benchmarks ({mode} mode, {elapsed:.0f} s)",
        f"  {info['cpu_model']}, {info['cpu_count']} cores ({info['cpus_usable']} usable), "
        f"Python {info['python']}, {info['platform']}, {info['date']}",
        "  packages: "
        + ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v is not None),
        f'  long-lived children use start method "{settings.start_method}"; each figure '
        "runs the systems interleaved round by round (A B C ... A B C ...)",
        "  ratios (x rawB, x rawA) = cost relative to the raw loop measured in this run: "
        "time / raw time or raw rate / rate; 1.00 = as fast as raw, 2.00 = twice as slow",
        "",
        "systems:",
    ]
    for slot in slots:
        status = f"  [{slot.status}]" if slot.status else ""
        text = f"{slot.name}: {slot.cls.note}{status}"
        lines.extend(
            textwrap.wrap(text, width=100, initial_indent="  ", subsequent_indent="      ")
        )
    for section in sections:
        lines.extend(render_section(section))
    return "\n".join(lines) + "\n"


def write_json(
    path: Path,
    sections: list[Section],
    slots: list[Slot],
    info: dict[str, Any],
    settings: Settings,
    elapsed: float,
    table: str,
) -> None:
    document = {
        "machine": info,
        "mode": "quick" if settings.quick else "full",
        "elapsed_seconds": round(elapsed, 1),
        "settings": vars(settings),
        "systems": {s.name: {"status": s.status or "ok", "note": s.cls.note} for s in slots},
        "baseline": "raw B",
        "figures": {
            s.key: {
                "title": s.title,
                "columns": s.columns,
                "rows": s.rows,
                "notes": list(dict.fromkeys(s.notes)),
                "data": s.data,
            }
            for s in sections
        },
        "table": table,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
