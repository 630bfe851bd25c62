"""``deid-router scan SRC``: what the pixel stage would mask, per file, without writing images.

For reviewing a data set before routing it. The report names input files and the text
read off their pixels, so it is PHI: it goes to the operator's terminal (or a file they
choose), never to the logs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from router.config import Config
from router.filemode import inputs
from router.profile import InstanceRefused, identifying_values, read_instance


def run(src: Path, config: Config, out=None) -> int:
    """Print one line per file and one per text region; exit 1 if any file was refused."""
    from router.pixels import PixelCleaner, load_policy

    out = out or sys.stdout
    if not src.exists():
        print(f"deid-router: {src}: no such file or folder", file=sys.stderr)
        return 2
    try:
        cleaner = PixelCleaner(load_policy(config.deid.pixel_policy))
    except (RuntimeError, ValueError) as exc:
        print(f"deid-router: cannot start the pixel stage: {exc}", file=sys.stderr)
        return 2
    refused = 0
    for path in inputs(src):
        name = str(path.relative_to(src)) if src.is_dir() else str(path)
        try:
            ds = read_instance(path)
            report = cleaner.clean(ds, identifying_values(ds))  # on the in-memory copy only
        except InstanceRefused as exc:
            refused += 1
            print(f"{name}: refused: {exc.reason}", file=out)
            continue
        if report.skipped_reason:
            print(f"{name}: not examined: {report.skipped_reason}", file=out)
            continue
        print(f"{name}: {len(report.regions)} text region(s)", file=out)
        for r in report.regions:
            print(f"  frame {r.frame} box ({r.x0},{r.y0})-({r.x1},{r.y1}): {r.text!r}", file=out)
    return 1 if refused else 0

