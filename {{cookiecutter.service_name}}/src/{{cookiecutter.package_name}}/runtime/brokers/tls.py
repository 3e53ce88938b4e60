"""TLS settings shared by every adapter: one CA bundle, one optional client certificate."""

from __future__ import annotations

import ssl

from ..config import ENV_PREFIX, Settings
from ..errors import ConfigError


def tls_context(settings: Settings, *, required: bool) -> ssl.SSLContext | None:
    """A verifying client context from BROKER_TLS_* files; None when TLS is not wanted."""
    files = (
        settings.broker_tls_ca_file,
        settings.broker_tls_cert_file,
        settings.broker_tls_key_file,
    )
    if not required and not any(files):
        return None
    for variable, path in zip(("CA", "CERT", "KEY"), files, strict=True):
        if path is not None and not path.is_file():
            raise ConfigError(f"{ENV_PREFIX}BROKER_TLS_{variable}_FILE: no such file {path}")
    try:
        context = ssl.create_default_context(
            cafile=str(settings.broker_tls_ca_file) if settings.broker_tls_ca_file else None
        )
        if settings.broker_tls_cert_file:
            context.load_cert_chain(
                str(settings.broker_tls_cert_file),
                str(settings.broker_tls_key_file) if settings.broker_tls_key_file else None,
            )
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"{ENV_PREFIX}BROKER_TLS_*: cannot load TLS files: {error}") from None
    return context
