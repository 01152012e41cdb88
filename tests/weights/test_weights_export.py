"""Packed N:M export: bit-exact round trips, the codes, the file size, damaged files, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sparseroute.weights import SparseLinear, check_pattern, sparse_layers, sparsify
from sparseroute.weights import export
from sparseroute.weights.export import (
    PackedFileError,
    load_packed,
    load_packed_into,
    pack_weight,
    packed_code,
    save_packed,
    to_semi_structured,
    unpack_weight,
)

PATTERNS = [(2, 4), (4, 8), (1, 4), (3, 8)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so that -0.0 and +0.0 differ)."""
    return t.contiguous().view(_BITS[t.dtype])


def masked(mod: SparseLinear) -> torch.Tensor:
    return torch.where(mod.mask, mod.weight.detach(), torch.zeros((), dtype=mod.weight.dtype))


def small_model(n: int, m: int, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 16, bias=False)).to(dtype)
    sparsify(model, f"{n}:{m}", filter=(nn.Linear,))
    return model


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n,m", PATTERNS, ids=lambda v: str(v))
def test_round_trip_is_bit_exact(tmp_path, n, m, dtype):
    model = small_model(n, m, dtype)
    # the dense weight under the mask is not zeroed: the file keeps weight ⊙ mask, masked positions +0
    stats = save_packed(model, tmp_path / "p.safetensors")
    assert stats.packed_layers == 2
    sd = load_packed(tmp_path / "p.safetensors")
    ref = model.state_dict()
    assert list(sd) == list(ref)  # same keys, same order
    for name, mod in sparse_layers(model):
        w = sd[f"{name}.weight"]
        assert w.dtype == dtype and w.shape == mod.weight.shape
        assert torch.equal(sd[f"{name}.mask"], mod.mask)
        assert torch.equal(bits(w), bits(masked(mod)))  # kept values bit for bit
        assert (bits(w)[~mod.mask] == 0).all()  # masked positions exactly +0
        check_pattern(w, f"{n}:{m}")
    for key in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(bits(sd[key]), bits(ref[key]))


@pytest.mark.parametrize("n,m", PATTERNS)
def test_masked_positions_are_zero_even_when_the_weight_is_not(n, m):
    torch.manual_seed(1)
    w = torch.randn(8, 32) + 5.0  # no zero, no negative: any leak shows
    mask = SparseLinear.from_linear(nn.Linear(32, 8), pattern=f"{n}:{m}").mask
    values, codes, code = pack_weight(w, mask, n, m)
    assert values.shape == (8, 32 * n // m) and codes.dtype == torch.uint8
    w2, mask2 = unpack_weight(values, codes, (8, 32), n, m, code)
    assert torch.equal(mask2, mask)
    assert torch.equal(w2, torch.where(mask, w, torch.zeros(())))


def test_codes_pick_the_smaller_form():
    # index: n·ceil(log2 m) bits a group; bitmask: m bits (ties go to the bitmask)
    assert packed_code(1, 4) == "index"  # 2 < 4
    assert packed_code(2, 4) == "bitmask"  # 4 = 4
    assert packed_code(4, 8) == "bitmask"  # 12 > 8
    assert packed_code(3, 8) == "bitmask"  # 9 > 8
    assert packed_code(1, 8) == "index" and packed_code(2, 16) == "index"
    mask = SparseLinear.from_linear(nn.Linear(64, 4), pattern="2:16").mask
    values, codes, code = pack_weight(torch.randn(4, 64), mask, 2, 16)
    assert code == "index" and codes.shape == (4, 4 * 2 * 4 // 8)  # 4 groups x 2 indices x 4 bits a row


def test_groups_keeping_fewer_than_n_fall_back_to_the_bitmask():
    w = torch.arange(1.0, 33.0).reshape(2, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 6, 8]] = True  # 1:4 with the last group empty
    mask[1, [0, 7, 9, 15]] = True
    values, codes, code = pack_weight(w, mask, 1, 4)
    assert code == "bitmask"
    w2, mask2 = unpack_weight(values, codes, (2, 16), 1, 4, code)
    assert torch.equal(mask2, mask) and torch.equal(w2, w * mask)


def test_a_mask_that_breaks_the_pattern_is_refused(tmp_path):
    sd = {"lin.weight": torch.randn(4, 8), "lin.mask": torch.ones(4, 8, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"lin\.weight.*2:4"):
        save_packed(sd, tmp_path / "p.safetensors", patterns="2:4")
    assert not any(tmp_path.iterdir())


def test_a_state_dict_is_packed_by_the_patterns_given(tmp_path):
    model = small_model(2, 4, torch.float16)
    sd = model.state_dict()
    assert save_packed(sd, tmp_path / "none.safetensors").packed_layers == 0  # without patterns: all dense
    stats = save_packed(sd, tmp_path / "one.safetensors", patterns="2:4")
    assert stats.packed_layers == 2
    stats = save_packed(sd, tmp_path / "map.safetensors", patterns={"2": "2:4"})
    assert stats.packed_layers == 1
    for name in ("none", "one", "map"):
        back = load_packed(tmp_path / f"{name}.safetensors")
        assert torch.equal(back["2.mask"], sd["2.mask"])
        assert torch.equal(bits(back["2.weight"]), bits(masked(model[2])) if name != "none" else bits(sd["2.weight"]))
    with pytest.raises(ValueError, match="no 9.weight"):
        save_packed(sd, tmp_path / "bad.safetensors", patterns={"9": "2:4"})
    with pytest.raises(ValueError, match="N:M"):
        save_packed(sd, tmp_path / "bad.safetensors", patterns="0.5")


def test_packed_2_4_fp16_is_at_most_057_of_the_dense_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False)).half()
    sparsify(model, "2:4")
    stats = save_packed(model, tmp_path / "packed.safetensors")
    save_file({"0.weight": model[0].weight.detach().contiguous()}, str(tmp_path / "dense.safetensors"))
    dense = os.path.getsize(tmp_path / "dense.safetensors")
    packed = os.path.getsize(tmp_path / "packed.safetensors")
    assert stats.file_bytes == packed
    assert packed <= 0.57 * dense, packed / dense
    assert stats.ratio == pytest.approx(0.5625)  # 1 byte of values + 1/8 byte of bitmask per weight, vs 2
    assert stats.dense_bytes == 2 * 1024 * 1024


def test_loading_into_a_dense_model_gives_the_same_outputs(tmp_path):
    model = small_model(2, 4, torch.float32, seed=3)
    save_packed(model, tmp_path / "p.safetensors")
    fresh = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 16, bias=False))
    assert load_packed_into(fresh, tmp_path / "p.safetensors") == ["0", "2"]
    assert all(mod.pattern is not None and str(mod.pattern) == "2:4" for _, mod in sparse_layers(fresh))
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), model(x))


def test_a_model_of_another_shape_is_refused(tmp_path):
    save_packed(small_model(2, 4, torch.float32), tmp_path / "p.safetensors")
    other = nn.Sequential(nn.Linear(64, 48), nn.LayerNorm(48), nn.Linear(48, 16, bias=False))
    with pytest.raises(PackedFileError, match="does not fit this model"):
        load_packed_into(other, tmp_path / "p.safetensors")


def _data_offset(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_a_flipped_byte_is_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_packed(small_model(2, 4, torch.float16), path)
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path) + 5] ^= 0x10  # inside the tensors: the header still parses
    path.write_bytes(bytes(raw))
    with pytest.raises(PackedFileError, match="corrupt"):
        load_packed(path)


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "p.safetensors"
    save_packed(small_model(4, 8, torch.float32), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(PackedFileError, match=str(path.name)):
        load_packed(path)


def test_a_foreign_or_edited_file_is_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(plain))
    with pytest.raises(PackedFileError, match="not a packed sparseroute file"):
        load_packed(plain)
    with pytest.raises(PackedFileError, match="does not exist"):
        load_packed(tmp_path / "missing.safetensors")
    # a packed file whose metadata was edited (its values then decode to another shape)
    path = tmp_path / "p.safetensors"
    save_packed(small_model(2, 4, torch.float32), path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    packed = json.loads(meta["packed"])
    packed["0.weight"]["shape"] = [16, 64]
    save_file(tensors, str(path), metadata={**meta, "packed": json.dumps(packed)})
    with pytest.raises(PackedFileError, match=r"0\.weight.*shape"):
        load_packed(path)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "p.safetensors"
    save_packed(small_model(2, 4, torch.float32), path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_packed(small_model(1, 4, torch.float32), path)
    assert path.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]  # no temporary left


def test_reserved_metadata_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_packed(small_model(2, 4, torch.float32), tmp_path / "p.safetensors", metadata={"packed": "x"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no CUDA device is present")
def test_semi_structured_names_its_requirements_on_cpu():
    model = small_model(2, 4, torch.float16)
    with pytest.raises(ValueError) as err:
        to_semi_structured(model)
    text = str(err.value)
    for word in ("CUDA", "8.0", "float16", "2:4", "layer 0"):
        assert word in text
    assert isinstance(model[0], SparseLinear)  # nothing changed
    with pytest.raises(ValueError, match="no SparseLinear"):
        to_semi_structured(nn.Sequential(nn.Linear(4, 4)))


def test_unstructured_masks_and_tied_tensors_are_stored_dense(tmp_path):
    torch.manual_seed(2)
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied, as a language model's head
    model = nn.ModuleDict({"emb": emb, "mid": nn.Linear(8, 8), "head": head})
    sparsify(model, "0.5", filter="mid")
    stats = save_packed(model, tmp_path / "p.safetensors")
    assert stats.packed_layers == 0 and stats.ratio == 0.0
    sd = load_packed(tmp_path / "p.safetensors")
    ref = model.state_dict()
    assert list(sd) == list(ref)
    for key, value in ref.items():
        assert sd[key].dtype == value.dtype and torch.equal(sd[key], value), key
