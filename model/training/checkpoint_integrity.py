"""Whether a sharded checkpoint is whole, and which older one to fall back on when the latest is not.

    verify_checkpoint(checkpoint)     ValueError (one line, naming the tensor and the file) unless every
                                      piece is there, covers its tensor and matches its CRC-32
    fallback_hint(run_dir, error)     the clause naming the newest older intact checkpoint, when
                                      `error` names the latest one and it does not verify; else ""

An error that a damaged checkpoint causes — at resume (the driver's checks or a rank's read), or
at export — ends with `fallback_hint`, so the user learns in the same line which checkpoint still
works and how to use it: older checkpoints are the ones `--keep-checkpoints` kept. Verifying reads
every piece once, which only a failure pays for.
"""
from __future__ import annotations

import os

from ringpipe.model.training.checkpoint_metadata import check_checkpoint, read_metadata, tensor_name
from ringpipe.model.training.run_dir import SHARDED_CHECKPOINTS_DIR, find_checkpoint, sharded_checkpoints
from ringpipe.model.training.sharded_checkpoint import family_of, hf_name, parameter_names, verify_piece

ROLES = ("weight", "exp_avg", "exp_avg_sq")


def verify_checkpoint(checkpoint: str) -> None:
    """ValueError (or CorruptFileError) naming what is wrong unless the sharded checkpoint's metadata
    describes its family's model, every weight and moment is covered by pieces of the stated sizes,
    and every piece matches its checksum."""
    metadata = read_metadata(checkpoint)
    model_family = family_of(metadata)
    plan = model_family.parallel_plan(model_family.config(**metadata["model"]))
    shapes = plan.param_shapes() if hasattr(plan, "param_shapes") else None
    expected = {tensor_name(hf_name(plan, name), role): (shapes[name] if shapes else None)
                for name in parameter_names(plan) for role in ROLES}
    check_checkpoint(checkpoint, metadata, expected if shapes else list(expected))
    for name, entry in metadata["tensors"].items():
        for piece in entry["pieces"]:
            verify_piece(os.path.join(checkpoint, piece["file"]), name, piece)


def _intact(checkpoint: str) -> bool:
    try:
        verify_checkpoint(checkpoint)
    except (ValueError, OSError, KeyError, TypeError):  # CorruptFileError is a ValueError
        return False
    return True


def fallback_hint(run_dir: str, error: str, action: str = "resume from it") -> str:
    """What to add to the message `error`: "; the newest older checkpoint, OLDER (step N), is intact:
    move the damaged one aside (mv LATEST LATEST.damaged) to `action`" when `error` names the run's
    latest sharded checkpoint and that one is damaged while an older one verifies; "; no older intact
    checkpoint ..." when none does; "" otherwise (an error about something else costs no reading)."""
    try:
        latest = find_checkpoint(run_dir)
    except ValueError:
        return ""
    committed = sharded_checkpoints(run_dir)
    if not committed or committed[-1][1] != latest or os.path.basename(latest) not in error or _intact(latest):
        return ""
    for step, older in reversed(committed[:-1]):
        if _intact(older):
            return (f"; the newest older checkpoint, {older} (step {step}), is intact: move the damaged one "
                    f"aside (mv {latest} {latest}.damaged) to {action}")
    return f"; no older intact checkpoint is kept in {os.path.join(run_dir, SHARDED_CHECKPOINTS_DIR)}"
