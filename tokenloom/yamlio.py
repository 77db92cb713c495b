"""YAML read as a node tree, so errors can name the file and line (catalogs, pipeline files)."""

from __future__ import annotations

from pathlib import Path

import yaml


def compose_file(path: Path, error: type[Exception], what: str) -> yaml.Node | None:
    """The YAML node tree of `path`; an unreadable or malformed file raises `error` naming the file, the
    line (when known) and `what` the file should have been."""
    try:
        return yaml.compose(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
