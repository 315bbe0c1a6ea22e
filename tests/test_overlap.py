"""Rendering ahead of the encoder: the same items in order, errors and early stops handled, the same video bytes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import write_wav

from xtalker.config import InferenceConfig
from xtalker.media import load_audio
from xtalker.overlap import ahead
from xtalker.pipeline import generate
from xtalker.warm import Networks

REPO = Path(__file__).resolve().parents[1]


def test_items_arrive_in_order_from_another_thread():
    threads = set()

    def produce():
        for i in range(20):
            threads.add(threading.get_ident())
            yield i

    assert list(ahead(produce(), depth=3)) == list(range(20))
    assert threads and threading.get_ident() not in threads


def test_a_producer_error_reaches_the_consumer():
    def produce():
        yield 1
        raise ValueError("render failed")

    got = []
    with pytest.raises(ValueError, match="render failed"):
        for item in ahead(produce()):
            got.append(item)
    assert got == [1]


def test_a_consumer_that_stops_stops_the_producer():
    made = []

    def produce():
        for i in range(1000):
            made.append(i)
            yield i

    items = ahead(produce(), depth=2)
    assert next(items) == 0
    items.close()  # what a failed encode or a cancel does
    assert len(made) <= 5  # the one consumed, the queue's two, the one waiting to be put, the one in hand


def test_overlapped_video_is_byte_identical(synthetic_checkpoints, tmp_path):
    speech = load_audio(REPO / "examples" / "driven_audio" / "hello.wav")
    audio = write_wav(tmp_path / "three.wav", speech[4000 : 4000 + 3 * 640 + 100])
    networks = Networks()
    videos = []
    for overlap in (False, True):
        config = InferenceConfig(driven_audio=audio, source_image=REPO / "examples" / "source_image" / "astronaut.png",
                                 checkpoint_dir=synthetic_checkpoints, output=tmp_path / f"overlap_{overlap}.mp4",
                                 seed=4, batch_size=1, overlap=overlap)
        videos.append(generate(config, networks).output.read_bytes())
    assert videos[0] == videos[1]
