"""`siren-proxy`: serve, check-config, score, train, eval, generate.

Subcommands other than `serve` live beside the code they drive (`policies.cli`,
`guard.cli`, `guard.training.cli`) and register themselves here; each module imports
torch only when its command runs, so `check-config` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from guard.cli import whole_number
from policies.config import LOG_LEVELS

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siren-proxy", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the guarding proxy")
    serve.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file (default: %(default)s)")
    serve.add_argument("--host", default=None, help="listen address (default: server.host, else 127.0.0.1)")
    serve.add_argument("--port", type=whole_number(0, 65535), default=None, help="listen port (default: server.port, else 8080)")
    serve.add_argument("--upstream", default=None,
                       help="base URL that replaces every upstream's base_url, e.g. http://127.0.0.1:8000/v1")
    serve.add_argument("--log-level", default=None, choices=LOG_LEVELS, help="overrides server.log_level")
    serve.set_defaults(func=run_serve)

    for module in ("policies.cli", "guard.cli", "guard.training.cli"):
        try:
            register = __import__(module, fromlist=["register"]).register
        except ImportError as exc:  # a partial install still serves
            logging.getLogger(__name__).debug("subcommands of %s unavailable: %s", module, exc)
            continue
        register(commands)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(args.config, host=args.host, port=args.port, upstream=args.upstream,
                 log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader of stdout left (`| head`): nothing more is wanted, so no traceback. What
        # is still buffered goes to devnull, or flushing it at exit would raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
