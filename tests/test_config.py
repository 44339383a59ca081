from dataclasses import dataclass, field

import pytest

from tl.config import apply_overrides, config_hash, from_dict, load_config
from tl.errors import ConfigError
from tl.pretrain import PretrainConfig


@dataclass(frozen=True)
class Inner:
    lr: float = 0.1
    shots: tuple[int, ...] = (1, 5)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    k: int | None = None


def test_nested_overrides_and_types():
    cfg = load_config(Outer, overrides=["inner.lr=0.5", "inner.shots=[1, 10]", "k=3"])
    assert cfg.inner.lr == 0.5 and cfg.inner.shots == (1, 10) and cfg.k == 3


def test_unknown_key_names_the_dotted_key():
    with pytest.raises(ConfigError, match="unknown config key 'inner.lrr'"):
        from_dict(Outer, {"inner": {"lrr": 1}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="'inner.lr'.*number"):
        load_config(Outer, overrides=["inner.lr=fast"])
    with pytest.raises(ConfigError, match="'k'"):
        load_config(Outer, overrides=["k=true"])


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: y\ninner:\n  lr: 0.2\n")
    cfg = load_config(Outer, f, ["inner.lr=0.3"])
    assert cfg.name == "y" and cfg.inner.lr == 0.3


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["epochs"])


def test_pretrain_config_validation_and_key():
    with pytest.raises(ConfigError, match="unknown backbone 'nonet'"):
        load_config(PretrainConfig, overrides=["backbone=nonet"])
    with pytest.raises(ConfigError, match="'epochs'"):
        load_config(PretrainConfig, overrides=["epochs=0"])
    a, b = PretrainConfig(), PretrainConfig(workers=1)
    assert a.key() == b.key(), "where it runs must not change the identity of the weights"
    assert PretrainConfig(lr=0.2).key() != a.key()
    assert config_hash(a) == config_hash(PretrainConfig())


def test_a_pretrained_name_keys_cells_and_runs_by_the_recipe_it_stands_for():
    """``pretrained`` became the digits recipe: its comparison cells and runs are those that
    ``pretrained:digits`` made, and ``pretrained:shift`` keeps the identities the former default
    gave them (finished cells stay valid, never mixed with the new backbone's)."""
    from tl.compare import CompareConfig, cells
    from tl.pretrain import weights_identity
    from tl.runs import RunConfig

    assert weights_identity("pretrained") == weights_identity("pretrained:digits") == "pretrained:digits"
    assert weights_identity("pretrained:shift") == "pretrained"
    assert weights_identity("torchvision:X") == "torchvision:X" and weights_identity("random") == "random"

    def first_cell(weights: str) -> str:
        return cells(load_config(CompareConfig, base={"weights": weights}))[0].name

    assert first_cell("pretrained") == first_cell("pretrained:digits") != first_cell("pretrained:shift")
    # and within a recipe, by the weights' content: a backbone pretrained again under the same name makes new cells
    cfg = load_config(CompareConfig)
    assert cells(cfg, content="a")[0].name != cells(cfg, content="b")[0].name

    def run_key(weights: str) -> str:
        return RunConfig(target="mnistm", source="mnist", strategy="dann", weights=weights).key()

    assert run_key("pretrained") == run_key("pretrained:digits") != run_key("pretrained:shift")
