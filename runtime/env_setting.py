"""An integer setting from the environment, with "off", checked once: the RINGPIPE_* tuning variables
(stream_store.py's thresholds, thread_priority.py's nice) read through here, so a bad value is one
ValueError that names the variable and what it takes."""
from __future__ import annotations

import os

OFF = "off"


def int_setting(name: str, low: int | None = None, high: int | None = None) -> int | str | None:
    """os.environ[name] as an int within [low, high] (either end None: open), OFF for "off" (any case),
    None when unset or blank. Raises ValueError naming the variable for anything else."""
    text = os.environ.get(name, "").strip().lower()
    if not text:
        return None
    if text == OFF:
        return OFF
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            expected = f"an integer from {low} to {high}"
        elif low is not None:
            expected = f"an integer >= {low}"
        else:
            expected = "an integer"
        raise ValueError(f"{name}={text!r}: expected {expected} or 'off'")
    return value


__all__ = ["int_setting", "OFF"]
