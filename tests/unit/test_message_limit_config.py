"""EVERRUNS_MAX_MESSAGE_BYTES: 64 MiB by default, and never so low that a request carrying a few
maximal payloads could be refused (4 x EVERRUNS_MAX_PAYLOAD_BYTES + 64 KiB); a bad value is a
one-line ConfigError naming the variable."""

from __future__ import annotations

import pytest

from everruns.errors import ConfigError
from everruns.server.config import ServerConfig

MIB = 1024 * 1024


def test_the_default_is_64_mib_and_a_value_is_read() -> None:
    assert ServerConfig.from_env({}).max_message_bytes == 64 * MIB
    assert ServerConfig().max_message_bytes == 64 * MIB
    env = {"EVERRUNS_MAX_MESSAGE_BYTES": str(9 * MIB)}
    assert ServerConfig.from_env(env).max_message_bytes == 9 * MIB
    least = 4 * 2 * MIB + 64 * 1024
    assert ServerConfig.from_env({"EVERRUNS_MAX_MESSAGE_BYTES": str(least)}).max_message_bytes


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (
            {"EVERRUNS_MAX_MESSAGE_BYTES": str(4 * 2 * MIB + 64 * 1024 - 1)},
            r"^EVERRUNS_MAX_MESSAGE_BYTES=8454143 \(ServerConfig.max_message_bytes\) must be "
            r"at least 4 x "
            r"EVERRUNS_MAX_PAYLOAD_BYTES \+ 64 KiB \(8454144\)",
        ),
        (
            {
                "EVERRUNS_MAX_PAYLOAD_BYTES": str(20 * MIB),
                "EVERRUNS_MAX_MESSAGE_BYTES": str(64 * MIB),
            },
            r"^EVERRUNS_MAX_MESSAGE_BYTES=67108864 .* must be at least .*lower "
            r"EVERRUNS_MAX_PAYLOAD_BYTES$",
        ),
        ({"EVERRUNS_MAX_MESSAGE_BYTES": "64MB"}, r"^EVERRUNS_MAX_MESSAGE_BYTES='64MB' is not"),
        ({"EVERRUNS_MAX_MESSAGE_BYTES": "-1"}, r"^EVERRUNS_MAX_MESSAGE_BYTES='-1' must be at"),
    ],
)
def test_a_limit_too_low_for_the_payloads_or_not_a_number_is_refused(
    env: dict[str, str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        ServerConfig.from_env(env)
    assert "\n" not in str(info.value)


def test_unset_it_grows_with_a_raised_payload_limit() -> None:
    """Raising EVERRUNS_MAX_PAYLOAD_BYTES alone past 16 MiB used to make the default message
    limit a ConfigError at start (an upgrade that stopped a working control plane)."""
    least = 4 * 20 * MIB + 64 * 1024
    config = ServerConfig.from_env({"EVERRUNS_MAX_PAYLOAD_BYTES": str(20 * MIB)})
    assert config.max_message_bytes == least
    assert ServerConfig(max_payload_bytes=20 * MIB).max_message_bytes == least


def test_a_lower_payload_limit_allows_a_lower_message_limit() -> None:
    env = {"EVERRUNS_MAX_PAYLOAD_BYTES": "1024", "EVERRUNS_MAX_MESSAGE_BYTES": str(68 * 1024)}
    assert ServerConfig.from_env(env).max_message_bytes == 68 * 1024
    with pytest.raises(ConfigError, match="EVERRUNS_MAX_MESSAGE_BYTES"):
        ServerConfig(max_message_bytes=1000)
    with pytest.raises(ConfigError, match=r"ServerConfig.max_message_bytes must be an integer"):
        ServerConfig(max_message_bytes="64 MiB")  # type: ignore[arg-type]
