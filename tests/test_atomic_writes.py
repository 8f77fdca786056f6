"""Every file hessrebal writes is replaced atomically: a save interrupted by an
exception, a KeyboardInterrupt or a SIGKILL leaves the previous file loading bit
for bit, and an exception leaves no temporary file behind."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hessrebal import SpectralSurgeon
from hessrebal.baselines import LogitAdjustment
from tests.conftest import trained_blobs_mlp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def problem():
    model, X, y = trained_blobs_mlp(7, [30, 30, 30])
    return model, X, y


@pytest.fixture(scope="module")
def two_surgeons(problem):
    model, X, y = problem
    a = SpectralSurgeon(max_steps=2, random_state=0).fit(model, X, y)
    b = SpectralSurgeon(max_steps=3, budget=0.2, random_state=1).fit(model, X, y)
    return a, b


def _half_written_save_file(error):
    """A ``safetensors.torch.save_file`` that writes the first half of the
    real file to the path it was given, then fails (a full disk, a Ctrl-C)."""
    from safetensors.torch import save

    def fake(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
        raise error

    return fake


def _others(directory, keep):
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in keep)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["OSError", "KeyboardInterrupt"])
def test_failed_surgeon_save_keeps_the_previous_file(tmp_path, monkeypatch, two_surgeons, error):
    old, new = two_surgeons
    path = old.save(tmp_path / "surgeon.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr("safetensors.torch.save_file", _half_written_save_file(error))
    with pytest.raises(type(error)):
        new.save(path)
    assert path.read_bytes() == before
    assert _others(tmp_path, {"surgeon.safetensors"}) == []  # no stray temporary file
    loaded = SpectralSurgeon.load(path)
    assert torch.equal(loaded.perturbation_, old.perturbation_)
    assert loaded.history_ == old.history_ and len(old.history_) == 2


def test_failed_baseline_save_keeps_the_previous_file(tmp_path, monkeypatch, problem):
    model, X, y = problem
    old = LogitAdjustment(tau=1.0).fit(model, X, y)
    new = LogitAdjustment(tau=0.5).fit(model, X, y)
    path = old.save(tmp_path / "la.safetensors")
    before = path.read_bytes()
    monkeypatch.setattr("safetensors.torch.save_file",
                        _half_written_save_file(OSError(5, "Input/output error")))
    with pytest.raises(OSError, match="Input/output"):
        new.save(path)
    assert path.read_bytes() == before and _others(tmp_path, {"la.safetensors"}) == []
    assert LogitAdjustment.load(path).tau == 1.0


def test_a_successful_save_replaces_the_file_and_keeps_its_permissions(tmp_path, two_surgeons):
    old, new = two_surgeons
    path = old.save(tmp_path / "s.safetensors")
    os.chmod(path, 0o640)
    new.save(path)
    assert SpectralSurgeon.load(path).history_ == new.history_
    assert (path.stat().st_mode & 0o777) == 0o640
    assert _others(tmp_path, {"s.safetensors"}) == []
    fresh = new.save(tmp_path / "fresh.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~umask  # as open() would make it


def test_atomic_write_interrupted_mid_text(tmp_path):
    from hessrebal._persistence import atomic_write, write_text_atomic

    path = tmp_path / "report.md"
    write_text_atomic(path, "old report\n")
    with pytest.raises(RuntimeError, match="renderer broke"):
        with atomic_write(path) as fh:
            fh.write("new rep")
            fh.flush()
            raise RuntimeError("renderer broke")
    assert path.read_text() == "old report\n" and _others(tmp_path, {"report.md"}) == []
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with atomic_write(path, "a"):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_text_atomic(tmp_path / "missing" / "x.txt", "x")


def test_report_figure_interrupted_mid_write_keeps_the_old_figure(tmp_path, monkeypatch):
    """The demo report's figures: savefig dies after writing part of the PNG."""
    from matplotlib.figure import Figure

    from hessrebal.report import _save

    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    path = tmp_path / "history.png"
    _save(fig, path)
    before = path.read_bytes()
    real = Figure.savefig

    def broken(self, fname, **kwargs):
        real(self, fname, **kwargs)
        if hasattr(fname, "truncate"):
            fname.truncate(20)
        else:
            with open(fname, "r+b") as fh:
                fh.truncate(20)
        raise MemoryError("renderer ran out of memory")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(MemoryError):
        _save(fig, path)
    assert path.read_bytes() == before and _others(tmp_path, {"history.png"}) == []


def test_bench_json_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    from hessrebal import _persistence
    from hessrebal.bench import _write_json

    path = tmp_path / "bench.json"
    _write_json(path, {"run": 1})

    def no_rename(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "replace", no_rename)
    monkeypatch.setattr(_persistence.os, "replace", no_rename)
    with pytest.raises(OSError, match="cross-device"):
        _write_json(path, {"run": 2})
    assert json.loads(path.read_text()) == {"run": 1}
    assert _others(tmp_path, {"bench.json"}) == []


def test_spectrum_cli_outputs_are_atomic(tmp_path, monkeypatch, capsys):
    """``hessrebal spectrum --output-dir``: a failing rename of spectrum.json
    keeps the previous JSON and PNG and leaves nothing else in the folder."""
    from hessrebal import _persistence
    from hessrebal.cli import main

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                                torch.nn.Linear(5, 3)).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.save(torch.jit.script(model), str(tmp_path / "net.pt"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", X=rng.normal(size=(30, 4)), y=np.arange(30) % 3)
    out = tmp_path / "out"
    argv = ["spectrum", "--model", str(tmp_path / "net.pt"), "--data", str(tmp_path / "data.npz"),
            "--n-components", "2", "--n-probes", "1", "--n-steps", "5", "--output-dir",
            str(out), "--quiet"]
    assert main(argv) == 0
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(files) == {"spectrum.json", "spectrum.png"}
    real = os.replace
    calls = []

    def fail_on_json(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "spectrum.json":
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(_persistence.os, "replace", fail_on_json)
    assert main(argv) == 2  # the CLI's one-line error
    assert "Input/output error" in capsys.readouterr().err
    assert calls == ["spectrum.png", "spectrum.json"]
    assert {p.name: p.read_bytes() for p in out.iterdir()}.keys() == files.keys()
    assert (out / "spectrum.json").read_bytes() == files["spectrum.json"]


CHILD = textwrap.dedent("""
    import sys, torch
    from hessrebal import SpectralSurgeon
    s = SpectralSurgeon.load(sys.argv[1])
    # A large fitted state (about 100 MB of eigenvectors) so that the save
    # takes long enough to be killed in the middle.
    g = torch.Generator().manual_seed(0)
    s.eigenvectors_ = torch.randn(s.perturbation_.numel(), 12_500_000 // s.perturbation_.numel()
                                  + 1, generator=g, dtype=torch.float64)
    print("saving", flush=True)
    s.save(sys.argv[1])
    print("saved", flush=True)
""")


def test_save_killed_mid_write_keeps_the_previous_file(tmp_path, two_surgeons):
    old, _ = two_surgeons
    path = old.save(tmp_path / "surgeon.safetensors")
    before = path.read_bytes()
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                             env=env, cwd=tmp_path)
    try:
        assert child.stdout.readline().strip() == b"saving"
        # Kill as soon as any byte of the new state reaches the disk: a
        # temporary file with data in it, or the target itself changing.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            tmp = [p for p in tmp_path.glob(".surgeon.safetensors.*") if p.stat().st_size > 0]
            if tmp or path.stat().st_size != len(before):
                break
            time.sleep(0.0002)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL, "the save finished before it could be killed"
    assert path.read_bytes() == before
    loaded = SpectralSurgeon.load(path)
    assert torch.equal(loaded.eigenvectors_, old.eigenvectors_)
    # A killed process cannot clean up: at most its one partial temporary
    # file is left, under a name no load() would pick up by mistake.
    stray = _others(tmp_path, {"surgeon.safetensors", "child.py"})
    assert len(stray) <= 1 and all(n.startswith(".surgeon.safetensors.") and n.endswith(".tmp")
                                   for n in stray)
