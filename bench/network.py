"""A/B of the metadata network path: the router and the bare pass-through, alternated.

    python -m bench.network [--count 500] [--workers N] [--repeat 2] [--keep DIR]

For profiling work on the router: the same synthetic CT series goes storescu ->
pass-through -> storescp, then storescu -> deid-router -> storescp (every default option
but clean-pixel-data), ``--repeat`` times, and the median ratio router / pass-through
is printed (the machine is shared and noisy; alternating evens out slow phases). The
full suite with every baseline is ``python -m bench``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.measure import Row, measure
from bench.paths import METADATA_OPTIONS
from bench.peers import Node, StoreSCP
from bench.synthetic import write_ct_series


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.network", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="router de-identification workers")
    parser.add_argument("--repeat", type=int, default=2, help="alternate the two forwarders this many times")
    parser.add_argument("--keep", type=Path, help="copy the logs and configs here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-network-"))
    pairs: list[tuple[Row, Row]] = []
    try:
        print(f"writing {args.count} synthetic CT slices ...", flush=True)
        files = write_ct_series(work / "ct", args.count)
        scp = StoreSCP(work / "scp")
        try:
            for run in range(args.repeat):
                pair = []
                for kind in ("pass-through", "router"):
                    scp.clear()
                    node = Node(work / f"{kind}-{run}", scp, kind, options=METADATA_OPTIONS, workers=args.workers)
                    try:
                        pair.append(measure("network", kind, files, port=node.port, aet=node.aet,
                                            delivered=scp.count, tree_pid=node.pid, node=node, scp=scp))
                    finally:
                        node.stop()
                pairs.append((pair[0], pair[1]))
        finally:
            scp.stop()
        print(f"\n{args.count} CT slices, {pairs[0][0].megabytes:.0f} MB, {os.cpu_count()} cores, "
              f"router workers: {args.workers}\n")
        print(f"{'run':5}{'':14}{'inst/s':>9}{'MB/s':>8}{'acked inst/s':>14}{'p50 ms':>8}{'p95 ms':>8}{'RSS MB':>8}"
              "  peak MB by role")
        for run, pair in enumerate(pairs, 1):
            for r in pair:
                roles = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r.peak_process_mb.items()))
                print(f"{run:<5}{r.name:14}{r.rate:9.1f}{r.mb_per_second:8.1f}"
                      f"{r.instances / r.extra['acked_seconds']:14.1f}"
                      f"{r.latency_p50_ms or 0:8.0f}{r.latency_p95_ms or 0:8.0f}{r.peak_rss_mb:8.0f}  {roles}")
        ratios = sorted(router.rate / base.rate for base, router in pairs)
        print(f"\nratio router / pass-through (end to end, inst/s): median {statistics.median(ratios):.2f}"
              f" (runs: {', '.join(f'{x:.2f}' for x in ratios)})")
    finally:
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("ct", "storescp"))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
