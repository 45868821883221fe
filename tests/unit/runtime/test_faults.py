"""Fault drills (``closedloop.runtime.faults``): which drills fire where, and the ``pause`` drill that holds a
task at a known moment (the production-shape tests kill a worker or restart MLflow during it)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from closedloop.runtime import faults


@pytest.fixture
def drill(tmp_path, monkeypatch):
    path = tmp_path / "faults.json"
    monkeypatch.setenv(faults.ENV, str(path))

    def write(*entries):
        path.write_text(json.dumps(list(entries)))
    return write


def test_no_drill_file_means_no_fault(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.inject(dag_id="d", task_id="train", try_number=1, point="start")  # returns


def test_drills_fire_only_on_their_task_point_try_and_dag(drill):
    drill({"task": "train", "point": "end", "fault": "transient", "tries": [2], "dag": "a"})
    for kwargs in ({"task_id": "label"}, {"point": "start"}, {"try_number": 1}, {"dag_id": "b"}):
        faults.inject(**{"dag_id": "a", "task_id": "train", "try_number": 2, "point": "end", **kwargs})
    with pytest.raises(ConnectionResetError, match="a.train try 2 at 'end'"):
        faults.inject(dag_id="a", task_id="train", try_number=2, point="end")
    drill({"task": "*", "fault": "permanent"})
    with pytest.raises(TypeError, match="permanent"):
        faults.inject(dag_id="a", task_id="label", try_number=1, point="start")


def test_an_unreadable_drill_file_injects_nothing(drill, tmp_path):
    (tmp_path / "faults.json").write_text("{not json")
    faults.inject(dag_id="a", task_id="train", try_number=1, point="start")


def test_pause_marks_holds_until_released_then_goes_on(drill, tmp_path):
    mark, release = tmp_path / "paused", tmp_path / "release"
    drill({"task": "train", "point": "model_logged", "fault": "pause", "mark": str(mark), "until": str(release)})
    done = threading.Event()
    worker = threading.Thread(target=lambda: (faults.inject(dag_id="a", task_id="train", try_number=1,
                                                            point="model_logged"), done.set()))
    worker.start()
    deadline = time.monotonic() + 10
    while not mark.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "a.train try 1 at 'model_logged'" in mark.read_text()
    time.sleep(0.5)
    assert not done.is_set()  # still held
    release.touch()
    worker.join(5)
    assert done.is_set()


def test_pause_ends_after_its_seconds(drill):
    drill({"task": "train", "fault": "pause", "seconds": 0.3})
    started = time.monotonic()
    faults.inject(dag_id="a", task_id="train", try_number=1, point="start")
    assert 0.25 <= time.monotonic() - started < 5
