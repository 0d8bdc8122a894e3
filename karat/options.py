"""Every host's view of an options dataclass, generated from its fields' metadata.

An options dataclass (``karat.KArAtConfig``) declares each option once: name, type, default, and in
``field(metadata=...)``:

* ``help``: the help text (command line, docs);
* ``choices``: the allowed values, when they are a closed set;
* ``host_name``: the keyword hosts use when the field name means something else to them (``depth`` is a
  ViT's block count, so the KAN depth is ``karat_depth`` in ``create_model``, backbone configs and yacs);
* ``model_decides``: the command line leaves it unset by default, so each model's own default applies;
* ``structural``: False when the option changes no parameter shape (resuming with another value is allowed).

From that one table this module generates the argparse flags (``--<field name>``), the yacs node
(``<HOST NAME>`` upper case) and the host keywords, and turns each back into a config. It knows no host
framework: a yacs ``CfgNode`` class is passed in, so ``karat`` imports without detectron2.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Type, TypeVar

T = TypeVar("T")


# ------------------------------------------------------------------------------------------- the table
def option_fields(cls: type) -> Tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def host_name(f: dataclasses.Field) -> str:
    """The keyword of this option in host configs and ``create_model`` calls."""
    return f.metadata.get("host_name", f.name)


def host_names(cls: type) -> Dict[str, str]:
    """Host keyword -> field name, for every option."""
    return {host_name(f): f.name for f in option_fields(cls)}


def renamed(cls: type) -> Dict[str, str]:
    """Field name -> host keyword, for the options hosts know by another name (``depth`` -> ``karat_depth``)."""
    return {f.name: host_name(f) for f in option_fields(cls) if host_name(f) != f.name}


def cli_flags(cls: type) -> Dict[str, str]:
    """Host keyword -> command-line flag (``karat_depth`` -> ``--depth``)."""
    return {host_name(f): f"--{f.name}" for f in option_fields(cls)}


def non_structural(cls: type) -> Tuple[str, ...]:
    """Host keywords of the options that change no parameter shape."""
    return tuple(host_name(f) for f in option_fields(cls) if not f.metadata.get("structural", True))


def _hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y"):
        return True
    if v.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


# ------------------------------------------------------------------------------------------ command line
def add_argparse_arguments(parser: Any, cls: type) -> None:
    """One ``--<field name>`` flag per option on ``parser`` (a parser or an argument group).

    Booleans accept ``--flag`` and ``--flag True/False``; pairs take two values; an option with
    ``model_decides`` defaults to None (the model's own default then applies)."""
    hints = _hints(cls)
    for f in option_fields(cls):
        tp = _unwrap_optional(hints[f.name])
        kw: Dict[str, Any] = dict(help=f.metadata.get("help"))
        default = None if f.metadata.get("model_decides") else f.default
        if f.metadata.get("choices"):
            kw["choices"] = tuple(f.metadata["choices"])
        if tp is bool:
            kw.update(type=str2bool, nargs="?", const=True)
        elif typing.get_origin(tp) in (tuple, Tuple):
            args = typing.get_args(tp)
            variadic = len(args) == 2 and args[1] is Ellipsis
            kw.update(type=args[0], nargs="+" if variadic else len(args))
            default = list(default) if default is not None else None  # argparse gives lists
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line form for type {tp!r}")
        if f.metadata.get("model_decides"):
            kw["help"] = f"{kw['help'] or ''} (default: the model's)".strip()
        parser.add_argument(f"--{f.name}", default=default, **kw)


def kwargs_from_namespace(ns: argparse.Namespace, cls: type) -> Dict[str, Any]:
    """The options set on the command line as host keywords (None, i.e. the model's default, left out)."""
    out: Dict[str, Any] = {}
    for f in option_fields(cls):
        value = getattr(ns, f.name)
        if value is not None:
            out[host_name(f)] = tuple(value) if isinstance(value, list) else value
    return out


# ----------------------------------------------------------------------------------------------- yacs
def _yacs_value(value: Any, tp: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if value is None:  # yacs needs a typed default: the type's zero stands for "unset"
        return _unwrap_optional(tp)()
    return value


def yacs_node(cls: type, node_cls: Type[T]) -> T:
    """A yacs node with one upper-case key per option (its host name), holding the defaults.

    yacs cannot hold None: an option whose default is None holds its type's zero (0) instead, read back as None."""
    node = node_cls()
    hints = _hints(cls)
    for f in option_fields(cls):
        setattr(node, host_name(f).upper(), _yacs_value(f.default, hints[f.name]))
    return node


def kwargs_from_yacs(node: Mapping[str, Any], cls: type) -> Dict[str, Any]:
    """The options of a yacs node (see :func:`yacs_node`) as host keywords."""
    out: Dict[str, Any] = {}
    hints = _hints(cls)
    for f in option_fields(cls):
        value = node[host_name(f).upper()]
        if f.default is None and value == _yacs_value(None, hints[f.name]):
            value = None
        out[host_name(f)] = tuple(value) if isinstance(value, list) else value
    return out


# ------------------------------------------------------------------------------------------- keywords
def unknown_option_error(unknown: Iterable[str], known: List[str], where: str = "", *, what: str = "KArAt option",
                         listed: Optional[List[str]] = None) -> ValueError:
    """``Unknown KArAt option(s) [...]`` with a 'did you mean' for each close miss, and the ``listed`` names."""
    unknown = sorted(unknown)
    parts = [f"Unknown {what}(s) {unknown}" + (f" in {where}." if where else ".")]
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            parts.append(f"{name!r}: did you mean {close[0]!r}?")
    parts.append(f"Known KArAt options: {known if listed is None else listed}.")
    return ValueError(" ".join(parts))


def check_keywords(given: Iterable[str], host_keywords: Iterable[str], cls: type, where: str) -> None:
    """Keywords that neither the host nor the options take fail here, with the closest name of either, instead
    of as a ``TypeError`` inside the host's constructor."""
    known = list(host_names(cls))
    unknown = set(given) - set(host_keywords) - set(known)
    if unknown:
        raise unknown_option_error(unknown, known + sorted(host_keywords), where, what="keyword", listed=known)


def renamed_error(names: Iterable[str], cls: type, where: str = "") -> ValueError:
    """A field name that hosts know by another name, given where only the host name is accepted."""
    ren = renamed(cls)
    names = sorted(names)
    return ValueError(f"{where + ': ' if where else ''}{', '.join(repr(n) for n in names)} is ambiguous here: the "
                      f"host has an option of that name (a ViT's depth is its number of blocks; set those with the "
                      f"host's own num_layers / depths / depth). Give the KArAt option as "
                      f"{', '.join(repr(ren[n]) for n in names)}.")


def _as_field_names(values: Mapping[str, Any], cls: type) -> Dict[str, Any]:
    """A mapping keyed by field or host names (a recorded or given ``karat_cfg``) keyed by field names."""
    hosts = host_names(cls)
    out = {hosts.get(k, k): (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
    unknown = set(out) - {f.name for f in option_fields(cls)}
    if unknown:
        raise unknown_option_error(unknown, [f.name for f in option_fields(cls)], "karat_cfg")
    return out


def pop_options(cls: Type[T], kwargs: dict, defaults: Optional[Mapping[str, Any]] = None, *,
                refuse_renamed: bool = False, where: str = "") -> T:
    """Take the options out of a host's keyword dict (host names), leaving the host's own keywords.

    A ready ``karat_cfg`` (a config or a mapping) may be among them; explicit keywords win over it, it wins
    over ``defaults``. A field name hosts know by another name (``depth``) stays for the host, unless
    ``refuse_renamed`` (hosts without such a keyword): then it is an error naming the right keyword."""
    values: Dict[str, Any] = _as_field_names(defaults or {}, cls)
    base = kwargs.pop("karat_cfg", None)
    if dataclasses.is_dataclass(base):
        values.update(dataclasses.asdict(base))
    elif base is not None:
        values.update(_as_field_names(dict(base), cls))
    if refuse_renamed and set(renamed(cls)) & set(kwargs):
        raise renamed_error(set(renamed(cls)) & set(kwargs), cls, where)
    for host, name in host_names(cls).items():
        if host in kwargs:
            value = kwargs.pop(host)
            values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def from_kwargs(cls: Type[T], options: Mapping[str, Any], *, where: str = "") -> T:
    """A config from a mapping that holds options only (host names): anything else is an error."""
    kwargs = dict(options)
    if set(renamed(cls)) & set(kwargs):
        raise renamed_error(set(renamed(cls)) & set(kwargs), cls, where)
    cfg = pop_options(cls, kwargs, where=where)
    if kwargs:
        raise unknown_option_error(kwargs, list(host_names(cls)), where)
    return cfg


def to_kwargs(values: Mapping[str, Any], cls: type) -> Dict[str, Any]:
    """Field-named option values (``dataclasses.asdict`` of a config, recorded metadata) as host keywords."""
    return {host_name(f): values[f.name] for f in option_fields(cls) if f.name in values}
