"""`--device`: resolution, refusals and precision rules, on a machine without a GPU (and one faked to have two)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xtalker import XTalker, cli, device
from xtalker.config import ConfigError, InferenceConfig
from xtalker.models.generator import Generator
from xtalker.parallel import JobError, Job
from xtalker.parallel.stages import on_cpu
from xtalker.render.precision import generator_precision, prepare_generator

REPO = Path(__file__).resolve().parents[1]


def config(**kw) -> InferenceConfig:
    return InferenceConfig(driven_audio=Path("a.wav"), source_image=Path("a.png"), **kw)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(device, "cuda_count", lambda: 2)


def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_an_error():
    assert device.resolve_device("auto") == "cpu" and device.resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="--device cuda: this torch .* sees no CUDA GPU; use --device cpu"):
        device.resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        device.resolve_device("gpu")


def test_gpus_when_there_are_some(two_gpus):
    assert device.resolve_device("auto") == "cuda:0" and device.resolve_device("cuda") == "cuda:0"
    assert device.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match="only 2 CUDA GPU"):
        device.resolve_device("cuda:2")


def test_precisions_are_bound_to_devices(two_gpus):
    with pytest.raises(ConfigError, match="--precision fp16 runs on CUDA GPUs only"):
        config(precision="fp16", device="cpu").validate()
    with pytest.raises(ConfigError, match="--precision int8 is a CPU path"):
        config(precision="int8", device="cuda").validate()
    with pytest.raises(ConfigError, match="--backend ipex is a CPU backend"):
        config(backend="ipex", device="cuda:1").validate()
    config(precision="fp16", device="cuda").validate()
    config(precision="int8", device="cpu").validate()


def test_parallel_jobs_run_on_cpu_cores(two_gpus, tmp_path):
    assert on_cpu(config()).device == "cpu" and on_cpu(config(device="cpu")).device == "cpu"
    with pytest.raises(JobError, match="parallel jobs .* render on CPU cores"):
        on_cpu(config(device="cuda"))
    from xtalker.parallel import stage_prepare

    with pytest.raises(JobError, match="render on CPU cores"):
        stage_prepare(config(device="cuda:0"), Job(tmp_path / "job"))


def test_fp16_generator_plan_has_its_own_name():
    generator = prepare_generator(Generator(), "fp16")
    assert generator_precision(generator) == "fp16"
    assert generator_precision(prepare_generator(Generator(), "bf16")) == "bf16"


def test_cli_and_api_refuse_a_gpu_that_is_not_there(synthetic_checkpoints, tmp_path, capsys):
    code = cli.main(["--driven_audio", "a.wav", "--source_image", "a.png", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: --device cuda: this torch") and err.count("\n") == 1
    code = cli.main(["--driven_audio", "a.wav", "--source_image", "a.png", "--precision", "fp16"])
    assert code == 1 and "use --precision bf16 on the CPU" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["--driven_audio", "a.wav", "--source_image", "a.png", "--cpu",
                                          "--device", "cuda"])
    assert cli.config_from_args(args).device == "cpu"  # upstream's --cpu still forces the CPU
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        XTalker(synthetic_checkpoints, device="cuda")


def test_doctor_says_what_gpus_torch_sees(synthetic_checkpoints):
    out = subprocess.run([sys.executable, str(REPO / "inference.py"), "doctor", "--checkpoint_dir",
                          str(synthetic_checkpoints)], capture_output=True, text=True, check=False).stdout
    assert "GPUs: none visible to torch (--device auto runs on the CPU)" in out
