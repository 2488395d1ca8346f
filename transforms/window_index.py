"""Indexes over one sorted series that answer a window [lo, hi) of it without
scanning the window: what makes a request cost the same whether its window
holds a thousand observations or a million. No Beam in here.

Each index follows the series through the only three changes it undergoes
(transforms/point_in_time.py `Series`): an insertion at a position (at the
end, or a little before it for ties on time, when events come in time order;
anywhere for a late observation), a drop of its oldest entries (eviction),
and a rebuild from scratch (a history restored from state).

- `ExactSums`: prefix sums of the values (and of their squares) as exact
  integers. Every finite double is an integer multiple of 2**-1074, so
  scaled by a power of two every value is an integer, and a difference of
  two prefix sums is the window's exact sum. Rounded once to a double it is
  `math.fsum` of the window bit for bit (both are the correctly rounded exact
  sum). The scale is the finest any value of the series needs (2**-e for the
  largest binary exponent e of a denominator: 1 for whole numbers), raised
  when a finer value arrives (every prefix is then shifted: at most 1074
  times in a series' life), so whole numbers stay small integers.
- `SlidingExtreme`: the window's min or max from a monotonic deque, amortized
  O(1) for requests in time order; a request behind the previous one (late)
  scans its window instead.
- `SlidingDistinct`: the number of distinct values in the window from counts
  of the values in it, moved by the change of the window's ends.

Positions are local (0 = the oldest kept entry); the sliding indexes keep an
offset so that a drop of entries before their window costs nothing.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional, Sequence


def _scaled(value) -> tuple[int, int]:
    """(numerator, e): the value is numerator * 2**-e exactly; e >= 0.
    Ints become doubles first: today's fsum rounds them so."""
    numerator, denominator = float(value).as_integer_ratio()
    return numerator, denominator.bit_length() - 1  # denominators of doubles are powers of two


class ExactSums:
    """Prefix sums of one component of a series' values (`component` None:
    the value itself; i: the i-th of a tuple), exact, in units of 2**-bits;
    with `squares`, prefix sums of the squares too (units of 2**-2bits)."""

    def __init__(self, values: list, component: Optional[int] = None, squares: bool = False):
        self._values, self._component, self._squares = values, component, squares
        self.rebuild()

    def _part(self, value):
        return value if self._component is None else value[self._component]

    def rebuild(self) -> None:
        parts = [_scaled(self._part(v)) for v in self._values]
        self.bits = max((e for _, e in parts), default=0)
        self._unit = 1 << self.bits
        self.sums, self.square_sums = [0], [0]
        for numerator, e in parts:
            scaled = numerator << (self.bits - e)
            self.sums.append(self.sums[-1] + scaled)
            if self._squares:
                self.square_sums.append(self.square_sums[-1] + scaled * scaled)

    def _rescale(self, bits: int) -> None:
        shift = bits - self.bits
        self.sums = [s << shift for s in self.sums]
        if self._squares:
            self.square_sums = [s << (2 * shift) for s in self.square_sums]
        self.bits, self._unit = bits, 1 << bits

    def insert(self, at: int, value) -> None:
        """The series gained `value` at position `at`."""
        numerator, e = _scaled(self._part(value))
        if e > self.bits:
            self._rescale(e)
        scaled = numerator << (self.bits - e)
        _insert_term(self.sums, at, scaled)
        if self._squares:
            _insert_term(self.square_sums, at, scaled * scaled)

    def drop_front(self, drop: int) -> None:
        """The series lost its `drop` oldest entries (the differences stay right)."""
        del self.sums[:drop]
        if self._squares:
            del self.square_sums[:drop]

    def total(self, lo: int, hi: int) -> float:
        """The window's sum, correctly rounded (int / int is, in Python)."""
        return (self.sums[hi] - self.sums[lo]) / self._unit

    def stddev(self, lo: int, hi: int) -> float:
        """The window's population standard deviation, correctly rounded."""
        n = hi - lo
        total = self.sums[hi] - self.sums[lo]
        numerator = n * (self.square_sums[hi] - self.square_sums[lo]) - total * total  # n^2 var, units 2**-2bits
        return exact_stddev(numerator, n, self.bits)


def exact_stddev(numerator: int, n: int, bits: int) -> float:
    """The population standard deviation of n values from n**2 times their
    variance in units of 2**-2bits (n * sum of squares - sum**2), correctly rounded."""
    if not numerator:
        return 0.0
    # A factor 4**s of the numerator is 2**s of the root: smaller integers, the same exact value.
    strip = min(((numerator & -numerator).bit_length() - 1) >> 1, bits)
    return exact_sqrt_ratio(numerator >> (2 * strip), n, bits - strip)


def _insert_term(prefix: list, at: int, term: int) -> None:
    prefix.insert(at + 1, prefix[at] + term)
    for i in range(at + 2, len(prefix)):  # only after a late observation is this more than a tie or two
        prefix[i] += term


def exact_sqrt_ratio(numerator: int, n: int, bits: int) -> float:
    """sqrt(numerator) / (n * 2**bits), correctly rounded to a double."""
    shift = max(0, 66 - numerator.bit_length() // 2 + n.bit_length())  # 66+ bits of the root before rounding
    scaled, remainder = divmod(numerator << (2 * shift), n * n)
    root = math.isqrt(scaled)  # floor(sqrt(numerator * 4**shift / n**2)), exactly
    if remainder or root * root != scaled:  # inexact: a sticky bit so that one rounding is the right one
        return (2 * root + 1) / (1 << (shift + bits + 1))
    return root / (1 << (shift + bits))


class _SlidingWindow:
    """What the sliding indexes share: the window [lo, hi) they hold, in
    positions offset by `base` (the entries dropped since), and a reset when a
    change of the series lands inside it."""

    def __init__(self, values: list):
        self._values = values
        self.rebuild()

    def rebuild(self) -> None:
        self.base = self.lo = self.hi = 0  # lo and hi are absolute: local position + base
        self._clear()

    def insert(self, at: int, value) -> None:
        at += self.base
        if at >= self.hi:  # after the window: what requests in time order always see
            return
        if at < self.lo:  # before it: the window's entries moved one on
            self._shift()
        else:  # a late observation inside the window
            self.lo = self.hi = self.base
            self._clear()

    def drop_front(self, drop: int) -> None:
        self.base += drop
        if self.lo < self.base:  # the window held dropped entries (it answered a late request)
            self.lo = self.hi = self.base
            self._clear()

    def _clear(self) -> None:
        raise NotImplementedError

    def _shift(self) -> None:
        raise NotImplementedError


class SlidingExtreme(_SlidingWindow):
    """The window's min (or max, `largest`), as `min()` (`max()`) of the
    window's slice would give it: the first extreme in series order, so of
    0.0 and -0.0 the older one."""

    def __init__(self, values: list, largest: bool = False):
        self._largest = largest
        super().__init__(values)

    def _clear(self) -> None:
        self._deque: deque[int] = deque()  # absolute positions; their values strictly better front to back

    def _shift(self) -> None:
        self.lo, self.hi = self.lo + 1, self.hi + 1
        self._deque = deque(p + 1 for p in self._deque)

    def query(self, lo: int, hi: int) -> float:
        values, base = self._values, self.base
        lo, hi = lo + base, hi + base
        if lo < self.lo or hi < self.hi:  # behind the last request: scan, and keep the window for the next
            window = values[lo - base:hi - base]
            return float(max(window) if self._largest else min(window))
        positions = self._deque
        if lo >= self.hi:  # no overlap with the last window: start from lo
            positions.clear()
            self.hi = lo
        for p in range(self.hi, hi):
            value = values[p - base]
            if self._largest:
                while positions and values[positions[-1] - base] < value:
                    positions.pop()
            else:
                while positions and values[positions[-1] - base] > value:
                    positions.pop()
            positions.append(p)
        while positions[0] < lo:
            positions.popleft()
        self.lo, self.hi = lo, hi
        return float(values[positions[0] - base])


class SlidingDistinct(_SlidingWindow):
    """The number of distinct values in the window, as `len(set(slice))`."""

    def _clear(self) -> None:
        self._counts: dict = {}

    def _shift(self) -> None:
        self.lo, self.hi = self.lo + 1, self.hi + 1

    def _add(self, values: Sequence) -> None:
        counts = self._counts
        for value in values:
            counts[value] = counts.get(value, 0) + 1

    def _remove(self, values: Sequence) -> None:
        counts = self._counts
        for value in values:
            left = counts[value] - 1
            if left:
                counts[value] = left
            else:
                del counts[value]

    def query(self, lo: int, hi: int) -> float:
        values, base = self._values, self.base
        lo, hi = lo + base, hi + base
        if abs(lo - self.lo) + abs(hi - self.hi) > hi - lo:  # moving costs more than counting afresh
            self._counts = {}
            self._add(values[lo - base:hi - base])
        else:  # grow first, then shrink: no count goes below zero
            if hi > self.hi:
                self._add(values[self.hi - base:hi - base])
            if lo < self.lo:
                self._add(values[lo - base:self.lo - base])
            if hi < self.hi:
                self._remove(values[hi - base:self.hi - base])
            if lo > self.lo:
                self._remove(values[self.lo - base:lo - base])
        self.lo, self.hi = lo, hi
        return float(len(self._counts))
