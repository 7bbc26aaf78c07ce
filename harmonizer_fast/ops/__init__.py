"""Layer 1 of the package: fast, autograd-aware, torch.compile-friendly ops (one module per op family)."""

from .attention_pool import token_attention_pool, token_attention_pool_reference
from .film import film, film_reference
from .haar import (
    haar_dwt2d,
    haar_dwt2d_reference,
    haar_dwt2d_split,
    haar_idwt2d,
    haar_idwt2d_reference,
    haar_idwt2d_split,
)

__all__ = [
    "film",
    "film_reference",
    "haar_dwt2d",
    "haar_dwt2d_reference",
    "haar_dwt2d_split",
    "haar_idwt2d",
    "haar_idwt2d_reference",
    "haar_idwt2d_split",
    "token_attention_pool",
    "token_attention_pool_reference",
]
