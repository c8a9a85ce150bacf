"""The hand-written regions of docs/study.md: the findings, written by people, between markers the report
generator keeps as they are while it rewrites every table and figure around them."""

from __future__ import annotations

from pathlib import Path

from gatenorm.errors import GatenormError

BEGIN = "<!-- hand-written: {name} (kept as is when scripts/study_report.py rewrites this file) -->"
END = "<!-- end hand-written -->"
_PREFIX = BEGIN[: BEGIN.index("{")]


class Prose:
    """The regions of an existing report, by name; `block` places one, `check_placed` refuses a report that
    would drop one."""

    def __init__(self, path: Path):
        self.path = path
        self.regions: dict[str, list[str]] = {}
        self.placed: set[str] = set()
        if path.is_file():
            self._read(path.read_text(encoding="utf-8").splitlines())

    def _read(self, lines: list[str]) -> None:
        name: str | None = None
        for number, line in enumerate(lines, 1):
            if line.startswith(_PREFIX):
                if name is not None:
                    raise GatenormError(f"{self.path}:{number}: hand-written region {name!r} is not closed")
                name = line[len(_PREFIX) :].split(" ", 1)[0]
                if name in self.regions:
                    raise GatenormError(f"{self.path}:{number}: hand-written region {name!r} appears twice")
                self.regions[name] = []
            elif line == END:
                if name is None:
                    raise GatenormError(f"{self.path}:{number}: {END} without a region to close")
                name = None
            elif name is not None:
                self.regions[name].append(line)
        if name is not None:
            raise GatenormError(f"{self.path}: hand-written region {name!r} is not closed")

    def block(self, name: str) -> list[str]:
        """Region `name`'s lines between its markers (empty for a new report), then a blank line."""
        self.placed.add(name)
        return [BEGIN.format(name=name), *self.regions.get(name, []), END, ""]

    def check_placed(self) -> None:
        """Refuse to write a report that has no place for a region of the old one (its text would be lost)."""
        lost = [name for name in self.regions if name not in self.placed]
        if lost:
            raise GatenormError(
                f"{self.path}: the report has no place for hand-written region(s) {', '.join(lost)}; move "
                "their text to a region it keeps before regenerating"
            )
