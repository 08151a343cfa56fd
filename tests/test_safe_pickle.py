"""The checkpoint reader runs nothing: tensors come back exact, everything else stays an inert placeholder."""

import io
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict

import pytest
import torch

from ci_core.errors import BundleError
from ci_core.models.safe_pickle import Opaque, TensorRef, open_archive, opaque_name, script_tensors

from delivery_layout import CreatesFile, MeterLog, RunsCode, save_dassl, torchscript_archive

WHAT = "a test checkpoint"


def write_archive(path, data_pkl: bytes, storages: dict[str, bytes], byteorder: str | None = "little"):
    """A torch zip archive written by hand: ``archive/data.pkl``, ``archive/data/<key>``, ``archive/byteorder``."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        if byteorder is not None:
            archive.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


class Storage:
    """A storage record to pickle by reference, as torch.save does."""

    def __init__(self, key: str, numel: int, storage_type=torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class Tensor:
    """A tensor to pickle as torch.save does: ``_rebuild_tensor_v2`` of a storage."""

    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, OrderedDict())


class _TensorPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            return torch._utils._rebuild_tensor_v2, obj.args
        return NotImplemented


def tensor_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _TensorPickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def call_global(module: str, name: str, *args: str) -> bytes:
    """Pickle opcodes for ``module.name(*args)``: what a malicious pickle does to run or import something."""
    return b"c" + f"{module}\n{name}\n".encode() + b"(" + b"".join(_str(a) for a in args) + b"tR"


# --------------------------------------------------------------------------- real checkpoints


def test_state_dict_tensors_come_back_exact_and_the_rest_stays_inert(tmp_path):
    base = torch.randn(6, 5)
    state = OrderedDict([
        ("ctx", torch.randn(4, 8)),
        ("half", torch.randn(3, 7).half()),
        ("view", base[2:, 1:4]),  # an offset, non-contiguous view
        ("transposed", base.t()),  # the same storage as "view", transposed
        ("count", torch.tensor(7)),
        ("empty", torch.zeros(0, 3)),
    ])
    learner = torch.nn.Linear(3, 2)
    path = save_dassl(tmp_path / "out", "prompt_learner", state, learner=learner, val_result=MeterLog(0.75))
    with open_archive(path, BundleError, WHAT) as archive:
        root = archive.root
        assert set(root) == {"state_dict", "epoch", "optimizer", "scheduler", "val_result"} and root["epoch"] == 10
        refs = root["state_dict"]
        assert isinstance(refs, OrderedDict) and list(refs) == list(state)
        for key, tensor in state.items():
            assert isinstance(refs[key], TensorRef)
            read = archive.tensor(refs[key])
            assert read.dtype == tensor.dtype and torch.equal(read, tensor), key
        # The scheduler's state keeps its successor and, through it, the optimizer: placeholders only.
        successor = root["scheduler"]["successor"]
        assert opaque_name(successor) == "torch.optim.lr_scheduler.CosineAnnealingLR"
        assert opaque_name(successor.attributes["optimizer"]) == "torch.optim.sgd.SGD"
        assert opaque_name(root["val_result"]) == "delivery_layout.MeterLog"
        assert root["val_result"].attributes == {"accuracy": 0.75}
        assert {"torch.optim.sgd.SGD", "torch.optim.lr_scheduler.CosineAnnealingLR",
                "delivery_layout.MeterLog"} <= set(archive.opaque)
        assert not archive.is_torchscript


def test_reduce_payloads_never_run(tmp_path):
    marker_open, marker_exec = tmp_path / "opened", tmp_path / "executed"
    state = {"ctx": torch.randn(2, 3)}
    path = save_dassl(tmp_path / "out", "prompt_learner", state,
                      extra={"scheduler": {"successor": CreatesFile(marker_open)}, "val_result": RunsCode(marker_exec)})
    # The payloads are real: torch.load without weights_only runs both.
    torch.load(path, weights_only=False)
    assert marker_open.exists() and marker_exec.exists()
    marker_open.unlink()
    marker_exec.unlink()

    with open_archive(path, BundleError, WHAT) as archive:
        assert torch.equal(archive.tensor(archive.root["state_dict"]["ctx"]), state["ctx"])
        assert isinstance(archive.root["val_result"], Opaque)
        assert {"builtins.exec"} <= set(archive.opaque) and any(name.endswith(".open") for name in archive.opaque)
    assert not marker_open.exists() and not marker_exec.exists()


def test_no_module_named_by_the_pickle_is_imported(tmp_path):
    sys.modules.pop("this", None)  # importing `this` prints the Zen of Python: a module with an import side effect
    data = b"\x80\x02}(" + _str("state_dict") + b"}" + _str("payload") + call_global("this", "s") + b"u."
    path = write_archive(tmp_path / "crafted.pt", data, {})
    with open_archive(path, BundleError, WHAT) as archive:
        assert opaque_name(archive.root["payload"]) == "this.s" and archive.root["payload"]._ci_args == ()
    assert "this" not in sys.modules


def test_setting_a_tensor_records_state_is_refused(tmp_path):
    data = tensor_pickle({"w": Tensor(Storage("0", 2), 0, (2,), (1,))})
    assert data.endswith(b"s.")  # SETITEM, STOP
    data = data[:-2] + b"}b" + b"s."  # BUILD on the tensor record: the pickle tries to give it new fields
    path = write_archive(tmp_path / "crafted.pt", data, {"0": torch.ones(2).numpy().tobytes()})
    with pytest.raises(BundleError, match="cannot be read safely"):
        open_archive(path, BundleError, WHAT)


# --------------------------------------------------------------------------- malformed files


def test_truncated_legacy_and_foreign_files_are_refused_naming_the_file(tmp_path):
    path = save_dassl(tmp_path / "out", "prompt_learner", {"ctx": torch.randn(4, 8)})
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BundleError, match=rf"{truncated}: not a readable zip archive .*truncated"):
        open_archive(truncated, BundleError, WHAT)

    legacy = tmp_path / "legacy.pth"
    torch.save({"state_dict": {"ctx": torch.zeros(2)}}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(BundleError, match=rf"{legacy}: a torch file in the legacy .*non-zip.* format"):
        open_archive(legacy, BundleError, WHAT)

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BundleError, match=rf"{text}: not a torch zip archive .*expected {WHAT}"):
        open_archive(text, BundleError, WHAT)

    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("docs/readme.txt", "not torch")
    with pytest.raises(BundleError, match=r"no docs/data.pkl in the archive"):
        open_archive(foreign, BundleError, WHAT)


def test_views_outside_their_storage_are_refused(tmp_path):
    storage = Storage("0", 4)
    raw = {"0": torch.arange(4, dtype=torch.float32).numpy().tobytes()}
    inside = write_archive(tmp_path / "inside.pt", tensor_pickle({"w": Tensor(storage, 1, (3,), (1,))}), raw)
    with open_archive(inside, BundleError, WHAT) as archive:
        assert archive.tensor(archive.root["w"]).tolist() == [1.0, 2.0, 3.0]
    beyond = write_archive(tmp_path / "beyond.pt", tensor_pickle({"w": Tensor(storage, 2, (3,), (1,))}), raw)
    with open_archive(beyond, BundleError, WHAT) as archive:
        with pytest.raises(BundleError, match=r"reaches element 4 of storage '0', which has 4"):
            archive.tensor(archive.root["w"])
    short = write_archive(tmp_path / "short.pt", tensor_pickle({"w": Tensor(Storage("0", 9), 0, (1,), (1,))}), raw)
    with pytest.raises(BundleError, match=r"9 elements of torch.float32 need 36 bytes, its record has 16"):
        open_archive(short, BundleError, WHAT)


def test_big_endian_archives_are_byte_swapped(tmp_path):
    values = torch.tensor([1.5, -2.25, 3.0e-3], dtype=torch.float32)
    data = tensor_pickle({"w": Tensor(Storage("0", 3), 0, (3,), (1,))})
    big = values.numpy().astype(">f4").tobytes()
    path = write_archive(tmp_path / "big.pt", data, {"0": big}, byteorder="big")
    with open_archive(path, BundleError, WHAT) as archive:
        assert torch.equal(archive.tensor(archive.root["w"]), values)


def test_torchscript_module_tensors_by_attribute_path(tmp_path, random_backbone):
    clip = random_backbone.model
    path = torchscript_archive(random_backbone, tmp_path / "scripted.pt")
    with open_archive(path, BundleError, WHAT) as archive:
        assert archive.is_torchscript
        refs = script_tensors(archive)
        expected = clip.state_dict()
        assert set(refs) == set(expected) | {"attn_mask"}  # the causal mask is an attribute, not a weight
        assert all(torch.equal(archive.tensor(refs[k]), v) for k, v in expected.items())
