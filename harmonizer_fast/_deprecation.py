"""Renamed keyword arguments keep working for one release, with a FutureWarning naming the new one.

[op-registry] #37 item 4: the count of prior samples K is ``num_samples`` everywhere (the model's name for
it); ``samples`` is kept for tensors of samples. Functions that took ``samples=K`` accept it still, warn, and
refuse both names at once.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_kwargs(**renames: str) -> Callable[[F], F]:
    """``@renamed_kwargs(samples="num_samples")``: a call with ``samples=`` is forwarded as ``num_samples=``."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}: pass {new}= only ({old}= is its old name)")
                    warnings.warn(f"{fn.__name__}: {old}= is renamed {new}= and the old name will be removed",
                                  FutureWarning, stacklevel=2)  # fmt: skip
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap
