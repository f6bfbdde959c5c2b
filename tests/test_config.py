import pytest
import torch

from petra.config import PRESETS, ConfigError, ModelConfig, build_config
from petra.memory import shapes
from petra.model import LlamaForCausalLM, count_parameters

# parameter counts of the paper presets (vocab 32000, untied embeddings)
EXPECTED_M = {"60m": 58.07, "130m": 134.11, "350m": 367.97, "1b": 1339.08, "7b": 6738.42}


@pytest.mark.parametrize("preset", list(EXPECTED_M))
def test_paper_preset_parameter_counts(preset):
    cfg = ModelConfig(**PRESETS[preset])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    n = count_parameters(model)
    assert round(n / 1e6, 2) == EXPECTED_M[preset]
    assert shapes(cfg).total == n  # the memory model counts the same parameters


def test_padding_option_rounds_mlp_width_only_when_asked():
    m = ModelConfig(**PRESETS["1b"])
    assert m.mlp_width == 5461
    m.pad_intermediate_to = 128
    assert m.mlp_width == 5504


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"preset": "huge"}, "unknown preset 'huge'; presets are: tiny"),
        ({"train.nonsense": 1}, "unknown option train.nonsense"),
        ({"method.name": "lora"}, "method.name='lora' is not allowed; choose one of: full"),
        ({"train.batch_size": 10, "train.micro_batch_size": 4}, "must be a multiple of train.micro_batch_size=4"),
        ({"train.seq_len": 512}, "longer than the model allows (model.max_position_embeddings=128)"),
        ({"method.name": "galore", "method.rank": 100}, "rank=100 is larger than the smallest side (64)"),
        ({"method.name": "relora", "method.rank": 65}, "rank=65 is larger than the smallest side (64)"),
        ({"method.rank": -1}, "method.rank=-1 must be at least 1"),
        ({"train.steps": "ten"}, "train.steps='ten' is not a valid int"),
        ({"method.update_proj_gap": 0}, "method.update_proj_gap=0 must be at least 1"),
        ({"bogus": 1}, "override 'bogus' must look like section.key"),
        ({"train.fsdp_unit_layers": 0}, "train.fsdp_unit_layers=0 must be at least 1"),
    ],
)
def test_bad_config_values_name_field_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config(overrides={"preset": "tiny", **overrides})
    assert message in str(e.value)


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\ntrain:\n  lr: 0.01\n  steps: 7\nmethod:\n  name: galore\n  rank: 8\n")
    cfg = build_config(overrides={"train.steps": 9}, file=f)
    assert (cfg.preset, cfg.train.lr, cfg.train.steps, cfg.method.name, cfg.method.rank) == (
        "tiny",
        0.01,
        9,
        "galore",
        8,
    )
    f.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        build_config(file=f)
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(file=tmp_path / "missing.yaml")


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\ntrain:\n  lr: 0.01\n   steps: [7\n")
    with pytest.raises(ConfigError, match=r"config file '.*run.yaml' is not valid YAML: line 4, column \d+"):
        build_config(file=f)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_name_the_field(value):
    with pytest.raises(ConfigError, match=f"train.lr='{value}' is not a valid finite number"):
        build_config(overrides={"train.lr": value})
    with pytest.raises(ConfigError, match="method.scale=nan is not a valid finite number"):
        build_config(overrides={"method.scale": float("nan")})


def test_runs_saved_before_staggered_refreshes_resume_without_them():
    from petra.config import build_config, from_dict

    d = build_config().to_dict()
    assert d["method"]["stagger_refresh"] is True  # new runs spread their refreshes
    del d["method"]["stagger_refresh"]
    assert from_dict(d).method.stagger_refresh is False
