"""``bnlab serve``: the live web app (see :mod:`bnlab.web`), on localhost unless told otherwise."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

from bnlab.cli.common import add_store_option, positive_int
from bnlab.errors import UsageError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="the live web app: train with and without BN in the browser")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than loopback: anyone who can reach it may train on this machine")
    p.add_argument("--max-sessions", type=positive_int, default=4,
                   help="browser tabs training at once (default: 4); one more is refused with a message")
    add_store_option(p)
    p.set_defaults(run=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def run(args: argparse.Namespace) -> int:
    if not is_loopback(args.host):
        if not args.allow_remote:
            raise UsageError(f"--host {args.host} is reachable from other machines; add --allow-remote to mean it")
        print(f"bnlab serve: WARNING: listening on {args.host}: anyone who can reach this port can train models "
              "on this machine and read the run store's results", file=sys.stderr)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    try:
        import uvicorn
    except ImportError:
        raise UsageError("the web app needs its extra dependencies: pip install 'bnlab[web]'") from None
    from bnlab.data import fetch_dataset
    from bnlab.web.app import create_app
    from bnlab.web.jobs import JobManager

    # a page asking for a dataset not yet in the cache fetches it (saying what it runs), as `bnlab data` would
    app = create_app(JobManager(max_jobs=args.max_sessions, load=fetch_dataset),
                     store_path=Path(args.store) if args.store else None)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"bnlab serve: open http://{shown}:{args.port}/ (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", ws_max_size=65536)
    return 0
