"""The one reader of time flags (beam_app/common/times.py), by property and by hand."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from beam_app.common.errors import UsageError
from beam_app.common.times import time_flag_rfc3339, time_flag_us, time_range_us
from transforms.events import time_us_to_rfc3339

UTC = dt.timezone.utc
MOMENTS = st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2999, 12, 31),
                       timezones=st.sampled_from([UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)),
                                                  dt.timezone(dt.timedelta(hours=-8))]))


def _epoch_us(moment: dt.datetime) -> int:
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@given(MOMENTS)
def test_an_rfc3339_time_with_any_offset_is_that_instant(moment):
    assert time_flag_us(moment.isoformat(), "--start") == _epoch_us(moment)


@given(MOMENTS)
def test_rfc3339_written_back_reads_the_same(moment):
    written = time_flag_rfc3339(moment.isoformat(), "--start")
    assert written.endswith("Z") and time_flag_us(written, "--start") == _epoch_us(moment)


@given(st.dates(min_value=dt.date(1971, 1, 1), max_value=dt.date(2999, 12, 31)))
def test_a_date_is_its_utc_midnight(day):
    assert time_us_to_rfc3339(time_flag_us(day.isoformat(), "--end")) == f"{day.isoformat()}T00:00:00Z"


def test_by_hand():
    assert time_flag_us("2013-12-01T06:30:00", "--end") == time_flag_us("2013-12-01T06:30:00Z", "--end")
    assert time_flag_us("2013-12-01T06:30:00+01:00", "--end") == time_flag_us("2013-12-01T05:30:00Z", "--end")
    assert time_flag_us(None, "--end") is None
    assert time_range_us("2013-12-01", "2013-12-02") == (1_385_856_000_000_000, 1_385_942_400_000_000)


@pytest.mark.parametrize("text", ["yesterday", "2013-13-01", "12/01/2013", ""])
def test_anything_else_names_the_flag_and_the_forms(text):
    with pytest.raises(UsageError, match=r"--start: expected a UTC date \(2013-11-01\) or an RFC 3339 time"):
        time_flag_us(text, "--start")


def test_an_empty_range_is_a_usage_error():
    with pytest.raises(UsageError, match=r"--end \(2013-12-01\) must be after --start \(2013-12-01\)"):
        time_range_us("2013-12-01", "2013-12-01")
