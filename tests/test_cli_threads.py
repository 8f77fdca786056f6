"""Issue 14: ``--threads`` for demo/spectrum/fit (default 1 on the CPU), and
``hessrebal bench --quick`` without ``--output``."""

import pytest
import torch

from hessrebal.cli import DEFAULT_CPU_THREADS, build_parser, main, set_threads


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_default_is_one_thread_on_the_cpu(restore_threads):
    torch.set_num_threads(2)
    assert set_threads(None) == DEFAULT_CPU_THREADS == 1
    torch.set_num_threads(2)
    assert set_threads(None, "cpu") == 1
    # a GPU run keeps torch's own setting
    torch.set_num_threads(2)
    assert set_threads(None, "cuda") == 2
    assert set_threads(2) == 2 and set_threads(1, "cuda") == 1
    for bad in (0, -1):
        with pytest.raises(ValueError, match="--threads must be a positive integer"):
            set_threads(bad)


@pytest.mark.parametrize("command", ["demo", "spectrum", "fit", "bench"])
def test_every_compute_command_has_threads(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    action = next(a for a in sub._actions if "--threads" in a.option_strings)
    assert action.default is None and action.type is int
    assert "default 1" in action.help


def test_demo_applies_threads(tmp_path, capsys, restore_threads, monkeypatch):
    seen = {}

    def fake_run_demo(**kwargs):
        seen["threads"] = torch.get_num_threads()
        raise ValueError("stop here")

    monkeypatch.setattr("hessrebal.demo.run_demo", fake_run_demo)
    torch.set_num_threads(2)
    assert main(["demo", "--quiet"]) == 2
    assert seen["threads"] == 1
    assert main(["demo", "--quiet", "--threads", "2"]) == 2
    assert seen["threads"] == 2
    assert "stop here" in capsys.readouterr().err


def test_bench_quick_without_output_prints_the_table(tmp_path, capsys, monkeypatch,
                                                     restore_threads):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--quick", "--seeds", "1", "--methods", "baseline", "class_bias",
               "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| Class-bias tuning |" in out and "wrote" not in out
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_bench_quick_help_gives_its_duration(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    # measured: 77 s and 139 s for the whole --quick run on the loaded 2-core VM
    assert "1-2 minutes" in " ".join(text.split()) and "a few minutes" not in text
