"""Every measured target of issue #15 (same-host communication) in one command, with its protocol.

    python -m ringpipe.tools.bench_issue15 --json issue15.json [--markdown issue15.md]
                                           [--baseline /path/to/checkout/of/the/start/commit]

Each figure is the median of `--rounds` (default 5) interleaved rounds, ringpipe and each peer
taking turns in fresh processes (tools/bench_rounds.py), every round kept in the JSON:
- collectives, 2 ranks: all_reduce and sendrecv against OpenMPI (mpi4py);
- p2p, 2 ranks: one-way latency (half the median round trip of `--pingpongs` ping-pongs) against
  OpenMPI;
- collectives, 4 ranks: every op against gloo and OpenMPI;
- pipeline: 1F1B at p = 2, m = 8, its bubble over a replay of the same step with its own compute
  times and no communication (tools/bench_pipeline.py), one run per round;
- data parallel: weak-scaling efficiency at dp = 2 (tools/bench_data_parallel.py), each round's
  dp = 1 and dp = 2 back to back.
With `--baseline`, ringpipe from that checkout runs as one more peer in the three communication
benchmarks: the "no regression" target (every op and size >= 0.95x the baseline). The README's
main-command A/B (tokens/s) is not part of this command.

The targets are checked at the end (tools/bench_issue15_report.py) and printed with the tables,
as Markdown, for the README.
"""
from __future__ import annotations

import os
import time

from ringpipe.runtime.files import write_json, write_text
from ringpipe.tools import bench_collectives, bench_data_parallel, bench_p2p, bench_pipeline
from ringpipe.tools.bench_collectives import parse_sizes
from ringpipe.tools.bench_issue15_report import format_markdown, targets
from ringpipe.tools.bench_libraries import CHECKOUT, check_checkout
from ringpipe.tools.script_args import ScriptParser, at_least, checked, comma_list, size_list, writable_file

SECTIONS = ("collectives2", "p2p", "collectives4", "pipeline", "data_parallel")
SIZES = "1K,64K,256K,1M,4M,64M"


def run(rounds: int = 5, baseline: str | None = None, sizes: str = SIZES, pingpongs: int = 1000,
        sections=SECTIONS, progress=print) -> dict:
    """The measurements of `sections` (all by default) and the targets checked on them."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    extra = [CHECKOUT + check_checkout(baseline)] if baseline else []
    size_list = parse_sizes(sizes)
    result = {"benchmark": "issue15", "rounds": rounds, "baseline": baseline, "sizes": size_list,
              "load_average_before": list(os.getloadavg()), "seconds": {}}

    def section(name, measure):
        if name not in sections:
            return
        progress(f"== {name}")
        start = time.perf_counter()
        result[name] = measure()
        result["seconds"][name] = time.perf_counter() - start

    section("collectives2", lambda: bench_collectives.run(2, ("all_reduce", "sendrecv"), size_list, ["mpi", *extra],
                                                          rounds, progress=progress))
    section("p2p", lambda: bench_p2p.run([1 << 10], pingpongs, ["mpi", *extra], rounds, progress=progress))
    section("collectives4", lambda: bench_collectives.run(4, bench_collectives.OPS, size_list,
                                                          ["gloo", "mpi", *extra], rounds, progress=progress))
    section("pipeline", lambda: bench_pipeline.run(("1f1b",), (8,), pp=2, rounds=rounds, echo=progress))
    section("data_parallel", lambda: bench_data_parallel.run((1, 2), rounds=rounds, steps=10, independent=False))
    result["load_average_after"] = list(os.getloadavg())
    result["targets"] = targets(result)
    return result


def main(argv=None):
    parser = ScriptParser(description=__doc__.splitlines()[0])
    # The files are checked before the run, whose results would be lost at the end.
    parser.add_argument("--json", required=True, type=writable_file, help="write every round and the targets here")
    parser.add_argument("--markdown", type=writable_file, help="also write the README's tables here")
    parser.add_argument("--baseline", type=checked(check_checkout),
                        help="a checkout of the commit to compare with (no-regression target)")
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--sizes", type=size_list, default=SIZES, help="collective sizes, e.g. 1K,64K,256K,1M,4M,64M")
    parser.add_argument("--pingpongs", type=at_least(1), default=1000)
    parser.add_argument("--sections", type=comma_list(SECTIONS), default=list(SECTIONS),
                        help="a comma list of " + ", ".join(SECTIONS))
    args = parser.parse_args(argv)
    result = run(args.rounds, args.baseline, args.sizes, args.pingpongs, args.sections)
    write_json(args.json, result, indent=1)
    text = format_markdown(result)
    if args.markdown:
        write_text(args.markdown, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
