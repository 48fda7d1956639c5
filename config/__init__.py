"""The platform's configuration: every environment variable in one typed tree (`settings.py`)."""

from config.settings import Settings, SettingsError, get_settings, load_settings, redact_url

__all__ = ["Settings", "SettingsError", "get_settings", "load_settings", "redact_url"]
