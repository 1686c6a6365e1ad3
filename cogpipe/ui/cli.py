"""`cogpipe ui`: serve the page (Generate, Runs, Train) at http://HOST:PORT, by default on this machine only."""

from __future__ import annotations

import sys

from cogpipe.ui.safety import AUTH_ENV, host_problem, login


def add_arguments(p) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help=f"interface to bind (default 127.0.0.1, this machine only; any other needs a login: "
                        f"{AUTH_ENV} or --auth-file)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--outputs", default="outputs", help="the folder of runs the page lists and writes (outputs/)")
    p.add_argument("--auth-file", default=None, metavar="FILE",
                   help=f"require the login USER:PASSWORD on the first line of FILE (or set {AUTH_ENV}=USER:PASSWORD)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help=f"require this login (warned: other users see a command line; prefer {AUTH_ENV} or "
                        f"--auth-file)")


def run(args) -> int:
    try:
        auth = login(args.auth, args.auth_file)
    except ValueError as e:
        print(f"cogpipe ui: error: {e}", file=sys.stderr)
        return 2
    problem = host_problem(args.host, auth)
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
