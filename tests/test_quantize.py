"""int8 renderer: precision plans, cache keys, engine choice and the build -> cache -> reload cycle.

The build cycle runs on a toy generator with the real generator's interface (a dataclass of source features,
`animate` with keypoints, a 3-D and 2-D convolution stack) so that both engines are exercised in seconds; the
real generator's int8 build is covered end to end in test_int8_inference.py.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from xtalker.render import CalibrationBatch, Int8Settings, QuantizationUnavailableError, quantize_generator
from xtalker.render import quantize as quantize
from xtalker.render.quantize import cache_key, key_digest


@dataclass
class ToyFeatures:
    volume: torch.Tensor  # (1, 4, 4, 12, 12)
    image: torch.Tensor  # (1, 8, 12, 12)


class ToyGenerator(nn.Module):
    """Same calling convention as models.generator.Generator, a few thousand parameters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Conv2d(3, 8, 3, padding=1)
        self.motion = nn.Conv3d(4, 4, 3, padding=1)
        self.third = nn.Conv2d(24, 24, 1)
        self.decoder = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 3, 3, padding=1))

    def encode_source(self, image: torch.Tensor) -> ToyFeatures:
        x = self.encoder(image)
        return ToyFeatures(volume=x[:, :4, None].repeat(1, 1, 4, 1, 1), image=x)

    def animate(self, features: ToyFeatures, kp_source: torch.Tensor, kp_driving: torch.Tensor) -> dict:
        b = kp_driving.shape[0]
        shift = (kp_driving - kp_source).mean((1, 2)).view(b, 1, 1, 1, 1)
        volume = self.motion(features.volume.expand(b, -1, -1, -1, -1) + shift)
        x = torch.cat([volume.flatten(1, 2), features.image.expand(b, -1, -1, -1) * (1 + shift[:, :, 0])], 1)
        return {"prediction": torch.sigmoid(self.decoder(self.third(x)))}


def toy_batches(gen: ToyGenerator, count: int = 4, batch: int = 2) -> list[CalibrationBatch]:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        features = gen.encode_source(torch.rand(1, 3, 12, 12, generator=g))
    kp = torch.rand(1, 15, 3, generator=g) - 0.5
    return [
        CalibrationBatch(features, kp.expand(batch, -1, -1), kp + 0.2 * torch.randn(batch, 15, 3, generator=g))
        for _ in range(count)
    ]


def test_plan_longest_prefix_wins_and_bad_plans_are_refused():
    s = Int8Settings()
    assert s.precision_of("decoder.G_middle_0.conv_0") == "int8"
    assert s.precision_of("dense_motion_network.hourglass.encoder.down_blocks.0.conv") == "bf16"
    assert s.precision_of("third.conv") == "fp32"
    assert s.precision_of("thirdparty") == "bf16"  # a prefix matches whole path components only
    assert Int8Settings(plan=(("", "fp32"),)).precision_of("decoder.fc") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        Int8Settings(plan=(("decoder", "fp16"),))
    with pytest.raises(ValueError, match="max_batch"):
        Int8Settings(max_batch=0)


def test_cache_key_follows_weights_size_and_settings_only():
    gen = ToyGenerator().eval()
    base = key_digest(cache_key(gen, 256, Int8Settings(), "inc"))
    assert base == key_digest(cache_key(ToyGenerator().eval(), 256, Int8Settings(), "inc"))
    assert base != key_digest(cache_key(gen, 512, Int8Settings(), "inc"))
    assert base != key_digest(cache_key(gen, 256, Int8Settings(calibration_tag="other"), "inc"))
    assert base != key_digest(cache_key(gen, 256, Int8Settings(), "torchao"))
    with torch.no_grad():
        gen.decoder[0].weight[0, 0, 0, 0] += 1e-3
    assert base != key_digest(cache_key(gen, 256, Int8Settings(), "inc"))


def test_engine_prefers_inc_then_torchao_then_says_what_to_install(monkeypatch):
    real = importlib.import_module
    missing: set[str] = set()

    def fake_import(name, *args, **kwargs):
        if any(name.startswith(m) for m in missing):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(quantize, "importlib", SimpleNamespace(import_module=fake_import))
    assert quantize.backend() == "inc"
    missing.add("neural_compressor")
    assert quantize.backend() == "torchao"
    missing.add("torchao")
    with pytest.raises(QuantizationUnavailableError, match="pip install 'neural-compressor\\[pt\\]'"):
        quantize.backend()


def test_missing_compiler_is_reported_before_any_work():
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-compiler-xyz",)}):
        with pytest.raises(QuantizationUnavailableError, match="C\\+\\+ compiler.*--precision bf16"):
            quantize.check_available()


@pytest.mark.parametrize("engine", ["inc", "torchao"])
def test_build_then_reload_from_cache(tmp_path, monkeypatch, engine):
    monkeypatch.setattr(quantize, "backend", lambda: engine)
    gen = ToyGenerator().eval()
    batches = toy_batches(gen)
    settings = Int8Settings(plan=(("", "bf16"), ("third", "fp32"), ("decoder", "int8")), max_batch=4)
    calls = []

    def calibration():
        calls.append(1)
        return batches

    q = quantize_generator(gen, calibration, 12, tmp_path, settings)
    assert q.precision == "int8" and not q.info.from_cache and calls == [1]
    assert q.info.convolutions["int8"] == {"decoder.0": 1, "decoder.2": 1}
    assert q.info.convolutions["bf16"] == {"motion": 1} and q.info.convolutions["fp32"] == {"third": 1}
    assert len(list(tmp_path.glob("generator-int8-*.pt2"))) == 1

    probe = toy_batches(gen, count=1, batch=3)[0]
    with torch.no_grad():
        expected = gen.animate(probe.features, probe.kp_source, probe.kp_driving)["prediction"]
        got = q.animate(probe.features, probe.kp_source, probe.kp_driving)["prediction"]
    assert got.shape == expected.shape == (3, 3, 12, 12)
    assert float((got - expected).abs().max()) < 0.03
    assert float((got - expected).abs().mean()) < 0.005

    again = quantize_generator(gen, calibration, 12, tmp_path, settings)
    assert again.info.from_cache and calls == [1]  # the calibration was not needed again
    with torch.no_grad():
        # One frame and more frames than max_batch: padding and splitting around the compiled batch range.
        single = again.animate(probe.features, probe.kp_source[:1], probe.kp_driving[:1])["prediction"]
        many = again.animate(probe.features, probe.kp_source[:1], probe.kp_driving.repeat(2, 1, 1))["prediction"]
    torch.testing.assert_close(single, got[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(many, got.repeat(2, 1, 1, 1), rtol=0, atol=1e-5)


def test_int8_conv3d_becomes_one_conv2d_over_depth_windows(tmp_path, monkeypatch):
    gen = ToyGenerator().eval()
    q = quantize_generator(gen, toy_batches(gen), 12, tmp_path, Int8Settings(plan=(("", "int8"),), max_batch=2))
    assert q.info.convolutions["int8"] == {"motion": 1, "third": 1, "decoder.0": 1, "decoder.2": 1}
    probe = toy_batches(gen, count=1)[0]
    with torch.no_grad():
        expected = gen.animate(probe.features, probe.kp_source, probe.kp_driving)["prediction"]
        got = q.animate(probe.features, probe.kp_source, probe.kp_driving)["prediction"]
    assert float((got - expected).abs().mean()) < 0.01


def test_corrupt_cache_entry_is_rebuilt(tmp_path):
    gen = ToyGenerator().eval()
    settings = Int8Settings(max_batch=2)
    first = quantize_generator(gen, toy_batches(gen), 12, tmp_path, settings)
    first.info.path.write_bytes(b"not a package")
    again = quantize_generator(gen, toy_batches(gen), 12, tmp_path, settings)
    assert not again.info.from_cache and again.info.path == first.info.path
