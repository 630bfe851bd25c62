"""The ``deid-router`` command: serve, deid, scan, check-config, echo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from router import __version__, config as config_module, log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deid-router", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deid-router {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the DICOM node: receive, de-identify, forward")
    serve.add_argument("--config", type=Path, help="TOML config (default: the embedded default)")

    deid = commands.add_parser("deid", help="de-identify files offline")
    deid.add_argument("src", type=Path, help="a DICOM file or a folder (walked recursively)")
    deid.add_argument("dst", type=Path, help="output folder")
    deid.add_argument("--config", type=Path, help="TOML config (its [deid] table is used)")
    deid.add_argument("--workers", type=int, default=None, help="worker processes (default: cores)")

    scan = commands.add_parser("scan", help="report the burned-in text the pixel stage would mask (no output images)")
    scan.add_argument("src", type=Path, help="a DICOM file or a folder (walked recursively)")
    scan.add_argument("--config", type=Path, help="TOML config (its [deid] pixel_policy is used)")

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file", type=Path)

    echo = commands.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("--aet", default="DEID_ROUTER", help="our (calling) AE title")
    echo.add_argument("--aec", default="ANY-SCP", help="the peer's (called) AE title")
    echo.add_argument("--timeout", type=float, default=10.0)

    args = parser.parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file)
    try:
        config = config_module.load(args.config) if getattr(args, "config", None) else config_module.embedded_default()
    except config_module.ConfigError as exc:
        print(f"deid-router: invalid config:\n{exc}", file=sys.stderr)
        return 2
    log.configure(config.logging)
    if args.command == "deid":
        from router import filemode

        return filemode.run(args.src, args.dst, config, workers=args.workers)
    if args.command == "scan":
        from router import scan

        return scan.run(args.src, config)
    if args.command == "serve":
        from router import node

        return node.run(config)
    from router import forward

    return 0 if forward.echo(args.host, args.port, called_ae=args.aec, calling_ae=args.aet, timeout=args.timeout) else 1


def check_config(path: Path) -> int:
    try:
        config_module.load(path)
    except config_module.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    print(f"{path}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
