"""istack_ds/metrics.py: what TensorBoard shows of a run and of a resumed run (hparams, config text, run name,
custom scalars, each step once), and the CSV monitor. Metrics is driven directly, as the trainer would."""

import time
import typing

import pytest
import yaml

from istack_ds.config import Config, LogConfig, RunConfig
from istack_ds.metrics import MONITORS, Metrics


def _config(tmp_path, **log) -> Config:
    return Config(run=RunConfig(name="resume-test", out_dir=str(tmp_path / "run")), log=LogConfig(**log))


def _write(metrics: Metrics, steps, offset: float, valid_at=()) -> None:
    for step in steps:
        metrics.scalars(step, {"train/loss": offset + step, "train/lr": 1e-3})
        if step in valid_at:
            metrics.scalars(step, {"valid/loss": offset + step})
    metrics.close()


def _next_second() -> None:
    # TensorBoard reads a run's event files in name order; the name starts with the creation second.
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)


def _shown(tb_dir):
    """The run as TensorBoard loads it: every event file of the directory, in order, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _steps(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_resumed_run_shows_hparams_config_name_layout_and_each_step_once(tmp_path):
    from tensorboard.plugins.hparams import metadata as hp
    from tensorboard.util import tensor_util

    cfg = _config(tmp_path)
    _write(Metrics.from_config(cfg), range(1, 7), 0.0, valid_at=(3, 6))
    _next_second()
    # Resumed from the checkpoint at step 3: steps 4.. are logged again.
    _write(Metrics.from_config(cfg, resume_step=3), range(4, 9), 100.0)

    tb = tmp_path / "run/tb"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2
    assert not [p for p in tb.iterdir() if p.is_dir()]  # hparams are in the scalars' run, not a subdirectory
    acc = _shown(tb)
    assert _steps(acc, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0)] + [(s, 100.0 + s) for s in range(4, 9)]
    assert _steps(acc, "valid/loss") == [(3, 3.0)]  # step 6 was after the checkpoint: gone, not logged again

    def texts(tag):  # SummaryWriter.add_text writes the tag `<tag>/text_summary`
        return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(f"{tag}/text_summary")]

    names, configs = texts("run/name"), texts("config/yaml")
    assert names and all("resume-test" in t for t in names)
    # Written where each process started: the config of every part of the run stays readable.
    assert [e.step for e in acc.Tensors("config/yaml/text_summary")] == [0, 4]
    config_text = configs[-1]
    assert yaml.safe_load(config_text.removeprefix("```yaml\n").removesuffix("```")) == cfg.to_dict()

    hparams = acc.PluginTagToContent(hp.PLUGIN_NAME)
    experiment = hp.parse_experiment_plugin_data(hparams[hp.EXPERIMENT_TAG])
    assert {m.name.tag for m in experiment.metric_infos} == {"valid/loss", "train/loss"}
    start = hp.parse_session_start_info_plugin_data(hparams[hp.SESSION_START_INFO_TAG])
    assert start.hparams["run.name"].string_value == "resume-test"
    assert start.hparams["optim.lr"].number_value == pytest.approx(cfg.optim.lr)
    assert start.hparams["growth.depths"].string_value == str(cfg.growth.depths)
    assert start.hparams["data.valid_index"].string_value == "null"

    layout = acc.PluginTagToContent("custom_scalars")
    assert list(layout) == ["custom_scalars__config__"]


def test_a_fresh_run_hides_what_an_earlier_run_left_in_its_directory(tmp_path):
    cfg = _config(tmp_path)
    _write(Metrics.from_config(cfg), range(1, 7), 0.0)
    _next_second()
    _write(Metrics.from_config(cfg), range(1, 3), 50.0)
    assert _steps(_shown(tmp_path / "run/tb"), "train/loss") == [(1, 51.0), (2, 52.0)]


def test_csv_monitor_holds_each_step_once_after_a_resume(tmp_path, monkeypatch):
    import deepspeed.comm

    # DeepSpeed's monitors ask deepspeed.comm for the rank; this test has no process group.
    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda group=None: 0)
    cfg = _config(tmp_path, monitors=["csv"], tensorboard=False)
    _write(Metrics.from_config(cfg), range(1, 7), 0.0)
    _write(Metrics.from_config(cfg, resume_step=3), range(4, 9), 100.0)
    rows = (tmp_path / "run/csv/train_loss.csv").read_text().split()
    assert rows == ["step,loss", "1,1.0", "2,2.0", "3,3.0"] + [f"{s},{100.0 + s}" for s in range(4, 9)]
    assert not (tmp_path / "run/tb").exists()
    (superseded,) = (tmp_path / "run/csv").glob("train_loss.csv.superseded-*")  # set aside, not deleted
    assert superseded.read_text().split() == ["step,loss"] + [f"{s},{float(s)}" for s in range(1, 7)]


def test_monitor_names_are_the_config_choices():
    hint = typing.get_type_hints(LogConfig)["monitors"]
    assert typing.get_args(typing.get_args(hint)[0]) == MONITORS


def test_wandb_without_the_package_is_refused_naming_the_key(monkeypatch):
    import importlib.util

    from istack_ds.config import ConfigError
    from istack_ds.metrics import check_monitors

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"log.monitors holds `wandb` but the wandb package is not installed"):
        check_monitors(["csv", "wandb"])
