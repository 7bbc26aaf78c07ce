"""``report.html``: one self-contained page for the reviewer of a batch, the cases the model is least sure of first.

Each case shows its image with each rater head's contour in its own colour (the consensus mask's when the model
has no heads) beside the uncertainty map (the entropy of the sample mean), for a volume at the slice with the
most uncertainty. Cases are sorted by their ``uncertainty`` score (the K samples' mean pairwise 1 - IoU), failed
cases are listed first with their errors. The pictures are made while each case is predicted
(``OUT/<case>/preview.png``) and embedded as base64, so the page is one file that opens anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .._io import write_atomic

# One colour per rater head (Okabe-Ito, readable by colour-blind reviewers); the consensus mask in white.
RATER_COLOURS = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
                 (204, 121, 167)]  # fmt: skip
CONSENSUS = (255, 255, 255)
PREVIEW_SIDE = 256


def _contour(mask: np.ndarray) -> np.ndarray:
    """The mask's boundary pixels (inside the mask, next to a pixel outside it)."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _upscale(a: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(a, factor, 0), factor, 1)


def _heat(u: np.ndarray) -> np.ndarray:
    """Entropy in [0, 1] bits -> RGB through matplotlib's 'magma' map."""
    from matplotlib import colormaps

    return (colormaps["magma"](np.clip(u, 0, 1))[..., :3] * 255).astype(np.uint8)


def render_preview(image: np.ndarray, mask: np.ndarray, uncertainty: np.ndarray, heads) -> bytes:
    """PNG bytes: the image (``(C, S, H, W)`` in [0, 1], first channel shown) with contours, beside the
    uncertainty map, at the slice whose entropy sum is largest."""
    from PIL import Image

    j = int(np.argmax(uncertainty.reshape(uncertainty.shape[0], -1).sum(1)))
    h, w = mask.shape[1:]
    factor = max(1, PREVIEW_SIDE // max(h, w))
    grey = (np.clip(image[0, j], 0, 1) * 255).astype(np.uint8)
    rgb = _upscale(np.repeat(grey[..., None], 3, -1), factor)
    outlines = [(m[j], RATER_COLOURS[i % len(RATER_COLOURS)]) for i, m in enumerate(heads)] if heads is not None \
        else [(mask[j], CONSENSUS)]  # fmt: skip
    for m, colour in outlines:
        rgb[_contour(_upscale(m.astype(bool), factor))] = colour
    heat = _upscale(_heat(uncertainty[j]), factor)
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.concatenate([rgb, gap, heat], 1)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def write_report(out: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``out/report.html`` from the summary rows and the cases' previews."""
    meta = json.loads((out / "predict.json").read_text()) if (out / "predict.json").is_file() else {}
    failed = [r for r in rows if r.get("status") != "ok"]
    done = sorted((r for r in rows if r.get("status") == "ok"), key=lambda r: -float(r.get("uncertainty", 0)))
    raters = sorted({k for r in done for k in r if k.startswith("area_rater")}, key=lambda k: int(k[10:]))
    legend = " ".join(f'<span style="color:rgb{RATER_COLOURS[i % 7]}">&#9632; head {i + 1}</span>'
                      for i in range(len(raters))) or "white: the consensus mask (the model has no heads)"  # fmt: skip
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>harmonizer-fast predictions</title><style>"
        "body{font-family:sans-serif;background:#111;color:#eee;margin:1.5em}table{border-collapse:collapse}"
        "td,th{padding:4px 8px;border-bottom:1px solid #333;text-align:left;vertical-align:top}"
        ".fail{color:#f77}img{image-rendering:pixelated}</style></head><body>",
        f"<h1>{len(done)} cases, least certain first</h1>",
        f"<p>model {html.escape(str(meta.get('model', {}).get('name', '?')))}, K = {meta.get('num_samples', '?')}, "
        f"heads {html.escape(str(meta.get('heads', '?')))}. Left: the image with {legend}; right: the uncertainty "
        "map (entropy of the mean of the K samples, black 0 to light 1 bit). Uncertainty: the samples' mean "
        "pairwise 1 - IoU over the case. Research use only, not for clinical decisions.</p>",
    ]
    if failed:
        parts.append(f"<h2 class='fail'>{len(failed)} failed or pending</h2><table>")
        parts += [f"<tr><td>{_fmt(r['case'])}</td><td class='fail'>{_fmt(r.get('error', ''))}</td></tr>"
                  for r in failed]
        parts.append("</table>")
    parts.append(f"<table><tr><th>case</th><th>uncertainty</th><th>area ({_fmt(done[0]['unit']) if done else ''})"
                 f"</th>{''.join(f'<th>head {k[10:]}</th>' for k in raters)}<th></th></tr>")  # fmt: skip
    for r in done:
        preview = out / str(r["case"]) / "preview.png"
        img = (f"<img src='data:image/png;base64,{base64.b64encode(preview.read_bytes()).decode()}'>"
               if preview.is_file() else "(no preview: predicted without --report)")  # fmt: skip
        cells = "".join(f"<td>{_fmt(r.get(k, ''))}</td>" for k in ("case", "uncertainty", "area", *raters))
        parts.append(f"<tr>{cells}<td>{img}</td></tr>")
    parts.append("</table></body></html>\n")
    path = out / "report.html"
    write_atomic(path, "".join(parts))
    return path
