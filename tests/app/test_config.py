from pathlib import Path

import pytest
from pydantic import ValidationError

from app.config import Settings


def test_settings_come_from_cnnserve_environment_variables(monkeypatch):
    monkeypatch.setenv("CNNSERVE_DEFAULT_MODEL", "lenet5")
    monkeypatch.setenv("CNNSERVE_MODELS_DIR", "/srv/models")
    monkeypatch.setenv("CNNSERVE_MAX_BODY_BYTES", "1024")
    settings = Settings()
    assert settings.default_model == "lenet5"
    assert settings.models_dir == Path("/srv/models")
    assert settings.max_body_bytes == 1024


def test_defaults_serve_efficientnet_on_localhost_port_8000():
    settings = Settings()
    assert (settings.host, settings.port, settings.default_model) == ("127.0.0.1", 8000, "efficientnet_lite0")


def test_a_bad_setting_is_refused_at_start(monkeypatch):
    monkeypatch.setenv("CNNSERVE_PROVIDERS", "tpu")
    with pytest.raises(ValidationError):
        Settings()


def test_an_empty_api_key_turns_authentication_off(monkeypatch):
    monkeypatch.setenv("CNNSERVE_API_KEY", "")
    assert Settings().api_key is None
    monkeypatch.setenv("CNNSERVE_API_KEY", "s3cret")
    assert Settings().api_key.get_secret_value() == "s3cret"
