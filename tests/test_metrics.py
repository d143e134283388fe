"""istack_ds/metrics.py and tbview.py: what TensorBoard shows of a run and of a resumed run (the run's name,
hparams in the method's order, config text, the custom-scalar layout, depth as steps and the growth pause as
spikes, a note on a random teacher, each step once), the CSV monitor, and the progress bar with log lines.
Metrics is driven directly, as the trainer would."""

import io
import sys
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

    from istack_ds.tbview import find_events

    acc = EventAccumulator(str(find_events(tb_dir)), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _steps(acc, tag) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard draws it: an event whose step goes back replaces the ones it supersedes."""
    from istack_ds.evidence.compare import shown

    return [(e.step, e.value) for e in shown(acc.Scalars(tag))]


def test_a_resumed_run_shows_hparams_config_name_layout_and_each_step_once(tmp_path):
    from tensorboard.plugins.hparams import metadata as hp
    from tensorboard.util import tensor_util

    cfg = _config(tmp_path)
    _write(Metrics.from_config(cfg), range(1, 7), 0.0, valid_at=(3, 6))
    _next_second()
    # Resumed from the checkpoint at step 3: steps 4.. are logged again.
    _write(Metrics.from_config(cfg, resume_step=3), range(4, 9), 100.0)

    tb = tmp_path / "run/tb"
    assert [p.name for p in tb.iterdir()] == ["resume-test"]  # one run, named by run.name
    assert len(list((tb / "resume-test").glob("events.out.tfevents.*"))) == 2
    assert not [p for p in (tb / "resume-test").iterdir() if p.is_dir()]  # hparams are in the scalars' run
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


def test_the_run_is_named_by_run_name_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    cfg = Config(run=RunConfig(name="my run/1", out_dir=str(tmp_path / "run")))
    _write(Metrics.from_config(cfg), range(1, 3), 0.0)
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "run/tb")).Runs()  # as `--logdir <out>/tb` lists
    assert list(runs) == ["my_run_1"]


def _growing_run(metrics: Metrics, log_steps, growths: dict[int, int], depth: int) -> None:
    """What the trainer writes: depth at each log step (report.interval_values), and at a growth the pause
    and the new depth (trainer.grow_to, report.log_student), after the log line of that step."""
    for step in sorted(set(log_steps) | set(growths)):
        if step in log_steps:
            metrics.scalars(step, {"train/loss": 1.0, "model/depth": float(depth)})
        if step in growths:
            depth = growths[step]
            metrics.scalars(step, {"growth/pause_s": 1.5})
            metrics.scalars(step, {"model/depth": float(depth), "model/params": 100.0 * depth})
    metrics.close()


def test_depth_is_a_step_at_each_change_and_the_growth_pause_a_spike(tmp_path):
    cfg = _config(tmp_path)
    _growing_run(Metrics.from_config(cfg), [0, 25, 50, 75, 100], {60: 4, 100: 8}, depth=2)
    acc = _shown(tmp_path / "run/tb")
    # The old depth again one step before each change; at a log step it replaces the old depth logged there
    # (TensorBoard, like EventAccumulator, drops the events a step going back supersedes).
    assert _steps(acc, "model/depth") == [(0, 2), (25, 2), (50, 2), (59, 2), (60, 4), (75, 4), (99, 4), (100, 8)]
    assert _steps(acc, "model/params") == [(60, 400.0), (99, 400.0), (100, 800.0)]
    assert _steps(acc, "growth/pause_s") == [(59, 0), (60, 1.5), (61, 0), (99, 0), (100, 1.5), (101, 0)]


def test_a_resumed_run_draws_its_next_depth_change_from_the_depth_it_resumed_at(tmp_path):
    cfg = _config(tmp_path)
    _growing_run(Metrics.from_config(cfg), [0, 25, 50], {50: 4}, depth=2)
    _next_second()
    metrics = Metrics.from_config(cfg, resume_step=50)
    metrics.scalars(50, {"model/depth": 4.0})  # the start's depth line, at the checkpoint's step: not written
    _growing_run(metrics, [75], {80: 8}, depth=4)
    assert _steps(_shown(tmp_path / "run/tb"), "model/depth") == [
        (0, 2),
        (25, 2),
        (49, 2),
        (50, 4),
        (75, 4),
        (79, 4),
        (80, 8),
    ]


def _layout(acc):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util

    (event,) = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())


def test_the_custom_scalars_open_on_the_losses_and_draw_depth_and_pause_unsmoothed(tmp_path):
    _write(Metrics.from_config(_config(tmp_path)), range(1, 3), 0.0)
    layout = _layout(_shown(tmp_path / "run/tb"))
    first = layout.category[0]
    assert first.title == "losses" and first.chart[0].title == "train and valid loss"
    assert list(first.chart[0].multiline.tag) == [r"^train/loss$", r"^valid/loss$"]
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    # Margin charts are the ones TensorBoard never smooths: depth stays a step, the pause a spike.
    for title, tag in [
        ("depth (student layers)", "model/depth"),
        ("growth pause, seconds (a spike at each growth)", "growth/pause_s"),
    ]:
        (series,) = charts[title].margin.series
        assert series.value == series.lower == series.upper == tag
    assert not any(t.startswith("diag/cka_") and t[9:10].isdigit() for c in charts.values() for t in c.multiline.tag)


def test_hparams_list_the_method_keys_first(tmp_path):
    from tensorboard.plugins.hparams import backend_context
    from tensorboard.plugins.hparams import metadata as hp

    _write(Metrics.from_config(_config(tmp_path)), range(1, 3), 0.0)
    content = _shown(tmp_path / "run/tb").PluginTagToContent(hp.PLUGIN_NAME)
    experiment = hp.parse_experiment_plugin_data(content[hp.EXPERIMENT_TAG])
    backend_context._sort_and_reduce_to_hparams_limit(experiment)  # what the HPARAMS tab lists, in its order
    names = [info.name for info in experiment.hparam_infos]
    sections = list(dict.fromkeys(n.split(".")[0] for n in names))
    assert sections[:4] == ["growth", "loss", "optim", "student"], sections  # before checkpoint, data, ...
    assert names[:5] == ["growth.alpha", "growth.boundaries", "growth.carry", "growth.depths", "growth.operator"]
    assert "run.name" in names and len(names) == len(set(names))


def _texts(acc, tag) -> list[str]:
    from tensorboard.util import tensor_util

    tags = acc.Tags()["tensors"]
    if f"{tag}/text_summary" not in tags:
        return []
    return [tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors(f"{tag}/text_summary")]


def test_a_random_teacher_gets_a_note_on_its_flat_cka_maps(tmp_path):
    from istack_ds.config import TeacherConfig
    from istack_ds.tbview import RANDOM_MARKER

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    cfg = Config(run=RunConfig(name="t", out_dir=str(tmp_path / "run")), teacher=TeacherConfig(path=str(teacher)))
    _write(Metrics.from_config(cfg), range(1, 2), 0.0)
    assert _texts(_shown(tmp_path / "run/tb"), "about/random_teacher") == []  # a trained teacher: no note
    (teacher / RANDOM_MARKER).write_text("random\n")
    _next_second()
    _write(Metrics.from_config(cfg), range(1, 2), 0.0)
    (note,) = _texts(_shown(tmp_path / "run/tb"), "about/random_teacher")
    assert "random weights" in note and "flat" in note and str(teacher) in note


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_and_the_progress_bar_never_share_a_line(tmp_path, monkeypatch):
    import logging

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(message)s"))
    monkeypatch.setattr(logging.root, "handlers", [handler])
    monkeypatch.setattr(logging.root, "level", logging.INFO)
    metrics = Metrics(tmp_path / "run", 10, tensorboard=False)
    assert metrics.bar is not None
    for step in range(1, 4):
        metrics.progress(step)
        logging.getLogger("istack_ds").info("growth: step %d", step)
    metrics.line(4, {"train/loss": 1.0}, depth=2, step_s=0.1, audio_s_per_s=10.0)
    metrics.close()
    assert logging.root.handlers == [handler]  # the console handler is back after the run
    out = terminal.getvalue()
    # Each line starts where the cleared bar was (after \r or \n), never right after the bar's text.
    for message in ["growth: step 1", "growth: step 2", "growth: step 3", "step 4/10"]:
        start = out.index(message)
        assert start == 0 or out[start - 1] in "\r\n", repr(out[max(0, start - 40) : start + 20])
