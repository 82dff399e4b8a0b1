"""Which models this process may load: `ENGINE_ALLOWED_MODELS` (or `allowed_models` in the config file).

Items, comma-separated: `any`; a local root (an absolute path, or one starting with `~` or `./`): folders under
it; a Hub id (`org/name`) or an organisation's pattern (`org/*`, any fnmatch pattern); `none` for nothing
beyond the project's own models. The project's own models (`embedded` and the registry's keys) are always
allowed, so the fallback to the embedded model always works.

Unset, the default is `any` for the CLI and for a server that listens on the loopback address only
(`serving(address)`, told by the app), and `none` for a server that others can reach.

A local name is resolved one component at a time, symlinks and `..` followed as the kernel would, and is
refused as soon as a step leaves every root (or the way down to one): nothing outside a root is opened,
listed or even looked up, so a refusal says the same whether or not the path exists. The loader then opens
the folder by its resolved path, and a file in it that links outside the roots refuses the folder too.
"""
from __future__ import annotations

import fnmatch
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from engine.core.settings import settings, where

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# A Hub repo id as the Hub spells them: no "..", no leading dot or dash, at most one slash.
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")
_server: dict[str, object] = {"declared": False, "address": None}


def serving(address: str | None) -> None:
    """The app tells the engine the address its server listens on (None or "" or 0.0.0.0: every interface)."""
    _server["declared"], _server["address"] = True, (address or "").strip()


def _loopback(address) -> bool:
    return bool(address) and (address in LOOPBACK or str(address).startswith("127."))


@dataclass(frozen=True)
class Policy:
    any: bool
    roots: tuple[str, ...]
    hub: tuple[str, ...]
    source: str

    def describe(self) -> str:
        if self.any:
            return "any model"
        allowed = ["embedded"] + [f"folders under {root}" for root in self.roots] + [f"Hub {h}" for h in self.hub]
        return ", ".join(allowed)


def policy() -> Policy:
    items = settings().allowed_models
    if items is None:
        address = _server["address"]
        if not _server["declared"] or _loopback(address):
            return Policy(True, (), (), "default")
        return Policy(False, (), (), f"the default for a server on {address or 'every interface'}; "
                                     "set ENGINE_ALLOWED_MODELS")
    roots, hub = [], []
    for item in items:
        if item.lower() in ("any", "*"):
            return Policy(True, (), (), where("allowed_models"))
        if item.lower() == "none":
            continue
        if item.startswith(("/", "~", "./", "../")) or item == ".":
            roots.append(os.path.realpath(os.path.expanduser(item)))
        else:
            hub.append(item)
    return Policy(False, tuple(roots), tuple(hub), where("allowed_models"))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _on_the_way(path: str, roots: tuple[str, ...]) -> bool:
    """Inside a root, or one of the folders on the way down to one."""
    return any(_under(path, root) or _under(root, path) for root in roots)


class Outside(Exception):
    """The path leaves every allowed root."""


def resolve_confined(name: str, roots: tuple[str, ...], hops: int = 40) -> str | None:
    """The real path of `name` (None when it does not exist), following symlinks and `..` step by step;
    raises Outside before looking up any step that leaves the roots."""
    absolute = os.path.join(os.getcwd(), os.path.expanduser(name))
    pending = list(reversed(Path(absolute).parts[1:]))
    current = "/"
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":  # `current` holds no symlink, so its parent is its dirname
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if not _on_the_way(candidate, roots):
            raise Outside(name)
        try:
            info = os.lstat(candidate)
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode):
            hops -= 1
            if hops < 0:
                raise Outside(name)
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending.extend(reversed(Path(target).parts[1:] if target.startswith("/") else Path(target).parts))
            continue
        current = candidate
    if not any(_under(current, root) for root in roots):
        raise Outside(name)
    return current


def links_outside(folder: str, roots: tuple[str, ...]) -> str | None:
    """The first file of `folder` that links outside the roots (what the loader would open), or None."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink():
                try:
                    resolve_confined(os.path.join(folder, entry.name), roots)
                except Outside:
                    return entry.name
    return None


def hub_allowed(repo_id: str, rules: tuple[str, ...]) -> bool:
    return bool(HUB_ID.match(repo_id)) and ".." not in repo_id and any(
        fnmatch.fnmatchcase(repo_id.lower(), rule.lower()) for rule in rules)
