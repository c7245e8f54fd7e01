"""Issue #15's targets checked on a `bench_issue15` result, and its tables as Markdown (the README's).

Every check reads the medians of the rounds the result holds; a target whose measurement is
missing (a section not run, a peer library unavailable) is listed with met = None, never as met.
"""
from __future__ import annotations

import statistics

from ringpipe.tools.bench_libraries import CHECKOUT

KiB, MiB = 1 << 10, 1 << 20


def _rows(result: dict, section: str) -> dict:
    """(impl, op, size) -> row of one communication section (p2p rows have op "p2p")."""
    rows = (result.get(section) or {}).get("rows", [])
    return {(row["impl"], row.get("op", "p2p"), row["size_bytes"]): row for row in rows}


def _baseline(result: dict) -> str | None:
    for section in ("collectives2", "p2p", "collectives4"):
        for library in (result.get(section) or {}).get("libraries", []):
            if library.startswith(CHECKOUT):
                return library
    return None


def _check(target: str, value, limit: float, at_most: bool, detail: str = "") -> dict:
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"target": target, "value": value, "limit": limit, "at_most": at_most, "met": met, "detail": detail}


def _worst(pairs):
    """(smallest ratio, its label) of (ratio, label) pairs; (None, "") when one is missing or none."""
    pairs = list(pairs)
    if not pairs or any(ratio is None for ratio, _ in pairs):
        return None, ""
    return min(pairs)


def _ratio(rows, ours, theirs, key="busbw"):
    """theirs-relative figure of ours: busbw ours/theirs, or time theirs/ours (higher: ringpipe better)."""
    if ours is None or theirs is None or key not in ours:
        return None
    if key == "time_us":
        return theirs["time_us"] / ours["time_us"]
    return ours[key] / theirs[key] if theirs[key] else None


def targets(result: dict) -> list[dict]:
    """One check per target of issue #15 that this command measures."""
    two, four, p2p = _rows(result, "collectives2"), _rows(result, "collectives4"), _rows(result, "p2p")
    sizes = result.get("sizes", [])
    checks = []
    row = two.get(("ringpipe", "all_reduce", KiB))
    checks.append(_check("2 ranks: all_reduce 1 KiB (µs)", row and row["time_us"], 30, True))
    row = p2p.get(("ringpipe", "p2p", KiB))
    checks.append(_check("2 ranks: p2p one-way 1 KiB (µs)", row and row["time_us"], 20, True))
    worst = _worst((_ratio(two, two.get(("ringpipe", "all_reduce", s)), two.get(("mpi", "all_reduce", s))),
                    _size(s)) for s in sizes if s >= 64 * KiB)
    checks.append(_check("2 ranks: all_reduce busbw / OpenMPI's, every size from 64 KiB", *worst[:1], 1.0, False,
                         f"lowest at {worst[1]}" if worst[1] else ""))
    row = four.get(("ringpipe", "all_reduce", KiB))
    checks.append(_check("4 ranks: all_reduce 1 KiB (µs)", row and row["time_us"], 150, True))
    worst = _worst((_ratio(four, four.get(("ringpipe", "all_reduce", s)), four.get(("mpi", "all_reduce", s))),
                    _size(s)) for s in sizes if 256 * KiB <= s <= 4 * MiB)
    checks.append(_check("4 ranks: all_reduce busbw / OpenMPI's, 256 KiB to 4 MiB", *worst[:1], 0.8, False,
                         f"lowest at {worst[1]}" if worst[1] else ""))
    for peer, name in (("mpi", "OpenMPI's"), ("gloo", "gloo's")):
        value = _ratio(four, four.get(("ringpipe", "all_reduce", 64 * MiB)), four.get((peer, "all_reduce", 64 * MiB)))
        checks.append(_check(f"4 ranks: all_reduce 64 MiB busbw / {name}", value, 1.5, False))
    ops = sorted({op for impl, op, _ in four if impl == "ringpipe"})
    worst = _worst((_ratio(four, four.get(("ringpipe", op, s)), four.get(("gloo", op, s)), "time_us"),
                    f"{op} {_size(s)}") for op in ops for s in sizes)
    checks.append(_check("4 ranks: every op and size, gloo's time / ringpipe's", *worst[:1], 1.0, False,
                         f"lowest at {worst[1]}" if worst[1] else ""))
    pipeline = (result.get("pipeline") or [None])[0]
    checks.append(_check("pipeline 1F1B p=2 m=8: bubble / no-communication replay (median of rounds)",
                         pipeline and pipeline["bubble_over_no_comm_replay_median"], 1.1, True))
    dp_rows = (result.get("data_parallel") or {}).get("rows", [])
    checks.append(_check("data parallel dp=2: weak-scaling efficiency (median of rounds)",
                         dp_rows[-1]["efficiency_median"] if len(dp_rows) > 1 else None, 0.92, False))
    baseline = _baseline(result)
    if baseline:
        pairs = []
        for section, rows in (("collectives2", two), ("p2p", p2p), ("collectives4", four)):
            if baseline not in (result.get(section) or {}).get("libraries", []):
                continue  # a section run without the baseline
            pairs += [(_ratio(rows, row, rows.get((baseline, op, size)), "time_us"), f"{section} {op} {_size(size)}")
                      for (impl, op, size), row in rows.items() if impl == "ringpipe"]
        worst = _worst(pairs)
        checks.append(_check("no regression: baseline's time / ringpipe's, every op and size", *worst[:1], 0.95,
                             False, f"lowest at {worst[1]}" if worst[1] else ""))
    return checks


def _size(nbytes: int) -> str:
    for unit, factor in (("MiB", MiB), ("KiB", KiB)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor} {unit}"
    return f"{nbytes} B"


def _number(value) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(l) + " |" for l in lines]


def _communication_table(result: dict, section: str) -> list[str]:
    data = result.get(section)
    if not data:
        return []
    peers = [p for p in data["libraries"][1:] if p not in data["unavailable"]]
    names = {p: ("baseline" if p.startswith(CHECKOUT) else p) for p in peers}
    rows = _rows(result, section)
    unit = "one-way µs" if section == "p2p" else "µs"
    header = ["op", "size", f"ringpipe {unit}"] + [f"{names[p]} {unit}" for p in peers]
    if section != "p2p":
        header += ["busbw GB/s: ringpipe"] + [names[p] for p in peers]
    lines = []
    for (impl, op, size), row in rows.items():
        if impl != "ringpipe":
            continue
        others = [rows.get((p, op, size)) for p in peers]
        line = [op, _size(size), _number(row["time_us"])] + [_number(o and o["time_us"]) for o in others]
        if section != "p2p":
            line += [f"{row['busbw']:.3f}"] + [f"{o['busbw']:.3f}" if o else "–" for o in others]
        lines.append(line)
    title = {"collectives2": "2 ranks", "collectives4": "4 ranks on 2 cores", "p2p": "point-to-point, 2 ranks"}[section]
    notes = [f"{library}: not run: {why}" for library, why in data["unavailable"].items()]
    return [f"**{title}** (median of {data['rounds']} interleaved rounds)", ""] + _table(header, lines) + \
        ([""] + notes if notes else []) + [""]


def format_markdown(result: dict) -> str:
    """The targets, then one table per section, as the README shows them."""
    before, after = result["load_average_before"][0], result.get("load_average_after", [float("nan")])[0]
    lines = [f"`python -m ringpipe.tools.bench_issue15 --json issue15.json`, {result['rounds']} rounds, "
             f"load average {before:.2f} before and {after:.2f} after, "
             + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items()), ""]
    lines += _table(["target", "measured", "limit", "met"],
                    [[c["target"] + (f" ({c['detail']})" if c["detail"] else ""), _number(c["value"]),
                      ("≤ " if c["at_most"] else "≥ ") + f"{c['limit']:g}",
                      {True: "yes", False: "**no**", None: "not measured"}[c["met"]]] for c in result["targets"]])
    lines.append("")
    for section in ("collectives2", "p2p", "collectives4"):
        lines += _communication_table(result, section)
    for row in result.get("pipeline") or []:
        rounds = " ".join(f"{r['bubble_over_no_comm_replay']:.2f}" for r in row["rounds"])
        lines += [f"**pipeline** {row['schedule']} p={row['pp']} m={row['microbatches']}: bubble / replay of the same "
                  f"step with its own compute times and no communication, per round {rounds}, median "
                  f"{row['bubble_over_no_comm_replay_median']:.2f}; bubble of total {row['bubble_fraction']:.1%} "
                  f"(best round) against {row['theory']['fraction']:.1%} in theory", ""]
    dp = result.get("data_parallel")
    if dp:
        for row in dp["rows"][1:]:
            rounds = " ".join(f"{e:.1%}" for e in row["round_efficiency"])
            lines += [f"**data parallel** {row['setup']}: weak-scaling efficiency per round {rounds}, median "
                      f"{row['efficiency_median']:.1%}; step {statistics.median(row['round_step_s']) * 1e3:.1f} ms "
                      f"against {statistics.median(dp['rows'][0]['round_step_s']) * 1e3:.1f} ms at dp=1", ""]
    return "\n".join(lines).rstrip()
