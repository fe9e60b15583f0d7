"""Load the sensitivity rules (``rules/*.yaml``) into a LabelIndex, once, at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.core.labels import LabelIndex, RuleDataError

_PACKAGE = Path(__file__).resolve().parent
# Installed from a wheel, rules/ is the package data gateway/bundled_rules (setup.py maps it);
# in a source checkout or an editable install it is the top-level rules/ beside the package.
BUNDLED_RULES = next(
    (d for d in (_PACKAGE / "bundled_rules", _PACKAGE.parent / "rules") if d.is_dir()),
    _PACKAGE / "bundled_rules",
)


class RulesError(Exception):
    """A rules file that cannot be used; ``str()`` is one line: file, entry, problem."""


def load_rules(rules_dir: Path | None = None) -> LabelIndex:
    """Read every ``*.yaml`` of ``rules_dir`` (default: the bundled ``rules/``) into a LabelIndex.

    Raises RulesError when the directory has no rules, a file is not valid YAML, or its
    content is wrong (unknown code system, bad label, duplicate code, ...).
    """
    directory = BUNDLED_RULES if rules_dir is None else Path(rules_dir)
    if not directory.is_dir():
        raise RulesError(f"{directory}: not a directory")
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise RulesError(f"{directory}: no rules (*.yaml) found")
    documents = {f"{directory.name}/{path.name}": _read(directory.name, path) for path in files}
    try:
        return LabelIndex.from_documents(documents)
    except RuleDataError as exc:
        raise RulesError(_one_line(str(exc))) from None


def _read(dir_name: str, path: Path) -> Any:
    name = f"{dir_name}/{path.name}"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(_one_line(f"{name}: cannot read: {exc}")) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "document"
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise RulesError(_one_line(f"{name}: {where}: malformed YAML: {problem}")) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())
