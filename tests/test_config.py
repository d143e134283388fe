"""The config tree: shipped configs load, typos and bad values are named, saved configs load back.

The DeepSpeed JSON generated from it is tested in tests/test_engine.py."""

from pathlib import Path

import pytest
import yaml

from istack_ds.config import Config, ConfigError, field_docs, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {
        "demo",
        "paper_interleaved_eql",
        "paper_interleaved_prop1",
        "paper_gradstack_eql",
        "paper_midas_eql",
        "paper_full_depth",
        "distilhubert",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_paper_recipes_differ_only_where_they_should():
    eql = load_config(CONFIGS[0].parent / "paper_interleaved_eql.yaml")
    prop = load_config(CONFIGS[0].parent / "paper_interleaved_prop1.yaml")
    full = load_config(CONFIGS[0].parent / "paper_full_depth.yaml")
    assert (eql.growth.alpha, prop.growth.alpha) == (0.0, 1.0)
    assert full.growth.operator == "none" and full.growth.stage_depths == [12]
    assert eql.student == prop.student == full.student
    assert eql.student.hidden_size == 384 and eql.growth.depths == [3, 6, 9, 12]


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "totl_steps": 5}}))
    with pytest.raises(ConfigError, match=r"optim\.totl_steps") as e:
        load_config(bad)
    assert str(bad) in str(e.value) and "total_steps" in str(e.value)  # names the file and the known keys


def test_unknown_section_and_override_key_are_named():
    with pytest.raises(ConfigError, match="optimiser"):
        load_config(None, ["optimiser.lr=1"])
    with pytest.raises(ConfigError, match=r"growth\.opertor"):
        load_config(None, ["growth.opertor=midas"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("growth.operator=zigzag", r"growth\.operator='zigzag'.*interleaved"),
        ("deepspeed.zero_stage=0", r"deepspeed\.zero_stage=0.*\[1, 2, 3\]"),
        ("growth.depths=[3,6,5]", "strictly increasing"),
        ("growth.depths=[3,7]", "more than doubles"),
        ("optim.lr=fast", r"optim\.lr='fast' must be a number"),
        ("loss.teacher_layers=[8,4]", "strictly increasing"),
        ("data.features=mfcc", r"data\.features"),
    ],
)
def test_bad_values_are_named_with_allowed_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_stack_needs_doubling_and_l2l_needs_room_for_targets():
    with pytest.raises(ConfigError, match="stack"):
        load_config(None, ["growth.operator=stack", "growth.depths=[3,6,9]"])
    with pytest.raises(ConfigError, match="starts at depth 2"):
        load_config(None, ["growth.depths=[2,4]"])  # three targets need three layers


def test_from_dict_checks_like_load_config():
    cfg = Config.from_dict({"growth": {"operator": "midas"}, "deepspeed": {"zero_stage": 3.0}})
    assert cfg.growth.operator == "midas" and cfg.deepspeed.zero_stage == 3
    with pytest.raises(ConfigError, match=r"growth\.carry='middle'.*\['last', 'first'\]"):
        Config.from_dict({"growth": {"carry": "middle"}})


def test_base_chain_and_saved_config_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0].parent / "paper_midas_eql.yaml", ["run.out_dir=" + str(tmp_path)])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.growth.operator == "midas"


def test_every_field_is_documented():
    import dataclasses

    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        names = {f.name for f in dataclasses.fields(cls)}
        assert names == set(field_docs(cls)), f"undocumented fields in {cls.__name__}: {names - set(field_docs(cls))}"
