"""Where the files a checkout ships are found: models/tiny-world, configs/, data/tiny, docs/.

The package imports without them: `pip install .` copies only `cogpipe/` into site-packages. The commands
that default to a shipped file look for it, in order, under $COGPIPE_HOME, the checkout this package was
imported from (an editable install or a clone on the path) and the current folder; if none holds it, the
error says what to pass instead.

Also link_or_copy_tree(), how a pipeline folder reuses another one's files (the export's base, the checkpoint
cache's converted entries).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def checkout_roots() -> list[Path]:
    """Folders that may hold the repository's shipped files, in the order they are tried."""
    roots = []
    if os.environ.get("COGPIPE_HOME"):
        roots.append(Path(os.environ["COGPIPE_HOME"]).expanduser())
    source = Path(__file__).resolve().parents[1]
    if (source / "pyproject.toml").is_file() and (source / "cogpipe").is_dir():  # a checkout, not site-packages
        roots.append(source)
    roots.append(Path.cwd())
    return roots


def repo_path(relative: str, instead: str) -> Path:
    """The shipped file or folder `relative` (e.g. "models/tiny-world"); FileNotFoundError names where it
    looked and `instead`, the option or key to pass when the repository is not at hand."""
    roots = checkout_roots()
    for root in roots:
        if (root / relative).exists():
            return root / relative
    looked = ", ".join(str(r) for r in dict.fromkeys(roots))
    raise FileNotFoundError(f"{relative} not found (looked in {looked}): pass {instead}, run from a clone of the "
                            f"cogpipe repository, or set COGPIPE_HOME to one")


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Recreate `src` under `dst` (symlinks of a hub snapshot followed): a hard link per file where the file
    system allows it, else a copy."""
    for folder, _, files in os.walk(src, followlinks=True):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            source = Path(folder, name).resolve()
            try:
                os.link(source, target / name)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(source, target / name)
