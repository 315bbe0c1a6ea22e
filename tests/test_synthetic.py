import math

import torch

from xtalker.checkpoints import expected_tensors
from xtalker.synthetic import sadtalker as synthetic


def test_seed_rule_matches_the_documented_example():
    # sha256("F:path") first 8 bytes little-endian, masked to 63 bits: recomputed independently here.
    import hashlib

    f, p = "SadTalker_V0.0.2_256.safetensors", "generator.first.conv.weight"
    d = hashlib.sha256(f"{f}:{p}".encode()).digest()
    assert synthetic.seed_for(f, p) == int.from_bytes(d[:8], "little") & (2**63 - 1)
    assert synthetic.seed_for(f, p) != synthetic.seed_for("SadTalker_V0.0.2_512.safetensors", p)


def test_gaussian_kernel_is_normalised_and_centred():
    g = synthetic.gaussian_kernel(13, 1.5)
    assert g.shape == (13, 13)
    assert math.isclose(float(g.sum()), 1.0, rel_tol=1e-12)
    assert int(g.argmax()) == 6 * 13 + 6
    assert math.isclose(float(g[6, 7] / g[6, 6]), math.exp(-1 / (2 * 1.5**2)), rel_tol=1e-12)


def test_mapping_file_matches_manifest_digest_and_ranges():
    name = "mapping_00229-model.pth.tar"
    spec = {k: tuple(v) for k, v in expected_tensors("mapping", 70).items()}
    tensors = synthetic.synthesize(name, "mapping/", spec)
    assert synthetic.content_digest(tensors, "mapping/") == synthetic.expected_digest(name)
    # fc_exp uses gain 0.1: U(-a, a) with a = 0.1 * sqrt(3 / 1024)
    a = 0.1 * math.sqrt(3 / 1024)
    w = tensors["fc_exp.weight"]
    assert float(w.abs().max()) <= a and float(w.abs().max()) > 0.9 * a
    assert float(tensors["first.0.bias"].abs().max()) <= 0.1


def test_spectral_vectors_estimate_the_top_singular_value():
    spec = {k: tuple(v) for k, v in expected_tensors("generator").items() if k.startswith("decoder.up_1.conv_1.")}
    tensors = synthetic.synthesize("SadTalker_V0.0.2_256.safetensors", "generator.", spec)
    w = tensors["decoder.up_1.conv_1.weight_orig"].double().reshape(64, -1)
    sigma = torch.dot(tensors["decoder.up_1.conv_1.weight_u"].double(), w @ tensors["decoder.up_1.conv_1.weight_v"].double())
    # 30 power iterations from a random start: unit vectors, sigma just below the true spectral norm
    top = float(torch.linalg.matrix_norm(w, ord=2))
    assert 0.97 * top < float(sigma) <= top
    assert math.isclose(float(tensors["decoder.up_1.conv_1.weight_u"].norm()), 1.0, rel_tol=1e-6)
    assert math.isclose(float(tensors["decoder.up_1.conv_1.weight_v"].norm()), 1.0, rel_tol=1e-6)


def test_cached_files_are_verified(synthetic_checkpoints):
    for name, group, _spec in synthetic.official_files():
        marker = synthetic_checkpoints / f".{name}.digest"
        assert marker.read_text() == synthetic.expected_digest(name)
    assert synthetic.read_back_digest(synthetic_checkpoints / "mapping_00109-model.pth.tar", "mapping/") == synthetic.expected_digest("mapping_00109-model.pth.tar")
