"""Every typed flag of every subcommand, under hostile values drawn by hypothesis ([reliability] #36 item 6).

The flags are discovered from the parser, so a new flag is covered the day it is added. For each: a value
the flag's type accepts is a finite number (an int where an int is promised, within its choices); a value it
refuses ends the command line with exit 2 and one line on stderr naming the flag, before any work.
"""

from __future__ import annotations

import argparse
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harmonizer_fast import cli

HOSTILE = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-1", "0", "-0", "0.5", "1e3", "3.0", "0x10", "1_000", " 7",
                     "", "abc", "99999999999999999999999", str(2**63), str(2**31), "1e-320", "None", "True",
                     "nan\n", " inf ", "4\n", "1e3\t", "-nan"]),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=8),
)  # fmt: skip


def _typed_flags() -> list[tuple[str, argparse.Action]]:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, action) for name, p in sub.choices.items() for action in p._actions
            if action.option_strings and action.type is not None]  # fmt: skip


FLAGS = _typed_flags()


def test_the_sweep_covers_every_subcommand_with_numeric_flags():
    commands = {name for name, _ in FLAGS}
    assert {"train", "evaluate", "sample", "predict", "compare", "export", "demo", "profile"} <= commands, commands


@pytest.mark.parametrize("command,action", FLAGS, ids=[f"{c}{a.option_strings[-1]}" for c, a in FLAGS])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=HOSTILE)
def test_a_flag_accepts_finite_values_or_refuses_in_one_line_naming_itself(command, action, text, capsys):
    try:
        value = action.type(text)
        accepted = action.choices is None or value in action.choices
    except (argparse.ArgumentTypeError, ValueError, TypeError):
        accepted = False
    if accepted:
        for v in value if isinstance(value, list) else [value]:
            assert not isinstance(v, float) or math.isfinite(v), (action.option_strings, text, v)
        return
    values = [text] * (action.nargs if isinstance(action.nargs, int) else 1)
    capsys.readouterr()
    rc = cli.main([command, f"{action.option_strings[-1]}={values[0]}" if len(values) == 1 else
                   action.option_strings[-1], *([] if len(values) == 1 else values)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == cli.EXIT_USAGE, (text, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert any(o in err for o in action.option_strings), err
