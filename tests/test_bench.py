"""The benchmark runner, its JSON and its summary table."""

import json
import math

import numpy as np
import pytest

from hessrebal.bench import METHODS, POST_HOC, format_table, run_benchmark, summarize
from hessrebal.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"train_steps": 40, "hidden": (16,), "finetune_steps": 4, "finetune_lrs": (1e-3,),
        "curvature_samples": 96, "surgeon": {"max_steps": 2}}


def _strict_json(text):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.json"
    result = run_benchmark("digits-lt", seeds=1, imbalance_ratio=10, settings=TINY,
                           output=path, raise_errors=True)
    return result, path


def test_tiny_run_writes_valid_json_with_every_method(tiny_result):
    result, path = tiny_result
    data = _strict_json(path.read_text())
    assert data["rows"] == result["rows"]
    rows = data["rows"]
    assert [r["method"] for r in rows] == list(METHODS)
    for r in rows:
        assert r["error"] is None
        assert r["seed"] == 0 and r["dataset"] == "digits-lt" and r["imbalance_ratio"] == 10
        assert r["post_hoc"] is POST_HOC[r["method"]]
        for key in ("balanced_accuracy", "class_std", "worst_class_accuracy", "accuracy",
                    "nll", "seconds"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (r["method"], key)
        pc = np.asarray(r["per_class_accuracy"])
        assert pc.shape == (10,)
        # The summary numbers are those of the per-class accuracies (balanced test split).
        assert r["balanced_accuracy"] == pytest.approx(pc.mean())
        assert r["class_std"] == pytest.approx(pc.std())
        assert r["worst_class_accuracy"] == pytest.approx(pc.min())
        assert r["accuracy"] == pytest.approx(r["balanced_accuracy"])
    settings = data["settings"]
    assert settings["seeds"] == [0] and settings["bench"]["train_steps"] == 40
    assert settings["imbalance_ratio"] == 10


def test_controls_share_the_spike_run_budget(tiny_result):
    rows = {r["method"]: r for r in tiny_result[0]["rows"]}
    spikes = rows["spectral_surgery"]["details"]
    for control in ("random_directions", "bulk_directions"):
        d = rows[control]["details"]
        assert d["initial_budget"] == spikes["initial_budget"]
        assert d["n_components"] == spikes["n_components"]
        # Random/bulk directions have far less curvature than the top spike.
        assert max(d["eigenvalues"]) < spikes["eigenvalues"][0]
    # The baseline row is the trained model: LA with τ=0 would equal it.
    assert rows["baseline"]["details"]["train_size"] > 0


def test_methods_subset_and_dependencies_not_reported():
    result = run_benchmark("digits-lt", seeds=[3], methods=["baseline", "logit_adjustment"],
                           settings={"train_steps": 10, "hidden": (8,)})
    assert [(r["method"], r["seed"]) for r in result["rows"]] == [
        ("baseline", 3), ("logit_adjustment", 3)]
    again = run_benchmark("digits-lt", seeds=[3], methods=["baseline"],
                          settings={"train_steps": 10, "hidden": (8,)})
    # Seeded from scratch: the same numbers twice.
    assert again["rows"][0]["per_class_accuracy"] == result["rows"][0]["per_class_accuracy"]
    assert again["rows"][0]["nll"] == result["rows"][0]["nll"]


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "cli.json"
    rc = main(["bench", "--dataset", "digits", "--seeds", "1", "--epochs", "2",
               "--methods", "baseline", "class_bias", "--output", str(out), "--quiet"])
    assert rc == 0
    data = _strict_json(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["baseline", "class_bias"]
    assert data["settings"]["command"].startswith("hessrebal bench --dataset digits")
    printed = capsys.readouterr().out
    assert "| Class-bias tuning |" in printed


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ["nope"]}, "unknown method"),
    ({"seeds": 0}, "seeds"),
    ({"settings": {"not_a_setting": 1}}, "unknown setting"),
])
def test_run_benchmark_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_benchmark("digits-lt", **{"seeds": 1, **kwargs})


def test_summary_mean_std_and_paired_deltas():
    base = [0.10, 0.20, 0.40]
    surg = [0.05, 0.20, 0.25]
    rows = []
    for seed, (b, s) in enumerate(zip(base, surg)):
        rows.append({"dataset": "d", "imbalance_ratio": 10.0, "method": "baseline",
                     "seed": seed, "class_std": b, "balanced_accuracy": 0.5 + b,
                     "accuracy": 0.9, "worst_class_accuracy": 0.1, "nll": 1.0, "seconds": 2.0})
        rows.append({"dataset": "d", "imbalance_ratio": 10.0, "method": "spectral_surgery",
                     "seed": seed, "class_std": s, "balanced_accuracy": 0.6,
                     "accuracy": 0.9, "worst_class_accuracy": 0.2, "nll": 1.1, "seconds": 1.0})
    # A failed row is counted but does not enter the statistics.
    rows.append({"dataset": "d", "imbalance_ratio": 10.0, "method": "spectral_surgery",
                 "seed": 3, "class_std": None, "balanced_accuracy": None, "error": "boom"})
    # Another ratio is another group.
    rows.append({"dataset": "d", "imbalance_ratio": 1.0, "method": "baseline", "seed": 0,
                 "class_std": 0.9, "balanced_accuracy": 0.1})
    summary = summarize({"rows": rows})
    assert [(e["imbalance_ratio"], e["method"]) for e in summary] == [
        (1.0, "baseline"), (10.0, "baseline"), (10.0, "spectral_surgery")]
    s = summary[2]
    assert s["n_seeds"] == 3 and s["n_failed"] == 1 and s["seeds"] == [0, 1, 2]
    assert s["class_std_mean"] == pytest.approx(np.mean(surg))
    assert s["class_std_std"] == pytest.approx(np.std(surg, ddof=1))
    diffs = np.subtract(surg, base)
    assert s["delta_class_std_mean"] == pytest.approx(diffs.mean())
    assert s["delta_class_std_std"] == pytest.approx(diffs.std(ddof=1))
    assert s["delta_balanced_accuracy_mean"] == pytest.approx(np.mean(0.1 - np.asarray(base)))
    one = summary[0]
    assert one["class_std_mean"] == pytest.approx(0.9) and math.isnan(one["class_std_std"])

    table = format_table(summary)
    # Percent, one decimal, mean ± sample std; Δσ signed.
    assert f"| {100 * np.mean(surg):.1f} ± {100 * np.std(surg, ddof=1):.1f} |" in table
    assert f"| {100 * diffs.mean():+.1f} ± {100 * diffs.std(ddof=1):.1f} |" in table
    assert "**Spectral Surgery** (1 failed)" in table
    assert "imbalance ratio 10" in table and "imbalance ratio 1**" in table


IMAGE_TINY = {"epochs": 1, "batch_size": 16, "finetune_epochs": 1, "finetune_lrs": (1e-3,),
              "curvature_samples": 16, "batch_size_eval": 32,
              "surgeon": {"max_steps": 1, "n_components": 2}}


def test_bench_on_fake_cifar10_lt_files(tmp_path):
    from tests.test_datasets import _write_cifar

    _write_cifar(tmp_path, per_class_train=12, per_class_test=3)
    result = run_benchmark(
        "cifar10-lt", seeds=1, imbalance_ratio=10, root=tmp_path,
        methods=["baseline", "logit_adjustment", "spectral_surgery", "bulk_directions"],
        settings={**IMAGE_TINY, "model": "cnn"}, raise_errors=True,
        dataset_kwargs={"verify_checksums": False, "val_per_class": 2})
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["baseline", "logit_adjustment", "spectral_surgery",
                                           "bulk_directions"]
    assert all(math.isfinite(r["balanced_accuracy"]) for r in rows)
    assert rows[0]["details"]["train_size"] == sum(result["settings"]["class_counts_seed_0"])


def test_bench_on_fake_isic2019_files(tmp_path):
    from tests.test_datasets import _write_isic

    _write_isic(tmp_path, counts=(6, 12, 5, 5, 5, 5, 5, 5), unk=0)
    result = run_benchmark(
        "isic2019", seeds=1, root=tmp_path, methods=["baseline", "class_bias",
                                                     "class_balanced_finetune"],
        settings={**IMAGE_TINY, "model": "cnn"}, raise_errors=True,
        dataset_kwargs={"image_size": 8})
    assert [r["method"] for r in result["rows"]] == ["baseline", "class_bias",
                                                      "class_balanced_finetune"]
    assert all(len(r["per_class_accuracy"]) == 8 for r in result["rows"])


@pytest.mark.slow
def test_bench_cifar10_lt_default_resnet(tmp_path):
    """The CIFAR-10-LT defaults (ResNet-32, every method) on fake files, shortened."""
    from tests.test_datasets import _write_cifar

    _write_cifar(tmp_path, per_class_train=12, per_class_test=3)
    result = run_benchmark(
        "cifar10-lt", seeds=1, imbalance_ratio=10, root=tmp_path, raise_errors=True,
        settings={"epochs": 1, "finetune_epochs": 1, "curvature_samples": 16,
                  "surgeon": {"max_steps": 1}},
        dataset_kwargs={"verify_checksums": False, "val_per_class": 2})
    assert result["settings"]["bench"]["model"] == "resnet32"
    assert [r["method"] for r in result["rows"]] == list(METHODS)
    assert all(math.isfinite(r["nll"]) for r in result["rows"])
