"""[reliability] #36 item 3: one rule for the configs' field types (harmonizer_fast._schema), checked from
the dataclass annotations: any value of any type in any field is either accepted with its annotated type or
refused with a ValueError that names the field. Property-based over every field of both configs."""

import math
from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harmonizer_fast.model import HarmonizerConfig
from harmonizer_fast.train import TrainConfig

ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=6), st.tuples(st.integers(-2, 64)), st.tuples(st.floats(), st.floats()),
                st.lists(st.integers(0, 8), max_size=3))  # fmt: skip


def _has_type(kind: str, v) -> bool:
    if kind.startswith("Optional["):
        return v is None or _has_type(kind[9:-1], v)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    return isinstance(v, tuple) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


@pytest.mark.parametrize("make, cls", [(HarmonizerConfig.small, HarmonizerConfig), (TrainConfig, TrainConfig)])
@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_every_field_accepts_its_type_or_refuses_by_name(make, cls, data):
    f = data.draw(st.sampled_from(fields(cls)), label="field")
    value = data.draw(ANY, label="value")
    try:
        made = make(**{f.name: value})
    except ValueError as exc:
        assert f.name in str(exc), str(exc)
        return
    assert _has_type(str(f.type), getattr(made, f.name)), (f.name, value)


def test_round_trip_through_json_keeps_every_type():
    for c in (HarmonizerConfig.small(), HarmonizerConfig.paper()):
        assert HarmonizerConfig.from_dict(__import__("json").loads(c.to_json())) == c


# ---- the same rule through a checkpoint manifest: any JSON value in any field of a saved model's config is
# refused naming the field, or loads a model that holds exactly that value; never an allocation first (a
# count of 10**12 is bounded by the weights file, model/budget.py)
JSON_ANY = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**13), st.floats(allow_nan=True, allow_infinity=True),
                     st.text(max_size=6), st.lists(st.integers(0, 10**12), max_size=5))  # fmt: skip


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    import torch

    from harmonizer_fast.checkpoint import save_checkpoint
    from harmonizer_fast.model import HarmonizerNet

    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("manifest")
    return save_checkpoint(run, "best", HarmonizerNet(HarmonizerConfig.small()))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_manifest_config_field_loads_exactly_or_is_refused_by_name(saved_model, data):
    import json

    from harmonizer_fast.checkpoint import CheckpointError, load_model

    f = data.draw(st.sampled_from(fields(HarmonizerConfig)), label="field")
    value = data.draw(JSON_ANY, label="value")
    manifest = json.loads(saved_model.read_text())
    manifest["model_config"][f.name] = value
    edited = saved_model.with_name("edited.json")
    edited.write_text(json.dumps(manifest))
    try:
        model, _ = load_model(edited)
    except CheckpointError as exc:
        assert f.name in str(exc), str(exc)
        return
    got = getattr(model.config, f.name)
    assert (list(got) if isinstance(got, tuple) else got) == value or (value != value and got != got), (f.name, got)
