"""Every network on the run's device, uint8 made on the device, `--batch_size auto`: checked on the CPU.

Without a GPU the plumbing is shown with torch's "meta" device (weights without data): a network asked for on
"meta" lands there, so the device is passed through and not taken from a global. The CUDA-only paths (the pinned
copy, the free-memory query) are exercised with CUDA where there is one, and with a mocked memory query here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_wav

from xtalker import XTalker, cli, device
from xtalker.config import ConfigError, InferenceConfig
from xtalker.finish import Finisher, FinishSettings
from xtalker.finish.enhance import make_enhancer
from xtalker.finish.restore import FFHQ_TEMPLATE_512
from xtalker.media import load_audio
from xtalker.models.gfpgan import FILE_NAME as GFPGAN_FILE
from xtalker.models.parsenet import FILE_NAME as PARSENET_FILE
from xtalker.models.retinaface import FILE_NAME as RETINAFACE_FILE
from xtalker.parallel.stages import on_cpu
from xtalker.pipeline import generate
from xtalker.preprocess import get_backend
from xtalker.presets import PresetError, load_presets
from xtalker.render.frames import PinnedPool, to_uint8, uint8_nhwc
from xtalker.warm import Networks, network_key

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
MIB = 2**20


def config(**kw) -> InferenceConfig:
    return InferenceConfig(driven_audio=Path("a.wav"), source_image=Path("a.png"), **kw)


def devices_of(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


# --- uint8 on the device -----------------------------------------------------------------------------------------


def float_frames() -> torch.Tensor:
    """Random frames in and beyond [0, 1], plus values whose float32 product with 255 lies exactly on .5."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.2, 1.2, size=(2, 3, 16, 16)).astype(np.float32)
    halves = []
    for k in range(256):  # x with fl(x * 255) == k + 0.5 (round half to even decides these)
        x0 = np.float32((k + 0.5) / 255)
        for candidate in (x0, np.nextafter(x0, np.float32(0)), np.nextafter(x0, np.float32(1))):
            if candidate * np.float32(255) == np.float32(k + 0.5):
                halves.append(candidate)
    assert len(halves) > 100
    special = [0.0, 1.0, -0.0, -1e-8, 1 + 1e-7, 2.0, -3.0, np.inf, -np.inf, 0.5 / 255, 254.5 / 255]
    values = np.array(halves + special, np.float32)
    x.reshape(-1)[: len(values)] = values
    return torch.from_numpy(x)


def test_uint8_on_torch_is_the_numpy_conversion_bit_for_bit():
    x = float_frames()
    expected = to_uint8(x.numpy())
    assert expected.shape == (2, 16, 16, 3) and expected.dtype == np.uint8
    got = uint8_nhwc(x)
    assert got.is_contiguous() and got.dtype == torch.uint8
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(to_uint8(x), expected)  # a CPU tensor takes the numpy path
    half = x.clamp(-2, 2).half()  # fp16 frames convert exactly to float32 on both paths
    np.testing.assert_array_equal(uint8_nhwc(half).numpy(), to_uint8(half))
    # even rounding really is exercised: 0.5 -> 0, 1.5 -> 2
    on_half = x.reshape(-1)[:4] * 255.0
    assert set(on_half.frac().abs().tolist()) == {0.5}


def test_pinned_pool_lends_buffers_until_their_arrays_are_gone():
    made = []

    def allocate(shape):
        made.append(shape)
        return torch.zeros(shape, dtype=torch.uint8)

    pool = PinnedPool(per_shape=2, shapes=2, allocate=allocate)
    first = pool.take((2, 4, 4, 3))
    assert first is not None
    buffer, array = first
    assert array.shape == (2, 4, 4, 3) and np.shares_memory(array, buffer.numpy())
    view = array[0, ..., ::-1]  # a view keeps the array, so the buffer, lent
    del first, array
    second = pool.take((2, 4, 4, 3))
    assert second is not None and second[0] is not buffer
    assert pool.take((2, 4, 4, 3)) is None  # both lent: the caller copies to ordinary memory
    del view
    third = pool.take((2, 4, 4, 3))
    assert third is not None and third[0] is buffer  # given back, reused
    assert len(made) == 2
    pool.take((1, 4, 4, 3))
    pool.take((3, 4, 4, 3))  # a third shape: the least recently used one goes
    assert len(pool) <= 2 * 2 and (2, 4, 4, 3) not in pool._buffers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_uint8_on_cuda_matches_the_cpu_and_held_frames_stay_intact():
    x = float_frames()
    expected = to_uint8(x)
    held = [to_uint8(x.cuda() * 0 + x.cuda()) for _ in range(6)]  # more than the pool lends: the rest are copies
    for frames in held:
        np.testing.assert_array_equal(frames, expected)
    other = to_uint8(torch.rand(2, 3, 16, 16, device="cuda"))  # reuses nothing still held
    for frames in held:
        np.testing.assert_array_equal(frames, expected)
    assert other.shape == expected.shape


# --- every network on the run's device --------------------------------------------------------------------------


def test_landmark_networks_follow_the_device(aux_checkpoints):
    cpu = get_backend("upstream", aux_checkpoints, device="cpu")
    assert devices_of(cpu.detector.net) == devices_of(cpu.fan.net) == {"cpu"}
    assert cpu.detector.device.type == cpu.fan.device.type == "cpu"
    meta = get_backend("upstream", aux_checkpoints, device="meta")  # the GPU stand-in: passed through, not global
    assert devices_of(meta.detector.net) == devices_of(meta.fan.net) == {"meta"}


def test_mediapipe_takes_the_device_and_stays_on_the_cpu():
    from xtalker.preprocess.landmarks.base import unavailable_reason

    if reason := unavailable_reason("mediapipe"):
        pytest.skip(reason)
    assert get_backend("mediapipe", device="meta").name == "mediapipe"  # TFLite: the device is not used


def test_enhancer_networks_follow_the_device_one_copy_per_device(aux_checkpoints):
    networks = Networks()
    with networks.active():
        cpu = make_enhancer("gfpgan", "detect", aux_checkpoints, "bf16", device="cpu")
        again = make_enhancer("gfpgan", "detect", aux_checkpoints, "bf16", device="cpu")
        assert networks.take_loaded() == ["gfpgan", "retinaface", "parsenet"]
        meta = make_enhancer("gfpgan", "detect", aux_checkpoints, "bf16", device="meta")
        assert networks.take_loaded() == ["gfpgan", "retinaface", "parsenet"]  # the cpu copies are not reused
    assert again.restorer.net is cpu.restorer.net and meta.restorer.net is not cpu.restorer.net
    for enhancer, where in ((cpu, "cpu"), (meta, "meta")):
        assert devices_of(enhancer.restorer.net) == devices_of(enhancer.detector.net) == {where}
        assert devices_of(enhancer.parsenet) == {where}
    kept = set(networks._kept)
    for kind, name in (("gfpgan", GFPGAN_FILE), ("retinaface", RETINAFACE_FILE), ("parsenet", PARSENET_FILE)):
        assert {(kind, network_key(aux_checkpoints / name, d)) for d in ("cpu", "meta")} <= kept


def test_finish_settings_carry_the_device(aux_checkpoints):
    points = (FFHQ_TEMPLATE_512 / 2).astype(np.float32)
    for where in ("cpu", "meta"):
        settings = FinishSettings(enhancer="gfpgan", checkpoint_dir=aux_checkpoints, precision="bf16", device=where)
        finish = Finisher(settings, 256, (256, 256), None, points, seed=1)
        enhance = dict(finish.stages)["enhance"]
        assert devices_of(enhance.restorer.net) == {where}
    assert FinishSettings().device == "cpu"


# --- --batch_size auto ------------------------------------------------------------------------------------------


def test_auto_batch_on_the_cpu_is_the_default_batch():
    for size in (256, 512):
        for precision in ("fp32", "bf16", "int8"):
            assert device.auto_batch_size("cpu", size, precision) == 2 == InferenceConfig.batch_size


@pytest.fixture
def gpu_memory(monkeypatch):
    """A fake GPU: set `free`, `reserved`, `allocated` (bytes) on the returned dict."""
    state = {"free": 0, "reserved": 0, "allocated": 0, "asked": []}

    def mem_get_info(index):
        state["asked"].append(index)
        return state["free"], 141 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: state["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: state["allocated"])
    return state


def test_auto_batch_on_cuda_is_what_fits_the_free_memory(gpu_memory):
    gpu_memory["free"] = 10 * GIB  # 8 GiB usable after the 20 % headroom
    # per frame: table MiB x 1.25 overhead
    assert device.auto_batch_size("cuda:0", 256, "fp32") == int(8 * 1024 // (313 * 1.25)) == 20
    assert device.auto_batch_size("cuda:0", 256, "fp16") == int(8 * 1024 // (163 * 1.25)) == 40
    assert device.auto_batch_size("cuda:0", 512, "fp32") == 5
    assert device.auto_batch_size("cuda:1", 512, "bf16") == 10
    assert gpu_memory["asked"][-1] == torch.device("cuda:1")
    gpu_memory.update(reserved=6 * GIB, allocated=1 * GIB)  # torch's cache holds 5 GiB it can reuse
    assert device.auto_batch_size("cuda:0", 512, "fp32") == int(15 * 1024 * 0.8 // (1251 * 1.25)) == 7
    gpu_memory.update(free=1000 * GIB, reserved=0, allocated=0)
    assert device.auto_batch_size("cuda:0", 256, "bf16") == device.MAX_AUTO_BATCH == 64
    gpu_memory["free"] = 100 * MIB
    assert device.auto_batch_size("cuda:0", 512, "fp32") == 1  # never 0: a batch that does not fit fails clearly


def test_auto_parses_from_the_cli_presets_and_the_api(tmp_path, monkeypatch, synthetic_checkpoints):
    base = ["--driven_audio", "a.wav", "--source_image", "a.png"]
    args = cli.build_parser().parse_args([*base, "--batch_size", "auto"])
    assert cli.config_from_args(args).batch_size == "auto"
    assert cli.config_from_args(cli.build_parser().parse_args([*base, "--batch_size", "3"])).batch_size == 3
    presets = tmp_path / "presets.yaml"
    presets.write_text("gpu:\n  batch_size: auto\n  precision: bf16\n")
    monkeypatch.setenv("XTALKER_PRESETS", str(presets))
    assert load_presets()["gpu"].settings["batch_size"] == "auto"
    chosen = cli.config_from_args(cli.build_parser().parse_args([*base, "--preset", "gpu"]))
    assert chosen.batch_size == "auto"
    chosen.validate()
    presets.write_text("gpu:\n  batch_size: fast\n")
    with pytest.raises(PresetError, match="batch_size must be int or auto, got 'fast'"):
        load_presets()
    monkeypatch.delenv("XTALKER_PRESETS")
    xt = XTalker(synthetic_checkpoints, warm=False, batch_size="auto")
    assert xt.config("a.png", "a.wav").batch_size == "auto"
    xt.config("a.png", "a.wav").validate()


def test_bad_batch_sizes_are_one_clear_line(capsys):
    for bad in ("fast", "Auto", "4", 0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="--batch_size must be a whole number of at least 1 or auto, got"):
            config(batch_size=bad).validate()
    config(batch_size="auto").validate()
    config(batch_size=np.int64(3)).validate()
    code = cli.main(["--driven_audio", "a.wav", "--source_image", "a.png", "--batch_size", "fast"])
    err = capsys.readouterr().err
    assert code == 1 and err == "error: --batch_size must be a whole number of at least 1 or auto, got 'fast'\n"


def test_parallel_jobs_render_auto_with_the_cpu_batch():
    assert on_cpu(config(batch_size="auto")).batch_size == 2
    assert on_cpu(config(batch_size="auto", device="cpu")).device == "cpu"
    same = config(batch_size=3, device="cpu")
    assert on_cpu(same) is same


def test_auto_on_the_cpu_renders_the_batch_2_video(synthetic_checkpoints, tmp_path):
    speech = load_audio(REPO / "examples" / "driven_audio" / "hello.wav")
    audio = write_wav(tmp_path / "two.wav", speech[4000 : 4000 + 2 * 640 + 100])  # one batch of 2 (auto as 1: two)
    networks = Networks()
    results = {}
    for batch in (2, "auto"):
        run = InferenceConfig(driven_audio=audio, source_image=REPO / "examples" / "source_image" / "astronaut.png",
                              checkpoint_dir=synthetic_checkpoints, output=tmp_path / f"batch_{batch}.mp4", seed=4,
                              batch_size=batch, precision="bf16", device="cpu")
        results[batch] = generate(run, networks)
    auto = results["auto"]
    assert auto.batch_size == results[2].batch_size == 2 and auto.profile.as_dict()["batch_size"] == 2
    assert "(batch 2)" in auto.profile.table()
    assert auto.output.read_bytes() == results[2].output.read_bytes()
