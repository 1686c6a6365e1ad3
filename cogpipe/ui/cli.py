"""`cogpipe ui`: serve the page (Generate, Runs, Train) at http://HOST:PORT, by default on this machine only."""

from __future__ import annotations

import sys

from cogpipe.ui.safety import host_problem, parse_auth


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1, this machine only; any other needs --auth)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--outputs", default="outputs", help="the folder of runs the page lists and writes (outputs/)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login on the page")


def run(args) -> int:
    try:
        auth = parse_auth(args.auth)
    except ValueError as e:
        print(f"cogpipe ui: error: {e}", file=sys.stderr)
        return 2
    problem = host_problem(args.host, args.auth)
    if problem:
        print(f"cogpipe ui: error: {problem}", file=sys.stderr)
        return 2
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page makes no calls of its own to the network
    try:
        from cogpipe.ui.app import serve  # keep: gradio
    except ImportError as e:
        print(f"cogpipe ui: error: {e}; the page needs the `ui` extra: pip install -e \".[ui]\"", file=sys.stderr)
        return 2
    serve(args.outputs, args.host, args.port, auth)
    return 0
