"""Line-aware YAML and typed field reading: the generic half of config loading.

`load_tree` turns YAML text into plain dicts, lists and scalars, where every mapping and
list also remembers the line (1-based) of each of its keys and items, so that any later
error can name the line. Two YAML 1.1 traps are closed here: only `true`/`false` are
booleans (so `action: off` is the string "off", not False), and a duplicate key is an
error instead of silently keeping the last value.

`Section` reads one mapping field by field with strict types (a bool is never a number),
interpolates `${VAR}` in strings, and `finish()` rejects whatever keys were not read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from policies.errors import ConfigError

_MAX_DEPTH = 32


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: `on`, `off`, `yes`, `no` stay strings."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


class YMap(dict):
    """A YAML mapping; `line` is where it starts, `key_lines[key]` where each key is."""

    line: int | None = None
    key_lines: dict[str, int]


class YList(list):
    """A YAML sequence; `line` is where it starts, `item_lines[i]` where each item is."""

    line: int | None = None
    item_lines: list[int]


def load_tree(text: str, file: str | None) -> Any:
    """Parse YAML text into YMap/YList/scalars; YAML errors become `ConfigError` with a line."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _convert(loader, node, file, "", 0, [_MAX_VALUES])
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"invalid YAML: {problem}", file=file, line=mark.line + 1 if mark else None
        ) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError("invalid YAML: nested too deeply", file=file) from None
    finally:
        loader.dispose()


_MERGE_TAG = "tag:yaml.org,2002:merge"
# Values (and merged pairs) a document may expand to. Aliases of aliases repeat a value
# exponentially often ("billion laughs": nine levels of nine make 9**9), and a reload
# parses on the proxy's event loop: such a file hung every request, not only the reload.
_MAX_VALUES = 100_000


def _spend(left: list[int], count: int, node: yaml.Node) -> None:
    left[0] -= count
    if left[0] < 0:
        raise yaml.constructor.ConstructorError(
            None, None, f"the document expands to over {_MAX_VALUES:,} values (aliases repeated inside aliases?)",
            node.start_mark)


def _pairs(node: yaml.MappingNode, left: list[int], depth: int = 0) -> list[tuple[yaml.Node, yaml.Node, bool]]:
    """A mapping's (key, value, merged) pairs with `<<` merge keys resolved as PyYAML's
    `flatten_mapping` resolves them (merged pairs first; of `<<: [*a, *b]`, `*a`'s last, so
    that it wins), without changing the node: an aliased mapping is read again where it
    is used, and `flatten_mapping` left it with its merged pairs as if written there."""
    if depth > _MAX_DEPTH:
        raise yaml.constructor.ConstructorError(None, None, "merge keys nested too deeply (recursive alias?)",
                                                node.start_mark)
    merged, own = [], []
    for key, value in node.value:
        if key.tag != _MERGE_TAG:
            own.append((key, value, False))
            continue
        sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise yaml.constructor.ConstructorError(None, None, "a merge key (<<) takes a mapping or a list of "
                                                        "mappings", source.start_mark)
            merged += [(k, v, True) for k, v, _ in _pairs(source, left, depth + 1)]
    _spend(left, len(merged), node)
    return merged + own


def _convert(loader: _Loader, node: yaml.Node, file: str | None, path: str, depth: int, left: list[int]) -> Any:
    """`node` as YMap/YList/scalars; `left`: how many more values may be made (`_MAX_VALUES`)."""
    _spend(left, 1, node)
    line = node.start_mark.line + 1
    if depth > _MAX_DEPTH:
        raise ConfigError("nested too deeply (recursive alias?)", file=file, key_path=path, line=line)
    if isinstance(node, yaml.MappingNode):
        out = YMap()
        out.line, out.key_lines = line, {}
        overridable = set()  # keys a merged pair set: a later pair replaces them, as YAML's `<<` means
        for key_node, value_node, merged in _pairs(node, left):
            key = loader.construct_object(key_node, deep=True)
            key_line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise ConfigError(
                    f"keys must be strings, got {key!r}", file=file, key_path=path, line=key_line
                )
            child = f"{path}.{key}" if path else key
            if key in out and key not in overridable:
                raise ConfigError("duplicate key", file=file, key_path=child, line=key_line)
            (overridable.add if merged else overridable.discard)(key)
            out[key] = _convert(loader, value_node, file, child, depth + 1, left)
            out.key_lines[key] = key_line
        return out
    if isinstance(node, yaml.SequenceNode):
        items = YList()
        items.line, items.item_lines = line, []
        for i, item in enumerate(node.value):
            items.append(_convert(loader, item, file, f"{path}[{i}]", depth + 1, left))
            items.item_lines.append(item.start_mark.line + 1)
        return items
    return loader.construct_object(node, deep=True)


_INTERPOLATION = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.S)
_MISSING: Any = object()
REQUIRED: Any = _MISSING  # pass as `default` to make a key required


@dataclass(frozen=True)
class Context:
    """What every section shares: the file name for messages and the environment."""

    file: str | None
    env: Mapping[str, str]

    def error(self, reason: str, key_path: str, line: int | None) -> ConfigError:
        return ConfigError(reason, file=self.file, key_path=key_path, line=line)

    def interpolate(self, raw: str, key_path: str, line: int | None) -> str:
        """`${VAR}` → env value, `${VAR:-default}` → value or default (a default holds no
        `${`), `$${` → literal `${`."""

        def replace(match: re.Match[str]) -> str:
            whole = match.group(0)
            if whole == "$${":
                return "${"
            if match.group(1) is None:
                raise self.error("unterminated '${' in value", key_path, line)
            var = _VAR.match(match.group(1))
            if var is None:
                raise self.error(f"bad variable name in '${{{match.group(1)}}}'", key_path, line)
            name, default = var.group(1), var.group(2)
            if default is not None and "${" in default:  # `${A:-${B}}`: the first `}` ends the reference
                raise self.error(f"nested '${{' in the default of ${{{name}:-...}} is not supported", key_path, line)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            raise self.error(f"environment variable {name} is not set", key_path, line)

        return _INTERPOLATION.sub(replace, raw)


_KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _kind(value: Any) -> str:
    """How an error names the type it got (never the value: it may be a secret)."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return _KIND_NAMES.get(type(value), type(value).__name__)


class Section:
    """Reads one YAML mapping at `path`; every getter records the key as known."""

    def __init__(self, ctx: Context, value: Any, path: str, line: int | None) -> None:
        if not isinstance(value, dict):
            raise ctx.error(f"expected a mapping, got {_kind(value)}", path, line)
        self.ctx, self.value, self.path, self.line = ctx, value, path, line
        self._seen: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def key_line(self, key: str) -> int | None:
        return getattr(self.value, "key_lines", {}).get(key, self.line)

    def error(self, key: str, reason: str) -> ConfigError:
        return self.ctx.error(reason, self.key_path(key), self.key_line(key))

    def has(self, key: str) -> bool:
        return key in self.value

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._seen.add(key)
        if key in self.value:
            return self.value[key]
        if default is _MISSING:
            raise self.ctx.error("required key is missing", self.key_path(key), self.line)
        return default

    def _scalar(self, key: str, default: Any) -> Any:
        value = self.raw(key, default)
        if isinstance(value, str) and "${" in value:
            return self.ctx.interpolate(value, self.key_path(key), self.key_line(key)), True
        return value, False

    def string(self, key: str, default: Any = _MISSING, *, nullable: bool = False, nonempty: bool = True) -> Any:
        value, _ = self._scalar(key, default)
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_kind(value)}")
        if nonempty and not value:
            raise self.error(key, "must not be empty")
        return value

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        options = tuple(choices)
        value = self.string(key, default)
        if value not in options:
            raise self.error(key, f"must be one of {', '.join(options)}; got {self.value[key]!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value, interpolated = self._scalar(key, default)
        if interpolated and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_kind(value)}")
        return value

    def integer(self, key: str, default: Any, *, minimum: int | None = None, maximum: int | None = None,
                nullable: bool = False) -> Any:
        value, interpolated = self._scalar(key, default)
        if interpolated:
            value = _parse(value, int)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            got = _not_finite(value) if isinstance(value, float) else None
            raise self.error(key, f"expected an integer, got {got or _kind(value)}{_why_a_string(value, interpolated)}")
        return self._bounded(key, value, minimum, maximum)

    def number(
        self, key: str, default: Any, *, minimum: float | None = None, maximum: float | None = None,
        positive: bool = False, nullable: bool = False,
    ) -> Any:
        value, interpolated = self._scalar(key, default)
        if interpolated:
            value = _parse(value, float)
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a finite number, got {_kind(value)}{_why_a_string(value, interpolated)}")
        not_finite = _not_finite(value)
        if not_finite:
            raise self.error(key, f"expected a finite number, got {not_finite}")
        if positive and value <= 0:
            raise self.error(key, f"must be > 0, got {value}")
        return float(self._bounded(key, value, minimum, maximum))

    def _bounded(self, key: str, value: Any, minimum: Any, maximum: Any) -> Any:
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be <= {maximum}, got {value}")
        return value

    def section(self, key: str) -> Section | None:
        """The mapping under `key`, or None when the key is absent or null."""
        value = self.raw(key, None)
        return None if value is None else Section(self.ctx, value, self.key_path(key), self.key_line(key))

    def items(self, key: str) -> list[tuple[str, int | None, Any]] | None:
        """(key path, line, value) of each item of the list under `key`; None when absent."""
        value = self.raw(key, None)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_kind(value)}")
        lines = getattr(value, "item_lines", [self.key_line(key)] * len(value))
        return [(f"{self.key_path(key)}[{i}]", lines[i], item) for i, item in enumerate(value)]

    def entries(self, key: str) -> list[tuple[str, str, int | None, Any]] | None:
        """(name, key path, line, value) of each entry of the mapping under `key`."""
        sub = self.section(key)
        if sub is None:
            return None
        self._seen.add(key)
        sub._seen.update(sub.value)
        return [(name, sub.key_path(name), sub.key_line(name), v) for name, v in sub.value.items()]

    def finish(self) -> None:
        """Reject keys nobody read: a typo must not silently fall back to a default."""
        for key in self.value:
            if key not in self._seen:
                raise self.error(key, f"unknown key (known: {', '.join(sorted(self._seen))})")


def _not_finite(value: int | float) -> str | None:
    """How an error names a number no float holds (never the value itself), or None."""
    try:
        number = float(value)
    except OverflowError:
        return "an integer too large for a float"
    if math.isnan(number):
        return "NaN"
    return None if math.isfinite(number) else "infinity (.inf, or a number too large for a float, e.g. 1.0e+400)"


def _why_a_string(value: Any, interpolated: bool) -> str:
    """Why a string that reads as a number in Python is a string here: it was quoted, or
    YAML 1.1 does not read that spelling as a number (`1e3`, `1.0e400`: an exponent needs
    a '.' before it and a sign after the 'e'). Quotes the value only when it was written in
    the file (an interpolated value may be a secret)."""
    if interpolated or not isinstance(value, str) or not re.search(r"\d", value):
        return ""
    try:
        float(value)
        plain = yaml.load(value, Loader=_Loader)  # what the same text reads as unquoted
    except (ValueError, yaml.YAMLError):
        return ""
    if isinstance(plain, (int, float)) and not isinstance(plain, bool):
        return f" ({value!r} is quoted: write the number without quotes)"
    if "e" in value.lower():
        return f" (YAML reads {value!r} as a string: write an exponent with a '.' and a sign, e.g. 1.0e+3)"
    return f" (YAML reads {value!r} as a string, not a number)"


def _parse(text: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(text.strip())
    except ValueError:
        return text
