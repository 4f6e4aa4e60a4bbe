"""Settings refuse values that cannot work, with the flag's name in the message."""

import datetime as dt
from pathlib import Path

import pytest

from meshplane.controlplane.errors import ConfigError
from meshplane.controlplane.settings import Settings, parse_duration


def test_a_certificate_lifetime_too_short_to_renew_is_refused() -> None:
    with pytest.raises(ConfigError, match="--cert-ttl"):
        Settings(mesh_file=Path("mesh.yaml"), cert_ttl=dt.timedelta(milliseconds=10))
    assert Settings(mesh_file=Path("mesh.yaml"), cert_ttl=parse_duration("2s")).cert_ttl.total_seconds() == 2
