"""Config dataclasses are the one place a training setting, its default and its help live; the
commands are generated from them, so `python -m train.finetune --help` lists exactly the fields
of `FinetuneConfig` (nested configs, such as its `AugmentConfig`, flattened into the same list).

    @dataclass
    class Config:
        epochs: int = setting(30, "Passes over the data.")

    main = command(Config, run)          # run(Config(...)); a user mistake is one line and exit 2
"""

from __future__ import annotations

import copy
import inspect
import sys
import typing
from collections.abc import Callable
from dataclasses import field, fields, is_dataclass

import typer

from edgetag.checkpoint import CheckpointError
from edgetag.runtime import BackendError


def setting(default, help: str, required: bool = False):
    """A config field with its command-line help (`required`: the command line must give it);
    list and dataclass defaults are copied per instance."""
    metadata = {"help": help, "required": required}
    if isinstance(default, list) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def choose(name: str, value, allowed) -> None:
    """Refuse a setting outside its choices, naming the setting (configs call it on construction,
    so a command fails before it reads any data)."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def bounded(config, *checks: tuple[str, bool, str]) -> None:
    """Refuse the first (field, holds, bound) whose check fails, naming its option and value:
    `--time-ratio: 1.5 is not in [0, 1)` (NaN fails every comparison, so it is refused too)."""
    for name, holds, bound in checks:
        if not holds:
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(config, name):g} is not {bound}")


def _options(cls, defaults) -> list[inspect.Parameter]:
    """The command-line parameter of every leaf field, nested configs flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        value = getattr(defaults, f.name)
        if is_dataclass(value):
            out += _options(type(value), value)
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with setting()")
        option = typer.Option(... if f.metadata.get("required") else value, f"--{f.name.replace('_', '-')}", help=f.metadata["help"])
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[f.name]))
    names = [p.name for p in out]
    clashes = {n for n in names if names.count(n) > 1}
    if clashes:
        raise TypeError(f"{cls.__name__}: options {', '.join(sorted(clashes))} appear twice once nested configs are flattened")
    return out


def _build(cls, defaults, values: dict):
    """The config from the flat option values, nested configs rebuilt in place."""
    kwargs = {}
    for f in fields(cls):
        nested = getattr(defaults, f.name)
        kwargs[f.name] = _build(type(nested), nested, values) if is_dataclass(nested) else values[f.name]
    return cls(**kwargs)


def command(cls, run: Callable, defaults=None, errors: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, CheckpointError, BackendError),
            **extra: tuple[type, object]) -> Callable:
    """A function for `typer.run` whose options are `cls`'s fields (defaults from `defaults`, an
    instance, else the class's) and then `extra` ones (name=(type, typer.Option(...)), passed to
    `run` by name); it builds the config and calls `run(config, **extra)`, `run`'s docstring as
    its help. `errors` raised by `run` end as one line on stderr and exit code 2."""
    defaults = defaults if defaults is not None else cls()
    options = _options(cls, defaults)
    module = sys.modules[run.__module__]  # `python -m train.finetune` runs it as __main__
    program = module.__spec__.name if getattr(module, "__spec__", None) else run.__module__

    def main(**values):
        extras = {name: values.pop(name) for name in extra}
        try:
            run(_build(cls, defaults, values), **extras)
        except errors as e:
            print(f"{program}: error: {e}", file=sys.stderr)
            raise typer.Exit(2) from e

    parameters = options + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)
                            for name, (annotation, option) in extra.items()]
    main.__signature__ = inspect.Signature(parameters)
    main.__annotations__ = {p.name: p.annotation for p in parameters}
    main.__doc__ = inspect.getdoc(run)
    return main
