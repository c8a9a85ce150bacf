"""Read a recipe YAML file; any error names the file, the line and the key, in one line."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from gatenorm.errors import GatenormError
from gatenorm.io import read_text_file
from gatenorm.recipes.schema import Recipe


def _node_at(root: yaml.Node, loc: tuple) -> yaml.Node:
    """The YAML node that a pydantic error location points at.

    Steps that the document does not have (a missing key, a union tag) stop the walk at the deepest node
    found, which is where the user has to look."""
    node = root
    for step in loc:
        if isinstance(node, yaml.MappingNode):
            value = next((v for k, v in node.value if k.value == step), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            value = node.value[step]
        else:
            value = None
        if value is None:
            break
        node = value
    return node


def _key_node(root: yaml.Node, loc: tuple) -> yaml.Node | None:
    """The key node of the mapping entry at `loc` (for an unknown key: the key itself)."""
    parent = _node_at(root, loc[:-1])
    if isinstance(parent, yaml.MappingNode):
        for key, _value in parent.value:
            if key.value == loc[-1]:
                return key
    return None


def _where(loc: tuple) -> str:
    """A location as the user wrote it: ``exports.gguf.quants[1]``."""
    out = ""
    for step in loc:
        if isinstance(step, int):
            out += f"[{step}]"
        elif step in ("layers", "target") and out.startswith("budgets["):
            continue  # the union tags of a budget
        else:
            out += f".{step}" if out else str(step)
    return out or "recipe"


def describe_error(error: dict, root: yaml.Node, path: Path) -> str:
    """One line: ``FILE:LINE: KEY: message``, the line of the offending key or value."""
    loc = tuple(error["loc"])
    kind = error["type"]
    node = _key_node(root, loc) if kind == "extra_forbidden" and loc else None
    if node is None:
        node = _node_at(root, loc)
    message = error["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "required key missing"
    return f"{path}:{node.start_mark.line + 1}: {_where(loc)}: {message}"


def _tidy_errors(errors: list[dict]) -> list[dict]:
    """Put unknown keys first (a typo explains the rest), then the order pydantic found them."""
    return sorted(errors, key=lambda e: e["type"] != "extra_forbidden")


def parse_recipe(text: str, path: Path) -> Recipe:
    """Validate recipe `text` (read from `path`) against the schema."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"{mark.line + 1}:" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GatenormError(f"{path}:{line} not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise GatenormError(f"{path}: a recipe is a YAML mapping (models:, budgets:, exports:, ...)")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        errors = _tidy_errors(e.errors())
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise GatenormError(describe_error(errors[0], root, path) + more) from None


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    """The validated recipe at `path` and its text."""
    path = Path(path)
    text = read_text_file(path, "recipe file")
    return parse_recipe(text, path), text
