"""What users install: the sdist, a wheel built from it, and that wheel in a fresh virtual environment that has
only the required dependencies (with this machine's torch), used from a directory outside the checkout so that
the source tree cannot be imported by accident. The editable install of `make test` hides exactly these
faults: a package missing from the wheel, a header missing from the sdist, an import of an optional extra.
"""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import harmonizer_fast as hf

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # builds the extension from the sdist (minutes on 2 cores) and fills a venv
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("HARMONIZER_FAST_", "TRITON_", "PYTHON"))}
ENV["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"


def _run(args, cwd: Path, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env={**ENV, **env}, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _source_packages() -> set[str]:
    return {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "harmonizer_fast").rglob("__init__.py")}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """``python -m build --sdist`` as a packager runs it: isolated, so it must not need torch."""
    out = tmp_path_factory.mktemp("dist")
    _ok(_run([sys.executable, "-m", "build", "--sdist", "--outdir", out, ROOT], cwd=out))
    (path,) = out.glob("harmonizer_fast-*.tar.gz")
    return path


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory) -> Path:
    """A wheel built from the sdist (not the checkout) against this environment's torch."""
    out = tmp_path_factory.mktemp("wheel")
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, sdist], cwd=out))
    (path,) = out.glob("harmonizer_fast-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with this machine's torch and the wheel's required dependencies, nothing else."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    _ok(_run([sys.executable, "-m", "venv", env_dir], cwd=env_dir.parent))
    pip = [env_dir / "bin" / "python", "-m", "pip", "install", "-q"]
    _ok(_run([*pip, f"torch=={torch.__version__.split('+')[0]}"], cwd=env_dir.parent))
    _ok(_run([*pip, wheel], cwd=env_dir.parent))
    return env_dir


def test_sdist_carries_what_a_build_needs(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"setup.py", "pyproject.toml", "LICENSE", "NOTICE", "README.md", "MANIFEST.in"}
    expected |= {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    expected |= {str(p.relative_to(ROOT)) for p in (ROOT / "harmonizer_fast").rglob("*.py")}
    assert not expected - names, sorted(expected - names)


def test_isolated_wheel_build_stops_and_says_why(sdist, tmp_path):
    """Without torch in the build environment the wheel build fails loudly, never a wheel without _C."""
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", tmp_path, sdist], cwd=tmp_path)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "--no-build-isolation" in said and "HARMONIZER_FAST_NO_EXT=1" in said, said
    assert not list(tmp_path.glob("*.whl"))


def test_wheel_has_every_package_the_extension_and_the_licence(wheel):
    assert not wheel.name.endswith("-none-any.whl"), wheel.name  # a platform wheel: it carries _C
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    packages = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == _source_packages()
    assert any(re.fullmatch(r"harmonizer_fast/_C\..*\.so", n) for n in names), "no harmonizer_fast/_C*.so"
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert any(n.endswith("NOTICE") for n in names)
    assert meta.get("License-Expression") == "Apache-2.0", meta.get("License-Expression")
    # Triton only as an extra: a CPU-only torch gets no 1 GB of a compiler it cannot run.
    requires = meta.get_all("Requires-Dist")
    assert all("extra ==" in r for r in requires if r.startswith(("triton", "nvidia-ml-py", "pydicom", "onnx")))
    torch_req = next(r for r in requires if r.startswith("torch"))
    assert "<" in torch_req, f"torch must be bounded above: {torch_req}"


def test_installed_cli_starts_outside_the_checkout(venv, tmp_path):
    exe = venv / "bin" / "harmonizer-fast"
    assert _ok(_run([exe, "--version"], cwd=tmp_path)).stdout.strip() == f"harmonizer-fast {hf.__version__}"
    top = _ok(_run([exe, "--help"], cwd=tmp_path)).stdout
    commands = re.search(r"\{([a-z,-]+)\}", top).group(1).split(",")
    assert {"train", "evaluate", "sample", "export", "info"} <= set(commands)
    for command in commands:
        out = _ok(_run([exe, command, "--help"], cwd=tmp_path)).stdout
        assert f"harmonizer-fast {command}" in out and "example:" in out, (command, out)
    code = ("import importlib.util as u, harmonizer_fast as hf; print(hf.__file__); "
            "print(hf.backend_info()['cpu'].available); "
            "print([m for m in ('triton', 'onnx', 'h5py', 'pydicom', 'pywt') if u.find_spec(m)])")  # fmt: skip
    probe = _ok(_run([venv / "bin" / "python", "-c", code], cwd=tmp_path))
    where, cpu, extras = probe.stdout.split("\n")[:3]
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    assert cpu == "True", probe.stdout  # the C++ kernels built from the sdist load
    assert extras == "[]", f"optional dependencies installed by the required set: {extras}"


@pytest.fixture(scope="module")
def trained_run(venv, tmp_path_factory) -> Path:
    """One epoch of each phase on synthetic data, by the installed command, from outside the checkout."""
    where = tmp_path_factory.mktemp("train")
    _ok(_run([venv / "bin" / "harmonizer-fast", "train", "--data", "synthetic", "--synthetic-items", "24", "--epochs",
              "1", "--out", where / "run", "--no-progress"], cwd=where))  # fmt: skip
    return where / "run"


def test_installed_train_evaluate_and_predict(venv, trained_run, tmp_path):
    exe = venv / "bin" / "harmonizer-fast"
    _ok(_run([exe, "evaluate", "--checkpoint", trained_run, "--data", "synthetic", "--synthetic-items", "24",
              "--samples", "4", "--out", tmp_path / "eval"], cwd=tmp_path))  # fmt: skip
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "eval" / "report.md").is_file()
    code = "import numpy as np; np.save('scan.npy', np.random.default_rng(0).random((2, 40, 36)))"
    _ok(_run([venv / "bin" / "python", "-c", code], cwd=tmp_path))
    _ok(_run([exe, "predict", "-i", tmp_path / "scan.npy", "-o", tmp_path / "pred", "-m", trained_run, "-k", "4"],
             cwd=tmp_path))  # fmt: skip
    assert np.load(tmp_path / "pred" / "scan-00001" / "probability.npy").shape == (40, 36)
    # the bundled model ships inside the wheel and loads from it
    code = "import harmonizer_fast as hf; print(hf.pretrained.available()); hf.load_pretrained('lidc-small')"
    assert "lidc-small" in _ok(_run([venv / "bin" / "python", "-c", code], cwd=tmp_path)).stdout


def test_missing_extra_is_one_line_naming_it(venv, trained_run, tmp_path):
    exe = venv / "bin" / "harmonizer-fast"
    proc = _run([exe, "export", "--checkpoint", trained_run, "--format", "onnx", "--out", tmp_path / "m.onnx"],
                cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "pip install 'harmonizer-fast[export]'" in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


USER_MODEL = """
import numpy as np, onnxruntime as ort, torch, harmonizer_fast as hf

class Mine(torch.nn.Module):  # a user's model calling the public ops
    def __init__(self):
        super().__init__()
        self.dwt, self.idwt = hf.DWTForward(J=2, wave="haar"), hf.DWTInverse(wave="haar")
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    def forward(self, x):
        yl, yh = self.dwt(x)
        bands = hf.haar_dwt2d(self.conv(x))
        g = bands.mean(dim=(2, 3, 4))
        return hf.film(self.idwt((yl, yh)), g, -g), bands

model, x = Mine().eval(), torch.randn(2, 3, 32, 48)
program = torch.onnx.export(model, (x,), dynamo=True)  # plain export: no decomposition table passed
session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
for g, w in zip(got, model(x)):
    np.testing.assert_allclose(g, w.detach().numpy(), rtol=1e-4, atol=1e-5)
assert not [n for n in program.model_proto.graph.node if "harmonizer" in n.domain]
print("ok")
"""


def test_user_model_exports_to_onnx_from_the_installed_package(venv, wheel, tmp_path):
    """`torch.onnx.export(model, args, dynamo=True)` of a user's module that calls the ops just works."""
    py = venv / "bin" / "python"
    _ok(_run([py, "-m", "pip", "install", "-q", "--find-links", wheel.parent, "harmonizer-fast[export]"],
             cwd=tmp_path))  # fmt: skip
    assert _ok(_run([py, "-c", USER_MODEL], cwd=tmp_path)).stdout.strip().endswith("ok")
