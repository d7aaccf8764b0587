"""Generic: nested dicts (YAML) and ``--dotted.key value`` arguments into typed dataclasses, with errors that name
the field. Knows nothing of loravl's own configs (``loravl.config`` has those).

A dataclass may declare ``RENAMED = {"old_key": "new.dotted.key"}`` (a ``ClassVar``): old keys are still accepted,
in YAML files, saved checkpoint configs and on the command line, and land on their new place.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the field (``model.lora.rank``) or file."""


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _renamed(cls: type) -> dict[str, str]:
    return getattr(cls, "RENAMED", {})


def upgrade_keys(cls: type, tree: dict) -> dict:
    """``tree`` with every renamed key of ``cls`` and its sub-configs moved to its new place. A renamed key that is
    now a section (``compile: true`` -> ``compile.enabled``) is moved only when its value is not a mapping."""
    if not isinstance(tree, dict):
        return tree
    hints = typing.get_type_hints(cls)
    out: dict = {}
    moved: list[tuple[str, Any]] = []
    for key, value in tree.items():
        new = _renamed(cls).get(key)
        if new is not None and not (isinstance(value, dict) and is_dataclass_type(hints.get(key))):
            moved.append((new, value))
        else:
            out[key] = value
    for new, value in moved:  # the new place wins where both are given
        parts = new.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node.setdefault(parts[-1], value)
    for key, value in out.items():
        tp = hints.get(key)
        if is_dataclass_type(tp) and isinstance(value, dict):
            out[key] = upgrade_keys(tp, value)
    return out


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert only where no information is lost (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # a comma-separated CLI value
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """An instance of the dataclass ``cls`` from ``data`` (renamed keys accepted); unknown keys and wrong types
    raise ``ConfigError`` naming the field."""
    data = upgrade_keys(cls, data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}{did_you_mean(str(key), names)} (known keys here: "
                              f"{', '.join(sorted(names))})")
        kwargs[key] = coerce(value, hints[key], path)
    return cls(**kwargs)


def leaf_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every leaf field as ``{"model.lora.rank": annotation}``."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if is_dataclass_type(hints[f.name]):
            out.update(leaf_paths(hints[f.name], path + "."))
        else:
            out[path] = hints[f.name]
    return out


def renamed_paths(cls: type, prefix: str = "") -> dict[str, str]:
    """Every old dotted path with its new one: ``{"train.log_every": "train.logging.every"}``."""
    out = {f"{prefix}{old}": f"{prefix}{new}" for old, new in _renamed(cls).items()}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if is_dataclass_type(hints[f.name]):
            out.update(renamed_paths(hints[f.name], f"{prefix}{f.name}."))
    return out


def resolve_key(cls: type, key: str) -> str:
    """``model.lora.rank`` stays; a flat ``batch_size`` becomes ``train.batch_size`` when the leaf name is unique;
    an old name (dotted or flat) becomes its new path."""
    paths, renamed = leaf_paths(cls), renamed_paths(cls)
    if key in paths:
        return key
    if key in renamed:
        return renamed[key]
    matches = [p for p in paths if p.split(".")[-1] == key or p.endswith("." + key)]
    matches += [new for old, new in renamed.items() if old.split(".")[-1] == key and new not in matches]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        names = {*paths, *renamed} if "." in key else {p.split(".")[-1] for p in (*paths, *renamed)}
        raise ConfigError(f"unknown config option --{key}{did_you_mean(key, names, prefix='--')}")
    raise ConfigError(f"ambiguous option --{key}: write one of " + ", ".join("--" + m for m in matches))


def did_you_mean(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, sorted(known), n=2, cutoff=0.8)
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def describe_options(cls: type) -> str:
    """Every option of ``cls`` with its type and default, grouped by section (what ``--help`` prints)."""
    defaults = flatten(dataclasses.asdict(cls()))
    lines, section = [], None
    for path, annotation in leaf_paths(cls).items():
        head = path.rsplit(".", 1)[0] if "." in path else ""
        if head != section:
            section = head
            lines.append(f"\n{section or 'options'}:")
        kind = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        lines.append(f"  --{path:<42} {kind:<16} default {defaults.get(path)!r}")
    return "\n".join(lines).lstrip("\n")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(cls: type, args: list[str]) -> dict:
    """``["--model.lora.rank", "32", "--batch_size=64"]`` -> a nested dict. Values are read as YAML scalars."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are written --name value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            key = arg[2:]
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raw = "true"  # a bare flag: --do_sample
                i += 1
            else:
                raw = args[i + 1]
                i += 2
        path = resolve_key(cls, key)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        annotation = leaf_paths(cls)[path]
        # Keep strings as typed where a string is wanted ("001" stays "001").
        if annotation is str or annotation == Optional[str]:
            value = raw if raw.lower() not in ("null", "none") else None
        set_path(tree, path, value)
    return tree


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out
