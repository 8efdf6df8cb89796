"""Settings: flag > environment > config file > default, conversions, and the core's part."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from embedd_server.compute.settings import EngineSettings
from embedd_server.settings import (
    Settings,
    SettingsError,
    add_arguments,
    child_environment,
    load_settings,
    settings_from_argv,
)


def _config(tmp_path: Path, text: str, name: str = "embedd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _parse(*argv: str) -> argparse.Namespace:
    """The flags as `embedd serve` parses them."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


# --- precedence ----------------------------------------------------------------------------------


def test_nothing_given_is_the_defaults() -> None:
    assert load_settings(None, environ={}) == Settings()
    assert load_settings(_parse(), environ={}) == Settings()


def test_each_source_overrides_the_ones_below_it(tmp_path: Path) -> None:
    config = _config(tmp_path, "workers = 3\nbatch_tokens = 64\nkeep_alive = '1m'\n")
    environ = {"EMBEDD_CONFIG": str(config), "EMBEDD_WORKERS": "4", "EMBEDD_BATCH_TOKENS": "32"}
    settings = load_settings(_parse("--workers", "5"), environ=environ)
    assert settings.workers == 5  # flag > environment
    assert settings.batch_tokens == 32  # environment > config file
    assert settings.keep_alive == "1m"  # config file > default
    assert settings.batch_sequences == Settings().batch_sequences  # default


def test_a_flag_left_at_none_does_not_hide_the_environment_or_the_default() -> None:
    # Regression: a parser whose flag defaults to None (not argparse.SUPPRESS) gave
    # models_dir=None, which overrode EMBEDD_MODELS_DIR.
    from_env = load_settings(argparse.Namespace(models_dir=None), {"EMBEDD_MODELS_DIR": "/m"})
    assert from_env.models_dir == Path("/m")
    assert load_settings(argparse.Namespace(models_dir=None), environ={}) == Settings()
    assert load_settings(argparse.Namespace(workers=None, log_json=None), environ={}) == Settings()


def test_a_flag_left_at_none_does_not_hide_the_config_file(tmp_path: Path) -> None:
    config = _config(tmp_path, "models_dir = '/from-config'\n")
    settings = load_settings(argparse.Namespace(models_dir=None), environ={}, config_path=config)
    assert settings.models_dir == Path("/from-config")


def test_false_and_zero_flags_are_given_values_not_absent_ones() -> None:
    environ = {"EMBEDD_WORKER_PROCESSES": "true", "EMBEDD_METRICS_PORT": "9999"}
    args = argparse.Namespace(worker_processes=False, metrics_port=0)
    settings = load_settings(args, environ)
    assert settings.worker_processes is False and settings.metrics_port == 0


def test_the_config_file_is_found_by_flag_then_argument_then_environment(tmp_path: Path) -> None:
    by_flag = _config(tmp_path, "workers = 3\n", "flag.toml")
    by_argument = _config(tmp_path, "workers = 4\n", "argument.toml")
    by_env = _config(tmp_path, "workers = 5\n", "env.toml")
    environ = {"EMBEDD_CONFIG": str(by_env)}
    assert load_settings(_parse("--config", str(by_flag)), environ, by_argument).workers == 3
    assert load_settings(_parse(), environ, by_argument).workers == 4
    assert load_settings(_parse(), environ).workers == 5


def test_settings_from_argv_reads_flags_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDD_WORKERS", "7")
    settings = settings_from_argv(["--workers", "3", "--no-worker-processes", "--log-json"])
    assert (settings.workers, settings.worker_processes, settings.log_json) == (3, False, True)
    assert settings_from_argv([]).workers == Settings().workers


# --- conversions and errors ----------------------------------------------------------------------


def test_values_are_converted_to_each_fields_type(tmp_path: Path) -> None:
    environ = {
        "EMBEDD_WORKER_TIMEOUT_S": "2.5",
        "EMBEDD_LOG_JSON": "yes",
        "EMBEDD_WORKER_PROCESSES": "off",
        "EMBEDD_MODELS_DIR": "~/models",
    }
    settings = load_settings(None, environ)
    assert settings.worker_timeout_s == 2.5
    assert settings.log_json is True and settings.worker_processes is False
    assert settings.models_dir == Path("~/models").expanduser()


def test_worker_processes_is_auto_by_default_and_picks_per_engine(tmp_path: Path) -> None:
    """auto: ONNX Runtime's workers in threads (one shared session), llama.cpp's in
    processes; true or false put every engine's workers in processes or in threads."""
    assert Settings().worker_processes is None
    auto = Settings().engine_settings()
    assert not auto.processes_for("onnxruntime") and not auto.processes_for("onnxruntime-int8")
    assert auto.processes_for("llama.cpp")
    for given, expected in (("true", True), ("false", False), ("auto", None)):
        settings = load_settings(None, {"EMBEDD_WORKER_PROCESSES": given})
        assert settings.worker_processes is expected
        assert child_environment(settings)["EMBEDD_WORKER_PROCESSES"] == given
    config = _config(tmp_path, "worker_processes = 'auto'\n")
    assert load_settings(None, {}, config).worker_processes is None
    assert settings_from_argv(["--worker-processes"]).worker_processes is True
    for engine in ("onnxruntime", "llama.cpp"):
        assert EngineSettings(worker_processes=True).processes_for(engine)
        assert not EngineSettings(worker_processes=False).processes_for(engine)
    with pytest.raises(SettingsError, match="worker_processes"):
        load_settings(None, {"EMBEDD_WORKER_PROCESSES": "sometimes"})


def test_workers_and_spinning_are_auto_by_default_and_pick_per_engine() -> None:
    """auto: one worker per core for ONNX Runtime in threads (a single-threaded session for
    busy workers, a spinning one of every core for a call alone), or per ONNX Runtime thread
    where those are set; two (one per core) for llama.cpp and ONNX Runtime's processes, whose
    threads don't spin; a number or a boolean given is taken as it is."""
    auto = Settings().engine_settings()
    assert (auto.workers, auto.onnx_spinning) == (0, None)
    cores = len(os.sched_getaffinity(0))
    for engine in ("onnxruntime", "onnxruntime-int8"):
        assert (auto.workers_for(engine), auto.onnx_spins(engine)) == (cores, True)
    assert EngineSettings(onnx_threads=3).workers_for("onnxruntime") == 3
    assert EngineSettings(onnx_threads=3).onnx_cores() == 3
    assert auto.workers_for("llama.cpp") == 2
    processes = EngineSettings(worker_processes=True)
    assert (processes.workers_for("onnxruntime"), processes.onnx_spins("onnxruntime")) == (2, False)
    two = EngineSettings(workers=2)
    assert (two.workers_for("onnxruntime"), two.onnx_spins("onnxruntime")) == (2, True)
    assert EngineSettings(workers=3).workers_for("llama.cpp") == 3
    assert EngineSettings(workers=1, onnx_spinning=False).onnx_spins("onnxruntime") is False
    assert settings_from_argv(["--no-onnx-spinning"]).onnx_spinning is False
    assert load_settings(None, {"EMBEDD_ONNX_SPINNING": "auto"}).onnx_spinning is None


def test_aliases_come_as_pairs_or_as_a_config_table(tmp_path: Path) -> None:
    config = _config(tmp_path, "[model_aliases]\nsmall = 'fake'\nbig = 'other'\n")
    from_table = load_settings(None, environ={}, config_path=config)
    assert from_table.aliases == {"small": "fake", "big": "other"}
    from_env = load_settings(None, {"EMBEDD_MODEL_ALIASES": " small = fake , big=other "})
    assert from_env.aliases == {"small": "fake", "big": "other"}


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"EMBEDD_WORKERS": "two"}, ["workers", "two"]),
        ({"EMBEDD_LOG_JSON": "maybe"}, ["log_json", "not a boolean"]),
        ({"EMBEDD_WORKERS": "-1"}, ["workers must not be negative"]),
        ({"EMBEDD_GRPC_PORT": "70000"}, ["grpc_port must be 0..65535"]),
        ({"EMBEDD_KEEP_ALIVE": "soon"}, ["keep_alive"]),
        ({"EMBEDD_MODEL_ALIASES": "small"}, ["'small' is not alias=model"]),
        ({"EMBEDD_LOG_LEVEL": "loud"}, ["log_level must be one of"]),
    ],
)
def test_bad_values_are_a_settings_error_naming_the_setting(
    environ: dict[str, str], words: list[str]
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(None, environ)
    for word in words:
        assert word in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError, match=r"workers must not be.*batch_tokens must be"):
        Settings(workers=-1, batch_tokens=0)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("workerz = 3\n", ["unknown settings workerz"]),
        ("workers = \n", ["not valid TOML"]),
    ],
)
def test_a_bad_config_file_is_a_settings_error(tmp_path: Path, text: str, words: list[str]) -> None:
    config = _config(tmp_path, text)
    with pytest.raises(SettingsError) as caught:
        load_settings(None, environ={}, config_path=config)
    assert str(config) in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_a_missing_config_file_is_a_settings_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(None, {"EMBEDD_CONFIG": str(missing)})


def test_api_keys_stay_out_of_repr() -> None:
    assert "sk-secret" not in repr(Settings(api_keys="sk-secret"))


# --- the core's part -----------------------------------------------------------------------------

# A value other than the default for every engine-level field.
ENGINE_VALUES: dict[str, Any] = {
    "models_dir": Path("/models"),
    "builtin_models_dir": "/opt/embedd/models",
    "default_model": "fake",
    "keep_alive": "1h",
    "memory_budget_mb": 512,
    "workers": 3,
    "worker_processes": False,
    "threads_per_worker": 2,
    "batch_tokens": 64,
    "batch_sequences": 8,
    "n_gpu_layers": -1,
    "max_inputs_per_request": 10,
    "max_queued_texts": 100,
    "max_queued_tokens": 1000,
    "worker_timeout_s": 5.0,
    "log_json": True,
    "engine": "llama.cpp",
    "onnx_batch_tokens": 512,
    "onnx_threads": 3,
    "onnx_spinning": True,
    "int8": True,
    "cache_mb": 16,
    "bulk_share": 4,
    "bulk_batch_tokens": 32,
    "bulk_free_workers": 1,
    "bulk_above_inputs": 10,
    "bulk_above_tokens": 500,
}
TRANSPORT_ONLY = {
    "grpc_host",
    "grpc_port",
    "http_port",
    "envoy_admin_socket",
    "envoy_header_timeout_s",
    "envoy_idle_timeout_s",
    "envoy_max_connections",
    "envoy_max_streams_per_connection",
    "xff_trusted_hops",
    "proxy_secret",
    "api_keys",
    "api_keys_file",
    "rate_limit_per_s",
    "rate_limit_burst",
    "metrics_port",
    "max_message_mb",
    "max_request_bytes",
    "stream_window",
    "shutdown_grace_s",
    "replicas",
}


def test_engine_settings_carry_every_engine_level_field() -> None:
    engine_fields = {f.name for f in fields(EngineSettings)}
    assert engine_fields == {*ENGINE_VALUES, "aliases"}, "a new engine field needs a value here"
    settings = Settings(**ENGINE_VALUES, model_aliases="small=fake")
    engine = settings.engine_settings()
    assert {name: getattr(engine, name) for name in ENGINE_VALUES} == ENGINE_VALUES
    assert engine.aliases == {"small": "fake"}


def test_engine_settings_have_no_ports_and_no_keys() -> None:
    engine_fields = {f.name for f in fields(EngineSettings)}
    assert not engine_fields & TRANSPORT_ONLY
    assert {f.name for f in fields(Settings)} >= TRANSPORT_ONLY  # the names are real
    engine = Settings(api_keys="sk-secret", grpc_port=1234).engine_settings()
    assert "sk-secret" not in repr(engine) and "1234" not in repr(engine)


def test_engine_settings_defaults_match_the_settings_defaults() -> None:
    # The core may be built without Settings (tests, tools): its defaults must not drift.
    assert Settings().engine_settings() == EngineSettings()
