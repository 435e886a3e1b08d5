"""`bench compare`: the spec is checked (exit 2 naming the key), and the report is assembled from the sweep's jobs.

The report test builds a finished sweep by hand (metrics.jsonl, the run's trainable-parameters log line, the
sweep's done markers), so `run_sweep` skips every job without a subprocess; only the prediction measurement (a
fresh process per job, `bench_predict.measure_job`) and its planner call are replaced.
"""
from __future__ import annotations

import csv
import io
import json

from pathlib import Path

import pytest
import yaml

from trainer.bench import compare
from trainer.cli import main
from trainer.errors import ConfigError


def _spec(tmp_path, **extra) -> object:
    spec = {"dir": str(tmp_path / "cmp"), "methods": ["probe", "lora"],
            "overrides": {"run.max_steps": 4, "data.root": str(tmp_path / "data")},
            "backbones": [{"name": "a_tiny", "config": "demo.yaml", "overrides": {"model.backbone": "prithvi_eo_tiny"}},
                          {"name": "b_tiny", "config": "demo.yaml"}], **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"compare": spec}))
    return path


@pytest.fixture
def spec_path(tmp_path, root):
    (tmp_path / "demo.yaml").write_text((root / "launch/configs/demo.yaml").read_text())
    return _spec(tmp_path)


def test_spec_errors_name_the_key(tmp_path, root):
    (tmp_path / "demo.yaml").write_text((root / "launch/configs/demo.yaml").read_text())
    with pytest.raises(ConfigError) as e:
        compare.load_spec(_spec(tmp_path, methods=["probe", "full_ft"]))
    assert "compare.methods: 'full_ft' is not a method; choose from probe, lora" in str(e.value)
    bad = _spec(tmp_path, backbones=[{"name": "x", "config": "missing.yaml"}, {"name": "x", "config": "demo.yaml"}])
    with pytest.raises(ConfigError) as e:
        compare.load_spec(bad)
    assert "compare.backbones.0.config: missing.yaml does not exist" in str(e.value)
    assert "name 'x' appears twice" in str(e.value)
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({"compare": {"backbone": [], "dir": "x"}}))
    with pytest.raises(ConfigError, match="compare.backbone"):
        compare.load_spec(path)


def test_cli_without_spec_exits_2(capsys):
    assert main(["bench", "compare"]) == 2
    assert "give --config SPEC.yaml" in capsys.readouterr().err
    assert main(["bench", "predict", "--config", "x.yaml"]) == 2
    assert "takes no --config" in capsys.readouterr().err


def test_every_job_gets_the_common_overrides_and_its_method(spec_path):
    sweep = compare.build_sweep(compare.load_spec(spec_path), spec_path, ["run.seed=3"])
    names = [j.name for j in sweep.jobs]
    assert names == ["a_tiny-probe", "a_tiny-lora", "b_tiny-probe", "b_tiny-lora"]
    probe, lora = sweep.jobs[0].overrides, sweep.jobs[1].overrides
    assert "model.freeze_backbone=true" in probe and "memory.profile=full" in probe
    assert "memory.profile=lora" in lora and "model.freeze_backbone=true" not in lora
    for job in sweep.jobs:
        assert "run.max_steps=4" in job.overrides and job.overrides[-1] == "run.seed=3"  # command line last


def _finished_job(job_dir, miou: float, trainable: float):
    job_dir.mkdir(parents=True)
    records = [{"split": "train", "step": s, "loss": 1.0 / s, "samples_per_s": 10.0 + s, "peak_rss_mb": 900.0}
               for s in (1, 2, 3, 4)] + [{"split": "val", "step": 4, "loss": 0.5, "miou": miou}]
    (job_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (job_dir / "sweep.stderr.log").write_text(
        f"12:00:00 INFO trainer.model.fitting: profile full: {trainable:.2f}M of 5.10M parameters trainable\n")
    (job_dir / "sweep_done.json").write_text("{}")


def test_report_from_a_finished_sweep(spec_path, monkeypatch):
    from trainer.bench import bench_predict
    spec = compare.load_spec(spec_path)
    jobs = spec.dir + "/jobs"
    values = {"a_tiny-probe": (0.61, 1.25), "a_tiny-lora": (0.72, 1.40), "b_tiny-probe": (0.55, 0.80)}
    for name, (miou, trainable) in values.items():
        _finished_job(Path(jobs) / name, miou, trainable)
    # b_tiny-lora is not finished: run_sweep would train it; an unknown key makes it fail at config loading
    calls = []
    monkeypatch.setattr(bench_predict, "measure_job", lambda job, scratch, w, b: calls.append(job.name) or {
        "status": "ok", "windows_per_s": 3.5, "peak_rss_mb": 1200.0, "tile": 64})
    monkeypatch.setattr(bench_predict, "planned", lambda job, b: {"planned_cpu_mb": 1300.0,
                                                                  "gpu_bound_windows_per_s": {"bf16": 1e5},
                                                                  "gpu_max_windows_24gb": {"nf4": 4096}})
    doc = compare.run_compare(spec_path, ["run.not_a_key=1"], echo=lambda *a: None)
    rows = {(r["backbone"], r["method"]): r for r in doc["rows"]}
    assert rows[("a_tiny", "lora")]["val_metric"] == 0.72 and rows[("a_tiny", "lora")]["trainable_m"] == 1.40
    assert rows[("a_tiny", "probe")]["train_samples_per_s"] == 13.0  # median of steps 2..4
    assert rows[("a_tiny", "probe")]["measured_train_mb"] == 900.0
    assert rows[("b_tiny", "lora")]["status"] == "failed" and "not_a_key" in rows[("b_tiny", "lora")]["error"]
    assert sorted(calls) == ["a_tiny-lora", "a_tiny-probe", "b_tiny-probe"]  # only finished jobs predict
    out = Path(spec.dir)
    md = (out / "compare.md").read_text()
    assert "the metrics only prove the pipeline" in md and "| a_tiny | lora | done | 0.72 | 1.4 |" in md
    table = list(csv.DictReader(io.StringIO((out / "compare.csv").read_text())))
    assert len(table) == 4 and {"val_metric", "predict_windows_per_s", "planned_train_mb"} <= set(table[0])
    assert (out / "compare.png").stat().st_size > 10_000
    assert json.loads((out / "compare.json").read_text())["schema"] == "terrascale.compare/1"
