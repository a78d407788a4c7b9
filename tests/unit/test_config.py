"""Settings read from the environment: a bad value stops ``vna`` at start, the
variable named, instead of failing later at first use or with a traceback."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vna.cli import main
from vna.config import Settings


def test_commitment_retry_seconds_are_read_in_order() -> None:
    settings = Settings(commitment_retry_seconds=" 10, 0.5 ,600,")
    assert settings.commitment_retry_delays() == [10.0, 0.5, 600.0]


def test_no_commitment_retries_when_empty() -> None:
    assert Settings(commitment_retry_seconds="").commitment_retry_delays() == []


def test_the_default_retries_four_times_within_the_hour() -> None:
    delays = Settings().commitment_retry_delays()
    assert len(delays) == 4
    assert sum(delays) < 3600


@pytest.mark.parametrize("value", ["ten", "10,-1", "nan", "inf", "90000"])
def test_bad_commitment_retry_seconds_are_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="is not a number of seconds"):
        Settings(commitment_retry_seconds=value)


def test_vna_names_a_bad_setting_and_exits_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VNA_COMMITMENT_RETRY_SECONDS", "10,soon")
    monkeypatch.setenv("VNA_DIMSE_PORT", "eleven")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "VNA_COMMITMENT_RETRY_SECONDS='10,soon': 'soon' is not a number of seconds" in err
    assert "VNA_DIMSE_PORT='eleven'" in err
    assert "Traceback" not in err
