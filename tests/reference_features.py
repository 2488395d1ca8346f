"""An independent implementation of the flights features, in DuckDB SQL.

Written from docs/concepts.md and docs/spec.md alone, sharing no code with the pipeline: the
end-to-end test checks every example against it, and the benchmark uses it
as the reference run. `?` is the path of a plain flights.csv.

FLIGHTS_V2_FEATURES_SQL (`?` = flights.csv, `?` = weather.csv) gives, per
request, those five features plus tail-number (last delay, seconds since it,
last three delays), route, destination, origin-stddev and weather windows;
WEATHER_DEAD_ROWS_SQL (`?` = weather.csv) lists the weather rows left out as
dead letters. Both are explained above their definitions, at the end of this
file, and checked on hand-made rows by tests/test_reference_sql.py.
"""

# A request at t sees observations in [t - W, t): with integer microseconds
# that is the frame RANGE BETWEEN W PRECEDING AND 1 PRECEDING over requests and
# observations ordered by time (requests carry no delay, so they add nothing).
FEATURES_SQL = """
WITH flights AS (
    SELECT *, epoch_us(CAST(time_hour AS TIMESTAMPTZ)) + minute * 60000000 AS sched_us,
           printf('%04d%02d%02d-%s%d-%s', year, month, day, carrier, flight, origin) AS event_id
    FROM read_csv(?, header = true, nullstr = 'NA')
), events AS (
    SELECT event_id, origin, carrier, sched_us - 3600000000 AS t, NULL::DOUBLE AS delay,
           CAST(dep_delay AS DOUBLE) AS label, true AS is_request
    FROM flights
    UNION ALL
    SELECT event_id, origin, carrier,
           sched_us + CAST(round(CAST(dep_delay AS DOUBLE) * 60000000) AS BIGINT), CAST(dep_delay AS DOUBLE),
           NULL, false
    FROM flights WHERE dep_delay IS NOT NULL
), features AS (
    SELECT event_id, label, t, is_request,
        count(delay) OVER origin_1h AS origin_departures_1h,
        avg(delay) OVER origin_1h AS origin_dep_delay_mean_1h,
        max(delay) OVER origin_1h AS origin_dep_delay_max_1h,
        avg(delay) OVER origin_3h AS origin_dep_delay_mean_3h,
        avg(delay) OVER carrier_3h AS carrier_dep_delay_mean_3h
    FROM events
    WINDOW origin_1h AS (PARTITION BY origin ORDER BY t RANGE BETWEEN 3600000000 PRECEDING AND 1 PRECEDING),
           origin_3h AS (PARTITION BY origin ORDER BY t RANGE BETWEEN 10800000000 PRECEDING AND 1 PRECEDING),
           carrier_3h AS (PARTITION BY carrier ORDER BY t RANGE BETWEEN 10800000000 PRECEDING AND 1 PRECEDING)
)
SELECT event_id, label,
       CASE WHEN t >= epoch_us(TIMESTAMPTZ '2013-12-01 00:00:00+00') THEN 'test'
            WHEN t >= epoch_us(TIMESTAMPTZ '2013-11-01 00:00:00+00') THEN 'eval' ELSE 'train' END AS split,
       origin_departures_1h, origin_dep_delay_mean_1h, origin_dep_delay_max_1h,
       origin_dep_delay_mean_3h, carrier_dep_delay_mean_3h
FROM features WHERE is_request
"""


# The chicago_taxi features, written from the use case's contract alone (not
# from its adapter). `?` is the path of the trips CSV (the embedded
# beam_app/data/chicago_taxi.csv). Every field is read as text, empty fields
# kept as '' (a null string no field holds), so that the event id's hash sees
# the row's raw values.
#
# A trip is a request at its start t and an observation at t + trip_seconds,
# both keyed by the pickup area; a row breaking any rule below is a dead letter
# as a whole. A trip_miles of 0 is "not recorded": missing, not a dead letter.
_TAXI_TRIPS = """
WITH raw AS (
    SELECT * FROM read_csv(?, header = true, all_varchar = true, nullstr = '<no null string>')
), trips AS (
    SELECT *,
        try_cast(trip_start_timestamp AS BIGINT) * 1000000 AS t,
        try_cast(trip_seconds AS BIGINT) AS seconds_,
        try_cast(fare AS DOUBLE) AS fare_,
        CASE WHEN try_cast(trip_miles AS DOUBLE) <> 0 THEN try_cast(trip_miles AS DOUBLE) END AS miles_,
        list_filter([
            CASE WHEN coalesce(try_cast(trip_seconds AS BIGINT) NOT BETWEEN 1 AND 86400, true) THEN 'trip_seconds' END,
            CASE WHEN coalesce(try_cast(fare AS DOUBLE) NOT BETWEEN 0.01 AND 300, true) THEN 'fare' END,
            CASE WHEN try_cast(trip_miles AS DOUBLE) <> 0
                      AND try_cast(trip_miles AS DOUBLE) NOT BETWEEN 0.01 AND 500 THEN 'trip_miles' END,
            CASE WHEN pickup_community_area = '' THEN 'pickup_community_area' END,
            CASE WHEN payment_type = '' THEN 'payment_type' END
        ], lambda f: f IS NOT NULL) AS bad_fields,
        concat_ws(',', pickup_community_area, fare, trip_start_month, trip_start_hour, trip_start_day,
                  trip_start_timestamp, pickup_latitude, pickup_longitude, dropoff_latitude, dropoff_longitude,
                  trip_miles, pickup_census_tract, dropoff_census_tract, payment_type, company, trip_seconds,
                  dropoff_community_area, tips) AS raw_line,
        strftime(make_timestamp(try_cast(trip_start_timestamp AS BIGINT) * 1000000), '%Y%m%dT%H%M') || '-' ||
        left(sha256(concat_ws(chr(31), pickup_community_area, fare, trip_start_month, trip_start_hour,
                  trip_start_day, trip_start_timestamp, pickup_latitude, pickup_longitude, dropoff_latitude,
                  dropoff_longitude, trip_miles, pickup_census_tract, dropoff_census_tract, payment_type, company,
                  trip_seconds, dropoff_community_area, tips)), 10) AS event_id
    FROM raw
)
"""

# The rows that are dead letters: (raw CSV line, [offending field, ...]).
TAXI_DEAD_ROWS_SQL = _TAXI_TRIPS + """
SELECT raw_line, bad_fields FROM trips WHERE len(bad_fields) > 0
"""

# One row per request (every good trip is labeled by its fare):
#   event_id, split, fare, pickup_community_area, dropoff_community_area,
#   trip_start_hour, trip_start_day, payment_type, company,
#   centroid_distance_miles (NULL when a centroid is unknown),
#   pickup_trips_7d, pickup_trips_30d, pickup_fare_per_mile_7d,
#   pickup_fare_per_mile_30d, pickup_fare_mean_30d, pickup_trip_seconds_mean_30d
# A request at t sees its pickup area's observations in [t - W, t): the frame
# RANGE BETWEEN W PRECEDING AND 1 PRECEDING over integer microseconds (requests
# add only NULLs to the aggregates). The fare per mile is a ratio of sums over
# the observations whose trip_miles is known.
TAXI_FEATURES_SQL = _TAXI_TRIPS + """
, good AS (
    SELECT * FROM trips WHERE len(bad_fields) = 0
), events AS (
    SELECT event_id, pickup_community_area AS area, t, true AS is_request,
           NULL::DOUBLE AS obs_fare, NULL::DOUBLE AS obs_miles, NULL::DOUBLE AS obs_fare_with_miles,
           NULL::DOUBLE AS obs_seconds
    FROM good
    UNION ALL
    SELECT event_id, pickup_community_area, t + seconds_ * 1000000, false,
           fare_, miles_, CASE WHEN miles_ IS NOT NULL THEN fare_ END, seconds_
    FROM good
), features AS (
    SELECT event_id, is_request,
        count(obs_fare) OVER w7 AS pickup_trips_7d,
        count(obs_fare) OVER w30 AS pickup_trips_30d,
        sum(obs_fare_with_miles) OVER w7 / sum(obs_miles) OVER w7 AS pickup_fare_per_mile_7d,
        sum(obs_fare_with_miles) OVER w30 / sum(obs_miles) OVER w30 AS pickup_fare_per_mile_30d,
        avg(obs_fare) OVER w30 AS pickup_fare_mean_30d,
        avg(obs_seconds) OVER w30 AS pickup_trip_seconds_mean_30d
    FROM events
    WINDOW w7 AS (PARTITION BY area ORDER BY t RANGE BETWEEN 604800000000 PRECEDING AND 1 PRECEDING),
           w30 AS (PARTITION BY area ORDER BY t RANGE BETWEEN 2592000000000 PRECEDING AND 1 PRECEDING)
)
SELECT g.event_id,
       CASE WHEN g.t >= epoch_us(TIMESTAMP '2015-07-01 00:00:00') THEN 'test'
            WHEN g.t >= epoch_us(TIMESTAMP '2015-01-01 00:00:00') THEN 'eval' ELSE 'train' END AS split,
       g.fare_ AS fare,
       g.pickup_community_area, g.dropoff_community_area,
       CAST(g.trip_start_hour AS BIGINT) AS trip_start_hour, CAST(g.trip_start_day AS BIGINT) AS trip_start_day,
       g.payment_type, g.company,
       CASE WHEN '' NOT IN (g.pickup_latitude, g.pickup_longitude, g.dropoff_latitude, g.dropoff_longitude) THEN
           2 * 3958.8 * asin(sqrt(
               pow(sin(radians(CAST(g.dropoff_latitude AS DOUBLE) - CAST(g.pickup_latitude AS DOUBLE)) / 2), 2)
               + cos(radians(CAST(g.pickup_latitude AS DOUBLE))) * cos(radians(CAST(g.dropoff_latitude AS DOUBLE)))
                 * pow(sin(radians(CAST(g.dropoff_longitude AS DOUBLE) - CAST(g.pickup_longitude AS DOUBLE)) / 2), 2)))
       END AS centroid_distance_miles,
       f.pickup_trips_7d, f.pickup_trips_30d, f.pickup_fare_per_mile_7d, f.pickup_fare_per_mile_30d,
       f.pickup_fare_mean_30d, f.pickup_trip_seconds_mean_30d
FROM good g JOIN features f ON f.event_id = g.event_id AND f.is_request
"""


# ---------------------------------------------------------------------------
# The flights features, version 2: the five above plus per-tail-number, route,
# destination and weather windows, written from the contract alone.
#
# FLIGHTS_V2_FEATURES_SQL takes two parameters: the flights CSV path and the
# weather CSV path (plain CSVs, 'NA' = missing). Every field is read as text
# and cast explicitly, so that a tiny file (a test's) is typed like the real
# one. Times are integer microseconds since the epoch, UTC.
#
# Events:
#   request    every flight, at t = sched_us - 1h (sched_us = time_hour + minute),
#              labeled by dep_delay (NULL for a cancelled flight);
#   departure  every flight with a dep_delay, at sched_us + round(dep_delay min);
#   weather    every valid weather row, at its time_hour. A row with
#              wind_speed > 100, or visib or precip present and outside [0, 10],
#              is a dead letter: left out entirely, listed by WEATHER_DEAD_ROWS_SQL.
#
# All three kinds are rows of one table; each row carries only its own kind's
# values (NULL elsewhere), so an aggregate over one kind's value ignores the
# other kinds' rows. A request at t sees, for a key, the observations with the
# same key value in [t - W, t): the frame
#   PARTITION BY key ORDER BY t RANGE BETWEEN W PRECEDING AND 1 PRECEDING.
# A missing key value (a NULL tailnum; a route or dest that is NULL) would put
# rows in the NULL partition together, so the features of a key are forced to
# NULL for a request whose key value is missing (lengths included), and an
# observation whose key value is missing can only be seen by such requests:
# it is in no window.
#
# The latest observation(s) of a tail number: ordered by (time, event_id),
# both descending, so that a tie on time goes to the larger event_id. The
# last one is arg_max(dep_delay, {t, event_id}); the last three are an ordered
# list aggregate over the same frame, list(dep_delay ORDER BY t DESC,
# event_id DESC), cut to its first 3 (unpadded; the pipeline pads with 0).
#
# One row per request (cancelled flights included), ordered by t, event_id:
#   event_id, label, split, tailnum,
#   origin_departures_1h, origin_dep_delay_mean_1h, origin_dep_delay_max_1h,
#   origin_dep_delay_mean_3h, carrier_dep_delay_mean_3h,
#   tailnum_last_dep_delay_24h, tailnum_seconds_since_last_24h,
#   tailnum_dep_delay_last3_24h (DOUBLE[], length <= 3),
#   tailnum_dep_delay_last3_24h_length (0 on an empty window),
#   route_dep_delay_mean_24h, dest_dep_delay_mean_3h, origin_dep_delay_std_3h,
#   origin_visib_min_3h, origin_precip_sum_3h, origin_wind_speed_max_3h
# ---------------------------------------------------------------------------

# The weather CTEs, shared by the two queries below (their one `?`: the weather CSV path).
_WEATHER_CTES = """
weather_raw AS (
    SELECT * FROM read_csv(?, header = true, nullstr = 'NA', all_varchar = true)
), weather AS (
    SELECT origin, time_hour,
        epoch_us(CAST(time_hour AS TIMESTAMPTZ)) AS t,
        CAST(visib AS DOUBLE) AS visib, CAST(precip AS DOUBLE) AS precip,
        CAST(wind_speed AS DOUBLE) AS wind_speed
    FROM weather_raw
), weather_checked AS (
    SELECT *,
        -- the weather event id: hour of time_hour in UTC, then the origin
        strftime(make_timestamp(t), '%Y%m%dT%H') || '-' || origin AS event_id,
        -- a missing value breaks no rule: comparisons with NULL are NULL, dropped here
        list_filter([
            CASE WHEN wind_speed > 100 THEN 'wind_speed' END,
            CASE WHEN visib NOT BETWEEN 0 AND 10 THEN 'visib' END,
            CASE WHEN precip NOT BETWEEN 0 AND 10 THEN 'precip' END
        ], lambda f: f IS NOT NULL) AS bad_fields
    FROM weather
)
"""

# The weather rows that are dead letters, one row each:
#   origin, time_hour (as written in the file), reason (the offending column
#   names, comma separated), event_id (the weather event id it would have had).
# `?` is the weather CSV path.
WEATHER_DEAD_ROWS_SQL = "WITH" + _WEATHER_CTES + """
SELECT origin, time_hour, array_to_string(bad_fields, ',') AS reason, event_id
FROM weather_checked WHERE len(bad_fields) > 0
ORDER BY t, origin
"""

FLIGHTS_V2_FEATURES_SQL = """
WITH flights_raw AS (
    SELECT * FROM read_csv(?, header = true, nullstr = 'NA', all_varchar = true)
), flights AS (
    SELECT
        epoch_us(CAST(time_hour AS TIMESTAMPTZ)) + CAST(minute AS BIGINT) * 60000000 AS sched_us,
        printf('%04d%02d%02d-%s%d-%s', CAST(year AS BIGINT), CAST(month AS BIGINT), CAST(day AS BIGINT),
               carrier, CAST(flight AS BIGINT), origin) AS event_id,
        carrier, origin, dest, tailnum, CAST(dep_delay AS DOUBLE) AS dep_delay
    FROM flights_raw
),""" + _WEATHER_CTES + """, events AS (
    -- kind, t, event_id, keys, then each kind's values (NULL on the other kinds)
    SELECT 'request' AS kind, sched_us - 3600000000 AS t, event_id, carrier, origin, dest, tailnum,
           dep_delay AS label, NULL::DOUBLE AS delay,
           NULL::DOUBLE AS visib, NULL::DOUBLE AS precip, NULL::DOUBLE AS wind_speed
    FROM flights
    UNION ALL
    SELECT 'departure', sched_us + CAST(round(dep_delay * 60000000) AS BIGINT), event_id,
           carrier, origin, dest, tailnum, NULL, dep_delay, NULL, NULL, NULL
    FROM flights WHERE dep_delay IS NOT NULL
    UNION ALL
    SELECT 'weather', t, event_id, NULL, origin, NULL, NULL, NULL, NULL, visib, precip, wind_speed
    FROM weather_checked WHERE len(bad_fields) = 0
), marked AS (
    SELECT *,
        -- a departure's time and its (time, event_id) order, for the "latest" features
        CASE WHEN kind = 'departure' THEN t END AS dep_t,
        CASE WHEN kind = 'departure' THEN {'t': t, 'event_id': event_id} END AS dep_order
    FROM events
), features AS (
    SELECT kind, t, event_id, label, tailnum, origin, dest,
        count(delay) OVER origin_1h AS origin_departures_1h,
        avg(delay) OVER origin_1h AS origin_dep_delay_mean_1h,
        max(delay) OVER origin_1h AS origin_dep_delay_max_1h,
        avg(delay) OVER origin_3h AS origin_dep_delay_mean_3h,
        avg(delay) OVER carrier_3h AS carrier_dep_delay_mean_3h,
        arg_max(delay, dep_order) OVER tailnum_24h AS tailnum_last,
        max(dep_t) OVER tailnum_24h AS tailnum_last_t,
        list(delay ORDER BY t DESC, event_id DESC) FILTER (WHERE kind = 'departure') OVER tailnum_24h
            AS tailnum_all,
        avg(delay) OVER route_24h AS route_dep_delay_mean_24h,
        avg(delay) OVER dest_3h AS dest_dep_delay_mean_3h,
        stddev_pop(delay) OVER origin_3h AS origin_dep_delay_std_3h,
        min(visib) OVER origin_3h AS origin_visib_min_3h,
        sum(precip) OVER origin_3h AS origin_precip_sum_3h,
        max(wind_speed) OVER origin_3h AS origin_wind_speed_max_3h
    FROM marked
    WINDOW origin_1h AS (PARTITION BY origin ORDER BY t RANGE BETWEEN 3600000000 PRECEDING AND 1 PRECEDING),
           origin_3h AS (PARTITION BY origin ORDER BY t RANGE BETWEEN 10800000000 PRECEDING AND 1 PRECEDING),
           carrier_3h AS (PARTITION BY carrier ORDER BY t RANGE BETWEEN 10800000000 PRECEDING AND 1 PRECEDING),
           tailnum_24h AS (PARTITION BY tailnum ORDER BY t RANGE BETWEEN 86400000000 PRECEDING AND 1 PRECEDING),
           route_24h AS (PARTITION BY origin, dest ORDER BY t
                         RANGE BETWEEN 86400000000 PRECEDING AND 1 PRECEDING),
           dest_3h AS (PARTITION BY dest ORDER BY t RANGE BETWEEN 10800000000 PRECEDING AND 1 PRECEDING)
)
SELECT event_id, label,
       CASE WHEN t >= epoch_us(TIMESTAMPTZ '2013-12-01 00:00:00+00') THEN 'test'
            WHEN t >= epoch_us(TIMESTAMPTZ '2013-11-01 00:00:00+00') THEN 'eval' ELSE 'train' END AS split,
       tailnum,
       origin_departures_1h, origin_dep_delay_mean_1h, origin_dep_delay_max_1h,
       origin_dep_delay_mean_3h, carrier_dep_delay_mean_3h,
       CASE WHEN tailnum IS NOT NULL THEN tailnum_last END AS tailnum_last_dep_delay_24h,
       CASE WHEN tailnum IS NOT NULL THEN (t - tailnum_last_t) / 1e6 END AS tailnum_seconds_since_last_24h,
       CASE WHEN tailnum IS NOT NULL THEN coalesce(tailnum_all[1:3], []::DOUBLE[]) END
           AS tailnum_dep_delay_last3_24h,
       CASE WHEN tailnum IS NOT NULL THEN coalesce(len(tailnum_all[1:3]), 0) END
           AS tailnum_dep_delay_last3_24h_length,
       CASE WHEN origin IS NOT NULL AND dest IS NOT NULL THEN route_dep_delay_mean_24h END
           AS route_dep_delay_mean_24h,
       CASE WHEN dest IS NOT NULL THEN dest_dep_delay_mean_3h END AS dest_dep_delay_mean_3h,
       origin_dep_delay_std_3h,
       origin_visib_min_3h, origin_precip_sum_3h, origin_wind_speed_max_3h
FROM features WHERE kind = 'request'
ORDER BY t, event_id
"""
