"""The measurement protocol of the benchmarks that compare libraries: every library runs once per
round, in turn (ringpipe, peer, ringpipe, peer, ...), in fresh processes, and each figure is the
median of its rounds, every round kept.

Why: on a shared machine single runs move by 20-50 %. Interleaving spreads the machine's slow
phases over all libraries instead of handing them to whichever ran then; the median ignores the odd
slow (or lucky) round, where best-of would report the luckiest and a mean the slowest.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from ringpipe.tools.bench_libraries import LibraryUnavailable


def interleaved_rounds(runners: dict[str, Callable[[], list[dict]]], rounds: int,
                       progress: Callable[[str], None] | None = None) -> tuple[dict[str, list], dict[str, str]]:
    """Call every runner once per round, in the dict's order, `rounds` times.

    Returns ({library: [rows of round 1, rows of round 2, ...]}, {library: why it has no rows}).
    A runner raising LibraryUnavailable is dropped, with the rounds it had done; any other exception
    propagates. `progress` gets one line per round."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    results = {name: [] for name in runners}
    unavailable: dict[str, str] = {}
    for index in range(rounds):
        seconds = []
        for name, runner in runners.items():
            if name in unavailable:
                continue
            start = time.perf_counter()
            try:
                results[name].append(runner())
            except LibraryUnavailable as exc:
                unavailable[name] = str(exc) if index == 0 else f"round {index + 1} of {rounds}: {exc}"
                results[name] = []
                continue
            seconds.append(f"{name} {time.perf_counter() - start:.1f} s")
        if progress:
            progress(f"round {index + 1}/{rounds}: " + ", ".join(seconds))
    return {name: rows for name, rows in results.items() if name not in unavailable}, unavailable


def median_of_rounds(rounds: list[list[dict]], key: tuple[str, ...]) -> list[dict]:
    """One row per `key` value (in the first round's order) from rows of several rounds.

    Each input row has "time_us" and "wrong". The output row has the first round's other fields,
    time_us = the median over the rounds (of two middle rounds, their mean), wrong = the sum over
    the rounds, and "rounds": every round's {"time_us", "wrong"} in order. Raises ValueError when
    the rounds do not hold the same keys."""
    if not rounds:
        return []
    keys = [tuple(row[k] for k in key) for row in rounds[0]]
    by_round = []
    for index, rows in enumerate(rounds):
        found = {tuple(row[k] for k in key): row for row in rows}
        if sorted(found) != sorted(keys) or len(found) != len(rows):
            raise ValueError(f"round {index + 1} measured {sorted(found)}, round 1 {sorted(keys)}")
        by_round.append(found)
    merged = []
    for k in keys:
        per_round = [{"time_us": found[k]["time_us"], "wrong": found[k]["wrong"]} for found in by_round]
        row = dict(by_round[0][k])
        row.update(time_us=statistics.median(r["time_us"] for r in per_round),
                   wrong=sum(r["wrong"] for r in per_round), rounds=per_round)
        merged.append(row)
    return merged
