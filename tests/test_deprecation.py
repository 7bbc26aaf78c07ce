"""One name for K ([op-registry] #37 item 4): ``num_samples`` everywhere; the old ``samples=`` keyword and the
``--samples`` flag keep working for one release (the keyword with a FutureWarning)."""

import warnings

import numpy as np
import pytest

from harmonizer_fast import cli
from harmonizer_fast.data import make_synthetic
from harmonizer_fast.references import label_only_references


def test_the_old_keyword_warns_and_gives_the_same_result():
    data = make_synthetic(n=6, size=32, seed=3)
    idx = np.arange(6)
    new = label_only_references(data, idx, num_samples=5)
    with pytest.warns(FutureWarning, match=r"label_only_references: samples= is renamed num_samples="):
        old = label_only_references(data, idx, samples=5)
    assert old == new
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name never warns
        label_only_references(data, idx, num_samples=5)
    with pytest.raises(TypeError, match="pass num_samples= only"):
        label_only_references(data, idx, samples=5, num_samples=5)


@pytest.mark.parametrize("command", ["evaluate", "sample", "compare", "export", "profile", "predict"])
def test_every_command_takes_k_under_one_name_and_the_old_flag(command):
    p = next(a for a in cli.parser()._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
    flag = next(a for a in p._actions if a.dest == "num_samples")
    assert {"-k", "--num-samples", "--samples"} <= set(flag.option_strings)
    assert not any(a.dest == "samples" for a in p._actions)


@pytest.mark.parametrize("name, home", [("ged", "metrics.energy"), ("ged_terms", "metrics.energy"),
                                        ("GEDTerms", "metrics.energy"), ("ged_loss", "losses"),
                                        ("ged_loss_per_image", "losses")])  # fmt: skip
def test_ged_names_moved_out_of_the_ops_keep_working_with_a_warning(name, home):
    """[op-registry] #37 item 3: GED's conventions and means live in metrics.energy, its loss in losses; the
    names the ops package exported resolve there for one release, with a DeprecationWarning."""
    import importlib

    import torch

    import harmonizer_fast as hf

    target = getattr(importlib.import_module(f"harmonizer_fast.{home}"), name)
    moved = f"harmonizer_fast.ops.{name} moved to harmonizer_fast.{home}"
    if name == "ged":  # a function of its own in ops (the submodule ops.ged would shadow a lazy name): warns called
        s, r = torch.rand(2, 3, 8, 8), (torch.rand(2, 2, 8, 8) > 0.5).float()
        with pytest.warns(DeprecationWarning, match=moved):
            torch.testing.assert_close(hf.ops.ged(s, r), hf.ged(s, r))
        assert hf.ged is target and hf.metrics.ged is target
    else:
        with pytest.warns(DeprecationWarning, match=moved):
            assert getattr(hf.ops, name) is target
