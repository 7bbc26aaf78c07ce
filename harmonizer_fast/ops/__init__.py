"""Layer 1 of the package: fast, autograd-aware, torch.compile-friendly ops (one module per op family)."""

from .attention_pool import token_attention_pool, token_attention_pool_reference
from .film import film, film_reference
from .ged import GEDTerms, ged, ged_loss, ged_loss_per_image, ged_terms, pairwise_intersection, pairwise_iou, soft_gram
from .haar import (
    haar_dwt2d,
    haar_dwt2d_reference,
    haar_dwt2d_split,
    haar_idwt2d,
    haar_idwt2d_reference,
    haar_idwt2d_split,
)
from .haar3d import haar_dwt3d, haar_dwt3d_reference, haar_idwt3d, haar_idwt3d_reference

__all__ = [
    "GEDTerms",
    "film",
    "film_reference",
    "ged",
    "ged_loss",
    "ged_loss_per_image",
    "ged_terms",
    "haar_dwt2d",
    "haar_dwt2d_reference",
    "haar_dwt2d_split",
    "haar_dwt3d",
    "haar_dwt3d_reference",
    "haar_idwt2d",
    "haar_idwt2d_reference",
    "haar_idwt2d_split",
    "haar_idwt3d",
    "haar_idwt3d_reference",
    "pairwise_intersection",
    "pairwise_iou",
    "soft_gram",
    "token_attention_pool",
    "token_attention_pool_reference",
]
