"""Types of a config dataclass's fields, checked from its annotations ([reliability] #36 item 3).

One rule for ``HarmonizerConfig`` and ``TrainConfig`` (and so for every manifest, since both are rebuilt
from their JSON through the constructor): an ``int`` field holds an int (not a bool, not 2.5), a ``float``
field a finite int or float, a ``bool`` a bool, a ``str`` a str, ``tuple[int, ...]`` a tuple of ints, and
``Optional[X]`` None or an X; for the JSON a manifest records, ``dict[str, Any]`` an object and
``list[dict[str, Any]]`` a list of objects. The ranges (counts >= 1, weights >= 0, names from a list) stay beside each
config, which knows them. A hand-written check per field had let ``latent_dim=2.5`` or ``lambda_kl=nan``
through to the model.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any


def is_int(v: Any) -> bool:
    """An int, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool."""
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


_CHECKS = {
    "int": (is_int, "an integer"),
    "float": (is_number, "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "tuple[int, ...]": (lambda v: isinstance(v, tuple) and all(is_int(x) for x in v), "a tuple of integers"),
    # the JSON side (a manifest's recorded training state): objects, and lists of objects
    "dict[str, Any]": (lambda v: isinstance(v, dict), "an object"),
    "list[dict[str, Any]]": (lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
                             "a list of objects"),
}


def check_field_types(obj: Any) -> None:
    """Raise ValueError naming the first field of dataclass ``obj`` whose value does not have its annotated
    type (annotations as strings, ``from __future__ import annotations``)."""
    where = type(obj).__name__
    for f in fields(obj):
        kind, optional = str(f.type), False
        if kind.startswith("Optional[") and kind.endswith("]"):
            kind, optional = kind[len("Optional[") : -1], True
        value = getattr(obj, f.name)
        if optional and value is None:
            continue
        check, expected = _CHECKS[kind]  # a new annotation kind must be added here (KeyError in the tests)
        if not check(value):
            raise ValueError(f"{where}.{f.name}: expected {expected}{' or None' if optional else ''}, got "
                             f"{value!r}")  # fmt: skip
