"""Build the daemon's ``ServeConfig`` from a TOML file, command-line flags and the environment.

Precedence, lowest to highest (the usual order for a daemon under systemd, where the unit's
``Environment=`` is the operator's last word and the file is the packaged default)::

    ServeConfig defaults  <  TOML file  <  command-line flags given explicitly  <  SHMCACHE_* env

The file has one top-level key per ``ServeConfig`` field, plus a ``[models]`` table that maps a
model name to its ONNX file (chosen over an array of tables because a name can then appear only
once — TOML itself refuses a duplicate key — and the file reads like the ``--model NAME=PATH``
flag)::

    workers = 4
    socket = "/run/shmcache/shmcache.sock"

    [models]
    embedded = "models/embedded.onnx"     # relative: against this file's directory

Relative paths in the file (models, ``socket``, ``state_dir``) resolve against the file's own
directory, so a config file and its models can move together; paths from flags and the
environment resolve against the working directory, as any command-line path does.

Environment variables are ``SHMCACHE_<KEY>`` in upper case (``SHMCACHE_WORKERS=4``,
``SHMCACHE_MODELS="a=/p/a.onnx,b=/p/b.onnx"``, booleans as 1/0, true/false, yes/no, on/off).
``SHMCACHE_*`` names that are not options are ignored, because the client side uses the same
prefix (``SHMCACHE_SOCKET`` is also how ``shmcache status`` finds the daemon). An empty value
means "unset" for the options whose default is "none" (``threads``, ``group``,
``metrics_address``).

Every refusal is a ``ConfigError`` whose message starts with where the value came from (the
file, ``--flag`` or ``SHMCACHE_VAR``) and names the key: STYLE.md principle 8, validate at the
edge so the supervisor trusts the object.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path

from shmcache.errors import ShmcacheError
from shmcache.registry import check_model_name
from supervisor.config import ConfigError, ModelSpec, ServeConfig

ENV_PREFIX = "SHMCACHE_"
MODELS = "models"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

Layer = dict[str, tuple[object, str]]  # key -> (value, where it came from)


def load_config(path: Path | None, cli: Mapping[str, object], env: Mapping[str, str],
                warn: Callable[[str], None] | None = None) -> ServeConfig:
    """The validated configuration; ``cli`` holds only the flags the user gave (field names as
    keys, ``models`` as a list of ``NAME=PATH`` strings or ``ModelSpec``), ``env`` is usually
    ``os.environ``. ``warn`` hears of every flag a variable overrides with another value:
    SHMCACHE_SOCKET, exported for clients, once made ``serve --socket X`` bind elsewhere
    without a word."""
    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    flags, variables = from_cli(cli), from_env(env)
    for key in flags.keys() & variables.keys():
        if warn is not None and flags[key][0] != variables[key][0]:
            warn(f"{variables[key][1]} overrides {flags[key][1]} "
                 f"({shown(variables[key][0])} instead of {shown(flags[key][0])})")
    layers = [read_file(path) if path is not None else {}, flags, variables]
    for layer in layers:
        for key, (value, where) in layer.items():
            values[key] = value
            origin[key] = where
    config = ServeConfig(**values)  # type: ignore[arg-type]
    try:
        return config.validate()
    except ConfigError as exc:
        key = str(exc).split(" ", 1)[0].rstrip(":")
        where = origin.get(key, "default")
        raise ConfigError(f"{where}: {exc}") from None


def shown(value: object) -> str:
    return str(value) if isinstance(value, Path) else repr(value)


# --- the option table --------------------------------------------------------------------------


def option_types() -> dict[str, object]:
    """Field name -> type annotation of every ServeConfig option, ``models`` included."""
    hints = typing.get_type_hints(ServeConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(ServeConfig)}


def base_type(annotation: object) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) of ``int | None`` and friends."""
    args = typing.get_args(annotation)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return annotation, False  # type: ignore[return-value]


def check_value(key: str, value: object, where: str, base: Path | None) -> object:
    """A TOML or flag value of ``key`` with its declared type, or ConfigError naming the key."""
    kind, _ = base_type(option_types()[key])
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value  # type: ignore[arg-type]
    elif kind is Path:
        ok = isinstance(value, (str, os.PathLike)) and os.fspath(value) != ""
        if ok:
            value = resolve(Path(value), base)  # type: ignore[arg-type]
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r}: expected {type_word(kind)}")
    if key == "metrics_address":
        parse_address(str(value), f"{where}: {key}")
    return value


def type_word(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number of seconds",
            Path: "a path (string)", str: "a string"}.get(kind, kind.__name__)


def resolve(path: Path, base: Path | None) -> Path:
    path = path.expanduser()
    return path if base is None or path.is_absolute() else base / path


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); the metrics endpoint's address syntax."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what} = {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9464")
    return host, int(port)


# --- the three sources -----------------------------------------------------------------------


def read_file(path: Path) -> Layer:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None  # says line and column
    known = option_types()
    base = path.resolve().parent
    out: Layer = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(known)}")
        if key == MODELS:
            out[key] = (models_from_table(value, path, base), str(path))
        else:
            out[key] = (check_value(key, value, str(path), base), str(path))
    return out


def models_from_table(table: object, where: Path, base: Path) -> list[ModelSpec]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: models = {table!r}: expected a table [models] "
                          'of NAME = "PATH" lines')
    specs = []
    for name, value in table.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: models.{name} = {value!r}: expected a path (string)")
        try:
            check_model_name(name)
        except ShmcacheError as exc:
            raise ConfigError(f"{where}: models.{name}: {exc}") from None
        specs.append(ModelSpec(name, resolve(Path(value), base)))
    return specs


def from_cli(cli: Mapping[str, object]) -> Layer:
    known = option_types()
    out: Layer = {}
    for key, value in cli.items():
        flag = "--model" if key == MODELS else "--" + key.replace("_", "-")
        if key not in known:
            raise ConfigError(f"{flag}: unknown option {key!r}")
        if key == MODELS:
            out[key] = (models_from_strings(value, flag), flag)
        elif value is None and base_type(known[key])[1]:
            out[key] = (None, flag)
        else:
            out[key] = (check_value(key, value, flag, None), flag)
    return out


def models_from_strings(items: object, where: str) -> list[ModelSpec]:
    if isinstance(items, str) or not isinstance(items, (list, tuple)):
        raise ConfigError(f"{where}: models = {items!r}: expected a list of NAME=PATH")
    return [item if isinstance(item, ModelSpec) else parse_model(str(item), where)
            for item in items]


def parse_model(text: str, where: str) -> ModelSpec:
    """``NAME=PATH`` or a bare ``PATH`` (named by its stem), as ``--model`` takes it."""
    try:
        return ModelSpec.parse(text)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def from_env(env: Mapping[str, str]) -> Layer:
    known = option_types()
    out: Layer = {}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        key = var[len(ENV_PREFIX):].lower()
        if key not in known:
            continue  # another SHMCACHE_* variable (see the module docstring)
        if key == MODELS:
            items = [t.strip() for t in text.split(",") if t.strip()]
            if not items:
                raise ConfigError(f"{var}: models = {text!r}: expected NAME=PATH[,NAME=PATH...]")
            out[key] = (models_from_strings(items, var), var)
            continue
        out[key] = (env_value(key, text, var), var)
    return out


def env_value(key: str, text: str, var: str) -> object:
    kind, optional = base_type(option_types()[key])
    if optional and text.strip() == "":
        return None
    if kind is Path and text.strip() == "":
        raise ConfigError(f"{var}: {key} = {text!r}: expected {type_word(kind)}")
    parsers: dict[type, Callable[[str], object]] = {int: int, float: float, Path: Path, str: str}
    try:
        if kind is bool:
            word = text.strip().lower()
            if word not in TRUE_WORDS | FALSE_WORDS:
                raise ValueError(text)
            value: object = word in TRUE_WORDS
        else:
            value = parsers[kind](text.strip())
    except ValueError:
        raise ConfigError(f"{var}: {key} = {text!r}: expected {type_word(kind)}") from None
    return check_value(key, value, var, None)
