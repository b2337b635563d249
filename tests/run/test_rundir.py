"""Atomic writes: complete files or nothing, and a replaced directory is never half there."""

from __future__ import annotations

import json

import pytest

from fedft.rundir import atomic_directory, atomic_write_json, atomic_write_jsonl, read_jsonl_rows


def test_json_and_jsonl_round_trip_and_leave_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"b": 1, "a": [1, 2]})
    atomic_write_jsonl(tmp_path / "m.jsonl", [{"round": 0}, {"round": 1}])
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1, 2], "b": 1}
    assert read_jsonl_rows(tmp_path / "m.jsonl") == [{"round": 0}, {"round": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "s.json"]


def test_failed_directory_write_keeps_the_previous_version(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("crash while writing")
    assert (target / "weights").read_text() == "v1"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_record_failure_writes_failed_json_and_a_refused_write_does_not_hide_the_run_error(tmp_path, monkeypatch):
    from fedft import rundir

    rundir.record_failure(tmp_path, "Interrupted", "stopped by SIGTERM")
    record = json.loads((tmp_path / rundir.FAILURE_FILE).read_text())
    assert record["error"] == "Interrupted" and record["message"] == "stopped by SIGTERM"

    def full(path, text):
        raise rundir.DiskFull(f"no space left on the device holding {path}")

    monkeypatch.setattr(rundir, "atomic_write_text", full)
    rundir.record_failure(tmp_path, "RunFailed", "round 3")  # returns: the caller raises its own error
    assert json.loads((tmp_path / rundir.FAILURE_FILE).read_text())["message"] == "stopped by SIGTERM"
