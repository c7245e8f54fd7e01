"""`ringpipe bench data-parallel`: its bucket size is given in MiB, as `train --bucket-mb` is."""
import json

import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main

TINY = ["bench", "data-parallel", "--dp", "2", "--n-layer", "1", "--n-head", "1", "--n-embd", "8",
        "--block-size", "8", "--batch-per-rank", "2", "--steps", "1", "--rounds", "1", "--no-independent"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags, bucket_bytes", [(["--bucket-mb", "0.25"], 256 << 10),
                                                 (["--bucket-kb", "64"], 64 << 10)],
                         ids=["mib-fraction", "deprecated-kib"])
def test_the_bucket_flag_takes_mib_and_the_old_kib_flag_still_works(tmp_path, flags, bucket_bytes):
    out = tmp_path / "dp.json"
    result = CliRunner().invoke(main, [*TINY, *flags, "--json", str(out)])
    assert result.exit_code == 0, result.output
    result_json = json.loads(out.read_text())
    assert result_json["bucket_bytes"] == bucket_bytes
    for row in result_json["rows"]:  # every round kept, with each round's own efficiency (issue #15's protocol)
        assert len(row["round_step_s"]) == len(row["round_efficiency"]) == 1
        assert row["efficiency_median"] == row["round_efficiency"][0]
    assert ("--bucket-kb is deprecated; use --bucket-mb 0.0625" in result.output) == ("--bucket-kb" in flags)


def test_the_bucket_size_given_in_both_units_is_refused_in_one_line():
    result = CliRunner().invoke(main, [*TINY, "--bucket-mb", "1", "--bucket-kb", "64"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("Error: ")] == [
        "Error: Invalid value for --bucket-kb: give the bucket size once, as --bucket-mb (--bucket-kb is its "
        "deprecated KiB form)"]


def test_the_deprecated_kib_flag_is_not_in_the_help():
    result = CliRunner().invoke(main, ["bench", "data-parallel", "--help"])
    assert "--bucket-mb" in result.output and "--bucket-kb" not in result.output
