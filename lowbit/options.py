"""Typed options: frozen dataclasses whose fields state, once, their default, their command-line flag, the
``lowbit.compile`` keyword that sets them and their help; each class checks its ranges in ``__post_init__``.
The CLI derives its flags from the classes (``add_flags``), the library maps keywords onto them
(``from_keywords``). No torch here: the CLI builds its parser where only the torch-free runtime is installed."""

from __future__ import annotations

from dataclasses import field, fields

from lowbit.errors import LowbitError


def option(default, help: str, flag: str, keyword: str, negate: bool = False, metavar: str = "VALUE"):
    """A field: ``flag`` on the command line (``negate``: a switch that sets the opposite of a true default),
    ``keyword`` in ``lowbit.compile``."""
    return field(default=default, metadata={"help": help, "flag": flag, "keyword": keyword, "negate": negate,
                                            "metavar": metavar})


def add_flags(group, cls) -> None:
    """One argparse flag per field of ``cls``; an absent flag stays None (the class's default applies). A value
    of the wrong type is one LowbitError line, like every other user error; the class checks the range."""
    for f in fields(cls):
        m = f.metadata
        if m["negate"]:
            group.add_argument(m["flag"], dest=m["keyword"], action="store_const", const=not f.default, default=None,
                               help=m["help"])
        else:
            group.add_argument(m["flag"], dest=m["keyword"], action=_typed(type(f.default)), default=None,
                               metavar=m["metavar"], help=f"{m['help']} (default {f.default})")


def _typed(kind):
    import argparse

    class Typed(argparse.Action):
        def __call__(self, parser, namespace, text, option_string=None):
            try:
                setattr(namespace, self.dest, kind(text))
            except ValueError:
                raise LowbitError(f"{option_string} must be {'an integer' if kind is int else f'a {kind.__name__}'}, "
                                  f"got '{text}'") from None
    return Typed


def keywords(cls) -> dict:
    """{``lowbit.compile`` keyword: field name} of ``cls``."""
    return {f.metadata["keyword"]: f.name for f in fields(cls)}


def flag(cls, keyword: str) -> str:
    return next(f.metadata["flag"] for f in fields(cls) if f.metadata["keyword"] == keyword)


def from_keywords(cls, given: dict):
    """``cls`` from ``lowbit.compile`` keywords (None: the default); a keyword it lacks raises KeyError."""
    names = keywords(cls)
    unknown = [k for k in given if k not in names]
    if unknown:
        raise KeyError(unknown[0])
    return cls(**{names[k]: v for k, v in given.items() if v is not None})


def check_choice(value, choices, flag_name: str, meaning: str = "") -> None:
    """One line naming the flag, the value and the valid ones (and what they mean) when ``value`` is not one."""
    if value not in choices:
        why = f" ({meaning})" if meaning else ""
        raise LowbitError(f"{flag_name} {value}: valid {', '.join(map(str, choices))}{why}")
