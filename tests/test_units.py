import pytest

from autofit.errors import ConfigError
from autofit.units import GiB, MiB, fmt_bytes, parse_size


@pytest.mark.parametrize("text, expected", [
    ("12GiB", 12 * GiB), ("12GB", 12 * GiB), ("12 G", 12 * GiB), ("12", 12 * GiB), ("11264MiB", 11264 * MiB),
    ("1.5GiB", int(1.5 * GiB)), ("512b", 512), ("2 tib", 2 * 1024 * GiB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "twelve", "-3GB", "12XB", "GB"])
def test_parse_size_rejects_with_one_line(text):
    with pytest.raises(ConfigError) as err:
        parse_size(text)
    assert "\n" not in str(err.value) and "12GiB" in str(err.value)


def test_fmt_bytes():
    assert fmt_bytes(12 * GiB) == "12.00 GiB"
    assert fmt_bytes(512 * MiB) == "512.0 MiB"
    assert fmt_bytes(1536) == "1.5 KiB"
    assert fmt_bytes(96) == "96 B"
    assert fmt_bytes(-2 * MiB) == "-2.0 MiB"
