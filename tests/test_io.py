"""common.io: weights round-trips, refusal of pickled objects, layout checks, atomic writes."""
import json

import pytest
import safetensors.torch
import torch
from PIL import Image

from common import io
from common.errors import UsageError


class Payload:
    """A non-tensor object whose unpickling a weights_only load must refuse."""


def _state_dict():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "a.weight": base,
        "a.tied": base,  # same storage as a.weight
        "b.view": base.t(),  # non-contiguous view of it
        "c.half": torch.randn(3, generator=g).half(),
        "d.bf16": torch.randn(2, 2, generator=g).bfloat16(),
        "e.int": torch.arange(5),
        "f.empty": torch.empty(0, 3),
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt", ".ckpt"])
def test_round_trip_gives_equal_tensors(tmp_path, suffix):
    sd = _state_dict()
    path = tmp_path / f"w{suffix}"
    io.save_weights(sd, path)
    loaded = io.load_weights(path)
    assert sorted(loaded) == sorted(sd)
    for key, value in sd.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_safetensors_metadata_is_stored(tmp_path):
    path = tmp_path / "w.safetensors"
    io.save_weights({"x": torch.ones(2)}, path, metadata={"method": "customdiffusion"})
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"method": "customdiffusion"}


def test_nested_bin_loads_as_saved_and_flattens(tmp_path):
    nested = {"unet": {"attn.k": torch.ones(2, 3)}, "modifier_token": {"<new1>": torch.zeros(1, 4)}}
    path = tmp_path / "delta.bin"
    io.save_weights(nested, path)
    loaded = io.load_weights(path)
    assert torch.equal(loaded["unet"]["attn.k"], nested["unet"]["attn.k"])
    flat = io.flatten_state_dict(loaded)
    assert sorted(flat) == ["modifier_token.<new1>", "unet.attn.k"]


def test_bin_saves_only_the_viewed_rows(tmp_path):
    big = torch.randn(10_000, 64)
    path = tmp_path / "row.bin"
    io.save_weights({"row": big[3:4]}, path)
    assert path.stat().st_size < big.numel() * big.element_size() // 10
    assert torch.equal(io.load_weights(path)["row"], big[3:4])


def test_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "obj": Payload()}, path)
    with pytest.raises(UsageError, match="pickled Python objects") as err:
        io.load_weights(path)
    assert "Payload" in str(err.value) and "safetensors" in str(err.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_truncated_file_is_reported_corrupt(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    io.save_weights({"x": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UsageError, match="is corrupt or not a weights file") as err:
        io.load_weights(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all"])
def test_garbage_file_is_reported_corrupt(tmp_path, content):
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="is corrupt or not a weights file"):
        io.load_weights(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(UsageError, match="not found: .*nope.safetensors"):
        io.load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(UsageError, match=r"unknown weights extension '\.npz'"):
        io.save_weights({"x": torch.ones(1)}, tmp_path / "w.npz")


def test_key_and_shape_mismatches_are_named(tmp_path):
    path = tmp_path / "w.safetensors"
    io.save_weights({"a": torch.ones(2, 3), "b": torch.ones(4), "extra": torch.ones(1)}, path)
    with pytest.raises(UsageError) as err:
        io.load_weights(path, expect_keys=["a", "missing.one"], expect_shapes={"a": (3, 2), "b": (4,)})
    msg = str(err.value)
    assert "1 missing key [missing.one]" in msg
    assert "1 unexpected key [extra]" in msg
    assert "a: got (2, 3) expected (3, 2)" in msg
    assert "b:" not in msg
    # Not strict: extra keys are fine; None matches any size.
    sd = io.load_weights(path, expect_shapes={"a": (None, 3), "b": (4,)}, strict=False)
    assert set(sd) == {"a", "b", "extra"}


def test_missing_key_listing_is_capped():
    with pytest.raises(UsageError, match=r"12 missing keys \[k0, k1, k2, k3, k4, \.\.\.\]"):
        io.check_state_dict({}, expect_keys=[f"k{i}" for i in range(12)])


def _only_file(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_exception_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), io.atomic_write(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".txt"
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert _only_file(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_weights_leaves_nothing_new(tmp_path, monkeypatch, existing):
    path = tmp_path / "w.safetensors"
    if existing:
        io.save_weights({"x": torch.zeros(3)}, path)

    def half_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.save_weights({"x": torch.ones(3)}, path)
    monkeypatch.undo()
    if existing:
        assert _only_file(tmp_path) == ["w.safetensors"]
        assert torch.equal(io.load_weights(path)["x"], torch.zeros(3))
    else:
        assert _only_file(tmp_path) == []


def test_atomic_image_and_json(tmp_path):
    io.atomic_save_image(Image.new("RGB", (4, 3), (1, 2, 3)), tmp_path / "sub" / "img.png")
    with Image.open(tmp_path / "sub" / "img.png") as img:
        assert img.format == "PNG" and img.getpixel((0, 0)) == (1, 2, 3)
    io.atomic_write_json(tmp_path / "r.json", {"clip_t": 0.3})
    assert json.loads((tmp_path / "r.json").read_text()) == {"clip_t": 0.3}
    assert _only_file(tmp_path) == ["r.json", "sub"]
    with pytest.raises(UsageError, match="unknown image extension"):
        io.atomic_save_image(Image.new("RGB", (1, 1)), tmp_path / "img.xyz")


def test_saved_files_get_umask_permissions_not_0600(tmp_path):
    import os

    path = tmp_path / "w.safetensors"
    io.save_weights({"a": torch.ones(2)}, path)
    mode = os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_weights_only_refusal_is_one_short_line(tmp_path):
    import pickle

    class Reduces:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "w.bin"
    path.write_bytes(pickle.dumps({"a": Reduces()}, protocol=4))  # a plain pickle, not torch.save
    with pytest.raises(UsageError) as err:
        io.load_weights(path)
    msg = str(err.value)
    assert msg == f"{path} is corrupt or not a weights file: Unsupported operand 149; re-download or re-save it"


def test_short_reason_keeps_only_the_weights_unpickler_sentence():
    paragraph = (
        "Weights only load failed. This file can still be loaded, to do so you have two options, "
        "\x1b[1mdo those steps only if you trust the source of the checkpoint\x1b[0m. \n\t(1) In PyTorch 2.6, we "
        "changed the default ...\n\tWeightsUnpickler error: Unsupported global: GLOBAL a.B was not an allowed "
        "global by default. Please use `torch.serialization.add_safe_globals([a.B])` ...\n\nCheck the documentation"
    )
    assert io.short_reason(RuntimeError(paragraph)) == (
        "Unsupported global: GLOBAL a.B was not an allowed global by default"
    )
    assert io.short_reason(ValueError("first\nsecond")) == "first"
    assert len(io.short_reason(ValueError("x" * 1000))) == 200


def test_check_writable(tmp_path):
    io.check_writable(tmp_path / "new" / "deeper" / "x.png")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing, not even the folders
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep")
    with pytest.raises(UsageError, match=r"file.txt is a file, not a folder"):
        io.check_writable(blocker / "x.png")
    with pytest.raises(UsageError, match="it is a folder"):
        io.check_writable(tmp_path)
    assert blocker.read_text() == "keep"


def test_atomic_write_under_a_file_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        io.atomic_write_text(blocker / "sub" / "x.txt", "new")
    assert blocker.read_text() == "keep"
