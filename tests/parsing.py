"""Parsing one record in a test, with the spec's adapters resolved as an entry point does."""

from beam_app.adapters import load_adapters
from transforms.events import Event, RawRecord
from transforms.parse import EventValidator, RecordParser
from transforms.spec import FeatureSpec


def parse_record(spec: FeatureSpec, record: RawRecord) -> list[Event]:
    return RecordParser(spec, load_adapters(spec))(record)


def validate_event(spec: FeatureSpec, event: Event) -> Event:
    return EventValidator(spec)(event)
