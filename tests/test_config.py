from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedvlm.config import list_recipes, load_config, save_config
from fedvlm.errors import ConfigError


def test_recipe_then_overrides_are_merged_over_defaults() -> None:
    cfg = load_config("leukemia_demo", ["federation.rounds=5", "federation.strategy=fedprox"])
    assert cfg.recipe == "leukemia_demo"
    assert cfg.federation.rounds == 5 and dict(cfg.federation.strategy) == {"name": "fedprox", "mu": 0.01}
    assert cfg.model.image_encoder.name == "vit_micro"  # from the recipe
    assert cfg.federation.min_clients == 1  # from the defaults


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("federation.roundz=3", "federation.roundz=3: Key 'roundz' not in 'FederationConfig'"),
        ("federation.rounds=abc", "federation.rounds=abc: Value 'abc' of type 'str' could not be converted"),
        ("model.modality=audio", "model.modality='audio' is not one of: fused, image, text"),
        ("federation.min_clients=11", "federation.min_clients=11 exceeds the clients asked each round"),
        ("federation.rounds=0", "federation.rounds=0 must be positive"),
        ("data.test_fraction=1.5", r"data.test_fraction=1.5 must be in \(0, 1\)"),
        ("federation.clients_per_round=11", "clients_per_round=11 exceeds federation.num_clients=10"),
        ("rounds", "is not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("leukemia_demo", [override])


def test_unknown_key_in_a_recipe_file_names_file_and_key(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  fusoin: gated\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: Key 'fusoin' not in 'ModelConfig'"):
        load_config(str(recipe))


def test_unknown_recipe_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown recipe 'leukaemia'; known recipes: .*leukemia_demo"):
        load_config("leukaemia")


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_every_recipe_loads_and_round_trips_through_config_yaml(recipe: str, tmp_path: Path) -> None:
    cfg = load_config(recipe)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)
    assert again.recipe == recipe


def test_recipes_have_a_description() -> None:
    recipes = list_recipes()
    assert {"leukemia_demo", "leukemia"} <= set(recipes)
    assert all(recipes.values())


def test_federated_evaluation_sampling_is_checked() -> None:
    cfg = load_config("leukemia_demo", ["federation.evaluate_clients_per_round=4", "federation.evaluate_every=5"])
    assert (cfg.federation.evaluate_clients_per_round, cfg.federation.evaluate_every) == (4, 5)
    with pytest.raises(ConfigError, match=r"federation.evaluate_clients_per_round=11 must be in 0..federation"):
        load_config("leukemia_demo", ["federation.evaluate_clients_per_round=11"])
    with pytest.raises(ConfigError, match="federation.evaluate_every=0 must be positive"):
        load_config("leukemia_demo", ["federation.evaluate_every=0"])
