"""supervisor.configfile: precedence file < flags < environment, and refusals that name the key."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from supervisor.config import ConfigError, ModelSpec, ServeConfig
from supervisor.configfile import load_config, option_types, parse_address

EXAMPLE = Path(__file__).resolve().parents[2] / "scripts" / "shmcache.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shmcache.toml"
    path.write_text(text)
    return path


def refused(path: Path | None, cli: dict[str, object] | None = None,
            env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, cli or {}, env or {})
    return str(info.value)


def test_defaults_without_any_source() -> None:
    config = load_config(None, {}, {})
    assert config.workers == ServeConfig().workers
    assert config.models == []


def test_file_sets_every_kind_of_value(tmp_path: Path) -> None:
    path = write(tmp_path, """
workers = 5
threads = 3
graceful_timeout = 12          # an integer is accepted for seconds
prepack = false
optimization = "basic"
socket = "run/s.sock"
metrics_address = "127.0.0.1:9464"
[models]
a = "models/a.onnx"
b = "/abs/b.onnx"
""")
    config = load_config(path, {}, {})
    assert (config.workers, config.threads, config.prepack) == (5, 3, False)
    assert config.graceful_timeout == 12.0 and isinstance(config.graceful_timeout, float)
    assert config.optimization == "basic"
    assert config.models == [ModelSpec("a", tmp_path / "models" / "a.onnx"),
                             ModelSpec("b", Path("/abs/b.onnx"))]
    assert config.socket == tmp_path / "run" / "s.sock"  # relative to the file, not the cwd


def test_flags_override_file_and_environment_overrides_both(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 5\nmax_inflight = 7\nlog_level = "debug"\n'
                           '[models]\na = "a.onnx"\n')
    config = load_config(path, {"workers": 6, "max_inflight": 8}, {"SHMCACHE_WORKERS": "9"})
    assert config.workers == 9  # env beats flag beats file
    assert config.max_inflight == 8  # flag beats file
    assert config.log_level == "debug"  # file beats default
    assert config.models == [ModelSpec("a", tmp_path / "a.onnx")]


def test_a_flag_overridden_by_the_environment_is_said(tmp_path: Path) -> None:
    heard: list[str] = []
    config = load_config(None, {"socket": "/flag.sock", "workers": 3},
                         {"SHMCACHE_SOCKET": "/env.sock", "SHMCACHE_WORKERS": "3"}, heard.append)
    assert config.socket == Path("/env.sock")
    assert heard == ["SHMCACHE_SOCKET overrides --socket (/env.sock instead of /flag.sock)"]


def test_models_from_flags_and_environment_replace_the_file_s(tmp_path: Path) -> None:
    path = write(tmp_path, '[models]\na = "a.onnx"\n')
    assert load_config(path, {"models": ["x=/x.onnx"]}, {}).models == [
        ModelSpec("x", Path("/x.onnx"))]
    env = {"SHMCACHE_MODELS": "a=/p/a.onnx, b=/p/b.onnx"}
    assert load_config(path, {"models": ["x=/x.onnx"]}, env).models == [
        ModelSpec("a", Path("/p/a.onnx")), ModelSpec("b", Path("/p/b.onnx"))]


def test_environment_values_are_parsed_by_type() -> None:
    env = {"SHMCACHE_LOCK_MEMORY": "yes", "SHMCACHE_PREPACK": "0", "SHMCACHE_SOCKET": "/s.sock",
           "SHMCACHE_GRACEFUL_TIMEOUT": "2.5", "SHMCACHE_THREADS": "",
           "SHMCACHE_UNRELATED_THING": "ignored", "OTHER": "x"}
    config = load_config(None, {"threads": 4}, env)
    assert config.lock_memory is True and config.prepack is False
    assert config.socket == Path("/s.sock") and config.graceful_timeout == 2.5
    assert config.threads is None  # empty means unset for an option whose default is None


@pytest.mark.parametrize("line, key, why", [
    ('workers = "four"', "workers", "expected an integer"),
    ("workers = true", "workers", "expected an integer"),
    ("prepack = 1", "prepack", "expected true or false"),
    ("graceful_timeout = \"30s\"", "graceful_timeout", "expected a number"),
    ("log_level = 3", "log_level", "expected a string"),
    ("workers = 0", "workers", "must be 1..256"),
    ("max_frame = 10", "max_frame", "must be 1 KiB"),
    ('optimization = "max"', "optimization", "must be one of"),
    ('log_level = "verbose"', "log_level", "must be debug"),
    ("keep = -1", "keep", "must be >= 0"),
    # out of range, NaN or infinite timeouts made loops (0: workers killed and respawned
    # forever; nan: a hung worker never detected; inf: a stop that never escalates)
    ("heartbeat_timeout = 0", "heartbeat_timeout", "must be 3 .. 3600 s"),
    ("heartbeat_timeout = nan", "heartbeat_timeout", "must be 3 .. 3600 s"),
    ("boot_timeout = -5", "boot_timeout", "must be 1 .. 86400 s"),
    ("graceful_timeout = inf", "graceful_timeout", "must be 0.1 .. 3600 s"),
    ("spin = nan", "spin", "must be 0 .. 0.1"),
    ("max_boot_failures = 0", "max_boot_failures", "must be >= 1"),
    ('metrics_address = "9464"', "metrics_address", "HOST:PORT"),
    ('models = ["a.onnx"]', "models", "expected a table"),
    ('[models]\na = 3', "models.a", "expected a path"),
    ('[models]\n"bad name!" = "x.onnx"', "models.bad name!", ""),
])
def test_every_file_error_names_its_key_and_the_file(tmp_path: Path, line: str, key: str,
                                                     why: str) -> None:
    path = write(tmp_path, line + "\n")
    message = refused(path)
    assert message.startswith(f"{path}: ")
    assert key in message and why in message


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    message = refused(write(tmp_path, "wokers = 4\n"))
    assert "unknown key 'wokers'" in message and "workers" in message  # lists the right ones


def test_syntax_error_reports_the_line(tmp_path: Path) -> None:
    message = refused(write(tmp_path, "workers = 4\nsocket = \n"))
    assert "TOML syntax error" in message and "line 2" in message


def test_missing_file_is_refused(tmp_path: Path) -> None:
    assert "cannot read config file" in refused(tmp_path / "nope.toml")


def test_errors_from_flags_and_environment_name_their_source() -> None:
    assert refused(None, {"workers": 0}).startswith("--workers: workers = 0: must be 1..256")
    assert refused(None, {"workers": "3"}).startswith("--workers: workers = '3': expected")
    assert refused(None, {}, {"SHMCACHE_WORKERS": "many"}).startswith(
        "SHMCACHE_WORKERS: workers = 'many': expected an integer")
    assert refused(None, {}, {"SHMCACHE_PREPACK": "maybe"}).startswith("SHMCACHE_PREPACK: prepack")
    assert refused(None, {}, {"SHMCACHE_MODELS": "a=/a.onnx,a=/b.onnx"}).startswith(
        "SHMCACHE_MODELS: models: name(s) given twice: a")
    assert refused(None, {}, {"SHMCACHE_MODELS": "a="}).startswith("SHMCACHE_MODELS: models")
    assert "unknown option" in refused(None, {"wrkrs": 1})


def test_validation_error_names_where_the_bad_value_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, "keep = -2\n")
    assert refused(path).startswith(f"{path}: keep = -2")
    assert refused(path, {}, {"SHMCACHE_KEEP": "-3"}).startswith("SHMCACHE_KEEP: keep = -3")


def test_file_knows_every_serveconfig_option() -> None:
    """A new ServeConfig field must not be unreachable from the file."""
    assert set(option_types()) == {f.name for f in dataclasses.fields(ServeConfig)}


def test_shipped_example_lists_every_option_commented_and_loads(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    assert tomllib.loads(text) == {}  # everything commented out
    for name in option_types():
        pattern = r"^# \[models\]$" if name == "models" else rf"^# {name} = "
        assert re.search(pattern, text, re.M), name
    uncommented = "\n".join(line[2:] if re.match(r"# (\w+ = |\[models\]|\w+ = \")", line) else line
                            for line in text.splitlines())
    config = load_config(write(tmp_path, uncommented), {}, {})
    assert config.workers == 2 and config.metrics_address == "127.0.0.1:9464"
    assert {m.name for m in config.models} == {"embedded", "ranker"}


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:0") == ("::1", 0)
    for bad in ("9464", ":9464", "host:", "host:70000", "host:http"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_a_relative_model_path_is_taken_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made absolute when given, so the manifest never reads it against the state directory."""
    monkeypatch.chdir(tmp_path)
    assert ModelSpec.parse("m=models/m.onnx") == ModelSpec("m", tmp_path / "models" / "m.onnx")
    assert ModelSpec.parse("m.onnx") == ModelSpec("m", tmp_path / "m.onnx")
