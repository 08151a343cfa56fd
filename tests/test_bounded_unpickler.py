"""Any pickle is read in bounded time and memory, and refused with one line naming the file when it asks for more."""

import pickle
import re
import struct
import zipfile

import pytest

from ci_core.models.bounded_unpickler import BoundedUnpickler, Limits, PickleLimitError
from ci_core.errors import BundleError
from ci_core.models.safe_pickle import open_archive

from test_safe_pickle import Storage, Tensor, WHAT, _str, tensor_pickle, write_archive


def load(data: bytes, **limits):
    return BoundedUnpickler(data, Limits(**limits)).load()


def refused(tmp_path, data: bytes, match: str, storages=None):
    path = write_archive(tmp_path / "crafted.pt", data, storages or {})
    # How long a refusal takes is measured side by side with the old reader in benchmarks/hostile_inputs.py
    # (group 8), not timed here.
    with pytest.raises(BundleError) as caught:
        open_archive(path, BundleError, WHAT)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 1000
    assert re.search(match, message), message
    return message


def test_plain_pickles_read_as_pickle_reads_them():
    values = [{"a": [1, 2.5, None, True], 3: ("é", -7, 2**70)}, [], (), {"nested": {"k": [(1,), ()]}}]
    newer = [{"b": (b"x", b"y")}, frozenset({1, "b"}), {1, 2}]  # before protocol 3 these are calls
    for protocol in range(0, 6):
        for value in values + (newer if protocol >= 4 else []):
            assert load(pickle.dumps(value, protocol=protocol)) == value, (protocol, value)
    shared = [1]
    again = load(pickle.dumps([shared, shared], protocol=2))
    assert again[0] is again[1]  # memo references stay references


def test_deep_nesting_is_refused_without_recursion(tmp_path):
    # The 1e6-deep tuple used as a dict key that overflowed the C stack (exit 139) under pickle.
    deep = b"\x80\x02}K\x01" + b"\x85" * 1_000_000 + b"K\x01s."
    refused(tmp_path, deep, r"nests containers more than 100 deep")
    marks = b"\x80\x02" + b"(" * 100_000 + b"N."
    with pytest.raises(PickleLimitError, match="MARKs"):
        load(marks)


def test_colliding_integer_keys_are_refused():
    # Python hashes an int by its value modulo 2**61 - 1: these 100,000 keys share one hash.
    keys = b"".join(b"\x8a\x0b" + ((k * (2**61 - 1) + 5).to_bytes(11, "little", signed=True)) + b"N"
                    for k in range(1, 100_001))
    with pytest.raises(PickleLimitError, match=r"integer dict key beyond"):  # timed in hostile_inputs.py, group 8
        load(b"\x80\x02}(" + keys + b"u.")
    assert load(b"\x80\x02}(K\x01NJ\xff\xff\xff\x7fNu.") == {1: None, 2**31 - 1: None}  # ordinary ints are fine


def test_huge_memo_indices_cost_one_entry():
    # LONG_BINPUT 2**32 - 1 made pickle allocate a 64 GiB memo.
    data = b"\x80\x02]r\xff\xff\xff\xff0j\xff\xff\xff\xff."
    assert load(data) == []
    too_many = b"\x80\x02" + b"".join(b"Nr" + struct.pack("<I", k) + b"0" for k in range(11)) + b"N."
    with pytest.raises(PickleLimitError, match="memoises more than 10"):
        load(too_many, memo=10)


def test_copies_and_references_count_as_work():
    big = b"\x80\x02](" + b"N" * 1000 + b"eq\x00"  # a list of 1,000 items, memoised
    repeated = big + b"0(" + b"h\x00" * 5000 + b"t."  # a tuple of 5,000 references to it
    with pytest.raises(PickleLimitError, match="more than 5000 objects"):
        load(repeated, objects=5000)
    # OrderedDict(d) copies d: the 84 GB pickle rebuilt a 200k-entry dict 4,000 times this way.
    copy = b"\x80\x02ccollections\nOrderedDict\n}q\x00\x85R."
    with pytest.raises(pickle.UnpicklingError, match="OrderedDict built from arguments"):
        from ci_core.models.safe_pickle import _RestrictedUnpickler
        _RestrictedUnpickler(copy, {}).load()


def test_long_keys_oversized_containers_and_cycles_are_refused(tmp_path):
    message = refused(tmp_path, b"\x80\x02}" + _str("k" * 10_000_000) + b"Ns.", r"dict key of 10000000 characters")
    assert len(message) < 600  # the key is not printed whole
    with pytest.raises(PickleLimitError, match="container or call of 11 items"):
        load(b"\x80\x02(" + b"N" * 11 + b"l.", items=10)
    with pytest.raises(PickleLimitError, match="dict key or set element of type tuple"):
        load(b"\x80\x02}K\x01\x85Ns.")
    cyclic = pickle.dumps((lambda x: (x.append(x), x)[1])([]), protocol=2)
    with pytest.raises(PickleLimitError, match="cyclic"):
        load(cyclic)


def test_tensor_sizes_beyond_int64_are_refused(tmp_path):
    # A zero-element tensor whose size or offset overflows int64 raised a TypeError from torch.empty.
    raw = {"0": b""}
    refused(tmp_path, tensor_pickle({"w": Tensor(Storage("0", 0), 0, (0, 2**64), (1, 1))}), r"tensor size must be",
            raw)
    refused(tmp_path, tensor_pickle({"w": Tensor(Storage("0", 0), 2**64, (0,), (1,))}), r"storage offset", raw)
    empty = write_archive(tmp_path / "empty.pt", tensor_pickle({"w": Tensor(Storage("0", 0), 2**40, (0, 3), (3, 1))}),
                          raw)
    with open_archive(empty, BundleError, WHAT) as archive:
        assert archive.tensor(archive.root["w"]).shape == (0, 3)


def _zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_zip_names_that_torch_and_zipfile_read_differently_are_refused(tmp_path):
    clean, backdoored = tensor_pickle({"v": 1}), tensor_pickle({"v": 2})
    # Measured: torch.load matches names ignoring case and takes the first; zipfile takes the exact (last) name.
    twins = _zip(tmp_path / "twins.pt", [("archive/DATA.PKL", backdoored), ("archive/data.pkl", clean)])
    with pytest.raises(BundleError, match=r"'archive/DATA.PKL' and 'archive/data.pkl' have names that differ only "
                                          r"in case: torch reads the first"):
        open_archive(twins, BundleError, WHAT)
    same = _zip(tmp_path / "same.pt", [("archive/data.pkl", backdoored), ("archive/data.pkl", clean)])
    with pytest.raises(BundleError, match=r"have the same name"):
        open_archive(same, BundleError, WHAT)
    storages = _zip(tmp_path / "storages.pt", [("archive/data.pkl", clean), ("archive/data/0", b"\0" * 4),
                                               ("archive/DATA/0", b"\1" * 4)])
    with pytest.raises(BundleError, match=r"differ only in case"):
        open_archive(storages, BundleError, WHAT)


def test_encrypted_zip_entries_are_refused(tmp_path):
    path = write_archive(tmp_path / "locked.pt", tensor_pickle({"v": 1}), {})
    data = bytearray(path.read_bytes())
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local and central headers
        start = 0
        while (start := data.find(signature, start)) >= 0:
            data[start + flag_offset] |= 1
            start += 4
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"zip entry 'archive/data.pkl' is encrypted"):
        open_archive(path, BundleError, WHAT)
