"""bench/gpu_check.py: the CPU smoke run writes every section's JSON and the markdown target (never the real
docs/benchmarks.md), and a failing or overrunning section is recorded without stopping the others."""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "docs" / "benchmarks.md"


@pytest.fixture
def gpu_check(monkeypatch):
    """bench/gpu_check.py as a module (registered while loading: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    return module


def _numbers(value):
    """Every int/float inside a JSON value (booleans excluded)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def _check_rows(rows, keys):
    assert rows
    for row in rows:
        assert "error" not in row and "skipped" not in row, row
        assert keys <= row.keys(), (keys - row.keys(), row)


def test_smoke_run_writes_every_section(gpu_check, tmp_path):
    before = BENCHMARKS.read_bytes()
    out, markdown = tmp_path / "out", tmp_path / "benchmarks.md"
    gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out), "--markdown", str(markdown),
                    "--cache-dir", str(tmp_path / "cache")])
    assert BENCHMARKS.read_bytes() == before

    sections = {name: json.loads((out / f"{name}.json").read_text()) for name in gpu_check.SECTIONS}
    for name, data in sections.items():
        assert "error" not in data, (name, data["error"])
        assert data["section"] == name and data["smoke"] is True
        assert all(math.isfinite(n) for n in _numbers(data)), name
    assert {"torch", "cuda_available", "device", "matmul_flops_per_s"} <= sections["environment"].keys()
    assert sections["environment"]["matmul_flops_per_s"] > 0
    _check_rows(sections["mfu"]["rows"], {"model", "compile", "tokens_per_s", "flops_per_s", "mfu"})
    assert {r["model"] for r in sections["mfu"]["rows"]} == {"loopmdm-small", "mdlm-small"}
    _check_rows(sections["memory"]["rows"], {"checkpointing", "loops", "peak_bytes"})
    assert sorted({r["loops"] for r in sections["memory"]["rows"]}) == [1, 4, 12, 24]
    _check_rows(sections["sampling"]["rows"], {"method", "batch", "tokens_per_s", "forward_passes"})
    assert {r["method"] for r in sections["sampling"]["rows"]} == {"bd3-kv-cache", "mdlm"}
    race = sections["race"]
    assert race["flops_budget"] > 0
    for run in race["runs"].values():
        assert run["points"] and all({"flops", "tokens", "nelbo"} <= p.keys() for p in run["points"])
        assert 0 < run["points"][-1]["nelbo"] < 20

    text = markdown.read_text()
    assert text.count("<!-- gpu-check:start -->") == 1 and text.count("<!-- gpu-check:end -->") == 1
    for title in ("Environment", "bf16 training MFU", "Peak training memory against S", "Sampling speed",
                  "LoopMDM vs MDM at equal FLOPs"):
        assert f"**{title}**" in text
    assert "failed" not in text and "not run" not in text

    # numbers fetched from another machine render into a markdown file naming that run's command and machine
    elsewhere = tmp_path / "elsewhere.md"
    gpu_check.main(["--render-only", "--out", str(out), "--markdown", str(elsewhere)])
    assert elsewhere.read_text() == text


def test_failing_and_overrunning_sections_are_recorded_and_the_rest_still_run(gpu_check, tmp_path, monkeypatch):
    def broken(ctx, result):
        raise ValueError("no such thing")

    def endless(ctx, result):
        result["rows"] = [{"kept": 1}]
        while True:
            time.sleep(0.01)

    monkeypatch.setitem(gpu_check.RUNNERS, "environment", broken)
    monkeypatch.setitem(gpu_check.RUNNERS, "mfu", endless)
    monkeypatch.setitem(gpu_check.SMOKE.budgets, "mfu", 0.4)  # hard limit 0.5 s
    out, markdown = tmp_path / "out", tmp_path / "benchmarks.md"
    markdown.write_text("# Benchmarks\n\nkept\n")
    gpu_check.main(["--smoke", "--device", "cpu", "--out", str(out), "--markdown", str(markdown),
                    "--sections", "environment", "mfu", "memory"])
    assert "ValueError: no such thing" in json.loads((out / "environment.json").read_text())["error"]
    mfu = json.loads((out / "mfu.json").read_text())
    assert "SectionTimeout" in mfu["error"] and mfu["seconds"] < 30
    assert mfu["rows"] == [{"kept": 1}]  # what a section measured before it failed is kept
    memory = json.loads((out / "memory.json").read_text())
    assert "error" not in memory and memory["rows"]
    text = markdown.read_text()
    assert "kept" in text and "**Environment**" in text and "failed: ValueError" in text
    assert "**Sampling speed**: not run." in text


def test_full_check_refuses_to_run_without_cuda(gpu_check, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--markdown", str(tmp_path / "b.md")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "b.md").exists()
