"""bench/: the byte model, the presets, and `python -m bench` end to end on a tiny preset (CPU).

bn_cuda is replaced by a stand-in (nn.BatchNorm2d under the candidate's name) so these tests check
the harness itself and run whether or not the extension is built.
"""

import csv
import json

import pytest
import torch
from torch import nn

from bench import bandwidth, cli
from bench.impls import Impl, baseline_impls
from bench.records import Cell, Row
from bench.runner import rotation_count
from bench.shapes import EDGE_SHAPES, Shape, parse_shapes, preset_shapes, resnet50_bn_layers, resnet50_shapes

PASSES = ["fwd-train", "bwd", "fwd+bwd", "fwd-eval"]


def stand_in() -> Impl:
    return Impl("bn_cuda", "bn_cuda (stand-in)", nn.BatchNorm2d, candidate=True)


class BrokenBatchNorm(nn.BatchNorm2d):
    """A baseline whose forward always raises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("broken on purpose")


class OffByOneBatchNorm(nn.BatchNorm2d):
    """A fast-looking but wrong implementation: its output is shifted by one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1


def unbuildable(channels: int) -> nn.Module:
    raise ValueError(f"cannot build {channels} channels")


def read_csv(path):
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


# --- byte model -------------------------------------------------------------------------------


def test_min_bytes_per_pass():
    shape = Shape(2, 3, 4, 5)  # 120 elements
    assert bandwidth.min_bytes(shape.numel, 4, "fwd-train") == 2 * 480
    assert bandwidth.min_bytes(shape.numel, 4, "fwd-eval") == 2 * 480
    assert bandwidth.min_bytes(shape.numel, 4, "bwd") == 3 * 480
    assert bandwidth.min_bytes(shape.numel, 4, "fwd+bwd") == 5 * 480
    assert bandwidth.min_bytes(shape.numel, 2, "bwd") == 3 * 240


def test_row_speedup_bandwidth_and_limit():
    row = Row(
        Shape(2, 3, 4, 5),
        "nchw",
        "bwd",
        "float32",
        itemsize=4,
        rotation=2,
        cells={
            "bn_cuda": Cell("ok", median_s=1e-6),
            "torch": Cell("ok", median_s=3e-6),
            "broken": Cell.failed("RuntimeError"),
        },
    )
    assert row.min_bytes == 1440
    assert row.speedup("bn_cuda", "torch") == pytest.approx(3.0)
    assert row.speedup("bn_cuda", "broken") is None
    assert row.gbps("bn_cuda") == pytest.approx(1.44)
    # 1440 bytes at 2.88 GB/s take 0.5 us: half of the measured 1 us.
    assert row.pct_of_limit("bn_cuda", copy_gbps=2.88) == pytest.approx(50.0)
    assert row.pct_of_limit("torch", copy_gbps=2.88) == pytest.approx(50.0 / 3)
    assert row.gbps("broken") is None


def test_cell_flags():
    assert not Cell("ok", median_s=1.0, q1_s=0.9, q3_s=1.1).noisy
    assert Cell("ok", median_s=1.0, q1_s=0.9, q3_s=1.3).noisy
    assert Cell("ok", median_s=1.0, host_s=0.95).host_bound
    assert not Cell("ok", median_s=1.0, host_s=0.2).host_bound
    assert not Cell("ok", median_s=1.0).host_bound  # CPU: no separate host time
    assert not Cell.failed("RuntimeError").ok


def test_limit_note_states_the_three_pass_ceiling():
    assert "67%" in bandwidth.LIMIT_NOTE


def test_rotation_exceeds_the_cache():
    assert rotation_count(input_bytes=10 << 20, cache_bytes=32 << 20) * (10 << 20) >= 2 * (32 << 20)
    assert rotation_count(input_bytes=1 << 30, cache_bytes=32 << 20) == 2
    assert rotation_count(input_bytes=16, cache_bytes=32 << 20) == 64


# --- shapes -----------------------------------------------------------------------------------


def test_resnet50_layers_follow_torchvision_v1_5():
    layers = {name: (c, h, w) for name, c, h, w in resnet50_bn_layers()}
    assert len(layers) == 53  # 1 stem + 16 bottlenecks x 3 + 4 downsample
    assert layers["bn1"] == (64, 112, 112)
    assert layers["layer1.0.downsample.1"] == (256, 56, 56)
    # The stride is in the 3x3 conv: bn1 of a stage's first block sees the previous resolution.
    assert layers["layer2.0.bn1"] == (128, 56, 56)
    assert layers["layer2.0.bn2"] == (128, 28, 28)
    assert layers["layer3.0.bn1"] == (256, 28, 28)
    assert layers["layer4.0.bn1"] == (512, 14, 14)
    assert layers["layer4.2.bn3"] == (2048, 7, 7)


def test_resnet50_distinct_shapes():
    shapes = resnet50_shapes(batch=256)
    assert [(s.c, s.h, s.w) for s in shapes] == [
        (64, 112, 112),
        (64, 56, 56),
        (256, 56, 56),
        (128, 56, 56),
        (128, 28, 28),
        (512, 28, 28),
        (256, 28, 28),
        (256, 14, 14),
        (1024, 14, 14),
        (512, 14, 14),
        (512, 7, 7),
        (2048, 7, 7),
    ]
    assert all(s.n == 256 for s in shapes)
    assert shapes[0].origin == "resnet50 bn1 (x1)"


def test_presets_per_device():
    assert all(s.n == 256 for s in preset_shapes("resnet50", "cuda"))
    assert all(s.n == 32 for s in preset_shapes("resnet50", "cpu"))
    everything = preset_shapes("all", "cpu")
    assert len(everything) == 16
    assert [s.dims for s in everything[-4:]] == [s.dims for s in EDGE_SHAPES]
    assert [s.dims for s in EDGE_SHAPES] == [(8, 32, 512, 512), (64, 2048, 7, 7), (4096, 1024, 1, 1), (2, 64, 256, 256)]
    assert 3 <= len(preset_shapes("quick", "cpu")) <= 4
    with pytest.raises(ValueError, match="unknown preset"):
        preset_shapes("huge", "cpu")


def test_parse_shapes():
    assert [s.dims for s in parse_shapes("2x3x4x5, 8X1X1X1")] == [(2, 3, 4, 5), (8, 1, 1, 1)]
    for bad in ("2x3x4", "2x3x4x0", "ax3x4x5"):
        with pytest.raises(ValueError, match="bad shape"):
            parse_shapes(bad)


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, capsys):
    threads_before = torch.get_num_threads()
    argv = ["--device", "cpu", "--preset", "tiny", "--format", "nchw", "--threads", "1", "--budget", "0.02"]
    status = cli.main([*argv, "--out", str(tmp_path)], impls=[stand_in(), *baseline_impls("cpu")])
    assert status == 0
    assert torch.get_num_threads() == threads_before

    table = capsys.readouterr().out
    assert "| 3x5x4x7 | nchw | fwd-train |" in table
    assert "67%" in table
    assert table == (tmp_path / "table.md").read_text()

    columns, rows = read_csv(tmp_path / "results.csv")
    for name in ("bn_cuda", "torch", "torch_compile"):
        for key in ("status", "us", "gbps", "pct_of_limit", "max_err"):
            assert f"{name}_{key}" in columns
    assert {"shape", "format", "pass", "dtype", "min_bytes", "speedup_vs_torch", "speedup_vs_torch_compile"} <= set(
        columns
    )
    assert [r["pass"] for r in rows] == PASSES
    for r in rows:
        for name in ("bn_cuda", "torch", "torch_compile"):
            assert r[f"{name}_status"] == "ok", r
            assert float(r[f"{name}_us"]) > 0
            assert float(r[f"{name}_pct_of_limit"]) > 0
        assert float(r["speedup_vs_torch"]) > 0
        for name in ("bn_cuda", "torch", "torch_compile"):
            assert float(r[f"{name}_max_err"]) <= 1e-5  # against the float64 reference

    data = json.loads((tmp_path / "results.json").read_text())
    meta = data["metadata"]
    for key in ("device_name", "torch_version", "cuda_version", "bn_cuda_commit", "date", "command"):
        assert key in meta
    assert meta["threads"] == 1
    assert meta["dtype"] == "float32"
    assert meta["command"].startswith("python -m bench --device cpu --preset tiny")
    assert data["copy_gbps"] > 0
    assert len(data["rows"]) == 4
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failing_baselines_are_reported_not_dropped(tmp_path):
    impls = [
        stand_in(),
        Impl("torch", "nn.BatchNorm2d", nn.BatchNorm2d),
        Impl("broken", "broken forward", BrokenBatchNorm),
        Impl("unbuildable", "unbuildable", unbuildable),
    ]
    argv = ["--device", "cpu", "--shapes", "2x3x2x2", "--format", "both", "--passes", "fwd-train,fwd-eval"]
    status = cli.main([*argv, "--budget", "0.01", "--out", str(tmp_path)], impls=impls)
    assert status == 0

    _, rows = read_csv(tmp_path / "results.csv")
    assert len(rows) == 4  # 2 formats x 2 passes: no row dropped
    for r in rows:
        assert r["bn_cuda_status"] == "ok"
        assert r["torch_status"] == "ok"
        assert r["broken_status"] == "failed: RuntimeError"
        assert r["unbuildable_status"] == "failed: ValueError"
        assert r["broken_us"] == ""
        assert r["speedup_vs_broken"] == ""
        assert float(r["speedup_vs_torch"]) > 0
    table = (tmp_path / "table.md").read_text()
    assert "failed (RuntimeError)" in table
    assert "failed (ValueError)" in table
    cells = json.loads((tmp_path / "results.json").read_text())["rows"][0]["cells"]
    assert cells["broken"]["error_detail"] == "broken on purpose"


def test_failing_candidate_keeps_baseline_times(tmp_path):
    impls = [
        Impl("bn_cuda", "bn_cuda (broken)", BrokenBatchNorm, candidate=True),
        Impl("torch", "nn.BatchNorm2d", nn.BatchNorm2d),
    ]
    argv = ["--device", "cpu", "--shapes", "2x3x2x2", "--format", "nhwc", "--passes", "bwd", "--budget", "0.01"]
    assert cli.main([*argv, "--out", str(tmp_path)], impls=impls) == 0
    _, rows = read_csv(tmp_path / "results.csv")
    assert rows[0]["bn_cuda_status"] == "failed: RuntimeError"
    assert float(rows[0]["torch_us"]) > 0
    assert rows[0]["speedup_vs_torch"] == ""


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--shapes", "2x3x4"], id="bad-shape"),
        pytest.param(["--passes", "fwd-train,sideways"], id="bad-pass"),
        pytest.param(["--threads", "0"], id="bad-threads"),
        pytest.param(["--baselines", "torch,cudnn"], id="unknown-baseline"),
        pytest.param(["--baselines", ","], id="no-baseline"),
        pytest.param(
            ["--device", "cuda"],
            id="no-gpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_cli_rejects_bad_options(tmp_path, capsys, extra):
    impls = [stand_in(), Impl("torch", "nn.BatchNorm2d", nn.BatchNorm2d)]
    status = cli.main(["--device", "cpu", "--preset", "tiny", "--out", str(tmp_path), *extra], impls=impls)
    assert status == 2
    assert "bench: error:" in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()


def test_baselines_option_keeps_only_the_named_baselines(tmp_path):
    impls = [stand_in(), *baseline_impls("cpu")]
    argv = ["--device", "cpu", "--preset", "tiny", "--format", "nchw", "--passes", "fwd-eval", "--budget", "0.01"]
    assert cli.main([*argv, "--baselines", "torch", "--out", str(tmp_path)], impls=impls) == 0
    columns, rows = read_csv(tmp_path / "results.csv")
    assert "torch_us" in columns and "bn_cuda_us" in columns
    assert not any(column.startswith("torch_compile") for column in columns)
    assert float(rows[0]["speedup_vs_torch"]) > 0


def test_wrong_results_are_flagged(tmp_path):
    impls = [
        Impl("bn_cuda", "bn_cuda (wrong)", OffByOneBatchNorm, candidate=True),
        Impl("torch", "nn.BatchNorm2d", nn.BatchNorm2d),
    ]
    argv = ["--device", "cpu", "--shapes", "4x3x2x2", "--format", "nchw", "--passes", "fwd-eval", "--budget", "0.01"]
    assert cli.main([*argv, "--out", str(tmp_path)], impls=impls) == 0
    _, rows = read_csv(tmp_path / "results.csv")
    assert float(rows[0]["bn_cuda_max_err"]) > 0.1
    assert float(rows[0]["torch_max_err"]) < 1e-6
    table = (tmp_path / "table.md").read_text()
    assert "| 4x3x2x2 | nchw | fwd-eval | " in table
    assert "float64 reference" in table
    row = next(line for line in table.splitlines() if line.startswith("| 4x3x2x2 |"))
    assert row.split("|")[4].strip().endswith("!")  # the candidate's time carries the mismatch mark


def test_geomean_summary_uses_the_faster_baseline_per_row(tmp_path):
    from bench.geomean import summarize

    path = tmp_path / "results.csv"
    path.write_text(
        "shape,format,pass,speedup_vs_torch,speedup_vs_torch_compile\n"
        "a,nchw,fwd-train,4.0,1.0\n"
        "b,nchw,fwd-train,1.0,0.25\n"
        "c,nchw,fwd-train,2.0,\n"  # a failed baseline: left out
    )
    lines = summarize(str(path))
    assert lines[2] == "| fwd-train | nchw | 2.00x | 0.50x | 0.25x (b) |"
    assert len(lines) == 3


@pytest.mark.parametrize("pass_name", ["eval", "train", "bwd", "module_train", "module_fwd_bwd"])
def test_op_time_prints_one_time(pass_name, capsys):
    """bench.op_time (run by scripts/compare_builds.sh in two builds) prints one positive number."""
    from bench import op_time

    assert op_time.main(["4x3x5x5", "nhwc", "float32", pass_name, "--reps", "2"]) == 0
    assert float(capsys.readouterr().out) > 0


def test_op_time_ab_compares_streaming_bounds(capsys):
    """--ab-stream-mb prints the best time under the kernels' own streaming bounds, under the
    given one, and their ratio, and leaves the setting in force as it was."""
    from bench import op_time
    from bn_cuda import _C

    before = _C.cpu_stream_bounds()
    assert op_time.main(["4x64x4x4", "nhwc", "float32", "bwd", "--reps", "4", "--ab-stream-mb", "0"]) == 0
    default, other, ratio = (float(v) for v in capsys.readouterr().out.split())
    assert default > 0 and other > 0 and ratio > 0  # times printed rounded, the ratio from the exact ones
    assert _C.cpu_stream_bounds() == before
    with pytest.raises(SystemExit):
        op_time.main(["4x3x5x5", "nhwc", "float32", "bwd", "--ab-stream-mb", "-1"])
