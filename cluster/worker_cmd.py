"""`ringpipe worker`: join a driver's rendezvous and run this host's share of the workers.

    ringpipe worker --rdzv-endpoint HOST:PORT --nproc-per-node 2 [--key-file F]   (by hand, torchrun-style)
    mpirun -np N ringpipe worker --rdzv-endpoint HOST:PORT                        (ranks from OMPI_*/PMI_*)
    srun ringpipe worker --rdzv-endpoint HOST:PORT                                (ranks from SLURM_*)

The key comes from a file readable by its owner only, or (ssh, srun: `--key-stdin`) from stdin, so
it never appears in a command line or an environment other users can read.
"""
from __future__ import annotations

import sys

import click

from ringpipe.cluster.launchers import (DEFAULT_KEY_FILE, die_with_launcher, host_from_environment, job_keys,
                                        rank_from_environment, stdin_watch)
from ringpipe.cluster.options import FiniteFloat, bad_flag, one_line
from ringpipe.runtime.auth import KeyFileError, keys_from_secret
from ringpipe.runtime.rendezvous import AGENT_SILENCE_S, RendezvousError, parse_endpoint


@click.command(short_help="Join a training run's rendezvous and run this host's workers.")
@click.option("--rdzv-endpoint", required=True, metavar="HOST:PORT",
              help="Where the driver (`ringpipe train --rdzv-endpoint`) listens.")
@click.option("--nproc-per-node", type=click.IntRange(min=1), default=None,
              help="Workers on this host (default: 1, or the one rank mpirun/srun gave this process).")
@click.option("--key-file", default=None, help=f"The rendezvous key, mode 0600 [default: {DEFAULT_KEY_FILE}].")
@click.option("--key-stdin", is_flag=True, hidden=True, help="Read the key from stdin (ssh and srun launchers).")
@click.option("--exit-with-stdin", is_flag=True, hidden=True,
              help="Stop this host's workers and exit when stdin ends (the ssh connection or srun's input, which "
                   "the driver holds open, ended).")
@click.option("--host-id", default=None, help="This host's name in the run (default: the launcher's node name "
                                              "under srun, else this host's address towards the driver).")
@click.option("--timeout", type=FiniteFloat(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the driver's answer.")
@click.option("--driver-silence", type=FiniteFloat(min=0, min_open=True), default=AGENT_SILENCE_S,
              show_default=True, help="Seconds without a word from the driver after which it is taken for "
                                      "dead and this host's workers are stopped.")
def worker(rdzv_endpoint, nproc_per_node, key_file, key_stdin, exit_with_stdin, host_id, timeout, driver_silence):
    """Join the rendezvous at HOST:PORT; exits 0 once every worker of this host ended with 0."""
    from ringpipe.runtime.rendezvous_agent import join_and_run

    try:
        parse_endpoint(rdzv_endpoint)
    except RendezvousError as exc:
        raise bad_flag("--rdzv-endpoint", str(exc)) from None
    from ringpipe.runtime import cpu_binding, env_setting

    try:  # this host's tuning variables, before it joins (its workers would fail at their start)
        env_setting.check()
        cpu_binding.mode_from(None)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    place = rank_from_environment()
    if place is not None or exit_with_stdin:  # started by a launcher (mpirun, srun, ssh): end with it
        die_with_launcher()
    ranks = None
    if place is not None and nproc_per_node is None:
        ranks = [place[0]]
        host_id = host_id or host_from_environment()
    try:
        keys = keys_from_secret(sys.stdin.buffer.readline()) if key_stdin else job_keys(key_file, create=False)
        code = join_and_run(rdzv_endpoint, keys, nproc_per_node or 1, host=host_id, ranks=ranks, timeout=timeout,
                            silence=driver_silence, driver_gone=stdin_watch() if exit_with_stdin else None,
                            say=lambda message: click.echo(f"ringpipe worker: {message}", err=True))
    except (KeyFileError, RendezvousError) as exc:
        raise click.ClickException(one_line(exc)) from None
    raise click.exceptions.Exit(code)
