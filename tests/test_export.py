"""Export (harmonizer_fast.export, ``harmonizer-fast export``): every custom op's decomposition equals the op; the
exported .pt2 and, with onnxruntime installed, the ONNX file give the eager model's outputs on the same latent
draws, at other batch and image sizes than the traced ones, with no custom op left in the program."""

import hashlib
import importlib
import json

import numpy as np
import pytest
import torch
from conftest import rand

import harmonizer_fast as hf
from harmonizer_fast import export as ex
from harmonizer_fast import ops
from harmonizer_fast.cli import main as cli
from harmonizer_fast.model import HarmonizerConfig, HarmonizerNet
from harmonizer_fast.ops import decompositions
from harmonizer_fast.ops.ged import OverlapMode

K = 3
TRACED = (64, 96)


def test_every_op_decomposes_to_its_reference():
    """The table that torch.export's run_decompositions takes covers every op of the namespace, and each entry
    computes what the op computes (the op runs the C++ kernels here), so an export keeps the model's values."""
    names = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("harmonizer_fast::")}
    table = {op.name().split("::")[1].split(".")[0]: fn for op, fn in decompositions().items()}
    cases = ops.examples("test")  # each family's own example inputs, float64 so that the comparison is tight
    assert set(table) == names == set(cases)
    for name, args in cases.items():
        want = getattr(torch.ops.harmonizer_fast, name)(*args)
        got = table[name](*args)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    soft = (cases["pairwise_overlap"][0], cases["pairwise_overlap"][0], 0.0, True, 0.0, 0.0, int(OverlapMode.GRAM))
    torch.testing.assert_close(table["pairwise_overlap"](*soft), torch.ops.harmonizer_fast.pairwise_overlap(*soft))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = HarmonizerNet(HarmonizerConfig.small(num_raters=3)).eval()
    m.personalizer.trained_steps += 1  # random weights, but heads that predict() serves
    return m


@pytest.fixture(scope="module")
def program(model):
    spec = ex.ExportSpec(K, "personalized", TRACED)
    return ex.export_program(model, spec), spec


def _draws(model, batch, seed):
    """The draws predict() makes from one generator: the samples' first, then the bank's."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return torch.randn(batch, K, c.latent_dim, generator=g), torch.randn(batch, c.prior_bank, c.latent_dim, generator=g)


CALLS = [(3, (64, 64)), (1, (96, 128)), (2, TRACED)]  # batch and size other than the traced ones included


def test_pt2_round_trip_equals_eager_predict(model, program, tmp_path):
    ep, spec = program
    assert not [n for n in ep.graph.nodes if n.op == "call_function" and "harmonizer_fast" in str(n.target)]
    path = tmp_path / "m.pt2"
    path.write_bytes(ex.serialize(ep, spec, "pt2", {"samples": K}))
    assert ex.read_metadata(path) == {"samples": K}
    loaded = torch.export.load(path).module()
    for i, (b, size) in enumerate(CALLS):
        images = rand((b, 1, *size), dtype=torch.float32, seed=20 + i)
        want = model.predict(images, K, generator=torch.Generator().manual_seed(i))
        got = loaded(images, *_draws(model, b, i))
        for w, o in zip(want, got):
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-6)


def test_onnx_round_trip_equals_eager_predict(model, program, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra (harmonizer-fast[export])")
    if ex.onnx_unavailable():
        pytest.skip(ex.onnx_unavailable())
    ep, spec = program
    path = tmp_path / "m.onnx"
    path.write_bytes(ex.serialize(ep, spec, "onnx", {"samples": K}))
    assert ex.read_metadata(path) == {"samples": K}  # the metadata travels inside the file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == spec.input_names()
    assert [o.name for o in session.get_outputs()] == spec.output_names()
    for i, (b, size) in enumerate(CALLS):
        images = rand((b, 1, *size), dtype=torch.float32, seed=30 + i)
        want = model.predict(images, K, generator=torch.Generator().manual_seed(i))
        noise, bank = _draws(model, b, i)
        got = session.run(None, {"images": images.numpy(), "sample_noise": noise.numpy(), "bank_noise": bank.numpy()})
        for w, o in zip(want, got):
            np.testing.assert_allclose(o, w.numpy(), rtol=1e-5, atol=1e-6)


def test_identity_heads_and_no_heads(model):
    """The other head kinds: identity heads are the prior mean's map for every rater; 'none' returns samples."""
    images = rand((2, 1, 64, 64), dtype=torch.float32, seed=40)
    noise, _ = _draws(model, 2, 0)
    for heads in ("identity", "none"):
        ep = ex.export_program(model, ex.ExportSpec(K, heads, (64, 64)))
        want = model.predict(images, K, heads=heads, generator=torch.Generator().manual_seed(0))
        got = ep.module()(images, noise)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == (2 if heads == "identity" else 1)
        for w, o in zip(want, got):
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-6)


def test_volumetric_haar_exports_to_aten_and_onnx(tmp_path):
    """The 3-D pair decomposes too (for volumetric models): a shrinkage of the detail bands, exported with a
    dynamic batch and depth, against the eager ops; through onnxruntime when it is installed."""

    class Shrink(torch.nn.Module):
        def forward(self, x):
            y = hf.haar_dwt3d(x)
            y = torch.cat([y[:, :, :1], 0.5 * y[:, :, 1:]], dim=2)
            return hf.haar_idwt3d(y, x.shape[-3:])

    x = rand((2, 3, 6, 8, 10), dtype=torch.float32, seed=41)
    dim = torch.export.Dim
    program = torch.export.export(Shrink(), (x,), dynamic_shapes={"x": {0: dim("b"), 2: 2 * dim("d")}})
    program = program.run_decompositions(decompositions())
    assert not [n for n in program.graph.nodes if n.op == "call_function" and "harmonizer_fast" in str(n.target)]
    other = rand((1, 3, 4, 8, 10), dtype=torch.float32, seed=42)
    torch.testing.assert_close(program.module()(other), Shrink()(other), rtol=1e-6, atol=1e-6)
    if importlib.util.find_spec("onnxruntime") is None or ex.onnx_unavailable():
        return
    import onnxruntime as ort

    onnx_program = torch.onnx.export(program, (x,), dynamo=True, verbose=False)
    onnx_program.save(str(tmp_path / "shrink.onnx"))
    session = ort.InferenceSession(str(tmp_path / "shrink.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    np.testing.assert_allclose(got, Shrink()(other).numpy(), rtol=1e-5, atol=1e-6)


def test_cli_export_of_a_trained_run(tmp_path, capsys):
    """harmonizer-fast export on a two-phase run: the file, its metadata, and the checkpoint's predictions."""
    from harmonizer_fast import data as hd
    from harmonizer_fast.checkpoint import load_model

    npz = tmp_path / "d.npz"
    hd.write_npz(hd.make_synthetic(24, size=32, raters=2, seed=2), npz)
    run = tmp_path / "run"
    assert cli(["train", "--data", str(npz), "--out", str(run), "--epochs", "1", "--batch-size", "8",
                "--no-progress"]) == 0  # fmt: skip
    out = tmp_path / "exported" / "model.pt2"
    assert cli(["export", "--checkpoint", str(run), "--format", "pt2", "--out", str(out), "-k", "4",
                "--size", "64", "64"]) == 0  # fmt: skip
    assert f"wrote {out}" in capsys.readouterr().out
    meta = json.loads(out.with_name("model.pt2.json").read_text())
    assert meta["heads"] == "personalized" and meta["samples"] == 4 and meta["bytes"] == out.stat().st_size
    assert list(meta["inputs"]) == ["images", "sample_noise", "bank_noise"] and meta["raters"] == [0, 1]
    assert meta["preprocessing"]["intensity"] == "auto" and meta["preprocessing"]["size_multiple"] == 32
    # the file carries the same metadata inside it; the sidecar adds the file's size and hash
    assert ex.read_metadata(out) == {k: v for k, v in meta.items() if k not in ("bytes", "sha256")}
    assert meta["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    model, _ = load_model(run)
    images = rand((2, 1, 64, 96), dtype=torch.float32, seed=50)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 4, model.config.latent_dim, generator=g)
    bank = torch.randn(2, model.config.prior_bank, model.config.latent_dim, generator=g)
    want = model.predict(images, 4, generator=torch.Generator().manual_seed(5))
    got = torch.export.load(out).module()(images, noise, bank)
    for w, o in zip(want, got):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-6)


def test_export_refuses_what_it_cannot_make(model, tmp_path, monkeypatch):
    untrained = HarmonizerNet(HarmonizerConfig.small(num_raters=3))
    with pytest.raises(ex.ExportError, match="personalizer was never trained"):
        ex.export_model(untrained, tmp_path / "m.pt2", "pt2", heads="personalized")
    assert ex.resolve_heads(untrained, "auto") == "none" and ex.resolve_heads(model, "auto") == "personalized"
    untrained.train()
    ex.export_program(untrained, ex.ExportSpec(1, "none", (64, 64)))
    assert untrained.training  # the export traced a copy: the caller's model keeps its mode (and device)
    with pytest.raises(ex.ExportError, match="format must be one of"):
        ex.export_model(model, tmp_path / "m.tflite", "tflite")
    with pytest.raises(ex.ExportError, match="size must be multiples of 32 of at least 64"):
        ex.export_model(model, tmp_path / "m.pt2", "pt2", size=(32, 64))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ex.ExportError, match=r"pip install 'harmonizer-fast\[export\]'"):
        ex.export_model(model, tmp_path / "m.onnx", "onnx")
    assert not list(tmp_path.iterdir())  # nothing written, not even a part


def test_a_users_model_exports_with_plain_onnx_export():
    """A user's module that calls the public ops exports with ``torch.onnx.export(model, args, dynamo=True)``, no
    decomposition table passed: importing harmonizer_fast registers the references where torch's ONNX exporter
    looks (torch._decomp's table). Every op family a model calls directly, against the eager module."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra (harmonizer-fast[export])")
    if ex.onnx_unavailable():
        pytest.skip(ex.onnx_unavailable())

    class Users(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dwt, self.idwt = hf.DWTForward(J=2, wave="haar"), hf.DWTInverse(wave="haar")
            self.tokens = torch.nn.Parameter(torch.randn(4, 8))
            self.w_k, self.w_v = torch.nn.Parameter(torch.randn(8, 3) / 3), torch.nn.Parameter(torch.randn(8, 3) / 3)

        def forward(self, x, v):
            bands = hf.haar_dwt2d(x)
            back = hf.haar_idwt2d(bands * 0.5, size=x.shape[-2:])
            yl, yh = self.dwt(x)
            pooled = hf.token_attention_pool(x, self.tokens, self.w_k, self.w_v)  # (B, 4, 8)
            gamma = pooled.mean(-1)[:, :3]
            modulated = hf.film(self.idwt((yl, yh)) + back, gamma, -gamma)
            vol = hf.haar_idwt3d(hf.haar_dwt3d(v) * 2, size=v.shape[-3:])
            return modulated, pooled, vol

    torch.manual_seed(0)
    model, x, v = Users().eval(), torch.randn(2, 3, 32, 40), torch.randn(1, 2, 4, 6, 8)
    program = torch.onnx.export(model, (x, v), dynamo=True, verbose=False)
    assert not [n for n in program.model_proto.graph.node if "harmonizer" in n.domain]
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {names[0]: x.numpy(), names[1]: v.numpy()})
    for g, w in zip(got, model(x, v)):
        np.testing.assert_allclose(g, w.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """[reliability] #36: a full disk used to abort inside torch's C++ writer (exit 134, 16 lines). Now the
    file is serialized in memory and written by one atomic write: ENOSPC is one line naming the path, exit 2,
    and neither the model nor its metadata is left behind."""
    import errno

    import harmonizer_fast._io as hio
    from harmonizer_fast.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run", "best", HarmonizerNet(HarmonizerConfig.small(num_raters=2)))
    real_write = hio.os.write

    def full(fd, data):
        if len(data) > 4096:  # the model; small JSON writes of the run itself still pass
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(hio.os, "write", full)
    out = tmp_path / "out" / "m.pt2"
    assert cli(["export", "--checkpoint", str(tmp_path / "run"), "--format", "pt2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot write {out}: No space left on device" in err, err
    assert not out.exists() and not out.with_name("m.pt2.json").exists()
    assert not [p for p in out.parent.iterdir()] if out.parent.exists() else True
