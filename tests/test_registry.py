import pytest

from fedvlm.registry import Registry


def test_create_and_unknown_name_lists_valid_ones() -> None:
    things: Registry[int] = Registry("thing")
    things.register("one")(lambda: 1)
    things.register("two")(lambda: 2)
    assert things.create("two") == 2
    assert things.names() == ["one", "two"] and "one" in things and len(things) == 2
    with pytest.raises(KeyError, match="unknown thing 'three'; valid names: one, two"):
        things.get("three")


def test_duplicate_registration_is_refused() -> None:
    things: Registry[int] = Registry("thing")
    things.register("one")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        things.register("one")(lambda: 2)
