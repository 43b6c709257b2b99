from pathlib import Path

import pytest

from finechat import config as cfg
from finechat.errors import UserError

PRESETS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_presets_exist_and_load():
    assert {p.stem for p in PRESETS} >= {"smollm2-demo", "mistral-7b-instruct-qlora"}
    for path in PRESETS:
        config = cfg.load_config(str(path))
        assert config.quantize == "nf4" and config.lora_rank == 16 and config.lora_alpha == 32
        assert config.optimizer == "paged_adamw_32bit" and config.learning_rate == 2e-4


def test_seed_recipe_preset():
    config = cfg.load_config("mistral-7b-instruct-qlora")
    assert config.model == "mistralai/Mistral-7B-Instruct-v0.2"
    assert config.data == "wikitext:wikitext-103-raw-v1"
    assert set(config.lora_targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config.double_quant and config.compute_dtype == "bfloat16" and config.lora_dropout == 0.05


def test_overrides_win_and_are_coerced():
    config = cfg.load_config(
        "smollm2-demo",
        {"max_steps": "7", "learning_rate": "1e-3", "lora_targets": "q_proj,v_proj", "double_quant": "false"},
    )
    assert config.max_steps == 7 and config.learning_rate == 1e-3
    assert config.lora_targets == ["q_proj", "v_proj"] and config.double_quant is False
    assert cfg.load_config("smollm2-demo", {}).offload_activations is True
    assert cfg.load_config("smollm2-demo", {"offload_activations": "false"}).offload_activations is False


def test_unknown_key_names_it_and_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rnk: 8\n")
    with pytest.raises(UserError, match=r"unknown config key 'lora_rnk'.*valid keys: model, data"):
        cfg.load_config(str(path))


@pytest.mark.parametrize(
    ("key", "value", "flag"),
    [
        ("batch_size", 0, "--batch-size"),
        ("max_seq_length", -5, "--max-seq-length"),
        ("lora_rank", 0, "--lora-r"),
        ("grad_accum", 0, "--grad-accum"),
        ("max_steps", 0, "--max-steps"),
        ("learning_rate", -1.0, "--lr"),
    ],
)
def test_non_positive_sizes_name_the_flag(key, value, flag):
    with pytest.raises(UserError, match=flag):
        cfg.load_config(None, {key: value})


def test_bad_type_and_bad_choice():
    with pytest.raises(UserError, match="batch_size in a config file\\): expected a whole number"):
        cfg.load_config(None, {"batch_size": "four"})
    with pytest.raises(UserError, match="--quantize must be one of nf4, none"):
        cfg.load_config(None, {"quantize": "int3"})


def test_saved_config_round_trips(tmp_path):
    config = cfg.load_config("smollm2-demo", {"seed": 7})
    cfg.save_config(config, tmp_path / "config.yaml")
    assert cfg.load_config(str(tmp_path / "config.yaml")) == config
