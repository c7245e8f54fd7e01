"""Ctrl-C in the driver cancels the running call on the workers: the next call starts at once."""
import os
import subprocess
import sys
import textwrap

import pytest

DRIVER = textwrap.dedent("""
    import os, signal, sys, threading, time
    from ringpipe.runtime import Cluster

    def sleep_long(comm, started):
        open(f"{started}-{comm.rank}", "w").close()
        time.sleep(60)

    def rank(comm):
        return comm.rank

    def interrupt_once_started(started):
        while not all(os.path.exists(f"{started}-{r}") for r in range(2)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    if __name__ == "__main__":
        signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job starts with it ignored)
        started = sys.argv[1]
        with Cluster(2) as cluster:
            threading.Thread(target=interrupt_once_started, args=(started,), daemon=True).start()
            try:
                cluster.run(sleep_long, started)
            except KeyboardInterrupt:
                print("interrupted", flush=True)
            print("next", cluster.run(rank, timeout=30), flush=True)
""")


@pytest.mark.timeout(90)
def test_ctrl_c_in_a_call_cancels_it_on_the_workers_and_the_next_call_runs_at_once(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "started")], capture_output=True,
                            text=True, timeout=80, env=dict(os.environ), cwd=tmp_path)
    # Without the cancel, the next call waits behind the 60 s sleep and its 30 s deadline fails it.
    assert result.stdout.split("\n")[:2] == ["interrupted", "next [0, 1]"], result.stderr
    assert result.returncode == 0, result.stderr
