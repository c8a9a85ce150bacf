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


#: Deepest nesting of YAML collections a recipe may use (PyYAML's composer recurses per level).
MAX_YAML_DEPTH = 64


def _check_depth(text: str, path: Path) -> None:
    """Refuse YAML nested deeper than `MAX_YAML_DEPTH`, from the parser's event stream (no recursion)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                line = event.start_mark.line + 1
                raise GatenormError(f"{path}:{line}: nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _check_duplicate_keys(root: yaml.Node | None, path: Path) -> None:
    """Refuse a mapping that repeats a key (PyYAML would keep the last one silently)."""
    stack = [root] if root is not None else []
    visited = set()  # aliases share nodes: walk each once
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise GatenormError(f"{path}:{key.start_mark.line + 1}: duplicate key {key.value!r}")
                    seen.add(key.value)
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def parse_recipe(text: str, path: Path) -> Recipe:
    """Validate recipe `text` (read from `path`) against the schema."""
    try:
        _check_depth(text, path)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_duplicate_keys(root, path)
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
