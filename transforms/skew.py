"""Served features against the batch engine's, with no Beam in it: which
columns differ, and why.

Our contract is exact (docs/concepts.md, "The point-in-time contract"): a request's features depend only
on the observations of its keys in [t - W, t). So a served value that differs
from the batch engine's on the same history is a finding, and the history
itself can often say what happened. `explain_group` tries, for one feature
group (one key field) of one request, the few ways a live job can legitimately
have seen a different set of observations, and keeps the first that gives
exactly the served values:

- `no_bootstrap`: the job started (job_start_time) without the observations
  it had not received itself: those that arrived before it started (or, in
  history without arrival times, whose event time is before it started);
- `late_observation`: observations in the window that arrived after the
  request was answered (their arrival, from the events archive, is later than
  the request's own time): what the watermark had passed without them;
- both at once (a cold job that also missed a late one);
- `duplicate`: an observation had conflicting copies (same identity, other
  content): the job kept the copy that arrived first, batch the one whose
  canonical JSON sorts first; the other copy gives the served values.

A hypothesis explains a difference only when it reproduces every served value
of the group bit for bit, so an explanation is evidence, not a guess.
Differences in static request fields, or that no hypothesis reproduces, stay
unexplained and are listed with their event_id.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional, Sequence

from transforms.deduplicate import identity, resolve_copies
from transforms.events import Event, event_to_json, time_us_to_rfc3339
from transforms.examples import row_values
from transforms.bounded_features import answer_bucket
from transforms.feature_layout import EventLayout, FeatureGroup, event_key, feature_groups, key_of
from transforms.spec import FeatureSpec, length_name, presence_name

NO_BOOTSTRAP, LATE_OBSERVATION, DUPLICATE = "no_bootstrap", "late_observation", "duplicate"
CATEGORIES = (NO_BOOTSTRAP, LATE_OBSERVATION, DUPLICATE)


class Arrived(NamedTuple):
    """An observation of the history, with its arrival at the serving job (None: unknown, e.g. files)."""

    event: Event
    arrival_us: Optional[int]


class Explanation(NamedTuple):
    category: str  # one of CATEGORIES, or "+"-joined ones
    detail: str  # what happened, in words a user can check
    observations: tuple[str, ...]  # the identities that make the difference


def differing_columns(served: dict, recomputed: dict, columns: Iterable[str]) -> list[str]:
    """The columns whose served value is not exactly the recomputed one (None == None)."""
    return [name for name in columns if served.get(name) != recomputed.get(name)]


def group_columns(spec: FeatureSpec, group: FeatureGroup) -> tuple[str, ...]:
    """The served columns of one feature group: its features and their presence flags."""
    names = []
    for feature in group.features:
        names.append(feature.name)
        if feature.has_presence:
            names.append(presence_name(feature.name))
        if feature.rule.sequence:
            names.append(length_name(feature.name))
    return tuple(names)


def column_groups(spec: FeatureSpec) -> dict[str, Optional[FeatureGroup]]:
    """Served column -> its feature group (None: a static request column)."""
    owner: dict[str, Optional[FeatureGroup]] = {}
    for group in feature_groups(spec):
        for name in group_columns(spec, group):
            owner[name] = group
    return owner


def group_values(spec: FeatureSpec, group: FeatureGroup, request: Event,
                 observations: Sequence[Event]) -> dict:
    """One group's served columns for `request`, computed from `observations`
    (of any kind and key: those the group does not read are left out) by the
    batch engine's arithmetic and the encoder's float32: what batch would serve."""
    layout = EventLayout.of(spec)
    empty = (None,) * len(spec.windowed_features)
    request_item = layout.to_item(request, empty)
    key = key_of(request_item, group)
    features = request_item
    if key is not None:
        items = [request_item]
        for event in observations:
            if event.role == group.kind:
                item = layout.to_item(event, empty)
                if key_of(item, group) == key:
                    items.append(item)
        (features,) = answer_bucket(group, items)
    encoded = row_values(spec, layout.to_row(features))
    return {name: encoded[name] for name in group_columns(spec, group)}


def _by_identity(copies: Sequence[Arrived]) -> dict[str, list[Arrived]]:
    grouped: dict[str, list[Arrived]] = {}
    for copy in copies:
        grouped.setdefault(identity(copy.event), []).append(copy)
    return grouped


def _earliest(versions: Sequence[Arrived]) -> Arrived:
    """Of copies, the one that arrived first (unknown arrivals last)."""
    return min(versions, key=lambda v: (v.arrival_us is None, v.arrival_us or 0))


def _kept(copies: Sequence[Arrived]) -> list[Arrived]:
    """One copy per identity, as batch keeps it (canonical order), at its earliest arrival."""
    kept = []
    for versions in _by_identity(copies).values():
        chosen, _, _ = resolve_copies([v.event for v in versions])
        kept.append(_earliest([v for v in versions if v.event == chosen]))
    return kept


def _duplicate_choices(copies: Sequence[Arrived], kept: list[Arrived]) -> list[tuple[tuple[str, ...], list[Arrived]]]:
    """Where identities have conflicting copies: the copies the live job kept
    (the first to arrive), and each other version of one identity in turn;
    each with the identities whose copy differs from batch's."""
    choices = []
    conflicted = {key: versions for key, versions in _by_identity(copies).items()
                  if len({event_to_json(v.event) for v in versions}) > 1}
    if not conflicted:
        return choices
    first = [_earliest(versions) for versions in _by_identity(copies).values()]
    if {event_to_json(a.event) for a in first} != {event_to_json(a.event) for a in kept}:
        choices.append((tuple(conflicted), first))
    for key, versions in conflicted.items():
        for version in {event_to_json(v.event): v for v in versions}.values():
            if all(version.event != k.event for k in kept):
                choices.append(((key,), [version if identity(k.event) == key else k for k in kept]))
    return choices


def explain_group(spec: FeatureSpec, group: FeatureGroup, request: Event, served: dict,
                  history: Sequence[Arrived], job_start_us: int) -> Optional[Explanation]:
    """Why the served values of `group` differ from batch's, or None when no
    hypothesis reproduces them. `history`: every copy of the observations of
    the request's key value (any time; conflicting copies included)."""
    window_s = max(f.window_s for f in group.features)
    lo, hi = request.time_us - window_s * 1_000_000, request.time_us
    layout = EventLayout.of(spec)
    key = event_key(layout, group, request)
    in_window = [a for a in history if lo <= a.event.time_us < hi and event_key(layout, group, a.event) == key]
    target = {name: served.get(name) for name in group_columns(spec, group)}

    def reproduces(copies: Sequence[Arrived]) -> bool:
        return group_values(spec, group, request, [a.event for a in copies]) == target

    def seen_at(a: Arrived) -> int:
        """When the job could have had it: its arrival, or (unknown) its event time."""
        return a.arrival_us if a.arrival_us is not None else a.event.time_us

    def describe(a: Arrived) -> str:
        arrived = f", arrived {time_us_to_rfc3339(a.arrival_us)}" if a.arrival_us is not None else ""
        return f"{identity(a.event)} at {time_us_to_rfc3339(a.event.time_us)}{arrived}"

    kept = _kept(in_window)
    choices = [((), kept)] + _duplicate_choices(in_window, kept)
    for duplicate, copies in choices:
        # A job without a warm start has what reached it live: a suffix of the history. Its subscription may
        # hold messages from before its start, so the boundary is any time up to the start, earliest first.
        cold_cutoffs = sorted({seen_at(a) for a in copies if seen_at(a) < job_start_us})
        # Arrivals after the request's own time, latest first: leave out the fewest that reproduce.
        late_cutoffs = sorted({a.arrival_us for a in copies if a.arrival_us is not None and a.arrival_us > hi},
                              reverse=True)
        for cold_cutoff in (None, *cold_cutoffs):
            missing_cold = [a for a in copies if cold_cutoff is not None and seen_at(a) <= cold_cutoff]
            base = [a for a in copies if a not in missing_cold]
            for cutoff in (None, *late_cutoffs):
                late = [a for a in base if cutoff is not None and a.arrival_us is not None and a.arrival_us >= cutoff]
                if not (duplicate or missing_cold or late):
                    continue  # the plain batch answer: already known to differ
                if not reproduces([a for a in base if a not in late]):
                    continue
                categories, details = [], []
                if missing_cold:
                    categories.append(NO_BOOTSTRAP)
                    details.append(f"the job started at {time_us_to_rfc3339(job_start_us)} without "
                                   f"{len(missing_cold)} observation(s) of {group.name}="
                                   f"{key} in the window from before its start "
                                   f"(no warm start): " + "; ".join(describe(a) for a in missing_cold[:5]))
                if late:
                    categories.append(LATE_OBSERVATION)
                    details.append(f"{len(late)} observation(s) in the window arrived after the request's time "
                                   f"{time_us_to_rfc3339(hi)}, after it was answered: "
                                   + "; ".join(describe(a) for a in late[:5]))
                if duplicate:
                    categories.append(DUPLICATE)
                    details.append(f"conflicting copies of {', '.join(duplicate)}: the job kept another copy than "
                                   "batch (the first to arrive; batch keeps the first in canonical order)")
                return Explanation("+".join(categories), "; ".join(details),
                                   tuple(identity(a.event) for a in (*missing_cold, *late)) + duplicate)
    return None
