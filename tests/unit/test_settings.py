"""Settings: seed 000's names and defaults, chatprocessor's own, validation and the CLI's exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import chatprocessor.cli
from chatprocessor.core.errors import ConfigError
from chatprocessor.settings import Settings

SECRET = "Zq9-very-secret-pw"

SEED_DEFAULTS = {
    "rabbitmq_host": "localhost",
    "rabbitmq_port": 5672,
    "rabbitmq_username": "guest",
    "rabbitmq_queue_input": "UserPromptReceived",
    "rabbitmq_queue_output": "BotResponseCreated",
    "ollama_base_url": "http://localhost:11434",
    "ollama_model": "llama2",
    "ollama_timeout": 300,
    "log_level": "INFO",
    "prefetch_count": 1,
}

NEW_DEFAULTS = {
    "transport": "local",
    "providers": ["embedded"],
    "ops_port": 8001,
    "log_file": "chatprocessor.log",
    "log_format": "text",
    "max_message_bytes": 1_048_576,
    "graceful_timeout": 30,
    "max_retries": 5,
    "retry_backoff_base": 1.0,
    "retry_backoff_cap": 300.0,
    "job_timeout": 600.0,
    "rabbitmq_consumer_timeout": 1800.0,
    "idempotency_ttl": 86_400,
    "redis_url": None,
    "openai_base_url": "https://api.openai.com/v1",
    "openai_model": "gpt-4o-mini",
    "breaker_fail_max": 5,
    "breaker_reset_timeout": 30.0,
    # Seed 001's names and defaults.
    "bootstrap_server": "localhost:9092",
    "consumer_group": "models-processor-group",
    "local_model_kafka_topic": "eater-send-photo",
    "expected_user_email": "",
}


@pytest.mark.parametrize(("field", "expected"), sorted(SEED_DEFAULTS.items()))
def test_seed_defaults(field: str, expected: object) -> None:
    settings = Settings.load()
    assert getattr(settings, field) == expected


def test_seed_password_default_is_guest_and_secret() -> None:
    settings = Settings.load()
    assert settings.rabbitmq_password.get_secret_value() == "guest"
    assert "guest" not in repr(settings.rabbitmq_password)


@pytest.mark.parametrize(("field", "expected"), sorted(NEW_DEFAULTS.items()))
def test_new_defaults(field: str, expected: object) -> None:
    settings = Settings.load()
    assert getattr(settings, field) == expected


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("RABBITMQ_HOST", "broker.internal", "rabbitmq_host", "broker.internal"),
        ("RABBITMQ_PORT", "5673", "rabbitmq_port", 5673),
        ("RABBITMQ_USERNAME", "bot", "rabbitmq_username", "bot"),
        ("RABBITMQ_QUEUE_INPUT", "In", "rabbitmq_queue_input", "In"),
        ("RABBITMQ_QUEUE_OUTPUT", "Out", "rabbitmq_queue_output", "Out"),
        ("OLLAMA_BASE_URL", "http://gpu:11434", "ollama_base_url", "http://gpu:11434"),
        ("OLLAMA_MODEL", "mistral", "ollama_model", "mistral"),
        ("OLLAMA_TIMEOUT", "12.5", "ollama_timeout", 12.5),
        ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("PREFETCH_COUNT", "8", "prefetch_count", 8),
        ("TRANSPORT", "RabbitMQ", "transport", "rabbitmq"),
        ("OPS_PORT", "0", "ops_port", 0),
        ("LOG_FILE", "", "log_file", ""),
        ("LOG_FORMAT", "JSON", "log_format", "json"),
        ("MAX_MESSAGE_BYTES", "4096", "max_message_bytes", 4096),
        ("GRACEFUL_TIMEOUT", "2.5", "graceful_timeout", 2.5),
    ],
)
def test_each_variable_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(Settings.load(), field) == expected


def test_dotenv_in_cwd_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "PREFETCH_COUNT=3\nOLLAMA_MODEL=mistral\nRABBITMQ_PASSWORD=from-dotenv\n", "utf-8"
    )
    settings = Settings.load()
    assert settings.prefetch_count == 3
    assert settings.ollama_model == "mistral"
    assert settings.rabbitmq_password.get_secret_value() == "from-dotenv"


def test_environment_overrides_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("PREFETCH_COUNT=3\nOLLAMA_MODEL=mistral\n", "utf-8")
    monkeypatch.setenv("PREFETCH_COUNT", "5")
    settings = Settings.load()
    assert settings.prefetch_count == 5
    assert settings.ollama_model == "mistral"  # not overridden: still from .env


def test_bad_value_in_dotenv_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PREFETCH_COUNT=lots\n", "utf-8")
    with pytest.raises(ConfigError, match="PREFETCH_COUNT"):
        Settings.load()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ollama, mock", ["ollama", "mock"]),
        ("mock", ["mock"]),
        ("Ollama,Embedded,MOCK", ["ollama", "embedded", "mock"]),
        ("ollama,,mock,", ["ollama", "mock"]),
    ],
)
def test_providers_parse_to_a_list(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("PROVIDERS", value)
    assert Settings.load().providers == expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PREFETCH_COUNT", "abc"),
        ("PREFETCH_COUNT", "0"),
        ("PREFETCH_COUNT", "1001"),
        ("PROVIDERS", "gpt5"),
        ("PROVIDERS", "ollama,gpt5"),
        ("PROVIDERS", " , "),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("RABBITMQ_PORT", "70000"),
        ("RABBITMQ_PORT", "0"),
        ("OLLAMA_TIMEOUT", "0"),
        ("MAX_MESSAGE_BYTES", "10"),
        ("OUTPUT_NAMING", "kebab"),
        ("TRANSPORT", "nats"),
        ("CONTRACT", "xml"),
        ("PHOTO_ANALYSIS_SCHEMA", "no_such_schema"),
        ("MAX_IMAGE_BYTES", "12"),
        ("IMAGE_MAX_SIDE", "-1"),
        ("PULL_MISSING_MODELS", "perhaps"),
    ],
)
def test_bad_value_raises_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        Settings.load()
    message = str(info.value)
    assert variable in message
    assert message.startswith("invalid configuration:")


def test_every_bad_variable_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFETCH_COUNT", "abc")
    monkeypatch.setenv("TRANSPORT", "nats")
    with pytest.raises(ConfigError) as info:
        Settings.load()
    assert "PREFETCH_COUNT" in str(info.value)
    assert "TRANSPORT" in str(info.value)


def test_unknown_provider_message_lists_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDERS", "gpt5")
    with pytest.raises(ConfigError) as info:
        Settings.load()
    message = str(info.value)
    assert "gpt5" in message
    for choice in ("embedded", "ollama", "mock"):
        assert choice in message


def test_safe_url_hides_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_PASSWORD", SECRET)
    monkeypatch.setenv("RABBITMQ_USERNAME", "bot")
    monkeypatch.setenv("RABBITMQ_HOST", "mq.local")
    settings = Settings.load()
    assert SECRET not in settings.rabbitmq_safe_url
    assert settings.rabbitmq_safe_url.startswith("amqp://bot:***@mq.local:5672/")
    # The real URL does carry it (URL-quoted), so the difference is meaningful.
    assert SECRET in settings.rabbitmq_url
    assert SECRET not in str(settings.model_dump())


def test_rabbitmq_url_quotes_special_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITMQ_PASSWORD", "p@ss:w/rd")
    settings = Settings.load()
    assert "p%40ss%3Aw%2Frd@localhost:5672/%2F" in settings.rabbitmq_url
    assert "p@ss" not in settings.rabbitmq_safe_url


@pytest.mark.parametrize(
    ("variable", "value"),
    [("RABBITMQ_PORT", "70000"), ("RABBITMQ_PORT", "not-a-port"), ("RABBITMQ_HEARTBEAT", "-1")],
)
def test_config_error_next_to_the_password_does_not_show_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("RABBITMQ_PASSWORD", SECRET)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        Settings.load()
    assert variable in str(info.value)
    assert SECRET not in str(info.value)


def test_config_error_on_the_password_itself_does_not_show_it() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(rabbitmq_password=987654321)
    assert "RABBITMQ_PASSWORD" in str(info.value)
    assert "987654321" not in str(info.value)


def test_cli_run_with_bad_setting_exits_2_naming_it() -> None:
    result = CliRunner().invoke(chatprocessor.cli.app, ["run"], env={"PREFETCH_COUNT": "abc"})
    assert result.exit_code == 2, result.output
    # Click >= 8.2 captures stderr into output too; the message is on stderr.
    assert "PREFETCH_COUNT" in result.stderr
    assert "PREFETCH_COUNT" in result.output
    assert "error" in result.output.lower()


def test_module_entry_point_with_bad_setting_exits_2_on_stderr(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "OLLAMA_"))}
    env["PREFETCH_COUNT"] = "abc"
    env["COLUMNS"] = "200"
    proc = subprocess.run(
        [sys.executable, "-m", "chatprocessor", "run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "PREFETCH_COUNT" in proc.stderr
    assert "PREFETCH_COUNT" not in proc.stdout


# -- paths and URLs are checked at startup -------------------------------------------------------


@pytest.mark.parametrize("url", ["notaurl", "ftp://x", "http://", ""])
def test_ollama_base_url_must_be_http(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_BASE_URL", url)
    with pytest.raises(ConfigError, match="OLLAMA_BASE_URL"):
        Settings.load()


def test_log_file_in_missing_directory_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_FILE", "/nonexistent-dir/chatprocessor.log")
    with pytest.raises(ConfigError, match="LOG_FILE"):
        Settings.load()


def test_missing_embedded_model_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDDED_MODEL_PATH", "/nonexistent/model.gguf")
    with pytest.raises(ConfigError, match="EMBEDDED_MODEL_PATH"):
        Settings.load()


def test_data_dir_that_cannot_be_created_stops_run_with_status_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = {**os.environ, "DATA_DIR": str(blocker / "sub"), "PROVIDERS": "mock", "OPS_PORT": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "chatprocessor", "run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "DATA_DIR" in proc.stderr


def test_check_masks_credentials_inside_urls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OLLAMA_BASE_URL", "http://bob:s3cr3t-in-url@localhost:11434")
    monkeypatch.setenv("PROVIDERS", "mock")
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(chatprocessor.cli.app, ["check"])
    assert result.exit_code == 0, result.output
    assert "s3cr3t-in-url" not in result.output
    assert "***@localhost" in result.output


# -- delivery guarantees -------------------------------------------------------------------------


def _error_for(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        Settings.load()
    return str(caught.value)


def test_job_timeout_must_end_before_the_brokers_consumer_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = _error_for(
        monkeypatch, TRANSPORT="rabbitmq", JOB_TIMEOUT="1800", RABBITMQ_CONSUMER_TIMEOUT="1800"
    )
    assert "JOB_TIMEOUT" in message and "RABBITMQ_CONSUMER_TIMEOUT" in message
    monkeypatch.setenv("RABBITMQ_CONSUMER_TIMEOUT", "0")  # the broker's timeout is off
    assert Settings.load().job_timeout == 1800


def test_backoff_cap_below_base_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error_for(monkeypatch, RETRY_BACKOFF_BASE="10", RETRY_BACKOFF_CAP="5")
    assert "RETRY_BACKOFF_CAP" in message and "RETRY_BACKOFF_BASE" in message


@pytest.mark.parametrize(("name", "value"), [("MAX_RETRIES", "-1"), ("JOB_TIMEOUT", "0")])
def test_bad_retry_numbers_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    assert name in _error_for(monkeypatch, **{name: value})


def test_redis_url_is_checked_and_its_password_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    message = _error_for(monkeypatch, REDIS_URL=f"http://:{SECRET}@localhost:6379")
    assert "REDIS_URL" in message and SECRET not in message
    monkeypatch.setenv("REDIS_URL", "redis://localhost:6379/2")
    assert Settings.load().redis_url == "redis://localhost:6379/2"


def test_openai_needs_a_key_only_for_api_openai_com(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "OPENAI_API_KEY" in _error_for(monkeypatch, PROVIDERS="ollama,openai")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")  # a local server
    assert Settings.load().providers == ["ollama", "openai"]


def test_local_replies_store_needs_a_writable_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    message = _error_for(monkeypatch, TRANSPORT="rabbitmq", DATA_DIR=str(blocker / "sub"))
    assert "DATA_DIR" in message
    monkeypatch.setenv("REDIS_URL", "redis://localhost:6379/0")  # replies go to Redis instead
    assert Settings.load().redis_url


def test_setting_variables_are_the_fields_and_the_clients_own() -> None:
    from chatprocessor.settings import is_setting_variable

    assert all(is_setting_variable(name.upper()) for name in Settings.model_fields)
    assert is_setting_variable("job_timeout")  # pydantic-settings reads any case
    assert is_setting_variable("OPENAI_ORG_ID") and is_setting_variable("OLLAMA_HOST")
    assert not is_setting_variable("PATH") and not is_setting_variable("CI")


def test_kafka_speaks_the_models_contract_unless_told_otherwise() -> None:
    kafka = Settings.load(transport="kafka")
    assert kafka.uses_models_contract and kafka.input_queue == "eater-send-photo"
    chat_on_kafka = Settings.load(transport="kafka", contract="chat")
    assert not chat_on_kafka.uses_models_contract
    assert chat_on_kafka.input_queue == "UserPromptReceived"
    models_on_rabbitmq = Settings.load(transport="rabbitmq", contract="models")
    assert models_on_rabbitmq.input_queue == "eater-send-photo"
    assert not Settings.load().uses_models_contract


def test_the_default_database_is_a_sqlite_file_in_the_expanded_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Job metrics, the usage ledger and `chatprocessor db` all open this one URL."""
    monkeypatch.setenv("HOME", str(tmp_path))
    settings = Settings(data_dir=Path("~/cp"), log_file="")
    assert "~" not in settings.database and str(tmp_path / "cp") in settings.database
    assert Settings(database_url="postgresql://u@h/db", log_file="").database.startswith(
        "postgresql+asyncpg://"
    )
