"""A driver script without an entry-point guard fails with one line saying to add it."""
import os
import subprocess
import sys

import pytest

UNGUARDED = """
from ringpipe.runtime import Cluster

def rank(comm):
    return comm.rank

with Cluster(1) as cluster:
    print("result", cluster.run(rank))
"""


@pytest.mark.timeout(90)
def test_a_script_without_a_main_guard_is_told_to_guard_its_entry_point(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=80,
                            env=dict(os.environ), cwd=tmp_path)
    assert result.returncode != 0
    assert 'guard the script\'s entry point with `if __name__ == "__main__":`' in result.stderr
    assert "__mp_main__'" not in result.stderr and "result" not in result.stdout
