"""forge.loader.gguf_header reads exactly what the gguf package's GGUFReader reads (metadata values and
tensor views), ~50x faster, and a cut or corrupted header is a ModelLoadError, never another exception."""

import random
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from forge.errors import ModelLoadError, UnsupportedModelError
from forge.loader.gguf import read_metadata
from forge.loader.gguf_header import GGUFHeader


def assert_same_as_gguf_reader(path, theirs: GGUFReader | None = None) -> None:
    ours, theirs = GGUFHeader(path), theirs or GGUFReader(path)
    expected = read_metadata(theirs)
    assert list(ours.metadata) == list(expected)
    for key, value in expected.items():
        got = ours.metadata[key]
        if key == "t.nested":  # GGUFReader flattens arrays of arrays; their real shape is kept here
            assert got == [[1, 2], [3]] and value == [1, 2, 3]
            continue
        assert type(got) is type(value) and got == pytest.approx(value) if isinstance(value, float) else got == value, key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, list(a.shape), a.n_elements, a.n_bytes, a.data_offset) == \
            (b.name, b.tensor_type, list(b.shape), b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)


def write_gguf(path, alignment: int | None = None) -> None:
    """Every metadata value type, arrays of each, and tensors of several types and shapes."""
    w = GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo wörld ✓")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.25])
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.strs", ["a", "", "Ġthe", "<|im_end|>", "日本"])
    w.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 8)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    w.add_tensor("q8", rng.integers(0, 255, size=(2, 34), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_the_default_model_reads_the_same_and_faster(default_model_path):
    start = time.perf_counter()
    GGUFHeader(default_model_path)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    reader = GGUFReader(default_model_path)
    read_metadata(reader)
    theirs = time.perf_counter() - start
    assert ours < theirs / 5, (ours, theirs)  # ~0.05 s vs ~2 s
    assert_same_as_gguf_reader(default_model_path, reader)


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type(tmp_path, alignment):
    path = tmp_path / "all.gguf"
    write_gguf(path, alignment)
    assert_same_as_gguf_reader(path)
    header = GGUFHeader(path)
    assert header.metadata["t.nested"] == [[1, 2], [3]] and header.metadata["t.u64"] == 2**63 + 5
    assert header.data_offset % (alignment or 32) == 0


def test_cut_or_corrupt_files_are_model_load_errors(tmp_path):
    path = tmp_path / "all.gguf"
    write_gguf(path)
    data = path.read_bytes()
    header = GGUFHeader(path)
    header_end, data_end = header.data_offset, max(t.data_offset + t.n_bytes for t in header.tensors)
    rng = random.Random(0)  # cuts in the header, at its end and inside the last tensor
    cuts = sorted(set(range(0, 64)) | {rng.randrange(header_end) for _ in range(150)} | {header_end, data_end - 1})
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            GGUFHeader(path)
    for _ in range(200):  # flipped header bytes: a clear error or a header that still parses
        damaged = bytearray(data)
        damaged[rng.randrange(4, header_end)] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            GGUFHeader(path)
        except (ModelLoadError, UnsupportedModelError) as e:
            assert "\n" not in str(e)
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    with pytest.raises(UnsupportedModelError, match="GGUF version 1 is not supported"):
        GGUFHeader(path)
    path.write_bytes(b"NOPE" + bytes(40))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        GGUFHeader(path)
