"""Warm start's pure part: which records of a history become state."""

from tests.conftest import HOUR_US, observation, request
from transforms.bootstrap import recent_observations
from transforms.events import RawRecord, event_to_json
from transforms.parse import RecordParser


def test_keeps_the_observations_since_the_cutoff_and_counts_the_rest(flights_spec):
    old, edge, new, req = (f"19700101-UA{n}-EWR" for n in (1, 2, 3, 4))
    events = [observation(old, 0, 1.0), observation(edge, HOUR_US, 2.0), request(req, 2 * HOUR_US),
              observation(new, 3 * HOUR_US, 3.0)]
    records = [RawRecord(f"h.ndjson:{i}", event_to_json(e), "json") for i, e in enumerate(events, 1)]
    records.append(RawRecord("h.ndjson:5", "{broken", "json"))
    counts = {}
    kept = recent_observations(RecordParser(flights_spec), records, since_us=HOUR_US, counts=counts)
    assert [(e.event_id, e.fields["dep_delay"]) for e in kept] == [(edge, 2.0), (new, 3.0)]  # the cutoff is kept
    assert counts == {"records": 5, "unreadable": 1, "requests": 1, "older": 1, "observations": 2}
