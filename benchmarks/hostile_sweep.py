"""A sweep of hostile inputs over the public API and the predict command, each classified ([reliability] #36).

    python benchmarks/hostile_sweep.py [--out hostile-sweep]

Generated, not listed: every tensor argument of every public op and metric (and the model's inference) is
replaced in turn by each mutation of :data:`MUTATIONS` applicable to its kind (probabilities, binary masks,
images, features), the predict command is run on a folder of damaged or unusual files, and every field of the
bundled model's checkpoint manifest is replaced in turn by each value of :data:`MANIFEST_VALUES` (loaded and run
under an address-space limit). Each outcome is one of the issue's classes:

- ``correct``: a valid input (a non-contiguous view, float64, bool or uint8 masks, ...) gave the result of
  the canonical input; a non-finite feature propagated as IEEE arithmetic does;
- ``clear error``: ValueError/TypeError naming the argument (the command: exit 2 and one line, or exit 3 with
  the case's own failure row naming it while the other cases complete);
- ``unclear error``: the right exception type, but the message does not name the argument;
- ``traceback``: any other exception type (IndexError, RuntimeError, ...), or a command ending otherwise;
- ``silent garbage``: an invalid input that returned a result, or a valid one whose result differs;
- ``hang``: no answer within 60 s; ``data loss``: an input file changed.

Writes ``benchmarks/results/OUT.json`` (every input with its class) and ``OUT.md`` (counts per class and per target).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_header, machine_info, write_results

import harmonizer_fast as hf
from harmonizer_fast import metrics
from harmonizer_fast.cli import EXIT_CASES_FAILED

CLASSES = ("correct", "clear error", "unclear error", "traceback", "silent garbage", "hang", "data loss")
TIMEOUT_S = 60


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prob(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=_gen(seed))


def mask(*shape: int, seed: int = 1) -> torch.Tensor:
    return (torch.rand(shape, generator=_gen(seed)) < 0.4).float()


def feature(*shape: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed))


def _put(x: torch.Tensor, value: float) -> torch.Tensor:
    y = x.clone()
    y.view(-1)[y.numel() // 2] = value
    return y


# name -> (kinds it applies to, validity: "valid" | "invalid" | "either", the mutation)
MUTATIONS: dict[str, tuple[tuple[str, ...], str, Callable[[torch.Tensor], Any]]] = {
    "non-contiguous": (("prob", "mask", "image", "feature"), "valid", lambda x: x.transpose(-1, -2).contiguous()
                       .transpose(-1, -2)),  # fmt: skip
    "float64": (("prob", "mask", "image", "feature"), "either", lambda x: x.double()),
    "float16": (("prob", "mask", "image", "feature"), "either", lambda x: x.half()),
    "bfloat16": (("prob", "mask", "image", "feature"), "either", lambda x: x.bfloat16()),
    "bool": (("mask",), "valid", lambda x: x.bool()),
    "uint8": (("mask",), "valid", lambda x: x.to(torch.uint8)),
    "int64": (("prob", "mask", "image", "feature"), "either", lambda x: x.long()),
    "complex64": (("prob", "mask", "image", "feature"), "invalid", lambda x: x.to(torch.complex64)),
    "NaN": (("prob", "mask", "image"), "invalid", lambda x: _put(x, float("nan"))),
    "+Inf": (("prob", "mask", "image"), "invalid", lambda x: _put(x, float("inf"))),
    "-Inf": (("prob", "mask", "image"), "invalid", lambda x: _put(x, float("-inf"))),
    "NaN feature": (("feature",), "propagates", lambda x: _put(x, float("nan"))),
    "Inf feature": (("feature",), "propagates", lambda x: _put(x, float("inf"))),
    "1.5": (("prob",), "invalid", lambda x: _put(x, 1.5)),
    "-0.25 (a logit)": (("prob",), "invalid", lambda x: _put(x, -0.25)),
    "all logits": (("prob",), "invalid", lambda x: torch.logit(x.clamp(0.01, 0.99))),
    "0.5 in a mask": (("mask",), "invalid", lambda x: _put(x, 0.5)),
    "2 in a mask": (("mask",), "invalid", lambda x: _put(x, 2.0)),
    "255 in a float mask": (("mask",), "invalid", lambda x: x * 255),
    "rank - 1": (("prob", "mask", "image", "feature"), "invalid", lambda x: x.flatten(0, 1)),
    "rank + 1": (("prob", "mask", "image", "feature"), "invalid", lambda x: x.unsqueeze(0)),
    "empty batch": (("prob", "mask", "image", "feature"), "invalid", lambda x: x[:0]),
    "zero width": (("prob", "mask", "image", "feature"), "invalid", lambda x: x[..., :0]),
    "one more image": (("prob", "mask", "image", "feature"), "invalid", lambda x: torch.cat([x, x[:1]])),
    "numpy array": (("prob", "mask", "image", "feature"), "invalid", lambda x: x.numpy()),
    "nested list": (("prob", "mask", "image", "feature"), "invalid", lambda x: x.tolist()),
    "None": (("prob", "mask", "image", "feature"), "invalid", lambda x: None),
    "a string": (("prob", "mask", "image", "feature"), "invalid", lambda x: "x"),
    "meta device": (("prob", "mask", "image", "feature"), "meta", lambda x: x.to("meta")),
}


# Inputs whose validity differs for one target, and why.
OVERRIDES = {
    # the GED loss is a soft-IoU distance: soft rater maps in [0, 1] are defined (label smoothing, averaging)
    ("ged_loss", "raters", "0.5 in a mask"): "accepted",
}


def _bundled_model() -> hf.HarmonizerNet:
    from harmonizer_fast.pretrained import load_pretrained

    return load_pretrained("lidc-small").eval()


def targets() -> list[tuple[str, Callable[..., Any], dict[str, tuple[str, torch.Tensor]], set[str]]]:
    """(name, function, {argument: (kind, canonical value)}, arguments whose batch size must match)."""
    s, r = prob(2, 4, 16, 16), mask(2, 3, 16, 16)
    net = _bundled_model()
    img = prob(2, 1, 32, 32, seed=5)
    pair = {"samples", "raters"}
    return [
        ("ged", hf.ged, {"samples": ("prob", s), "raters": ("mask", r)}, pair),
        ("ged_terms", lambda **k: hf.ged_terms(**k).ged, {"samples": ("prob", s), "raters": ("mask", r)}, pair),
        ("ged_loss", hf.ged_loss, {"probs": ("prob", s), "raters": ("mask", r)}, {"probs", "raters"}),
        ("pairwise_iou", hf.pairwise_iou, {"a": ("prob", s), "b": ("prob", s[:, :2])}, {"a", "b"}),
        ("pairwise_iou soft", lambda **k: hf.pairwise_iou(**k, soft=True), {"a": ("prob", s), "b": ("prob", s)},
         {"a", "b"}),  # fmt: skip
        ("dice_soft", metrics.dice_soft, {"probs": ("prob", s), "raters": ("mask", r)}, {"probs", "raters"}),
        ("dice_matrix", metrics.dice_matrix, {"raters": ("mask", r), "probs": ("prob", s)}, {"probs", "raters"}),
        ("sample_diversity", metrics.sample_diversity, {"samples": ("prob", s)}, set()),
        ("hm_iou", metrics.hm_iou, {"samples": ("prob", s), "raters": ("mask", r)}, pair),
        ("ncc", metrics.ncc, {"samples": ("prob", s), "raters": ("mask", r)}, pair),
        ("d_max", metrics.d_max, {"samples": ("prob", s), "raters": ("mask", r)}, pair),
        ("entropy_map", metrics.entropy_map, {"probs": ("prob", s)}, set()),
        ("evaluate_batch", lambda **k: metrics.evaluate_batch(**k)["ged"], {"probs": ("prob", s),
         "raters": ("mask", r)}, {"probs", "raters"}),  # fmt: skip
        ("haar_dwt2d", hf.haar_dwt2d, {"x": ("feature", feature(2, 3, 16, 12))}, set()),
        ("haar_idwt2d", hf.haar_idwt2d, {"y": ("feature", feature(2, 3, 4, 8, 6))}, set()),
        ("film", hf.film, {"x": ("feature", feature(2, 4, 8, 8)), "gamma": ("feature", feature(2, 4, seed=3)),
                           "beta": ("feature", feature(2, 4, seed=4))}, {"x", "gamma", "beta"}),  # fmt: skip
        ("HarmonizerNet.sample", lambda **k: net.sample(k["images"], 3, generator=_gen(9)),
         {"images": ("image", img)}, set()),  # fmt: skip
        ("HarmonizerNet.predict", lambda **k: torch.cat([t.flatten(1) for t in net.predict(
            k["images"], 3, generator=_gen(9))], 1), {"images": ("image", img)}, set()),  # fmt: skip
    ]


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout


def _close(a: Any, b: Any) -> bool:
    a, b = (torch.as_tensor(v) if isinstance(v, np.ndarray) else v for v in (a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False
        a, b = a.detach().double(), b.detach().double()
        return bool(torch.allclose(a, b, rtol=2e-2, atol=2e-2, equal_nan=True))  # half precision inputs too
    return a == b


def classify(fn: Callable[..., Any], kwargs: dict, reference: Any, validity: str, arg: str, mname: str = "",
             batched: frozenset = frozenset()) -> tuple[str, str]:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        out = fn(**kwargs)
    except _Timeout:
        return "hang", f"no answer in {TIMEOUT_S} s"
    except (ValueError, TypeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if validity == "valid":
            return "traceback", f"{type(exc).__name__} on a valid input: {text}"
        named = [arg] + (sorted(batched) if mname == "one more image" else [])  # a mismatch may name the other
        return ("clear error" if any(n in str(exc) for n in named) else "unclear error"), text
    except Exception as exc:  # noqa: BLE001 (the sweep records whatever escapes)
        return "traceback", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        signal.alarm(0)
    if validity == "invalid":
        return "silent garbage", "returned a result"
    if validity == "accepted":
        return "correct", "a defined input of this target"
    if validity == "meta":  # an op on meta tensors computes shapes only (torch.compile's fake tensors): fine
        ok = isinstance(out, torch.Tensor) and out.device.type == "meta" and out.shape == reference.shape
        return ("correct", "shapes only") if ok else ("silent garbage", "a meta input gave values")
    if validity == "propagates":
        finite = bool(torch.isfinite(out).all()) if isinstance(out, torch.Tensor) else True
        return ("silent garbage", "a non-finite input vanished") if finite else ("correct", "propagated")
    return ("correct", "") if _close(out, reference) else ("silent garbage", "differs from the canonical result")


def api_sweep() -> list[dict[str, Any]]:
    rows = []
    for name, fn, args, batched in targets():
        canonical = {a: v for a, (_, v) in args.items()}
        reference = fn(**canonical)
        for arg, (kind, value) in args.items():
            for mname, (kinds, validity, mutate) in MUTATIONS.items():
                if kind not in kinds or (mname == "one more image" and arg not in batched):
                    continue
                kwargs = {**canonical, arg: mutate(value)}
                validity = OVERRIDES.get((name, arg, mname), validity)
                cls, detail = classify(fn, kwargs, reference, validity, arg, mname, frozenset(batched))
                rows.append({"target": name, "argument": arg, "input": mname, "class": cls, "detail": detail})
    return rows


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _files(tmp: Path) -> dict[str, Callable[[Path], None]]:
    """Damaged or unusual inputs for predict, one per case folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (64, 64), dtype=np.uint8)

    def png(p: Path, arr: np.ndarray, mode: str | None = None) -> None:
        Image.fromarray(arr, mode=mode).save(p)

    def truncated(p: Path) -> None:
        png(p, good)
        p.write_bytes(p.read_bytes()[:200])

    def pickled_npy(p: Path) -> None:
        np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True)

    def huge_header(p: Path) -> None:  # a header declaring 4 TB of float32, then 16 bytes
        from numpy.lib import format as npf

        with open(p, "wb") as f:
            npf.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (999999, 999999)})
            f.write(bytes(16))

    return {
        "zero-byte-png.png": lambda p: p.write_bytes(b""),
        "text-as-png.png": lambda p: p.write_text("not an image"),
        "truncated.png": truncated,
        "rgba.png": lambda p: png(p, rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA"),
        "16-bit.png": lambda p: png(p, good.astype(np.uint16) * 257),  # PIL writes mode I;16
        "one-pixel.png": lambda p: png(p, good[:1, :1]),
        "odd-size.png": lambda p: png(p, good[:37, :53]),
        "text-as-nifti.nii.gz": lambda p: p.write_text("not a volume"),
        "zero-byte-nifti.nii": lambda p: p.write_bytes(b""),
        "pickled.npy": pickled_npy,
        "nan.npy": lambda p: np.save(p, np.full((32, 32), np.nan, np.float32)),
        "empty.npy": lambda p: np.save(p, np.zeros((0, 32), np.float32)),
        "complex.npy": lambda p: np.save(p, np.zeros((32, 32), np.complex64)),
        "huge-header.npy": huge_header,
        "string.npy": lambda p: np.save(p, np.array(["a", "b"])),
    }


def predict_sweep(tmp: Path) -> list[dict[str, Any]]:
    """Each file alone in a folder, then all of them together (one bad case must not stop the others)."""
    rows = []
    made = _files(tmp)
    src_all = tmp / "all"
    src_all.mkdir()
    for name, make in made.items():
        make(src_all / name)
    for name in [*made, "all of them together"]:
        if name == "all of them together":
            src = src_all
        else:
            src = tmp / f"in-{name}"
            src.mkdir()
            shutil.copy2(src_all / name, src / name)
        before = _digest(src)
        out = tmp / f"out-{name}"
        cmd = [sys.executable, "-m", "harmonizer_fast.cli", "predict", "-i", str(src), "-o", str(out), "--model",
               "lidc-small", "-k", "2", "--no-progress"]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S * 3)
        except subprocess.TimeoutExpired:
            rows.append({"target": "predict", "argument": "-i", "input": name, "class": "hang", "detail": ""})
            continue
        err = r.stderr.strip().splitlines()
        failed = sorted(p.stem for p in (out / ".failed").glob("*.json")) if (out / ".failed").is_dir() else []
        if _digest(src) != before:
            cls, detail = "data loss", "an input changed"
        elif "Traceback" in r.stderr or r.returncode not in (0, 2, EXIT_CASES_FAILED):
            cls, detail = "traceback", (err[-1] if err else f"exit {r.returncode}")
        elif r.returncode == 2:
            cls, detail = ("clear error" if len(err) == 1 else "unclear error"), " / ".join(err)[:300]
        elif failed:  # exit 3: the bad cases fail alone, each with a row saying why; the rest are written
            reasons = [json.loads((out / ".failed" / f"{f}.json").read_text())["row"]["error"] for f in failed]
            named = all(f in reason or "case" in reason for f, reason in zip(failed, reasons))
            ok = r.returncode == EXIT_CASES_FAILED and len(err) == 1
            cls, detail = ("clear error" if named and ok else "unclear error"), "; ".join(reasons)[:300]
        else:
            written = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
            cls, detail = ("correct", f"written: {written}") if written else ("silent garbage", "nothing written")
        rows.append({"target": "predict", "argument": "-i", "input": name, "class": cls, "detail": detail,
                     "exit": r.returncode})  # fmt: skip
    return rows


# Values written over one field of a checkpoint manifest at a time: JSON's other types, out-of-range and huge
# numbers (a count of 10**12 once made load_model allocate before any check), and NaN, which json writes.
MANIFEST_VALUES: dict[str, Any] = {
    "10**12": 10**12, "-1": -1, "0": 0, "2.5": 2.5, "NaN": float("nan"), "1e308": 1e308, "true": True,
    "string": "x", "null": None, "list": [1], "object": {"a": 1},
}  # fmt: skip


def _limit_address_space() -> None:
    """An allocation past what the machine has becomes a MemoryError (a traceback row) instead of swapping the
    machine: the address space this process has now plus the memory available."""
    import resource

    from harmonizer_fast._alloc import memory_available

    status = Path("/proc/self/status").read_text().splitlines()
    vm = int(next(ln for ln in status if ln.startswith("VmSize")).split()[1])
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + memory_available(), hard))


def _load_and_predict(run: Path) -> torch.Tensor:
    from harmonizer_fast.checkpoint import load_model, preprocessing_of

    net, manifest = load_model(run)
    preprocessing_of(manifest)
    samples, heads = net.predict(prob(1, net.config.in_channels, 32, 32, seed=7), num_samples=2,
                                 heads="personalized")  # fmt: skip
    return torch.cat([samples, heads], dim=1)


def manifest_sweep(tmp: Path) -> list[dict[str, Any]]:
    """Every field of the bundled model's manifest (its model config, preprocessing recipe and header) replaced
    in turn by each value of :data:`MANIFEST_VALUES`, then loaded and run. A value is taken correctly only when
    the model loads with exactly that value and predicts probabilities; otherwise it must be refused naming the
    field."""
    from harmonizer_fast.checkpoint import read_manifest
    from harmonizer_fast.pretrained import path as pretrained_path

    manifest = pretrained_path("lidc-small")  # the model's manifest, beside its weights
    src = manifest.parent
    original = json.loads(manifest.read_text())
    fields = [(part, key) for part in ("model_config", "preprocessing") for key in original[part]]
    fields += [(None, key) for key in original if key not in ("model_config", "preprocessing", "state")]
    _limit_address_space()
    rows = []
    for part, key in fields:
        for vname, value in MANIFEST_VALUES.items():
            run = tmp / "manifest"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(src, run)
            m = json.loads(json.dumps(original))
            (m if part is None else m[part])[key] = value
            (run / manifest.name).write_text(json.dumps(m))
            name = key if part is None else f"{part}.{key}"
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(TIMEOUT_S)
            try:
                out = _load_and_predict(run / manifest.name)
                ok = bool(((out >= 0) & (out <= 1)).all())
                loaded = read_manifest(run / manifest.name)[1]
                kept = json.dumps((loaded if part is None else loaded[part])[key])
                faithful = kept == json.dumps(value) and ok
                cls, detail = ("correct", "taken as written") if faithful else ("silent garbage", "loaded")
            except _Timeout:
                cls, detail = "hang", f"no answer in {TIMEOUT_S} s"
            except (ValueError, TypeError) as exc:
                text = " ".join(str(exc).split())
                cls, detail = ("clear error" if key in text else "unclear error"), text
            except Exception as exc:  # noqa: BLE001 (the sweep records whatever escapes)
                cls, detail = "traceback", f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            finally:
                signal.alarm(0)
            rows.append({"target": "load_model (manifest)", "argument": name, "input": vname, "class": cls,
                         "detail": detail[:300]})  # fmt: skip
    return rows


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    total = Counter(r["class"] for r in rows)
    by_target: dict[str, Counter] = {}
    for r in rows:
        by_target.setdefault(r["target"], Counter())[r["class"]] += 1
    lines = [f"# Hostile-input sweep: {len(rows)} inputs ([reliability] #36)", "", machine_header(result), "",
             f"`{result['command']}`. Generated from the mutation table of `benchmarks/hostile_sweep.py` over every "
             "tensor argument of the public ops, metrics and the model's inference, plus damaged and unusual files "
             "for `predict` (each alone, then all together), and every field of a checkpoint manifest replaced by "
             "each value of `MANIFEST_VALUES`, loaded and run under an address-space limit.", "",
             "| class | inputs |", "|---|---|", *[f"| {c} | {total.get(c, 0)} |" for c in CLASSES], "",
             "| target | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES),
             *[f"| {t} | " + " | ".join(str(c.get(k, 0)) for k in CLASSES) + " |" for t, c in by_target.items()],
             ""]  # fmt: skip
    bad = [r for r in rows if r["class"] not in ("correct", "clear error")]
    if bad:
        lines += ["## Every input outside the two good classes", "", "| target | argument | input | class | detail |",
                  "|---|---|---|---|---|",
                  *[f"| {r['target']} | {r['argument']} | {r['input']} | {r['class']} | "
                    f"{r['detail'].replace('|', '/')[:160]} |" for r in bad], ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="hostile-sweep", help="stem under benchmarks/results/ (or a path)")
    args = p.parse_args(argv)
    rows = api_sweep()
    with tempfile.TemporaryDirectory() as tmp:
        rows += predict_sweep(Path(tmp))
        rows += manifest_sweep(Path(tmp))  # last: it limits this process's address space
    result = {"command": "python benchmarks/hostile_sweep.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info(), "device": "cpu", "rows": rows,
              "counts": dict(Counter(r["class"] for r in rows))}  # fmt: skip
    write_results(args.out, result, markdown(result))
    print(markdown(result).split("\n## ")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
