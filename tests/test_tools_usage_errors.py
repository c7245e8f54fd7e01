"""The `python -m ringpipe.tools.<script>` entry points: a bad value is one `Error:` line naming the
flag and the value, exit status 2, never a traceback or a usage block (tools/script_args.py), as
`ringpipe bench` gives."""
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

TOOLS = pathlib.Path(__file__).resolve().parent.parent / "tools"

BAD = [
    ("bench_issue15", ["--json", "{tmp}/r.json", "--sizes", "abc"], "--sizes: bad size 'abc'"),
    ("bench_issue15", ["--json", "{tmp}/r.json", "--sizes", "0"], "--sizes: '0': give one or more sizes"),
    ("bench_issue15", ["--json", "{tmp}/r.json", "--rounds", "0"], "--rounds: 0 is less than 1"),
    ("bench_issue15", ["--json", "{tmp}/r.json", "--pingpongs", "many"], "--pingpongs: 'many' is not a whole number"),
    ("bench_issue15", ["--json", "{tmp}/r.json", "--baseline", "{tmp}/missing"],
     "--baseline: ringpipe@{tmp}/missing: not a ringpipe checkout"),
    ("bench_issue15", ["--json", "{tmp}/r.json", "--sections", "p2p,speed"], "--sections: 'p2p,speed': choose from"),
    ("bench_issue15", ["--json", "{tmp}/no/r.json"], "--json: cannot write {tmp}/no/r.json: directory"),
    ("bench_issue15", [], "the following arguments are required: --json"),
    ("bench_latency", ["--ops", "0"], "--ops: 0 is less than 1"),
    ("bench_latency", ["--baseline", "{tmp}"], "--baseline: ringpipe@{tmp}: not a ringpipe checkout"),
    ("bench_plan", ["--steps", "-3"], "--steps: -3 is less than 1"),
    ("bench_plan", ["--json", "{tmp}"], "--json: cannot write {tmp}: is a directory"),
    ("bench_plan", ["--part", "mine"], "--part: invalid choice: 'mine'"),
    ("bench_trace", ["--size", "1.5"], "--size: '1.5' is not a whole number"),
    ("bench_trace", ["--rounds", "2", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("module,args,expected", BAD, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD)])
def test_a_bad_value_is_one_error_line_naming_the_flag_and_the_value(module, args, expected, tmp_path, capsys):
    main = importlib.import_module(f"ringpipe.tools.{module}").main
    with pytest.raises(SystemExit) as exited:
        main([a.format(tmp=tmp_path) for a in args])
    captured = capsys.readouterr()
    assert exited.value.code == 2 and captured.out == ""
    assert captured.err.splitlines() == [captured.err.strip()] and captured.err.startswith("Error: "), captured.err
    assert expected.format(tmp=tmp_path) in captured.err


@pytest.mark.parametrize("module,args", [("bench_issue15", ["--json", "r.json", "--sizes", "abc"]),
                                         ("bench_latency", ["--rounds", "0"])])
def test_python_m_of_a_tools_script_exits_2_with_the_one_line(module, args, tmp_path):
    result = subprocess.run([sys.executable, "-m", f"ringpipe.tools.{module}", *args], cwd=tmp_path,
                            capture_output=True, text=True, env=os.environ, timeout=60)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("Error: --") and "Traceback" not in result.stderr


def test_every_tools_script_parses_its_flags_with_the_one_line_parser():
    scripts = [path.name for path in TOOLS.glob("*.py") if 'if __name__ == "__main__"' in path.read_text()]
    assert scripts, "no tools script found"
    for name in scripts:
        text = (TOOLS / name).read_text()
        assert "ScriptParser(" in text and "argparse.ArgumentParser(" not in text, name
