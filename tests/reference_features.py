"""An independent implementation of the flights features, in DuckDB SQL.

Written from DESIGN.md alone, sharing no code with the pipeline: the
end-to-end test checks every example against it, and the benchmark uses it
as the reference run. `?` is the path of a plain flights.csv.
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
