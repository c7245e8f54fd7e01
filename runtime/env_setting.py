"""An integer setting from the environment, with "off", checked once: the RINGPIPE_* tuning variables
(stream_store.py's thresholds, stream_choice.py's period, thread_priority.py's nice) read through here, so a bad value is one
ValueError that names the variable and what it takes."""
from __future__ import annotations

import os
import re

OFF = "off"


# The integer settings read through here and their bounds: `check` looks at all of them at once.
SETTINGS = {"RINGPIPE_SHM_STREAM_MIN": (0, None), "RINGPIPE_SHM_STREAM_REDUCE_MAX": (0, None),
            "RINGPIPE_SHM_STREAM_PROBE": (20, None),  # (stream_choice.MIN_PERIOD)
            "RINGPIPE_COMM_THREAD_NICE": (-20, 19)}


def setting(name: str, environ=None) -> int | str | None:
    """int_setting of a variable of SETTINGS, within its bounds."""
    return int_setting(name, *SETTINGS[name], environ=environ)


def check(environ=None) -> None:
    """Raise the ValueError of the first variable of SETTINGS that `environ` (default os.environ)
    holds a bad value for: the driver checks its workers' environment before starting them, and
    a worker its own at start (a launcher on another host)."""
    for name in SETTINGS:
        setting(name, environ)


def int_setting(name: str, low: int | None = None, high: int | None = None, environ=None) -> int | str | None:
    """environ[name] (default os.environ) as an int within [low, high] (either end None: open), OFF for
    "off" (any case), None when unset or blank. Raises ValueError naming the variable for anything else."""
    given = (os.environ if environ is None else environ).get(name, "").strip()
    if not given:
        return None
    if given.lower() == OFF:
        return OFF
    value = None
    if re.fullmatch(r"-?[0-9]+", given):  # (ASCII digits only: int() would take "1_000", "+5", "５")
        sign, digits = (-1 if given.startswith("-") else 1), given.lstrip("-").lstrip("0") or "0"
        # (past 40 digits, beyond any bound here: int() refuses past 4300)
        value = sign * (int(digits) if len(digits) <= 40 else 10**40)
    if value is None or (low is not None and value < low) or (high is not None and value > high):
        text = given if len(given) <= 40 else given[:40] + "..."
        if low is not None and high is not None:
            expected = f"an integer from {low} to {high}"
        elif low is not None:
            expected = f"an integer >= {low}"
        else:
            expected = "an integer"
        raise ValueError(f"{name}={text!r}: expected {expected} or 'off'")
    return value


__all__ = ["int_setting", "setting", "check", "SETTINGS", "OFF"]
