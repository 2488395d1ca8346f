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
