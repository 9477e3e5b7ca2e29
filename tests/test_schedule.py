"""Task schedules are pure functions of the step: tested without a model."""

import json

import pytest

from lxtrain.tasks.objectives import TASKS
from lxtrain.tasks.schedule import Phase, TaskSchedule, load_phases


def test_paper_recipe_turns_qa_on_at_half_of_the_epochs():
    schedule = TaskSchedule("paper", steps_per_epoch=10, total_epochs=20)
    phase_early, early = schedule.at(0)
    _, last_without = schedule.at(99)  # epoch 9.9
    phase_late, late = schedule.at(100)  # epoch 10.0
    assert "qa" not in early and "qa" not in last_without
    assert set(early) == set(TASKS) - {"qa"}
    assert late == dict.fromkeys(TASKS, 1.0)  # equal weights: a plain sum
    assert phase_early != phase_late


def test_release_recipe_keeps_qa_on_throughout():
    schedule = TaskSchedule("release", steps_per_epoch=5, total_epochs=4)
    assert all(schedule.at(step)[1] == dict.fromkeys(TASKS, 1.0) for step in range(20))


def test_phased_recipe_doubles_qa_in_second_half():
    schedule = TaskSchedule("phased", steps_per_epoch=4, total_epochs=12)
    assert "qa" not in schedule.at(23)[1]
    assert schedule.at(24)[1]["qa"] == 2.0 and schedule.at(24)[1]["mlm"] == 1.0


def test_sampled_recipe_is_deterministic_and_follows_ratios():
    schedule = TaskSchedule(
        "sampled",
        steps_per_epoch=100,
        total_epochs=10,
        seed=3,
        groups={"a": ("mlm",), "b": ("qa",)},
        group_ratios={"a": 0.75, "b": 0.25},
    )
    draws = [schedule.at(step)[1] for step in range(4000)]
    assert draws == [schedule.at(step)[1] for step in range(4000)]  # same on every call (resume, ranks)
    share_a = sum("mlm" in d for d in draws) / len(draws)
    assert abs(share_a - 0.75) < 0.03
    assert all(len(d) == 1 for d in draws)  # one group per step
    other_seed = TaskSchedule(
        "sampled", 100, 10, seed=4, groups={"a": ("mlm",), "b": ("qa",)}, group_ratios={"a": 0.75, "b": 0.25}
    )
    assert [other_seed.at(s)[1] for s in range(200)] != draws[:200]


def test_user_phases_from_file(tmp_path):
    path = tmp_path / "phases.json"
    path.write_text(
        json.dumps(
            [
                {"until_epoch": 1, "weights": {"mlm": 1.0, "qa": 0.0}, "name": "warm"},
                {"until_epoch": 3, "weights": {"mlm": 1.0, "qa": 0.5}},
            ]
        )
    )
    schedule = TaskSchedule("phases", steps_per_epoch=10, total_epochs=3, phases=load_phases(path))
    assert schedule.at(5) == ("warm", {"mlm": 1.0})  # weight 0 means not computed
    assert schedule.at(15) == ("phase1", {"mlm": 1.0, "qa": 0.5})
    assert schedule.at(1000)[1] == {"mlm": 1.0, "qa": 0.5}  # past the end: the last phase


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"recipe": "p20"}, "unknown task recipe"),
        ({"recipe": "phases"}, "at least one phase"),
        ({"recipe": "phases", "phases": (Phase(1, {"mlm": 1, "vqa": 1}),)}, "unknown task"),
        ({"recipe": "phases", "phases": (Phase(2, {"mlm": 1}), Phase(1, {"qa": 1}))}, "ordered"),
        ({"recipe": "paper", "steps_per_epoch": 0}, "steps_per_epoch"),
        ({"recipe": "phases", "phases": (Phase(1, {"mlm": 0.0}),)}, "no task has a weight"),
    ],
)
def test_bad_schedules_are_refused(kwargs, message):
    values = {"steps_per_epoch": 10, "total_epochs": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        TaskSchedule(**values)
