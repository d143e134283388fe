"""The config tree: shipped configs load, typos and bad values are named, saved configs load back.

The DeepSpeed JSON generated from it is tested in tests/test_engine.py."""

import re
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


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem.startswith("paper_")], ids=lambda p: p.stem)
def test_paper_recipes_use_the_settings_the_paper_states(path):
    """DESIGN.md section 3: AdamW lr 5e-4, wd 1e-4, global batch 64, 7 % warmup; where the paper states a value,
    the recipe's value is the paper's."""
    o, d = load_config(path).optim, load_config(path).data
    assert (o.lr, o.weight_decay, o.warmup_fraction) == (5e-4, 1e-4, 0.07)
    # LibriLight has no utterances: its batch is the seconds 64 LibriSpeech utterances hold
    assert (d.global_batch, d.batch_unit) == ((790, "seconds") if "librilight" in path.stem else (64, "utterances"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem != "demo"], ids=lambda p: p.stem)
def test_recipes_run_the_teacher_in_a_gpu_precision(path):
    """Every GPU recipe's teacher is bf16 or fp32 with TF32, never IEEE fp32 (which dominates a GPU step), and
    the recipe says it is assumed (the paper does not state it)."""
    teacher = load_config(path).teacher
    assert teacher.dtype == "bf16" or (teacher.dtype == "fp32" and teacher.tf32)
    recipe = path.read_text()
    while "tf32" not in recipe and "base:" in recipe:  # the line is where the base chain sets it
        recipe = (path.parent / recipe.split("base:")[1].split()[0]).read_text()
    assert "assumed: " in recipe.split("tf32: true")[0][-700:]  # the comment above the line that sets it


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


def test_an_error_names_the_set_override_it_came_from_not_the_file():
    demo = CONFIGS[0].parent / "demo.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(demo, ["run.name=x", "optim.lr=fast"])
    assert str(e.value).startswith("--set optim.lr=fast: optim.lr='fast' must be a number"), e.value
    with pytest.raises(ConfigError) as e:  # `optim.lr` is set, but the error is about `optim.lr_min`
        load_config(demo, ["optim.lr=0.1", "optim.lr_min=1"])
    assert str(e.value).startswith("--set optim.lr_min=1: unknown key `optim.lr_min`"), e.value
    with pytest.raises(ConfigError) as e:  # across sections: the message names the overridden key too
        load_config(demo, ["optim.lr=0.1", "growth.depths=[1,2,4]"])
    assert str(e.value).startswith("--set growth.depths=[1,2,4]: loss.teacher_layers=[4, 8] needs 2"), e.value
    with pytest.raises(ConfigError) as e:
        load_config(demo, ["eval.every=10", "loss.teacher_layers=[8,4]"])
    assert str(e.value).startswith("--set loss.teacher_layers=[8,4]: "), e.value


def test_an_error_in_the_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"optim": {"lr": "fast"}}))
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["run.name=x"])
    assert str(e.value).startswith(f"{bad}: optim.lr='fast'"), e.value


@pytest.mark.parametrize(
    "override, guess",
    [("optim.totl_steps=5", "optim.total_steps"), ("optm.lr=1", "optim"), ("growth.opertor=midas", "growth.operator")],
)
def test_a_misspelt_key_gets_did_you_mean(override, guess):
    with pytest.raises(ConfigError, match=rf"\(did you mean `{re.escape(guess)}`\?\); known keys"):
        load_config(None, [override])


def test_a_key_like_no_other_gets_no_guess():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.zzzzzz=1"])
    assert "did you mean" not in str(e.value) and "known keys" in str(e.value)


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


def _float_keys() -> list[str]:
    """Every float-typed key of the tree (float, float | None, list[float])."""
    import dataclasses
    import typing

    def holds_float(hint) -> bool:
        return hint is float or any(holds_float(a) for a in typing.get_args(hint))

    keys = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        keys += [f"{section.name}.{k}" for k, h in typing.get_type_hints(cls).items() if holds_float(h)]
    return keys


FLOAT_KEYS = _float_keys()


def test_float_keys_are_found():
    assert {"optim.lr", "optim.betas", "data.batch_seconds", "growth.alpha", "student.dropout"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [".nan", "-.inf", "1e999"])  # YAML nan, YAML -inf, a string read as inf
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_numbers(key, value):
    """Issue 13 item 8: `nan` passes every range check and `inf` every lower bound, so finiteness is checked
    once for every float (a list of floats: each entry)."""
    is_list = isinstance(getattr(getattr(Config(), key.split(".")[0]), key.split(".")[1]), list)
    override = f"{key}=[{value}, 0.5]" if is_list else f"{key}={value}"
    with pytest.raises(ConfigError, match=rf"{key}(\[0\])?=.* must be a finite number"):
        load_config(None, [override])


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_sections_built_in_code_refuse_non_finite_numbers(key):
    import dataclasses

    section, name = key.split(".")
    cls = type(getattr(Config(), section))
    value = [float("nan"), 0.5] if isinstance(getattr(cls(), name), list) else float("nan")
    with pytest.raises(ConfigError, match=rf"{key}(\[0\])?=nan must be a finite number"):
        dataclasses.replace(cls(), **{name: value})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.eps=-1"], r"optim\.eps=-1\.0 must be > 0"),
        (["optim.eps=0"], r"optim\.eps=0\.0 must be > 0"),
        (["student.conv_dim=[]"], r"student\.conv_dim=\[\] must be null or a list of channel counts >= 1"),
        (["student.conv_dim=[32,0,32]"], r"student\.conv_dim=\[32, 0, 32\]"),
        # 66 is divisible by 6 heads, but the positional convolution runs in 4 groups
        (["student.hidden_size=66", "student.num_attention_heads=6"], r"student\.hidden_size=66 must be a multiple"),
        # PROP-1 over 5 steps rounds the first boundary to step 0: a stage without a step
        (["growth.alpha=1", "optim.total_steps=5"], r"growth\.alpha=1\.0 .*optim\.total_steps=5.*\[0, 2, 1, 2\]"),
        (["growth.alpha=800"], r"growth\.alpha=800\.0 .*overflow"),
        (["growth.alpha=-40"], r"growth\.alpha=-40\.0 .*stages of \[\d+, 0, 0, 0\] steps"),
    ],
)
def test_numeric_holes_are_closed(overrides, message):
    """Issue 13 item 8: values that loaded before and failed only after the process group started (or never)."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value).startswith(f"config file {bad}: not valid YAML, line 3, column 1"), e.value


def test_a_malformed_set_value_names_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["growth.depths=[3,6"])
    assert str(e.value).startswith("--set growth.depths=[3,6: the value is not valid YAML"), e.value


@pytest.mark.parametrize("base", [["a.yaml", "b.yaml"], {"file": "a.yaml"}, ""])
def test_base_must_name_one_file(tmp_path, base):
    top = tmp_path / "top.yaml"
    top.write_text(yaml.safe_dump({"base": base, "optim": {"lr": 1e-3}}))
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(top))}: `base` must be the name of one"):
        load_config(top)
