"""Settings declared once, as dataclass fields, and everything derived from them.

A setting is one :func:`setting` field of a dataclass: the field holds its type and default, its
``metadata`` the rest (help text, check, choices, parser, whether it enters the digest, whether
the workers get it), in the style of kronfluence's argument dataclasses. The command line, the
validation, the class docstring, the digest and the workers' settings are all read from the
fields, so that a new flag is one new field and none of them can drift apart (see
``docs/design.md``, section "Settings").
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import typing
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from distributed_influence.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Check:
    """A rule a setting's value must follow, and the words that name it when it does not.

    Attributes:
        rule: completes "``--flag`` ..., got ``value``", e.g. ``must be an integer >= 1``, so
            every refusal reads the same way and names the flag the user typed.
        ok: True when the value follows the rule.
    """

    rule: str
    ok: Callable[[Any], bool]

    def error(self, flag: str, value: Any) -> Optional[str]:
        """The one-line refusal of ``value``, or None when it is valid."""
        try:
            good = bool(self.ok(value))
        except (TypeError, ValueError):  # e.g. text where a number belongs: as wrong as a bad number
            good = False
        return None if good else f"{flag} {self.rule}, got {value!r}"


INTEGER_AT_LEAST_1 = Check("must be an integer >= 1", lambda v: isinstance(v, int) and v >= 1)
# Written as comparisons, not math.isfinite, so that a huge int stays valid as it always was.
FINITE_POSITIVE = Check("must be a finite number > 0", lambda v: v > 0 and v == v and v != float("inf"))
POSITIVE = Check("must be > 0", lambda v: v > 0)
NOT_NEGATIVE = Check("must be >= 0", lambda v: not v < 0)
BOOLEAN = Check("must be true or false", lambda v: isinstance(v, bool))
POSITIVE_INTEGERS = Check("must be positive integers", lambda v: len(v) > 0 and all(int(s) >= 1 for s in v))
NAME = Check("must be a non-empty feature name", lambda v: isinstance(v, str) and bool(v.strip()))


def one_of(choices: Sequence[str]) -> Check:
    """The check of a setting with a fixed set of values (the flag's ``choices``)."""
    return Check(f"must be one of {', '.join(choices)}", lambda v: v in choices)


def setting(default: Any = dataclasses.MISSING, *, help: str, check: Optional[Check] = None,
            choices: Optional[Sequence[str]] = None, parse: Optional[Callable[[str], Any]] = None,
            digest: Any = True, worker: bool = False, source_option: bool = False) -> Any:
    """A dataclass field that is a setting of the command line.

    Args:
        default: the value when the flag is not given; none makes the flag required.
        help: the flag's ``--help`` text, which is also the field's entry in the class docstring.
        check: the rule the value must follow; None for free text. A value of None is always
            accepted when the field's type is ``Optional``: it means "derive it at run time".
        choices: the allowed values; they become the flag's choices and, without ``check``, the
            check.
        parse: turns the flag's text into the value; default: the field's type (text stays text).
        digest: False for a setting that cannot change the numbers of a result (where it is
            written, where it runs, how fast): a run that changes only such settings resumes the
            work of the first. ``"unless default"`` for a setting added after work directories
            existed: it enters the digest only when set, so the digests of runs that leave it
            alone stay what they were.
        worker: True for a setting the workers need: it becomes a field of ``WorkerSettings``.
        source_option: True for an option of ``open_source`` (how the rows of a source are read).

    Returns:
        The :func:`dataclasses.field`, to assign to a class attribute.
    """
    if check is None and choices is not None:
        check = one_of(choices)
    metadata = {"help": help, "check": check, "choices": None if choices is None else tuple(choices),
                "parse": parse, "digest": digest, "worker": worker, "source_option": source_option}
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The command-line flag of a field: ``batch_size`` is ``--batch-size``."""
    return "--" + name.replace("_", "-")


#: The ``digest`` mark of a setting hashed only when it differs from its default.
UNLESS_DEFAULT = "unless default"


def select(cls: type, **marks: Any) -> List[dataclasses.Field]:
    """The fields of ``cls`` whose metadata has every given mark, e.g. ``select(cls, worker=True)``."""
    return [f for f in dataclasses.fields(cls) if all(f.metadata.get(k) == v for k, v in marks.items())]


def names(cls: type, **marks: bool) -> tuple:
    """The names of :func:`select`'s fields, in declaration order."""
    return tuple(f.name for f in select(cls, **marks))


def _split_optional(hint: Any) -> tuple:
    """(the type without ``Optional``, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return hint, False


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def _check(f: dataclasses.Field, hint: Any, value: Any) -> None:
    rule = f.metadata.get("check")
    if rule is None or (value is None and _split_optional(hint)[1]):
        return
    message = rule.error(flag(f.name), value)
    if message is not None:
        raise ConfigError(message)


def check(cls: type, name: str, value: Any) -> None:
    """Applies the check of setting ``name`` of ``cls`` to ``value`` (for a command that shares it).

    Raises:
        ConfigError: the value breaks the rule; one line naming the flag and the value.
    """
    _check(_field(cls, name), typing.get_type_hints(cls)[name], value)


def check_all(obj: Any) -> None:
    """Checks every setting of a dataclass instance, in declaration order (the first bad one is named).

    Raises:
        ConfigError: a value breaks its field's rule.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        _check(f, hints[f.name], getattr(obj, f.name))


def _argument(f: dataclasses.Field, hint: Any) -> Dict[str, Any]:
    """The keyword arguments of ``add_argument`` for one field."""
    base, _ = _split_optional(hint)
    kwargs: Dict[str, Any] = {"help": f.metadata["help"].replace("%", "%%")}  # argparse formats help with %
    if base is bool:
        if f.default is not False:
            raise TypeError(f"{f.name}: a flag without a value can only switch on a setting that is off")
        kwargs["action"] = "store_true"
        return kwargs
    if f.default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = f.default
    parse = f.metadata.get("parse") or (None if base is str else base)
    if parse is not None:
        kwargs["type"] = parse
    if f.metadata.get("choices") is not None:
        kwargs["choices"] = list(f.metadata["choices"])
    return kwargs


def add_arguments(parser: argparse.ArgumentParser, cls: type, only: Optional[Iterable[str]] = None,
                  overrides: Optional[Dict[str, dict]] = None) -> None:
    """Adds a flag per setting of ``cls`` to ``parser``: name, type, default, choices and help.

    Args:
        parser: the command's parser.
        cls: the settings dataclass.
        only: the names of the settings to add, for a command that shares a few (default: all).
        overrides: ``add_argument`` keywords per setting name, for a command that gives a shared
            setting another default or meaning (``explain``'s ``--k`` defaults to the audit's).
    """
    hints = typing.get_type_hints(cls)
    wanted = None if only is None else set(only)
    for f in dataclasses.fields(cls):
        if wanted is not None and f.name not in wanted:
            continue
        kwargs = _argument(f, hints[f.name])
        kwargs.update((overrides or {}).get(f.name, {}))
        parser.add_argument(flag(f.name), **kwargs)


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of ``cls`` from the parsed flags that :func:`add_arguments` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def documented(cls: type) -> type:
    """Class decorator: appends an ``Attributes:`` entry per field to the docstring, from its help.

    The entries are written from the same text as ``--help``, so the API docs and the command
    line cannot disagree.
    """
    lines = ["", "    Attributes:"]
    for f in dataclasses.fields(cls):
        text = f"{f.name}: {f.metadata['help']}"
        if not f.metadata.get("digest", True):
            text += " (not in the digest)"
        elif f.metadata.get("digest") == UNLESS_DEFAULT:
            text += " (in the digest when set)"
        lines += textwrap.wrap(text, width=100, initial_indent=" " * 8, subsequent_indent=" " * 12,
                               break_on_hyphens=False)
    cls.__doc__ = (cls.__doc__ or cls.__name__).rstrip() + "\n" + "\n".join(lines) + "\n"
    return cls


def subset(cls: type, name: str, module: str, doc: str, **marks: bool) -> type:
    """A frozen, keyword-only dataclass of the fields of ``cls`` that have ``marks``.

    The fields keep their types, defaults and metadata, so a class built from them (the workers'
    settings) gains a field whenever ``cls`` gains one with the mark.

    Args:
        cls: the settings dataclass.
        name: the new class's name; bind it to that name in ``module``, so that pickle (and Ray)
            find the class by reference.
        module: the ``__name__`` of the module that binds it.
        doc: the new class's docstring.
        **marks: which fields, as for :func:`select`.
    """
    hints = typing.get_type_hints(cls)
    specs = [(f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
             for f in select(cls, **marks)]
    return dataclasses.make_dataclass(name, specs, frozen=True, kw_only=True,
                                      namespace={"__module__": module, "__doc__": doc})


def values(obj: Any, cls: type) -> Dict[str, Any]:
    """The values in ``obj`` of the fields of dataclass ``cls`` (e.g. a :func:`subset` of its class)."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}
