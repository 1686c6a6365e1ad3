"""What keeps the page safe by default: it binds to the loopback interface; a non-local host needs --auth (the page
starts training processes and reads files); paths typed into the page must lie inside the allowed folders."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class UnsafePath(ValueError):
    """A path typed into the page points outside the folders the page may read."""


def is_local(host: str) -> bool:
    """True for a loopback address or name (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """`user:pass` -> (user, pass); ValueError naming --auth when either part is empty."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASSWORD (both non-empty)")
    return user, password


def host_problem(host: str, auth: str | None) -> str | None:
    """Why serving on `host` with `auth` is refused, or None."""
    if is_local(host) or auth:
        return None
    return (f"--host {host}: the page starts training processes and reads files under the allowed folders, so "
            f"serving it beyond this machine needs a login: add --auth USER:PASSWORD (or use --host 127.0.0.1 and "
            f"an SSH tunnel)")


class PathGuard:
    """The folders whose files the page may read or name: typed paths must resolve (symlinks followed) inside one."""

    def __init__(self, roots):
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def inside(self, path) -> bool:
        resolved = Path(path).expanduser().resolve()
        return any(resolved == root or root in resolved.parents for root in self.roots)

    def check(self, path, what: str) -> Path:
        """`path` resolved, or UnsafePath naming `what` and the allowed folders."""
        if path is None or not str(path).strip():
            raise UnsafePath(f"{what}: empty path")
        if not self.inside(path):
            allowed = ", ".join(str(r) for r in self.roots)
            raise UnsafePath(f"{what} {path}: outside the folders this page may read ({allowed})")
        return Path(path).expanduser().resolve()

    def model(self, spec: str, what: str = "model") -> str:
        """A model field: a hub id (owner/name that is no local path) passes as it is; a path must be allowed."""
        spec = str(spec).strip()
        if HUB_ID.match(spec) and not os.path.lexists(spec) and not spec.startswith("."):
            return spec
        return str(self.check(spec, what))
