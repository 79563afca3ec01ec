"""`siren-proxy check-config FILE`: validate a config and print its routing table.

Exit status 0 when valid, 2 when not (argparse's own status for bad usage), so scripts
and CI can gate a deploy on it. Environment variables are interpolated as at serving
time, so a missing secret fails here too.
"""

from __future__ import annotations

import argparse
import sys

from policies.config import check_paths, load_config
from policies.errors import ConfigError
from policies.routing import routing_table


def check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
        check_paths(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK")
    print(routing_table(config))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("check-config", help="validate a config file and print its routing table")
    parser.add_argument("file", metavar="FILE", help="path of config.yaml")
    parser.set_defaults(func=check_config)
