"""runtime/env_setting.py: integer settings from the environment, "off", and a bad value named."""
import re

import pytest

from ringpipe.runtime import env_setting


def check_setting(monkeypatch, name: str, read, clear, cases, bad):
    """For each (text, want) in `cases`, with `name` set to text (None: unset), `read()` gives want
    (`clear()` first: the readers cache); each text of `bad` raises a ValueError naming `name`."""
    for text, want in cases:
        if text is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, text)
        clear()
        assert read() == want, (name, text)
    for text in bad:
        monkeypatch.setenv(name, text)
        clear()
        with pytest.raises(ValueError, match=re.escape(f"{name}={text.strip()[:40]!r}"[:-1])):
            read()
    monkeypatch.delenv(name)
    clear()


def test_an_integer_setting_is_read_within_its_bounds_off_and_unset_and_anything_else_is_named(monkeypatch):
    def read():
        return env_setting.int_setting("RINGPIPE_TEST_SETTING", low=-3, high=7)

    check_setting(monkeypatch, "RINGPIPE_TEST_SETTING", read, lambda: None,
                  [(None, None), ("", None), ("  ", None), ("off", "off"), ("OFF", "off"), ("-3", -3), (" 7 ", 7)],
                  ["8", "-4", "1.5", "many", "0x5", "+5", "1_0", "５", "٣", "4K", "1" * 5000])
    monkeypatch.setenv("RINGPIPE_TEST_SETTING", "0" * 5000 + "5")  # (leading zeros: still 5)
    assert env_setting.int_setting("RINGPIPE_TEST_SETTING") == 5
    monkeypatch.setenv("RINGPIPE_TEST_SETTING", "9" * 5000)  # (beyond int()'s digits: beyond every bound)
    assert env_setting.int_setting("RINGPIPE_TEST_SETTING", low=0) == 10**40
    monkeypatch.setenv("RINGPIPE_TEST_SETTING", "-1")
    with pytest.raises(ValueError, match=r"expected an integer >= 0 or 'off'"):
        env_setting.int_setting("RINGPIPE_TEST_SETTING", low=0)
    assert env_setting.int_setting("RINGPIPE_TEST_SETTING") == -1


def test_check_names_the_first_bad_variable_of_an_environment_and_passes_a_good_one():
    env_setting.check({"RINGPIPE_SHM_STREAM_MIN": "off", "RINGPIPE_COMM_THREAD_NICE": "-5", "OTHER": "x"})
    with pytest.raises(ValueError, match="RINGPIPE_SHM_STREAM_REDUCE_MAX='lots'"):
        env_setting.check({"RINGPIPE_SHM_STREAM_REDUCE_MAX": "lots"})


@pytest.mark.timeout(60)
def test_a_command_given_a_bad_setting_says_so_in_one_line_and_exits_non_zero():
    import os
    import subprocess
    import sys

    env = {**os.environ, "RINGPIPE_SHM_STREAM_MIN": "lots"}
    done = subprocess.run([sys.executable, "-m", "ringpipe.cluster", "bench", "collectives", "--world-size", "2",
                           "--sizes", "1K", "--rounds", "1"], env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "Error: RINGPIPE_SHM_STREAM_MIN='lots': expected an integer >= 0 or 'off'"


@pytest.mark.timeout(60)
def test_a_joining_host_with_a_bad_setting_says_so_before_it_joins():
    import os
    import subprocess
    import sys

    env = {**os.environ, "RINGPIPE_COMM_THREAD_NICE": "banana"}
    done = subprocess.run([sys.executable, "-m", "ringpipe.cluster", "worker", "--rdzv-endpoint", "127.0.0.1:9",
                           "--nproc-per-node", "1", "--timeout", "5"], env=env, capture_output=True, text=True,
                          timeout=50)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: RINGPIPE_COMM_THREAD_NICE='banana': expected an integer from -20 to 19 or 'off'")
