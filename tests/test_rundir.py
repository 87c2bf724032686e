"""The run-directory contract: atomic writers, DONE records, leftovers from killed writes."""
import json
import os

import pytest

from smolthink.rundir import (PipelineDir, RunDir, atomic_dir, atomic_write, read_done, remove_leftovers,
                              write_json, write_jsonl)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.json"
    write_json(p, {"x": 1})
    write_json(p, {"x": 2})
    assert json.loads(p.read_text()) == {"x": 2}
    assert sorted(os.listdir(p.parent)) == ["a.json"]
    write_jsonl(tmp_path / "r.jsonl", [{"a": 1}, {"b": 2}])
    assert (tmp_path / "r.jsonl").read_text() == '{"a": 1}\n{"b": 2}\n'


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.txt"
    atomic_write(p, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write(p, "new")
    monkeypatch.undo()
    assert p.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]  # the temp file is gone too


def test_atomic_dir_is_complete_or_absent(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("1")
    assert (target / "w").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w").write_text("2")
            raise RuntimeError("killed mid-write")
    assert (target / "w").read_text() == "1"  # the old one survives a failed replacement
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("3")
    assert (target / "w").read_text() == "3"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_remove_leftovers(tmp_path):
    (tmp_path / ".tmp_step_000004.abc").mkdir()
    (tmp_path / ".old_step_000002.77").mkdir()
    (tmp_path / ".metrics.jsonl.x.tmp").write_text("")
    (tmp_path / "step_000002").mkdir()
    gone = remove_leftovers(tmp_path)
    assert len(gone) == 3
    assert os.listdir(tmp_path) == ["step_000002"]


def test_done_has_one_meaning(tmp_path):
    run = RunDir(tmp_path / "sft")
    assert run.done() is None
    run.root.mkdir()
    run.mark_done(12.34, steps=160)
    assert run.done() == {"seconds": 12.3, "steps": 160}
    (run.root / "DONE").write_text("garbage\n")
    assert read_done(run.root) == {"seconds": None, "steps": None}  # still finished, seconds unknown


def test_pipeline_dir_timings_and_paths(tmp_path):
    pipe = PipelineDir(tmp_path)
    assert not pipe.is_pipeline()
    pipe.mark_done("base_eval", 80.04)
    pipe.mark_done("sft", 1200.0, steps=160)
    assert pipe.read_timings() == {"base_eval": 80.0, "sft": 1200.0}
    assert pipe.done("sft")["steps"] == 160
    assert pipe.run("sft").eval(160) == tmp_path / "sft" / "eval" / "step_000160.json"
    assert pipe.is_pipeline()
    with pytest.raises(ValueError):
        pipe.stage("nope")
    r = RunDir(tmp_path / "grpo")
    for s in (10, 0, 5):
        write_json(r.eval(s), {})
    write_jsonl(r.eval_completions(5), [])
    assert r.eval_steps() == [0, 5, 10]
    assert r.sample_steps() == []
    for s in (20, 3):
        write_jsonl(r.samples(s), [{"step": s}])
    assert r.sample_steps() == [3, 20]


def test_atomic_dir_fsyncs_files_and_directories_before_the_rename(tmp_path, monkeypatch):
    """Every file and the temp directory are on disk before the rename, and the parent after it: a power cut
    leaves the old directory or the complete new one."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))),
                                                     real_replace(a, b))[1])
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        for name in ("a", "sub/b"):
            (tmp / name).write_text(name)
    monkeypatch.undo()
    rename = events.index(("replace", str(tmp), str(target)))
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {str(tmp / "a"), str(tmp / "sub" / "b"), str(tmp / "sub"), str(tmp)} <= synced_before
    assert ("fsync", str(tmp_path)) in events[rename:]


def test_discard_never_leaves_a_half_deleted_directory(tmp_path, monkeypatch):
    """A deletion killed part-way leaves only an `.old_` leftover (cleaned at start), never a partial directory
    under its own name."""
    import shutil

    from smolthink.rundir import discard

    d = tmp_path / "step_000002"
    d.mkdir()
    (d / "w").write_text("1")

    def killed(path, ignore_errors=False):  # a kill once the deletion has begun
        if os.path.exists(path):
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        discard(d)
    monkeypatch.undo()
    assert not d.exists() and [p.name.startswith(".old_step_000002") for p in tmp_path.iterdir()] == [True]
    remove_leftovers(tmp_path)
    assert os.listdir(tmp_path) == []
