"""The validating YAML reader behind `config`: a strict loader (no duplicate keys) and `Section`,
one mapping of the document checked against the fields of the dataclass it becomes, with one-line
`UserError`s naming the file and the key path."""

from __future__ import annotations

import math
import typing
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from kins_tunnel.errors import UserError
from kins_tunnel.names import Address, kind, normalise_target

_T = TypeVar("_T")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class Section:
    """One mapping of the YAML document, checked against the fields of the dataclass it becomes."""

    def __init__(self, source: str, base_dir: Path, prefix: str, data: object, cls: type) -> None:
        self.source, self.base_dir, self.prefix, self.cls = source, base_dir, prefix, cls
        if data is None:  # an optional section left empty takes its defaults
            data = {}
        if not isinstance(data, Mapping):
            self.fail("", f"expected a mapping, got {kind(data)}")
        # resolved annotations: classes of other modules may use `from __future__ import annotations`
        self.types: dict[str, Any] = typing.get_type_hints(cls)
        known = [f.name for f in fields(cls)]
        for key in data:
            if not isinstance(key, str):
                self.fail("", f"key {key!r} is not a string")
            if key not in known:
                self.fail(key, f"unknown key (expected one of: {', '.join(known)})")
        self.data: Mapping[str, object] = data

    def where(self, key: str) -> str:
        return ".".join(part for part in (self.prefix, key) if part) or "top level"

    def fail(self, key: str, message: str) -> NoReturn:
        raise UserError(f"{self.source}: {self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def required(self, key: str) -> object:
        if key not in self.data:
            self.fail(key, "required key is missing")
        return self.data[key]

    def section(self, key: str, cls: type) -> Section:
        return Section(self.source, self.base_dir, self.where(key), self.data.get(key), cls)

    def build(self, cls: type[_T], *, defaults: object = None, **extra: object) -> _T:
        """Construct `cls` from this section's scalars and addresses, `defaults` and `extra`."""
        values: dict[str, Any] = self.scalars()
        for f in fields(self.cls):
            if f.name in extra:
                continue
            if self.types[f.name] in (Address, Address | None) and self.has(f.name):
                values[f.name] = self.address(self.where(f.name), self.data[f.name])
            elif defaults is not None and f.name not in values:
                values[f.name] = getattr(defaults, f.name)
        return cls(**values, **extra)

    def scalars(self) -> dict[str, Any]:
        """Type-checked values of the int, float, str and bool fields present in this section."""
        out: dict[str, Any] = {}
        for f in fields(self.cls):
            ftype = self.types[f.name]
            if f.name not in self.data or ftype not in _TYPE_NAMES:
                continue
            value: Any = self.data[f.name]
            if ftype is float and type(value) is int:
                value = float(value)
            if type(value) is not ftype:  # so true/false is never a number
                self.fail(f.name, f"expected {_TYPE_NAMES[ftype]}, got {kind(value)}")
            if ftype is float and not (math.isfinite(value) and value > 0):
                self.fail(f.name, f"must be a finite number greater than 0, got {value}")
            if ftype is int and value < 1 and not getattr(self.cls, "VALIDATES_BOUNDS", False):
                self.fail(f.name, f"must be at least 1, got {value}")
            out[f.name] = value
        return out

    def address(self, where: str, value: object, *, min_port: int = 0) -> Address:
        try:
            return Address.parse(value, min_port=min_port)
        except ValueError as exc:
            raise UserError(f"{self.source}: {where}: {exc}") from None

    def entries(self, key: str, expected: str) -> Iterator[tuple[object, object, str]]:
        """(key, value, where) for each entry of the optional mapping `key` (none when absent or
        null); `where` names the entry as `key."<entry key>"`; not a mapping: fails with
        "expected a mapping of <expected>"."""
        raw = self.data.get(key)
        if raw is None:
            return
        if not isinstance(raw, Mapping):
            self.fail(key, f"expected a mapping of {expected}, got {kind(raw)}")
        for k, v in raw.items():
            yield k, v, f'{key}."{k}"'

    def target(
        self,
        where: str,
        value: object,
        *,
        expected: str = 'a "host:port" string',
        error_prefix: str = "",
    ) -> str:
        """`value` as a routing target (`names.normalise_target`), or a failure at `where`."""
        if not isinstance(value, str):
            self.fail(where, f"expected {expected}, got {kind(value)}")
        try:
            return normalise_target(value)
        except ValueError as exc:
            self.fail(where, f"{error_prefix}{exc}")

    def unique(
        self, out: dict[Any, Any], key: object, value: object, where: str, what: str
    ) -> None:
        """`out[key] = value`, failing at `where` if an earlier entry has the same `key`."""
        if key in out:
            self.fail(where, f"same {what} as another key ({key})")
        out[key] = value

    def path(self, key: str) -> Path:
        value = self.required(key)
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"expected a file path, got {kind(value)}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base_dir / path


class StrictLoader(yaml.SafeLoader):  # type: ignore[misc]  # (no stubs for yaml)
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:  # before merge keys (<<) are flattened: those may repeat
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return result


def read_yaml(path: str | Path) -> tuple[Mapping[str, object], Path]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read config {path}: not UTF-8 text ({exc.reason})") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = f" line {mark.line + 1}:" if mark is not None else ""
        raise UserError(f"{path}:{line} invalid YAML: {problem}") from None
    if not isinstance(data, Mapping) and data is not None:
        raise UserError(f"{path}: top level: expected a mapping, got {kind(data)}")
    return data or {}, path.absolute().parent
