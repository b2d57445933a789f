"""The DeepSpeed configs and recipes that ship with selfaug (docs/design.md, "Command line"): `ds_configs/` and
`recipes/` of the repository, installed inside the package as `selfaug/_shipped/`.

A path a recipe or the command line names, `ds_configs/zero2.json` or `recipes/tiny.yaml`, is the file under
the current directory when there is one (a checkout, or the user's own copy), else the shipped one, so the
defaults work from any directory. `selfaug recipes` lists them and copies one out to edit (as torchtune's
`tune ls` / `tune cp`). Nothing here changes a config: the path is looked up where the file is opened.
"""
from __future__ import annotations

import os
import shutil

KINDS = ("ds_configs", "recipes")
_HERE = os.path.dirname(os.path.abspath(__file__))


def root(kind: str) -> str | None:
    """Where the shipped `kind` lives: inside the installed package, or beside the package in a checkout."""
    for where in (os.path.join(_HERE, "_shipped", kind), os.path.join(os.path.dirname(_HERE), kind)):
        if os.path.isdir(where):
            return where
    return None


def resolve(path: str | None) -> str | None:
    """`path` itself when it exists (or is absolute, or names no shipped kind), else the shipped file it names."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    head, _, rest = os.path.normpath(path).partition(os.sep)
    where = root(head) if head in KINDS and rest else None
    if where is not None and os.path.exists(os.path.join(where, rest)):
        return os.path.join(where, rest)
    return path


def recipes() -> list[tuple[str, str]]:
    """(name as the command line takes it, its first comment line) of every shipped recipe."""
    where = root("recipes")
    out = []
    for dirpath, _, files in os.walk(where or ""):
        for name in sorted(files):
            if name.endswith(".yaml") and not name.startswith("accelerate"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    first = f.readline().strip().lstrip("# ").strip()
                out.append((os.path.join("recipes", os.path.relpath(path, where)), first))
    return sorted(out)


def copy(name: str, dest: str | None = None) -> str:
    """Copy a shipped recipe (or DeepSpeed config) to `dest` (default: its own name under the current
    directory; into it when it is a directory) to edit; returns the path written. A shape's `recipe.yaml` copied
    to a `recipe.yaml` brings its directory (the random-init shape's config.json); copied to another name
    (`my8b.yaml`), it is that file alone, and its `model.name_or_path` still names the shipped shape."""
    rel = name if name.split(os.sep)[0] in KINDS else os.path.join("recipes", name)
    src = resolve(rel)
    if not os.path.exists(src):
        raise FileNotFoundError(f"no shipped recipe or config {name!r}; `selfaug recipes` lists them")
    dest = dest or rel
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(rel))
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} exists; name another destination")
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    if os.path.basename(src) == os.path.basename(dest) == "recipe.yaml":  # a shape directory: with its config.json
        shutil.copytree(os.path.dirname(src), os.path.dirname(dest) or ".", dirs_exist_ok=True)
    else:
        shutil.copyfile(src, dest)
    return dest
