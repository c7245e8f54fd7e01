"""ringpipe installs under one import name: a user's own model.py or runtime.py never shadows it.

Run as a user would, from a foreign working directory that holds its own `model.py`, `runtime.py`,
`cluster.py` and `tools.py` (each exits the process with a message if anything imports it): a
two-worker training run must work there, with the editable install the test suite runs under and
with a wheel built from this tree and installed into a fresh virtual environment.
"""
from __future__ import annotations

import ast
import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL = ("model", "runtime", "cluster", "tools")
TRAIN = ["train", "--nproc", "2", "--dp", "2", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
         "--block-size", "16", "--batch-size", "4", "--steps", "2", "--eval-every", "0", "--overwrite"]
# The driver itself must not have imported a top-level module of those names either.
CHECK = ("import sys\n"
         "from ringpipe.cluster.cli import main\n"
         "try:\n"
         "    main(sys.argv[1:], prog_name='ringpipe')\n"
         "except SystemExit as exc:\n"
         "    if exc.code:\n"
         "        raise\n"
         f"leaked = sorted(m for m in sys.modules if m.split('.')[0] in {TOP_LEVEL!r})\n"
         "assert not leaked, leaked\n"
         "import ringpipe.runtime\n"
         "print('ringpipe from', ringpipe.runtime.__file__)\n")


@pytest.fixture
def foreign_directory(tmp_path):
    """A user's project: its own modules named like ringpipe's folders, and a text corpus."""
    work = tmp_path / "user_project"
    work.mkdir()
    for name in TOP_LEVEL:
        (work / f"{name}.py").write_text(f"raise SystemExit('the user\\'s {name}.py was imported')\n")
    (work / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 200)
    return work


def _train_from(python, work, env=None):
    args = [python, "-c", CHECK, *TRAIN, "--data", "corpus.txt", "--out", str(work / "run")]
    return subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=150, env=env)


def _site_packages(python) -> str:
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_every_folder_with_an_init_is_an_installed_package():
    declared = ast.literal_eval(open(os.path.join(ROOT, "pyproject.toml")).read()
                                .split("packages = ", 1)[1].split("]", 1)[0] + "]")
    found = sorted("ringpipe." + os.path.relpath(directory, ROOT).replace(os.sep, ".")
                   for top in TOP_LEVEL for directory, _, files in os.walk(os.path.join(ROOT, top))
                   if "__init__.py" in files)
    assert sorted(declared) == found


@pytest.mark.timeout(200)
def test_a_run_from_a_directory_with_its_own_model_py_works_with_the_editable_install(foreign_directory):
    result = _train_from(sys.executable, foreign_directory)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (foreign_directory / "run" / "model.safetensors").is_file()


@pytest.mark.timeout(300)
def test_a_run_from_a_directory_with_its_own_model_py_works_with_a_wheel(foreign_directory, tmp_path):
    wheels, source = tmp_path / "wheels", tmp_path / "source"
    # Built from a copy: setuptools leaves its build/ folder in the tree it builds.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info",
                                                                  "__pycache__", ".pytest_cache"))
    for isolation in (["--no-build-isolation"], []):  # an old setuptools here: pip fetches a new one
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                                "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=240)
        if build.returncode == 0:
            break
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr[-300:]}")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    target = _site_packages(python)
    # ringpipe from the wheel only; its dependencies from this environment's site-packages, added as
    # a plain path (a .pth line is not a site directory, so this environment's editable finder of
    # ringpipe does not come along).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target,
                    *[str(p) for p in wheels.glob("ringpipe-*.whl")]], check=True, timeout=120)
    with open(os.path.join(target, "outer_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n" + "\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = _train_from(python, foreign_directory, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ringpipe from {target}" in result.stdout  # the wheel's copy, not this checkout
    assert (foreign_directory / "run" / "model.safetensors").is_file()
