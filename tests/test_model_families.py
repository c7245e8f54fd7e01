"""The family registry: `--model NAME` picks one family, the run records it, and no other family's
checkpoint is taken for it."""
import dataclasses
import json

import pytest

from ringpipe.model.families import FAMILIES, Family, check_checkpoint_family, family
from ringpipe.model.training.config import TrainConfig
from tests.conftest import run_cli


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_registered_family_describes_itself_under_its_name(name):
    described = family(name)
    assert isinstance(described, Family) and described.name == name
    options = described.default_options()
    assert isinstance(options, described.options)
    config = described.config(**dataclasses.asdict(options), vocab_size=40, dtype="float64", device="cpu")
    params = described.init_params(config, 0)
    assert params and all(p.dtype == "float64" for p in params.values())
    plan = described.parallel_plan(config)
    assert plan.num_layers >= 1 and set(plan.tied_params) <= set(params)


def test_an_unknown_family_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model family 'gpt5' \(--model\); expected one of gpt2"):
        family("gpt5")
    with pytest.raises(ValueError, match="unknown model family"):
        TrainConfig(family="gpt5")


def test_a_run_config_records_its_family_and_reads_back_the_same():
    config = TrainConfig(n_layer=2, steps=5)
    assert config.family == "gpt2"  # the default family
    saved = dataclasses.asdict(config)
    assert saved["family"] == "gpt2"
    assert TrainConfig(**saved) == config and TrainConfig(**config.flat()) == config


def test_options_of_another_family_are_refused():
    @dataclasses.dataclass
    class OtherOptions:
        n_layer: int = 1

    with pytest.raises(ValueError, match="model options OtherOptions are not those of the gpt2 family"):
        TrainConfig(model=OtherOptions())


def test_a_checkpoint_of_another_family_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    check_checkpoint_family(str(tmp_path), "gpt2")
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path} holds a gpt2 model, not bert "
                                         r"\(--model bert\); resume it with --model gpt2"):
        check_checkpoint_family(str(tmp_path), "bert")


def test_the_train_command_records_the_family_in_the_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--model", "gpt2", "--data", corpus, "--out", out, "--steps", 1, "--n-layer", 1,
                     "--n-embd", 16, "--n-head", 2, "--block-size", 8, "--batch-size", 2, "--eval-iters", 1)
    assert result.exit_code == 0, result.output
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert state["config"]["family"] == "gpt2"
    assert json.loads((out / "checkpoint" / "config.json").read_text())["model_type"] == "gpt2"


def test_an_unknown_model_flag_is_one_line(corpus, tmp_path):
    result = run_cli("train", "--model", "gpt5", "--data", corpus, "--out", tmp_path / "run")
    assert result.exit_code != 0
    assert "--model" in result.output and "gpt5" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()
