"""What keeps the page safe by default: it binds to the loopback interface; a non-local host needs a login (the page
starts training processes and reads files), given by COGPIPE_UI_AUTH or --auth-file (--auth on the command line
works but every local user sees it in the process list); paths typed into the page must lie inside the allowed
folders: every path-typed field of the config schema (`path_fields`, from the fields' metadata), so a path field added
to the schema later is guarded with no change here."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
import typing
from pathlib import Path

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}
AUTH_ENV = "COGPIPE_UI_AUTH"


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


def parse_auth(auth: str | None, source: str = "--auth") -> tuple[str, str] | None:
    """`user:pass` -> (user, pass); ValueError naming `source` when either part is empty."""
    if auth is None:
        return None
    user, sep, password = auth.strip().partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{source} must be USER:PASSWORD (both non-empty)")
    return user, password


def login(auth: str | None = None, auth_file=None, environ=os.environ, warn=None) -> tuple[str, str] | None:
    """The page's login, from (first found) --auth-file FILE (its first line USER:PASSWORD), the COGPIPE_UI_AUTH
    environment variable, or --auth USER:PASSWORD, which works but is warned about: every local user sees a command
    line in the process list. None: no login. ValueError naming the source when it is malformed or unreadable."""
    warn = warn or (lambda text: print(text, file=sys.stderr))
    if auth_file is not None:
        try:
            lines = Path(auth_file).expanduser().read_text().splitlines()
        except OSError as e:
            raise ValueError(f"--auth-file {auth_file}: cannot read it ({e.strerror or e})") from None
        return parse_auth(lines[0] if lines else "", f"--auth-file {auth_file} (its first line)")
    if environ.get(AUTH_ENV):
        return parse_auth(environ[AUTH_ENV], AUTH_ENV)
    if auth is not None:
        warn(f"cogpipe ui: warning: --auth puts the password on the command line, where every user of this machine "
             f"sees it (ps); use {AUTH_ENV}=USER:PASSWORD or --auth-file FILE instead")
    return parse_auth(auth)


def host_problem(host: str, auth: str | None) -> str | None:
    """Why serving on `host` with `auth` is refused, or None."""
    if is_local(host) or auth:
        return None
    return (f"--host {host}: the page starts training processes and reads files under the allowed folders, so "
            f"serving it beyond this machine needs a login: set {AUTH_ENV}=USER:PASSWORD or give --auth-file FILE "
            f"(or use --host 127.0.0.1 and an SSH tunnel)")


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
        """A model field: a hub id (told from a path as the loaders tell it, model_sources.is_hub_id) passes as it
        is; a path must be allowed."""
        from cogpipe.model_sources import is_hub_id

        spec = str(spec).strip()
        if is_hub_id(spec) and not os.path.lexists(spec):
            return spec
        return str(self.check(spec, what))


def path_fields(schema, prefix: str = "") -> dict[str, dict]:
    """{dotted key: metadata} of every field of the dataclass `schema` (nested sections included) marked as a path
    (`field(..., metadata={"path": True})`; cogpipe/config.py)."""
    found = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = prefix + f.name
        if f.metadata.get("path"):
            found[key] = dict(f.metadata)
        if dataclasses.is_dataclass(hints.get(f.name)):
            found.update(path_fields(hints[f.name], key + "."))
    return found
