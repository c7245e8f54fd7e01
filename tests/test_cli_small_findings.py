"""Smaller CLI behaviours: Ctrl-C while the CLI imports, greedy decoding at --temperature 0, a machine file
that lacks fields, and a `plan` with no fitting layout, each one short error line."""
import importlib.abc
import sys

import pytest

from tests.conftest import one_error_line, run_cli


class _InterruptingImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "ringpipe.cluster.cli":
            raise KeyboardInterrupt


def test_ctrl_c_while_the_cli_imports_is_one_line_and_exit_status_130(monkeypatch, capsys):
    from ringpipe.cluster.__main__ import run

    monkeypatch.delitem(sys.modules, "ringpipe.cluster.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptingImport(), *sys.meta_path])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_the_installed_script_is_the_entry_that_handles_ctrl_c():
    import pathlib
    import tomllib

    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["ringpipe"] == "ringpipe.cluster.__main__:run"


def test_generate_takes_temperature_0_as_greedy_decoding(tmp_path):
    line = one_error_line(run_cli("generate", "--checkpoint", tmp_path / "none", "--temperature", 0))
    assert "--checkpoint" in line  # the temperature passed; the missing model is what is refused
    assert "--temperature" in one_error_line(run_cli("generate", "--checkpoint", tmp_path, "--temperature", -1))


@pytest.mark.parametrize("text,named", [("{}", "missing field(s) name"), ("[]", "not a JSON object")],
                         ids=["empty", "list"])
def test_a_machine_file_without_its_fields_is_one_line_naming_file_and_field(tmp_path, text, named):
    path = tmp_path / "m.json"
    path.write_text(text)
    result = run_cli("plan", "--nproc", 2, "--machine", path)
    line = one_error_line(result)
    assert result.exit_code == 2 and str(path) in line and named in line and "__init__" not in line, line


def test_plan_without_a_fitting_layout_is_one_short_line():
    line = one_error_line(run_cli("plan", "--nproc", 100000))
    assert len(line) < 500 and "more reasons (--show-refused" in line, line


@pytest.mark.parametrize("flags,named", [
    (["--launcher", "mpi", "--dp", "2"], "run this command under mpirun"),
    (["--launcher", "slurm", "--dp", "2"], "not inside a Slurm allocation"),
    (["--hostfile", "{hostfile}", "--dp", "2"], "cannot resolve host 'nosuchhost.invalid'"),
    (["--device", "gpu"], "gpu needs CuPy"),
], ids=["mpi", "slurm", "hostfile", "gpu"])
def test_a_launcher_or_device_this_host_cannot_give_is_refused_before_tokenizing(tmp_path, monkeypatch, flags,
                                                                                 named):
    import importlib.util
    import os

    for name in [n for n in os.environ if n.startswith(("SLURM_", "OMPI_", "PMI_"))]:
        monkeypatch.delenv(name)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    (tmp_path / "hosts").write_text("nosuchhost.invalid slots=2\n")
    (tmp_path / "c.txt").write_text("some text\n" * 50)
    flags = [flag.format(hostfile=tmp_path / "hosts") for flag in flags]
    result = run_cli("train", "--data", tmp_path / "c.txt", "--out", tmp_path / "run", *flags)
    line = one_error_line(result)
    assert result.exit_code == 2 and named in line and "tokenizing" not in result.output, result.output


@pytest.mark.parametrize("pp,named", [(1, False), (2, True)])
def test_the_layout_line_names_a_schedule_only_for_pipeline_stages(pp, named):
    from ringpipe.model.families import family
    from ringpipe.model.training.config import TrainConfig
    from ringpipe.model.training.layout_report import describe_layout
    from ringpipe.model.training.parallel_trainer import Layout

    config = TrainConfig(n_layer=2, n_head=2, n_embd=16, block_size=8)
    plan = family(config.family).parallel_plan(config.model_config(32))
    line = describe_layout(plan, Layout(dp=2 // pp, pp=pp), "float32").splitlines()[0]
    assert ("(1f1b)" in line) == named, line
