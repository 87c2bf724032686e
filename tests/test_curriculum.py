"""Difficulty scheduling through reasoning-gym's curricula: start levels, moves on synthetic success rates, bad input,
tasks without a curriculum, and the question source's on-demand questions (never an eval question, exact state)."""
import logging

import pytest

from smolthink.config import CurriculumConfig, GRPOConfig, build_config
from smolthink.curriculum import build_curricula
from smolthink.errors import SmolthinkError
from smolthink.groups import GroupResult
from smolthink.questions import make_source
from smolthink.seeds import derive_seed
from smolthink.tasks import make_examples, parse_tasks


def curriculum(task="propositional_logic", **kw):
    curricula, _ = build_curricula(parse_tasks(task), CurriculumConfig(enabled=True, **kw))
    return curricula[task]


def test_start_level_reproduces_the_configured_difficulty():
    assert curriculum("syllogism").levels == {"allow_all": 3, "allow_no": 3, "allow_some": 3, "allow_some_not": 3}
    prop = curriculum()
    assert prop.levels == {"vars": 1, "statements": 1, "complexity": 2}
    assert prop.task_spec().config == {"min_vars": 2, "max_vars": 4, "min_statements": 2, "max_statements": 4,
                                       "min_complexity": 1, "max_complexity": 3}  # reasoning-gym's defaults
    # a configured difficulty picks its own level; an explicit start level wins
    custom = build_curricula(parse_tasks([{"name": "propositional_logic", "config": {"max_vars": 8}}]),
                             CurriculumConfig(enabled=True))[0]["propositional_logic"]
    assert custom.levels["vars"] == 3 and custom.unmatched == []
    odd = build_curricula(parse_tasks([{"name": "propositional_logic", "config": {"min_vars": 3}}]),
                          CurriculumConfig(enabled=True))[0]["propositional_logic"]
    assert odd.levels["vars"] == 0 and odd.unmatched == ["vars"]  # no level starts the range at 3: level 0
    assert curriculum(start_level=0).levels == {"vars": 0, "statements": 0, "complexity": 0}


def test_level_moves_up_and_down_on_synthetic_success_rates():
    cur = curriculum(window=4, start_level=1, attributes=["vars"])
    assert cur.levels == {"vars": 1}
    assert [cur.observe(0.9) for _ in range(3)] == [0, 0, 0]  # the window is not full yet
    assert cur.observe(0.9) == 1 and cur.levels == {"vars": 2}
    assert cur.task_spec().config["max_vars"] == 6 and cur.window_accuracy() is None  # a new level, a new window
    for _ in range(4):
        cur.observe(0.5)  # inside the band [0.2, 0.7]: stays
    assert cur.levels == {"vars": 2}
    moves = [cur.observe(0.0) for _ in range(12)]
    assert moves.count(-1) == 2 and cur.levels == {"vars": 0}  # down to the bottom, then it stays
    for _ in range(40):
        cur.observe(1.0)
    assert cur.levels == {"vars": 4}  # up to the top (levels 0-4), then it stays
    assert cur.task_spec().config == {"min_vars": 2, "max_vars": 10}  # attributes not moved keep their config


def test_moves_keep_syllogism_quantifiers_in_step():
    cur = curriculum("syllogism", window=1)
    cur.observe(0.0)
    assert cur.task_spec().config == {"allow_all": True, "allow_no": True, "allow_some": True,
                                      "allow_some_not": False}


def test_bad_curriculum_input_is_one_line():
    with pytest.raises(SmolthinkError) as e:
        build_config(GRPOConfig, [{"curriculum": {"enabled": True, "attributes": ["nope"]}}])
    assert str(e.value) == ("unknown curriculum attribute 'nope' (valid: syllogism.allow_all, syllogism.allow_no, "
                            "syllogism.allow_some, syllogism.allow_some_not)")
    with pytest.raises(SmolthinkError, match=r"^curriculum.start_level 5 is out of range for "
                                             r"propositional_logic.vars \(valid levels: 0-4\)$"):
        build_config(GRPOConfig, [{"task": "propositional_logic", "curriculum.enabled": True,
                                   "curriculum.start_level": 5}])
    with pytest.raises(SmolthinkError, match="lower_below must be < curriculum.raise_above"):
        build_config(GRPOConfig, [{"curriculum.lower_below": 0.8}])


def test_task_without_curriculum_runs_without_one_logged_once(caplog):
    cfg = build_config(GRPOConfig, [{"task": "acre:1,syllogism:1", "curriculum.enabled": True}])
    specs = parse_tasks(cfg.task)
    train = make_examples(specs, 8, 0, "train")
    with caplog.at_level(logging.INFO, logger="smolthink.questions"):
        source = make_source(cfg, specs, train, [])
    said = [r.getMessage() for r in caplog.records if "no reasoning-gym curriculum" in r.getMessage()]
    assert said == ["curriculum: acre has no reasoning-gym curriculum (or no attribute to move): its questions keep "
                    "the configured difficulty"]
    drawn = source.next_batch(8, 0)
    assert {d.origin for d in drawn if d.example.task == "acre"} == {"train"}
    assert {d.origin for d in drawn if d.example.task == "syllogism"} == {"curriculum"}


def _source(exclude=(), **cur):
    cfg = build_config(GRPOConfig, [{"task": "propositional_logic", "curriculum": {"enabled": True, **cur}}])
    specs = parse_tasks(cfg.task)
    return make_source(cfg, specs, make_examples(specs, 16, 0, "train"), exclude)


def test_curriculum_questions_are_fresh_and_never_from_the_eval_set():
    # the questions the first generation would give, declared held out: the source must draw others
    first = make_examples([_source().curricula["propositional_logic"].task_spec()], 4,
                          derive_seed(0, "curriculum", "propositional_logic", 0), "curriculum")
    banned = {e.question for e in first}
    source = _source(exclude=banned)
    drawn = [d for b in range(3) for d in source.next_batch(4, b)]
    assert all(d.origin == "curriculum" and d.level == {"vars": 1, "statements": 1, "complexity": 2} for d in drawn)
    assert not banned & {d.example.question for d in drawn}
    assert len({d.example.question for d in drawn}) == 12 and source.generated == 3  # a new seed per generation


def test_source_state_restores_exactly():
    a = _source(window=2)
    batch = a.next_batch(4, 0)
    a.record([GroupResult(d.example, d.origin, d.level, 4, 4, 10, True) for d in batch])  # all solved: raise
    assert a.curricula["propositional_logic"].levels == {"vars": 2, "statements": 2, "complexity": 3}
    b = _source(window=2)
    b.load_state_dict(a.state_dict())
    assert [d.example.question for d in b.next_batch(4, 1)] == [d.example.question for d in a.next_batch(4, 1)]
    assert b.state_dict() == a.state_dict()


def test_cli_bad_curriculum_attribute_is_one_line(tmp_path, capsys):
    from smolthink.cli import main

    args = ["train", "--out", str(tmp_path / "x"), "--set", "task=propositional_logic", "--set",
            "curriculum.enabled=true", "--set", "curriculum.attributes=[vars, depth]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert ("unknown curriculum attribute 'depth' (valid: propositional_logic.vars, propositional_logic.statements, "
            "propositional_logic.complexity)") in " ".join(err.split()) and "Traceback" not in err
    assert not (tmp_path / "x").exists()
