"""What a newcomer reads first: `--help` texts, and the README's example paths and outputs."""
import os
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from ringpipe.cluster.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


@pytest.mark.parametrize("group", [[], ["bench"], ["trace"]])
def test_help_lists_every_command_with_a_whole_description(group):
    result = CliRunner().invoke(main, [*group, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    commands = result.output.split("Commands:")[1].strip().splitlines()
    assert commands and all(len(line.split(None, 1)) == 2 for line in commands), result.output
    assert not any(line.rstrip().endswith("...") for line in commands), result.output


def test_the_readme_says_where_its_example_corpus_comes_from():
    assert "../shared/data/tinyshakespeare.txt" in README
    assert "karpathy/char-rnn" in README and "any text file" in README


@pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
                    reason="not a git checkout")
def test_what_the_readme_examples_write_is_ignored_by_git():
    outputs = set(re.findall(r"(?:--out|--json|-o) ([\w.-]+)", README))
    assert {"run", "run-mesh", "shakespeare", "pipeline.json"} <= outputs
    result = subprocess.run(["git", "check-ignore", "--no-index", *sorted(outputs)], cwd=ROOT,
                            capture_output=True, text=True)
    assert set(result.stdout.split()) == outputs, result.stderr
