"""The task-type registry: list, create, get, unknown names, per-task resolution, clean unregistering."""
from __future__ import annotations

import pytest

from tvq_lightning.errors import TvqError
from tvq_lightning.tasks import (Classification, TaskType, create_task_type, get_task_type, list_task_types,
                                 register_task_type, resolve_task_types, unregister_task_type)


class Dummy(Classification):
    """A registered subclass with one option."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale


def test_builtin_classification():
    assert "classification" in list_task_types()
    assert get_task_type("classification") is Classification
    tt = create_task_type("classification")
    assert isinstance(tt, TaskType) and tt.name == "classification"
    assert tt.main_metric == "acc" and tt.higher_is_better and tt.metric_info("acc").percent


def test_unknown_name_and_bad_options():
    with pytest.raises(TvqError, match=r"unknown task type 'clasification' \(did you mean 'classification'\?\)"):
        create_task_type("clasification")
    with pytest.raises(TvqError, match="has no option 'nope'"):
        create_task_type("classification", nope=1)


def test_register_create_and_clean():
    register_task_type("dummy_tt", Dummy)
    try:
        assert "dummy_tt" in list_task_types() and get_task_type("dummy_tt") is Dummy
        assert create_task_type("dummy_tt", scale=2.0).scale == 2.0
        register_task_type("dummy_tt", Dummy)                       # the same class again: fine
        with pytest.raises(ValueError, match="already registered"):
            register_task_type("dummy_tt", Classification)
        types = resolve_task_types(["a", "b"], {"b": "dummy_tt"})
        assert type(types["a"]) is Classification and type(types["b"]) is Dummy
    finally:
        unregister_task_type("dummy_tt")
    assert "dummy_tt" not in list_task_types()
    with pytest.raises(TvqError, match="unknown task type 'dummy_tt'"):
        create_task_type("dummy_tt")
    with pytest.raises(ValueError, match="built in"):
        unregister_task_type("classification")


def test_register_rejects_non_task_types():
    with pytest.raises(TypeError, match="not a TaskType subclass"):
        register_task_type("x", int)
    with pytest.raises(TypeError):
        @register_task_type("y")
        class NotOne:
            pass
    assert "x" not in list_task_types() and "y" not in list_task_types()


def test_resolve_one_name_for_every_task_and_unknown_task():
    types = resolve_task_types(["a", "b"], "classification")
    assert list(types) == ["a", "b"] and types["a"] is types["b"]
    given = create_task_type("classification")
    assert resolve_task_types(["a"], given)["a"] is given
    with pytest.raises(TvqError, match="names task 'z'"):
        resolve_task_types(["a"], {"z": "classification"})
