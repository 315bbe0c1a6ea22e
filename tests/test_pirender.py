"""PIRender renderer (issue 16): the official file's layout and loader errors, the synthetic weights' digest, the
SadTalker PIRender path's input/output conventions, and golden parity of both PIRender case kinds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import golden_dir, write_wav

from xtalker.checkpoints import CheckpointError
from xtalker.models import pirender as model
from xtalker.render import pirender
from xtalker.synthetic import pirender as synthetic

MANIFEST = golden_dir().parent / "pirender_manifest.json"


def _manifest_entry() -> dict:
    if not MANIFEST.is_file():
        pytest.skip(f"{MANIFEST} not present")
    return json.loads(MANIFEST.read_text())["files"][model.FILE_NAME]


@pytest.fixture(scope="module")
def state(pirender_checkpoint) -> dict[str, torch.Tensor]:
    return torch.load(str(pirender_checkpoint), map_location="cpu", weights_only=True)[model.TOP_KEY]


# ---- layout and synthetic weights ----------------------------------------------------------------


def test_layout_matches_reference_manifest():
    entry = _manifest_entry()
    expected = {k: tuple(v["shape"]) for k, v in entry["tensors"][model.TOP_KEY].items()}
    assert model.official_layout() == expected
    assert sum(math.prod(s) for s in expected.values()) == entry["trainable_parameters"] == 22_519_109
    dead = [k for k in expected if model.is_dead(k)]
    assert len(dead) == 48 and sum(math.prod(expected[k]) for k in dead) == 3_183_104
    # the network builds everything else and nothing more
    built = {k: tuple(v.shape) for k, v in model.FaceGenerator().state_dict().items()}
    assert built == {k: s for k, s in expected.items() if k not in dead}


def test_synthetic_file_matches_manifest_digest(pirender_checkpoint):
    entry = _manifest_entry()
    assert synthetic.DIGEST == entry["synthetic_content_digest"]
    assert synthetic.read_back_digest(pirender_checkpoint) == synthetic.DIGEST
    top = torch.load(str(pirender_checkpoint), map_location="cpu", weights_only=True)
    assert list(top) == [model.TOP_KEY, "current_epoch", "current_iteration"]
    assert (top["current_epoch"], top["current_iteration"]) == (190, 400000)


def test_synthetic_rule_ranges(state):
    w = state["mapping_net.first.0.weight"].double()
    a = math.sqrt(3 / (73 * 7))
    assert float(w[:, :70].abs().max()) <= a and float(w[:, 70:].abs().max()) <= 0.01 * a
    assert float(w[:, 70:].abs().max()) > 0.009 * a
    gamma = state["warpping_net.hourglass.encoder.encoder0.norm_0.mlp_gamma.weight"]
    assert float(gamma.abs().max()) <= 0.5 * math.sqrt(3 / 128)
    final_bias = state["editing_net.decoder.final.model.0.bias"]
    assert bool(((final_bias >= 0.6) & (final_bias <= 0.8)).all())
    ln = state["warpping_net.flow_out.0.weight"]
    assert ln.shape == (256, 1, 1) and bool(((ln >= 0.8) & (ln <= 1.2)).all())


def test_ensure_keeps_an_existing_file(tmp_path):
    (tmp_path / model.FILE_NAME).write_bytes(b"user file")
    assert synthetic.ensure_pirender(tmp_path).read_bytes() == b"user file"


# ---- loader errors -------------------------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        model.read_state(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_names_the_file_and_what_to_do(tmp_path):
    message = _error(tmp_path / model.FILE_NAME)
    assert model.FILE_NAME in message and "--pirender" in message


def test_truncated_file(tmp_path, pirender_checkpoint):
    path = tmp_path / model.FILE_NAME
    path.write_bytes(pirender_checkpoint.read_bytes()[: 40 * 2**20])
    message = _error(path)
    assert str(path) in message and "truncated" in message


def test_renamed_and_missing_keys(tmp_path, state):
    renamed = OrderedDict((k.replace("editing_net.decoder.final.", "editing_net.decoder.last."), v) for k, v in state.items())
    path = tmp_path / "renamed.pt"
    torch.save({model.TOP_KEY: renamed, "current_epoch": 190}, path)
    message = _error(path)
    assert str(path) in message
    assert "missing keys: editing_net.decoder.final.model.0.bias" in message
    assert "unexpected keys: editing_net.decoder.last.model.0.bias" in message
    # the discarded branch's tensors are never used, but a file without them is not the official layout
    no_dead = {k: v for k, v in state.items() if not model.is_dead(k)}
    path = tmp_path / "no_dead.pt"
    torch.save({model.TOP_KEY: no_dead}, path)
    message = _error(path)
    assert "missing keys: editing_net.decoder.res0.res0.conv1.bias, " in message and "(+45 more)" in message


def test_wrong_shape(tmp_path, state):
    bad = dict(state)
    bad["mapping_net.first.0.weight"] = bad["mapping_net.first.0.weight"][:, :70]
    path = tmp_path / "wrong_shape.pt"
    torch.save({model.TOP_KEY: bad}, path)
    assert "mapping_net.first.0.weight is (256, 70, 7)" in _error(path)


def test_wrong_kind_of_file(tmp_path):
    mapping_like = tmp_path / "mapping_00229-model.pth.tar"
    torch.save({"mapping": {"first.0.weight": torch.zeros(2, 70, 7)}, "epoch": 229}, mapping_like)
    message = _error(mapping_like)
    assert "no 'net_G_ema' state dict (found: epoch, mapping)" in message
    from safetensors.torch import save_file

    packed = tmp_path / "SadTalker_V0.0.2_256.safetensors"
    save_file({"generator.x": torch.zeros(2)}, str(packed))
    assert "no 'net_G_ema' state dict" in _error(packed)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    assert "not a readable torch checkpoint" in _error(text)


def test_code_in_the_pickle_is_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save({model.TOP_KEY: {}, "fn": math.sqrt}, path)
    assert "weights_only=True refused it: Unsupported global: GLOBAL math.sqrt" in _error(path)


# ---- SadTalker's PIRender path conventions --------------------------------------------------------


def test_driving_rows_are_73_channels_with_the_source_triple():
    rng = np.random.default_rng(0)
    generated = rng.normal(size=(5, 70)).astype(np.float32)
    first = rng.normal(size=(1, 73)).astype(np.float32)
    first[0, 70:] = (1.3, 127.4, 108.9)
    seq = pirender.driving_sequence(generated, first, expression_scale=0.5)
    assert seq.coeffs.shape == (5, 73)
    np.testing.assert_array_equal(seq.coeffs[:, :64], generated[:, :64] * np.float32(0.5))
    np.testing.assert_array_equal(seq.coeffs[:, 64:70], generated[:, 64:70])
    np.testing.assert_array_equal(seq.coeffs[:, 70:], np.broadcast_to(first[0, 70:], (5, 3)))
    still = pirender.driving_sequence(generated, first, still=True)
    np.testing.assert_array_equal(still.coeffs[:, 64:], np.broadcast_to(first[0, 64:], (5, 9)))
    assert pirender.source_semantics(first).shape == (1, 73, 27)
    assert pirender.rendered_frame_count(5, 2) == 6 and pirender.rendered_frame_count(4, 2) == 4


def test_frames_clip_the_negative_half():
    x = torch.tensor([-1.0, -0.4, 0.0, 0.3 / 255, 1.7 / 255, 0.25, 1.0]).reshape(1, 1, 1, 7).expand(1, 3, 1, 7)
    frames = pirender.to_frames(x)
    assert frames.shape == (1, 1, 7, 3)
    assert frames[0, 0, :, 0].tolist() == [0, 0, 0, 0, 2, 64, 255]


# Golden parity of both PIRender kinds runs in test_parity.py (every golden case, dispatched on its metadata).


def test_write_all_reports_the_digest(tmp_path):
    assert synthetic.write_all_pirender(tmp_path, verify=True) == {model.FILE_NAME: True}
    assert (tmp_path / f".{model.FILE_NAME}.digest").read_text() == synthetic.DIGEST


def test_bf16_editing_net_stays_close(pirender_checkpoint, golden):
    """bf16 in the editing net only: the reference measured 45.9 dB against fp32 (38 dB with bf16 everywhere)."""
    from safetensors.torch import load_file

    from xtalker.render import source_image

    case = load_file(str(golden / "pirender_net_a.safetensors"))
    renderer = pirender.PIRenderRenderer.from_checkpoint(pirender_checkpoint, precision="bf16")
    assert renderer.precision == "bf16"
    source = renderer.prepare(source_image(case["input.source_image_u8_nhwc"][0].numpy()))
    fake = renderer.render(source, case["input.target_semantics"][:1])
    expected = case["out.fake_image"][:1]
    mse = float(((fake.clamp(0, 1).double() - expected.clamp(0, 1).double()) ** 2).mean())
    assert 10 * math.log10(1 / mse) > 42
    assert 0 < float((fake - expected).abs().max()) < 0.1


# ---- end to end: --facerender pirender --------------------------------------------------------------------

PORTRAIT = Path(__file__).resolve().parents[1] / "examples" / "source_image" / "astronaut.png"
SPEECH = PORTRAIT.parents[1] / "driven_audio" / "hello.wav"


@pytest.fixture(scope="module")
def warm():
    from xtalker.warm import Networks

    return Networks()


@pytest.fixture(scope="module")
def speech7(tmp_path_factory) -> Path:
    """7 video frames (an odd count: upstream would pad it to 8 at batch 2) and 300 samples that make no frame."""
    from xtalker.media import load_audio

    return write_wav(tmp_path_factory.mktemp("audio") / "speech7.wav", load_audio(SPEECH)[4000 : 4000 + 7 * 640 + 300])


def _config(ckpt, audio, out, **kw):
    from xtalker.config import InferenceConfig

    kw.setdefault("compile", False)  # eager: torch.compile's first build takes a minute (test_compiled_forward_...)
    return InferenceConfig(driven_audio=audio, source_image=PORTRAIT, checkpoint_dir=ckpt, output=out, seed=3,
                           facerender="pirender", **kw)


def _frames(path) -> np.ndarray:
    from xtalker.media import iter_video_frames

    return np.stack(list(iter_video_frames(path)[1]))


def test_crop_mode_video_is_the_audio_long_and_the_upstream_loop_frames(tmp_path, pirender_checkpoint, speech7, warm):
    from xtalker.pipeline import generate, load_head, load_speech, prepare_run, render_frames
    from xtalker.profiling import Profiler
    from xtalker.render.inputs import batched_target

    config = _config(pirender_checkpoint.parent, speech7, tmp_path / "crop.mp4")
    result = generate(config, warm)
    assert result.frames == 7 and result.size_wh[0] == 256  # cut to the audio: upstream writes 8
    assert _frames(result.output).shape[0] == 7
    # The pipeline's batches are the frames of upstream's (batch, N) loop over the same windows.
    prof = Profiler()
    with warm.active():
        head = load_head(config, prof)
        run = prepare_run(config, head, load_speech(config, prof), 3, prof)
        ours = np.concatenate(list(render_frames(head, run, 0, run.num_frames, 2, prof)))
    assert run.sequence.channels == 73 and isinstance(head.renderer, pirender.PIRenderRenderer)
    target = batched_target(run.sequence, 2)
    loop = head.renderer.render_clip(run.source.image, target.semantics).flatten(0, 1)
    assert len(loop) == pirender.rendered_frame_count(7, 2) == 8
    upstream = pirender.to_frames(loop)
    assert np.abs(ours.astype(int) - upstream[:7]).max() <= 1
    assert np.array_equal(upstream[7], upstream[6])  # the padded frame upstream keeps: the last one again


def test_full_still_mode_pastes_back_and_workers_match(tmp_path, pirender_checkpoint, speech7, warm):
    import cv2

    from xtalker.parallel import Job
    from xtalker.parallel.stages import stage_merge, stage_prepare, stage_render
    from xtalker.pipeline import generate

    config = _config(pirender_checkpoint.parent, speech7, tmp_path / "full.mp4", preprocess="full", still=True,
                     blend="feather")
    result = generate(config, warm)
    h, w = cv2.imread(str(PORTRAIT)).shape[:2]
    assert result.frames == 7 and result.size_wh == (w, h)
    single = _frames(result.output)
    assert single.shape[0] == 7 and np.abs(single[0].astype(int) - single[-1]).max() > 0
    job = Job(tmp_path / "job")
    with warm.active():
        stage_prepare(config, job)
        for shard in range(2):
            stage_render(config, job, shard, 2)
    merged = stage_merge(config, job, 2, tmp_path / "merged.mp4")
    assert merged.frames == 7 and np.array_equal(_frames(merged.output), single)


def test_compiled_forward_pads_short_batches_to_its_one_shape(pirender_checkpoint, monkeypatch, tmp_path):
    """The compiled path is what the CLI runs by default; torch.compile itself is replaced by a recorder here (its
    real build takes a minute; its speed and fidelity are in benchmarks/results/speed_pirender.md)."""
    from xtalker.pipeline import Setting

    calls = []

    def recording_compile(fn, dynamic=None):
        def run(source, windows):
            calls.append(tuple(windows.shape))
            return fn(source, windows)

        assert dynamic is False
        return run

    monkeypatch.setattr(torch, "compile", recording_compile)
    config = _config(pirender_checkpoint.parent, SPEECH, tmp_path / "x.mp4", compile=True)
    assert Setting.of(config).compile and not Setting.of(_config(pirender_checkpoint.parent, SPEECH, None)).compile
    eager = pirender.PIRenderRenderer.from_checkpoint(pirender_checkpoint)
    compiled = pirender.PIRenderRenderer.from_checkpoint(pirender_checkpoint)
    compiled.compile(tmp_path)
    assert compiled.compiled and not eager.compiled
    rng = np.random.default_rng(0)
    image = rng.random((1, 3, 64, 64), dtype=np.float32)
    windows = torch.from_numpy(rng.normal(0, 0.3, (3, 73, 27)).astype(np.float32))
    source = compiled.prepare(image)
    out = torch.cat([compiled.render(source, windows[:2]), compiled.render(source, windows[2:])])
    assert calls == [(2, 73, 27), (2, 73, 27)]  # the last, single window padded to the first batch's shape
    assert float((out - eager.render(eager.prepare(image), windows)).abs().max()) < 1e-4


def test_what_pirender_cannot_do_is_refused(tmp_path, pirender_checkpoint):
    from xtalker.config import ConfigError

    ckpt = pirender_checkpoint.parent
    for kw, words in (({"input_yaw": [10.0]}, "--input_yaw set head-angle keyframes"),
                      ({"precision": "int8"}, "runs in fp32 or bf16"),
                      ({"backend": "ipex"}, "use --backend native")):
        with pytest.raises(ConfigError, match=words):
            _config(ckpt, SPEECH, tmp_path / "x.mp4", **kw).validate()


def test_a_preset_naming_pirender_fails_clearly_without_its_file(tmp_path, synthetic_checkpoints):
    from xtalker import cli

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("SadTalker_V0.0.2_256.safetensors", "mapping_00229-model.pth.tar"):
        (folder / name).symlink_to(synthetic_checkpoints / name)
    out = tmp_path / "out.mp4"
    args = ["--driven_audio", str(SPEECH), "--source_image", str(PORTRAIT), "--checkpoint_dir", str(folder),
            "--output", str(out), "--preset", "pirender"]
    proc = subprocess.run([sys.executable, "-m", "xtalker.cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    for words in (model.FILE_NAME, "preset pirender", "--facerender facevid2vid", "--checkpoint_dir"):
        assert words in proc.stderr
    assert not out.exists()
    assert cli.main([*args, "--facerender", "facevid2vid", "--list_presets"]) == 0  # the override parses
