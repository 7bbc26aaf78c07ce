"""``Predictor``: a trained model on the images users have, one code path for the API and ``harmonizer-fast predict``.

For each case (:mod:`.inputs`): read the raw pixels, apply the model's recorded preprocessing, draw K prior
samples and the rater heads slice by slice, crop the padding, and write in the input's format and geometry:

    OUT/<case>/mask.<ext>          the consensus mask: the mean of the K samples >= 0.5 (0/1; PNG 0/255)
    OUT/<case>/probability.<ext>   the mean of the K sample probabilities (float32; PNG 0-255)
    OUT/<case>/uncertainty.<ext>   the binary entropy of that mean in bits, in [0, 1] (float32; PNG 0-255)
    OUT/<case>/rater-<i>.<ext>     head i's mask (personalized heads; i = 1..R), when the model has them
    OUT/<case>/samples.npy         the K samples (K, S, H, W) float16, with save_samples
    OUT/<case>/case.json           the case's summary row, its seeds and timing (written last: the case is done)
    OUT/summary.csv                one row per case of the input (see output.SUMMARY_FIELDS)
    OUT/predict.json               model and its SHA-256, K, seed, device, preprocessing, version, parts
    OUT/report.html                with report=True (:mod:`.report`)

``<ext>`` is ``.png`` for 2-D images, ``.npy`` for NumPy inputs, ``.nii.gz`` for NIfTI inputs; a DICOM series
gives a derived DICOM series per map (``<map>/0000.dcm`` ...), on the source slices' geometry. A case's
files appear in one step: they are written into a hidden folder of OUT that is then renamed to
``OUT/<case>``, after the files of every case of its work unit are flushed to disk together (one ``syncfs``
per unit on Linux, instead of one fsync per file: 7.1 ms of a PNG case's writing was its eight fsyncs). A
rerun skips cases whose folder exists (``overwrite=True`` redoes them); a case that fails (unreadable, NaN
pixels, wrong channel count) becomes a ``failed`` row with its error while the others finish.

Randomness is keyed by the case, never by the run: slice ``j`` of case ``name`` draws its K sample latents
and then the personalizer's bank from ``torch.Generator().manual_seed(slice_seed(seed, name, j))`` on the
CPU, exactly as ``model.predict(image[None], K, generator=...)`` would. So the outputs do not depend on the
order of cases, the sharding over processes (``num_parts``/``part_id``, or torchrun's ranks) or the device's
draw order. Batches are fixed by the input alone (:func:`work_units`: consecutive 2-D cases share a batch of
``batch_size``, a volume's slices batch among themselves), and parts take whole units (under torchrun a
volume's batches are split over the ranks and gathered, bit for bit, on the rank that writes it), so sharded and
resumed runs write the same bytes as one uninterrupted process with the same batch size and thread count
(another batch size or thread count moves the float maps in their last bits, as oneDNN splits its sums
differently).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .._extras import require
from .._io import PathLike, write_atomic
from .._version import __version__
from ..checkpoint import load_model, preprocessing_of, read_manifest
from ..metrics import entropy_map, sample_diversity
from ..metrics.set_level import PairCounts
from ..model import HarmonizerNet
from ..model.net import resolve_heads
from ..ops import pairwise_intersection
from ..preprocessing import Preprocessing
from .inputs import VOLUME_KINDS, Case, CaseError, LoadedCase, find_cases, load_case
from .output import STATUS_OK, CaseWriter, check_not_inside, clean_stale, record_failure, write_summary

MAX_SAMPLES = 4096
BATCH_PIXELS = 128 * 128  # batch_size counts slices of this many pixels (Predictor.slices_per_batch)


def slice_seed(seed: int, case: str, index: int) -> int:
    """The generator seed of slice ``index`` of case ``case`` (63 bits of SHA-256 of the three)."""
    digest = hashlib.sha256(f"{seed}\0{case}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``auto`` (CUDA when torch sees one, under torchrun the local rank's), ``cpu``, ``cuda`` or ``cuda:i``."""
    text = "auto" if device is None else str(device)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:<index>, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:<index>, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text}: no CUDA device is visible to torch (a CPU build, or no GPU)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) in bits of the sample mean ``p (n, H, W)`` (:func:`harmonizer_fast.metrics.entropy_map`), float32."""
    return entropy_map(p[:, None]).float()


def mean_pairwise_disagreement(masks: np.ndarray) -> float:
    """Mean over pairs of ``1 - IoU`` of binary masks ``(N, ...)`` pooled over all their pixels, two empty masks
    agreeing: :func:`harmonizer_fast.metrics.sample_diversity` of one case (exact intersection counts below
    2^24 pixels), in [0, 1], 0 for fewer than two masks."""
    n = masks.shape[0]
    flat = torch.from_numpy(np.ascontiguousarray(masks)).view(torch.uint8).reshape(1, n, -1, masks.shape[-1])
    return float(sample_diversity(flat))


def _pair_counts(masks: torch.Tensor) -> torch.Tensor:
    """``(n, N, H, W)`` bool -> ``(n, N, N)`` float64: every pair's intersection per slice, the areas on the
    diagonal. Summed over a case's slices they are the case's pooled counts (exact integers)."""
    return pairwise_intersection(masks, masks).double()


def _disagreement(counts: torch.Tensor, pixels: int) -> float:
    """:func:`mean_pairwise_disagreement` from a case's pooled pair counts ``(N, N)``."""
    area = torch.diagonal(counts)[None]
    return float(PairCounts(counts[None], area, area, pixels).diversity()[0])


@dataclass
class CasePrediction:
    """One case's maps ``(S, H, W)`` at the input's size, and the heads ``(R, S, H, W)`` (None without heads)."""

    probability: np.ndarray
    uncertainty: np.ndarray
    heads: Optional[np.ndarray]
    votes: Optional[np.ndarray]  # (K, S, H, W) bool: each sample thresholded at 0.5 (None: a volume split over ranks)
    image: np.ndarray  # (S, C, H, W) float32: the network's input after preprocessing, padding removed
    samples: Optional[np.ndarray] = None  # (K, S, H, W) float16, when asked for (keep_samples)
    # the K votes' and the heads' mean pairwise 1 - IoU over the case (mean_pairwise_disagreement), from the
    # pair counts the forward pass made batch by batch (one kernel call per batch, not two per case)
    sample_disagreement: Optional[float] = None
    heads_disagreement: Optional[float] = None

    @property
    def mask(self) -> np.ndarray:
        return self.probability >= 0.5


def summary_row(name: str, loaded: LoadedCase, pred: CasePrediction, seconds: float) -> dict[str, Any]:
    """Areas (mask, each head) in mm^2 (2-D) or mm^3 (volumes) where the input records its spacing, else in
    pixels or voxels; ``uncertainty``: the K samples' mean pairwise 1 - IoU over the case; ``uncertain_area``:
    the entropy map summed (bits x area: the area the model is unsure about); ``heads_disagreement``: the
    heads' mean pairwise 1 - IoU."""
    g = loaded.geometry
    if g.spacing is not None:
        unit, per_pixel = ("mm3", float(np.prod(g.spacing))) if g.volume else ("mm2", g.spacing[1] * g.spacing[2])
    else:
        unit, per_pixel = ("voxels", 1.0) if g.volume else ("pixels", 1.0)
    s, h, w = pred.probability.shape
    row: dict[str, Any] = {
        "case": name, "status": STATUS_OK, "error": "", "kind": g.kind, "slices": s, "height": h, "width": w,
        "unit": unit, "area": float(pred.mask.sum()) * per_pixel,
        "uncertainty": (mean_pairwise_disagreement(pred.votes) if pred.sample_disagreement is None
                        else pred.sample_disagreement),
        "uncertain_area": float(pred.uncertainty.sum(dtype=np.float64)) * per_pixel,
        "heads_disagreement": "" if pred.heads is None else (
            mean_pairwise_disagreement(pred.heads >= 0.5) if pred.heads_disagreement is None
            else pred.heads_disagreement),
        "seconds": round(seconds, 3),
    }  # fmt: skip
    if pred.heads is not None:
        for i, head in enumerate(pred.heads >= 0.5):
            row[f"area_rater{i + 1}"] = float(head.sum()) * per_pixel
    return row


class Predictor:
    """A model ready to run on raw images: its preprocessing, device, K, seed and heads fixed.

    ``model``: a :class:`~harmonizer_fast.HarmonizerNet`, a run directory or checkpoint manifest, or the name
    of a bundled model (:func:`harmonizer_fast.pretrained.available`). ``heads``: ``auto`` (the personalized
    heads when phase 2 trained them, else none), ``personalized``, ``identity`` (the prior mean for every
    rater) or ``none``. ``batch_size`` slices of up to 128 x 128 go through the network together (never from two
    cases); larger slices go fewer at a time (:meth:`slices_per_batch`).
    """

    def __init__(
        self,
        model: Union[HarmonizerNet, PathLike],
        *,
        num_samples: int = 16,
        seed: int = 0,
        device: Union[str, torch.device] = "auto",
        batch_size: int = 16,
        heads: str = "auto",
        preprocessing: Optional[Preprocessing] = None,
    ) -> None:
        for name, v, hi in (("num_samples", num_samples, MAX_SAMPLES), ("batch_size", batch_size, 1 << 16)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
                raise ValueError(f"{name}: expected an int in [1, {hi}], got {v!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
        self.device = resolve_device(device)
        self.model, self.model_info, recorded = _load(model)
        self.model.to(self.device).eval()
        self.preprocessing = preprocessing or recorded
        heads = resolve_heads(self.model, heads, "predict")
        self.heads, self.num_samples, self.seed, self.batch_size = heads, num_samples, seed, batch_size

    @property
    def channels(self) -> int:
        return self.model.config.in_channels

    def slices_per_batch(self, height: int, width: int) -> int:
        """Slices of ``height x width`` (before padding) in one forward pass: ``batch_size``, or fewer where the
        padded slices are larger than 128 x 128, so that a batch never holds more pixels than ``batch_size``
        slices of 128 x 128. The sampling head's maps are B x K x 16 x H x W floats: at 256 x 256 a batch of 16
        made them 1 GB each, and a fresh process page-faulted its whole peak heap in its first batch (4.4-4.8 s
        instead of 2.3 s for 32 slices on one thread of a 2-core AMD EPYC; 2.5 s in batches of 4)."""
        m = self.preprocessing.size_multiple
        pixels = (height + -height % m) * (width + -width % m)
        return max(1, min(self.batch_size, self.batch_size * BATCH_PIXELS // pixels))

    # -- one case -------------------------------------------------------------------------------------------

    def _draws(self, keys: list[tuple[str, int]]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The standard-normal draws of the slices ``(case, index)``: each from its own generator, the K sample
        latents first, then the personalizer's bank, as ``model.predict`` draws them for one image."""
        c = self.model.config
        z, bank = [], []
        for name, j in keys:
            g = torch.Generator().manual_seed(slice_seed(self.seed, name, j))
            z.append(torch.randn((1, self.num_samples, c.latent_dim), generator=g))
            if self.heads == "personalized":
                bank.append(torch.randn((1, c.prior_bank, c.latent_dim), generator=g))
        return torch.cat(z), torch.cat(bank) if bank else None

    def _prepare(self, images: np.ndarray, name: str) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise CaseError(f"case {name!r}: expected images (S, {self.channels}, H, W), got {images.shape}")
        try:
            return self.preprocessing.normalize(images)
        except ValueError as exc:
            raise CaseError(f"case {name!r}: {exc}") from None

    def _forward(self, x: np.ndarray, keys: list[tuple[str, int]], keep_samples: bool) -> dict[str, torch.Tensor]:
        """Normalized slices ``(n, C, H, W)`` of one size -> per slice, cropped back to ``H x W`` on the CPU: the
        sample mean ``probability (n, H, W)``, the thresholded samples ``votes (n, K, H, W)``, ``heads (n, R, H,
        W)`` and, with ``keep_samples``, ``samples (n, K, H, W)`` float16. Reduced batch by batch
        (:meth:`slices_per_batch`), so a volume never holds its K float32 maps at once."""
        h, w = x.shape[2:]
        padded = self.preprocessing.pad(x)
        bs = self.slices_per_batch(h, w)
        parts: dict[str, list[torch.Tensor]] = {"probability": [], "uncertainty": [], "votes": [], "heads": [],
                                                "samples": [], "vote_counts": [], "head_counts": []}  # fmt: skip
        for first in range(0, len(keys), bs):
            part = keys[first : first + bs]
            batch = torch.from_numpy(np.ascontiguousarray(padded[first : first + len(part)])).to(self.device)
            z, bank = self._draws(part)
            p, hd = self.model.decode_draws(batch, z.to(self.device), None if bank is None else bank.to(self.device),
                                            heads=self.heads)  # fmt: skip
            p = p[..., :h, :w].float()
            mean = p.mean(1)
            parts["probability"].append(mean.cpu())
            # per batch, not per case: one elementwise pass for 16 PNG cases, none over a whole volume at the end
            parts["uncertainty"].append(_binary_entropy(mean).cpu())
            votes = p >= 0.5
            parts["votes"].append(votes.cpu())
            parts["vote_counts"].append(_pair_counts(votes).cpu())
            if keep_samples:
                parts["samples"].append(p.to(torch.float16).cpu())
            if hd is not None:
                heads = hd[..., :h, :w].float()
                parts["heads"].append(heads.cpu())
                parts["head_counts"].append(_pair_counts(heads >= 0.5).cpu())
        return {k: torch.cat(v) for k, v in parts.items() if v}

    def _forward_shared(self, x: np.ndarray, keys: list[tuple[str, int]], keep_samples: bool, rank: int,
                        world: int, owner: int) -> Optional[dict[str, torch.Tensor]]:  # fmt: skip
        """:meth:`_forward` of one volume with its batches split over the process group: rank r computes batches
        r, r + world, ... (each batch exactly as one process computes it, so the bytes do not change), and the
        slices are summed onto ``owner`` byte by byte (each slice computed by one rank, zeros elsewhere: the sum
        is the value, bit for bit). Returns the result on ``owner`` (all but the votes), None on the other ranks.
        A rank that fails makes every rank raise, so no rank waits on a reduction that never comes."""
        import torch.distributed as dist

        n, bs = x.shape[0], self.slices_per_batch(*x.shape[2:])
        # every rank makes the same buffers, a rank with no batch included, from the configuration
        # (_result_shapes): a one-slice pass to learn them would cost a forward
        shapes = self._result_shapes(x, keep_samples)
        # not the votes: the writer needs only their pair counts, and at K x S x H x W bytes they were 40% of
        # the bytes reduced (67 of 168 MB for a 256 x 256 x 64 volume)
        del shapes["votes"]
        full = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()}
        error: Optional[BaseException] = None
        try:
            for b in range(rank, -(-n // bs), world):
                t = self._forward(x[b * bs : (b + 1) * bs], keys[b * bs : (b + 1) * bs], keep_samples)
                for k in full:
                    full[k][b * bs : b * bs + len(t[k])] = t[k]
        except (MemoryError, RuntimeError) as exc:
            error = exc
        if _any_rank_failed(error):
            raise error or CaseError(f"case {keys[0][0]!r}: failed on another rank")
        for k in sorted(full):  # the same order on every rank
            # summed as bytes: a byte plus zero bytes is that byte (no carry), so every map arrives bit for bit
            # (-0.0 and NaN included), and gloo reduces uint8 where it has no int16 or bool sum
            dist.reduce(full[k].view(torch.uint8), dst=owner, op=dist.ReduceOp.SUM)
        return full if rank == owner else None

    def _result_shapes(self, x: np.ndarray, keep_samples: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """The shapes and dtypes of :meth:`_forward`'s output for slices ``x``."""
        n, _, h, w = x.shape
        k, r = self.num_samples, self.model.config.num_raters
        out = {"probability": ((n, h, w), torch.float32), "uncertainty": ((n, h, w), torch.float32),
               "votes": ((n, k, h, w), torch.bool),
               "vote_counts": ((n, k, k), torch.float64)}  # fmt: skip
        if self.heads != "none":
            out.update(heads=((n, r, h, w), torch.float32), head_counts=((n, r, r), torch.float64))
        if keep_samples:
            out["samples"] = ((n, k, h, w), torch.float16)
        return out

    @staticmethod
    def _result(x: np.ndarray, t: dict[str, torch.Tensor], lo: int, hi: int) -> CasePrediction:
        """The case made of slices ``lo:hi`` of :meth:`_forward`'s output."""

        def take(key: str) -> Optional[np.ndarray]:
            return t[key][lo:hi].transpose(0, 1).contiguous().numpy() if key in t else None  # (K or R, S, H, W)

        def disagreement(key: str) -> Optional[float]:
            return _disagreement(t[key][lo:hi].sum(0), (hi - lo) * pixels) if key in t else None

        probability = t["probability"][lo:hi].numpy()
        pixels = probability.shape[1] * probability.shape[2]
        return CasePrediction(probability, t["uncertainty"][lo:hi].numpy(), take("heads"), take("votes"), x,
                              take("samples"), disagreement("vote_counts"), disagreement("head_counts"))  # fmt: skip

    @torch.no_grad()
    def predict_images(self, images: np.ndarray, name: str, *, keep_samples: bool = False) -> CasePrediction:
        """Raw images ``(S, C, H, W)`` of the case ``name`` -> its :class:`CasePrediction` (the name keys the
        random draws, see the module docstring); ``keep_samples`` keeps the K samples as float16."""
        x = self._prepare(images, name)
        t = self._forward(x, [(name, j) for j in range(x.shape[0])], keep_samples)
        return self._result(x, t, 0, x.shape[0])

    @torch.no_grad()
    def predict_many(self, items: list[tuple[str, np.ndarray]], *, keep_samples: bool = False) -> list[CasePrediction]:
        """Several single-slice cases ``(name, images (1, C, H, W))`` through the network together (cases of one
        size share batches): what :meth:`run` does with a group of 2-D images."""
        xs = [self._prepare(images, name) for name, images in items]
        out: list[Optional[CasePrediction]] = [None] * len(items)
        for shape in dict.fromkeys(x.shape for x in xs):
            idx = [i for i, x in enumerate(xs) if x.shape == shape]
            t = self._forward(np.concatenate([xs[i] for i in idx]),
                              [(items[i][0], j) for i in idx for j in range(shape[0])], keep_samples)  # fmt: skip
            s = shape[0]
            for n, i in enumerate(idx):
                out[i] = self._result(xs[i], t, n * s, (n + 1) * s)
        return out

    def predict_case(self, case: Case, slice_axis: Optional[int] = None) -> tuple[LoadedCase, CasePrediction]:
        loaded = load_case(case, self.channels, slice_axis)
        return loaded, self.predict_images(loaded.images, case.name)

    # -- a whole input --------------------------------------------------------------------------------------

    def run(
        self,
        input: PathLike,
        output: PathLike,
        *,
        overwrite: bool = False,
        num_parts: int = 1,
        part_id: int = 0,
        save_samples: bool = False,
        slice_axis: Optional[int] = None,
        report: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Predict every case of ``input`` (a file or folder) this process's part owns into ``output``; returns
        the run record (also ``output/predict.json``). See the module docstring for the layout."""
        from ..distributed import init_distributed

        src, out = Path(input), Path(output)
        check_not_inside(src, out)
        rank, world = init_distributed()
        if not (isinstance(num_parts, int) and isinstance(part_id, int) and 0 <= part_id < num_parts):
            raise ValueError(f"part_id must lie in [0, num_parts), got part_id={part_id}, num_parts={num_parts}")
        parts, part = num_parts * world, part_id * world + rank  # torchrun's ranks split each part further
        cases, unlisted = find_cases(src)
        if not cases and not unlisted:
            raise CaseError(f"{src}: no inputs found (PNG/TIFF/JPEG, .npy/.npz, .nii/.nii.gz or DICOM series)")
        if any(c.kind == "dicom" for c in cases):
            require("pydicom", "reading DICOM")  # one line naming the extra, before any work
        units = work_units(cases, self.batch_size)
        # under torchrun a volume's slices are split over the ranks of its part (_forward_shared), one rank
        # writing it; every other unit goes whole to one rank, as with --num-parts alone
        split = [world > 1 and u[0].kind in VOLUME_KINDS for u in units]
        shared = [u for u, s in zip(units, split) if s][part_id::num_parts]
        mine = [u for u, s in zip(units, split) if not s][part::parts]
        out.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        started = time.time()
        counts = {"done": 0, "skipped": 0, "failed": 0}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(map(len, mine)) + len(shared[rank::world]), unit="case", disable=None,
                       desc=f"predict {part + 1}/{parts}" if parts > 1 else "predict")  # fmt: skip
        def pending(case: Case) -> bool:
            return overwrite or not (out / case.name / "case.json").is_file()

        volumes = [u[0] for u in shared if pending(u[0])]  # decided before any collective: every rank skips alike
        todo = [(unit, [c for c in unit if pending(c)]) for unit in mine]
        work = [(unit, pending) for unit, pending in todo if pending]
        counts["skipped"] = sum(len(unit) - len(pending) for unit, pending in todo)
        counts["skipped"] += sum(1 for i, u in enumerate(shared) if i % world == rank and u[0] not in volumes)
        if bar is not None:
            bar.update(counts["skipped"])
        for i, case in ((i, u[0]) for i, u in enumerate(shared) if u[0] in volumes):  # volume i: rank i % world writes
            status = self._run_shared(out, case, slice_axis, save_samples, report, rank, world, owner=i % world)
            if status:
                counts[status] += 1
                if bar is not None:
                    bar.update(1)
        self._run_units(out, work, slice_axis, save_samples, report, counts, bar)
        if bar is not None:
            bar.close()
        for name, error in unlisted if part == 0 else []:
            record_failure(out, name, CaseError(error))
            counts["failed"] += 1
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank's cases are on disk before rank 0 summarises
        record = self._record(src, out, cases, unlisted, counts, parts, part, started)
        record["volumes_split_over_ranks"] = len(shared)  # this part's volumes, each computed by all its ranks
        if rank == 0:
            rows = write_summary(out, [c.name for c in cases] + [n for n, _ in unlisted])
            write_atomic(out / "predict.json", json.dumps(record, indent=1) + "\n")
            if report:
                from .report import write_report

                write_report(out, rows)
            record["rows"] = rows
        return record

    def _run_units(self, out: Path, work: list[tuple[list[Case], list[Case]]], slice_axis, save_samples: bool,
                   report: bool, counts: dict[str, int], bar) -> None:  # fmt: skip
        """This rank's work units ``(unit, its pending cases)``, their statuses added to ``counts``. One reader
        thread loads the next unit and one writer thread commits the last one's cases while this unit computes
        (PNG decoding, PNG/gzip encoding and fsync release the GIL); at most one unit waits on each side, which
        bounds the memory held."""
        writes: list[Future] = []
        with ThreadPoolExecutor(1, thread_name_prefix="predict-writer") as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="predict-reader") as reader:  # fmt: skip
            loading = reader.submit(self._load_unit, work[0][0], slice_axis) if work else None
            for i, (unit, pending) in enumerate(work):
                loaded = loading.result()
                if i + 1 < len(work):
                    loading = reader.submit(self._load_unit, work[i + 1][0], slice_axis)
                failed, jobs = self._run_unit(out, unit, pending, loaded, save_samples, report, writer)
                counts["failed"] += failed
                for job in writes:
                    for status in job.result():
                        counts[status] += 1
                writes = jobs
                if bar is not None:
                    bar.update(len(pending))
            for job in writes:
                for status in job.result():
                    counts[status] += 1

    def _run_shared(self, out: Path, case: Case, slice_axis, save_samples: bool, report: bool, rank: int,
                    world: int, owner: int) -> Optional[str]:  # fmt: skip
        """One volume predicted by every rank together (:meth:`_forward_shared`) and written by ``owner``;
        returns its status there ("done" or "failed"), None on the other ranks. Every rank reads the volume, so
        a file that cannot be read fails on all of them alike."""
        t0 = time.perf_counter()
        error: Optional[BaseException] = None
        try:
            loaded = load_case(case, self.channels, slice_axis)
            x = self._prepare(loaded.images, case.name)
        except (CaseError, OSError, MemoryError) as exc:
            error = exc
        try:
            if _any_rank_failed(error):  # a read that failed on one rank only must not leave the others waiting
                raise error or CaseError(f"case {case.name!r}: could not be read on another rank")
            with torch.no_grad():
                t = self._forward_shared(x, [(case.name, j) for j in range(x.shape[0])], save_samples, rank, world,
                                         owner)  # fmt: skip
        except (CaseError, OSError, MemoryError, RuntimeError) as exc:
            if rank == owner:
                if not isinstance(exc, CaseError):
                    exc = CaseError(f"case {case.name!r}: {type(exc).__name__}: {exc}")
                record_failure(out, case.name, exc)
                return "failed"
            return None
        if rank != owner:
            return None
        pred = self._result(x, t, 0, x.shape[0])
        row = summary_row(case.name, loaded, pred, time.perf_counter() - t0)
        return CaseWriter(out, self._seeds).commit_unit([(loaded, pred, row)], save_samples, report)[0]

    def _load_unit(self, unit: list[Case], slice_axis) -> list[Union[LoadedCase, Exception]]:
        """Each case of ``unit`` read and checked, or the error that refused it (run in the reader thread)."""
        loaded: list[Union[LoadedCase, Exception]] = []
        for case in unit:
            try:
                loaded.append(load_case(case, self.channels, slice_axis))
            except (CaseError, OSError, MemoryError) as exc:
                loaded.append(exc)
        return loaded

    def _run_unit(self, out: Path, unit: list[Case], pending: list[Case], read: list, save_samples: bool,
                  report: bool, writer: ThreadPoolExecutor) -> tuple[int, list[Future]]:
        """Predict one work unit, read by :meth:`_load_unit`, and hand its pending cases to ``writer``; returns
        the cases that failed before writing and the unit's write job (its result: "done" or "failed" per
        case). The whole unit goes through the network even when some of its cases are done (a resumed run),
        so every batch holds what an uninterrupted run's held."""
        counts = {"failed": 0}
        jobs: list[Future] = []
        ready: list[tuple[LoadedCase, CasePrediction, dict]] = []
        t0 = time.perf_counter()
        loaded: list[LoadedCase] = []
        for case, item in zip(unit, read):
            if isinstance(item, LoadedCase):
                loaded.append(item)
            elif case in pending:
                record_failure(out, case.name, item)
                counts["failed"] += 1
        preds: list = []
        try:
            if len(unit) == 1 and loaded:
                preds = [self.predict_images(loaded[0].images, loaded[0].case.name, keep_samples=save_samples)]
            elif loaded:
                preds = self.predict_many([(lc.case.name, lc.images) for lc in loaded], keep_samples=save_samples)
        except (CaseError, MemoryError, RuntimeError):
            # a bad case (NaN pixels; a volume too large for this machine's memory) fails alone: the unit is
            # predicted case by case and the error becomes that case's row
            preds = []
            for lc in loaded:
                try:
                    preds.append(self.predict_images(lc.images, lc.case.name, keep_samples=save_samples))
                except (CaseError, MemoryError, RuntimeError) as exc:
                    preds.append(CaseError(f"case {lc.case.name!r}: {type(exc).__name__}: {exc}")
                                 if not isinstance(exc, CaseError) else exc)  # fmt: skip
        seconds = (time.perf_counter() - t0) / max(1, len(unit))
        for lc, pred in zip(loaded, preds):
            if lc.case not in pending:
                continue
            if isinstance(pred, CaseError):
                record_failure(out, lc.case.name, pred)
                counts["failed"] += 1
                continue
            row = summary_row(lc.case.name, lc, pred, seconds)
            ready.append((lc, pred, row))
        if ready:  # one job per unit: its cases are flushed to disk together (CaseWriter.commit_unit)
            jobs.append(writer.submit(CaseWriter(out, self._seeds).commit_unit, ready, save_samples, report))
        return counts["failed"], jobs

    def _seeds(self, name: str, slices: int) -> dict[str, Any]:
        """What a case.json records of its randomness (see the module docstring)."""
        return {"seed": self.seed, "slice_seeds": [slice_seed(self.seed, name, j) for j in range(slices)]}

    def _record(self, src, out, cases, unlisted, counts, parts, part, started) -> dict[str, Any]:
        return {
            "harmonizer_fast": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "model": self.model_info, "num_samples": self.num_samples, "seed": self.seed, "heads": self.heads,
            "batch_size": self.batch_size, "device": str(self.device), "preprocessing": self.preprocessing.to_dict(),
            "input": str(src), "output": str(out), "cases": len(cases) + len(unlisted), "parts": parts,
            "part": part, "this_part": counts, "seconds": round(time.time() - started, 3),
            "seeding": "slice j of case c: torch.Generator().manual_seed(slice_seed(seed, c, j))",
        }  # fmt: skip


def _any_rank_failed(error: Optional[BaseException]) -> bool:
    """Whether any rank of the process group passes an error (a collective: every rank must call it)."""
    import torch.distributed as dist

    failed = torch.tensor([error is not None], dtype=torch.int32)
    dist.all_reduce(failed)
    return bool(int(failed))


def work_units(cases: list[Case], batch_size: int) -> list[list[Case]]:
    """The input's cases in units of work, fixed by the sorted case list and the batch size alone: consecutive
    2-D cases (images, NumPy items) in groups of ``batch_size`` (one batch), every other case alone. Parts and
    ranks take whole units, so a batch holds the same cases whatever the sharding (the network's float sums
    depend on the batch's composition in their last bits)."""
    units: list[list[Case]] = []
    group: list[Case] = []
    for case in cases:
        if case.kind in ("image", "numpy"):
            group.append(case)
            if len(group) == batch_size:
                units.append(group)
                group = []
            continue
        if group:
            units.append(group)
            group = []
        units.append([case])
    if group:
        units.append(group)
    return units


def _load(model: Union[HarmonizerNet, PathLike]) -> tuple[HarmonizerNet, dict[str, Any], Preprocessing]:
    if isinstance(model, HarmonizerNet):
        return model, {"name": "in-memory HarmonizerNet", "sha256": None}, Preprocessing()
    from .. import pretrained

    if isinstance(model, str) and model in pretrained.available():
        manifest_path = pretrained.path(model)
        name = model
    else:
        manifest_path, name = read_manifest(model)[0], str(model)
    net, manifest = load_model(manifest_path)
    info = {"name": name, "manifest": str(manifest_path), "sha256": manifest["sha256"]["weights"]}
    return net, info, preprocessing_of(manifest)
