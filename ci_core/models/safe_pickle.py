"""Reading torch zip archives (``torch.save`` checkpoints, TorchScript archives) without running anything in them.

A torch file is a zip archive with one top-level folder: ``<name>/data.pkl``, a
pickle of the saved object whose tensors name their storage by key, and
``<name>/data/<key>``, each storage's raw bytes (in the byte order that
``<name>/byteorder`` names; little-endian when it is absent).  ``pickle`` and
``torch.load`` import and call whatever globals a pickle names, so a file from
an untrusted provider could run anything.  This reader resolves no global:

* the tensor-rebuild functions (``torch._utils._rebuild_tensor_v2`` and kin)
  and the storage types (``torch.FloatStorage``, ...) map to local functions
  that only record where a tensor's bytes are (a ``TensorRef``); the bytes are
  read, bounds-checked, when ``Archive.tensor`` asks for them;
* ``collections.OrderedDict`` (a state dict is one) and torch's dtype objects
  are the real ones: a container and inert constants;
* every other global becomes an ``Opaque`` placeholder class named after it:
  calling it, creating it, setting its state, items or attributes only record
  the arguments.  Nothing is imported, no ``__reduce__`` payload runs.

``Archive.opaque`` names every global that became a placeholder, so that a
caller can report what it skipped.  The legacy (pre-1.6) non-zip torch format
is refused.  Of a TorchScript archive only ``data.pkl`` and ``data/`` are read,
never ``code/`` or ``constants.pkl``.
"""

from __future__ import annotations

import _compat_pickle
import math
import pickle
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from ci_core.models.bounded_unpickler import BoundedUnpickler
from ci_core.errors import CIError
from ci_core.validators import printable

# Legacy torch files start with a pickled magic number (0x1950a86a20f9469cfc6c) in protocol 2.
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_ZIP_PREFIX = b"PK\x03\x04"
# data.pkl of a checkpoint or of OpenAI's CLIP archives is far smaller; a larger one is refused unread.
MAX_PICKLE_BYTES = 256 * 1024**2
# A checkpoint's pickle names a dozen classes; a TorchScript archive's, a few hundred module types.
_MAX_PLACEHOLDERS = 10_000
# Sizes, strides, offsets and element counts are int64 in torch: larger ones are no tensor torch could have saved.
_MAX_ELEMENTS = 2**62
_MAX_DIMS = 32

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_DTYPES = {name: getattr(torch, name) for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "double", "float", "half", "long", "int", "short")}


class _Inert:
    """Records built by the reader cannot be given state by the pickle (BUILD on them fails)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError("the pickle tries to set the state of a tensor record")


class StorageRef(_Inert):
    """Where one storage's bytes are: ``data/<key>`` of the archive, ``numel`` elements of ``dtype``."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "numel", numel)

    def __setattr__(self, name, value):
        raise AttributeError("a StorageRef is read-only")

    @property
    def nbytes(self) -> int:
        return self.numel * _element_size(self.dtype)


class TensorRef(_Inert):
    """A tensor of the archive, not yet read: a strided view of a storage."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage: StorageRef, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                 dtype: torch.dtype):
        for name, value in (("storage", storage), ("offset", offset), ("size", size), ("stride", stride),
                            ("dtype", dtype)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("a TensorRef is read-only")

    @property
    def shape(self) -> tuple[int, ...]:
        return self.size

    def __repr__(self) -> str:
        return f"TensorRef({list(self.size)}, {self.dtype})"


class Opaque:
    """An object of a class the reader would not import: records how the pickle built it, does nothing else."""

    _ci_global = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "_ci_args", args)
        object.__setattr__(obj, "_ci_state", None)
        object.__setattr__(obj, "_ci_items", [])
        object.__setattr__(obj, "_ci_mapping", {})
        object.__setattr__(obj, "_ci_attributes", {})
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        object.__setattr__(self, "_ci_state", state)

    def __setattr__(self, name, value):
        self._ci_attributes[name] = value

    def __setitem__(self, key, value):
        self._ci_mapping[key] = value

    def append(self, item):
        self._ci_items.append(item)

    def extend(self, items):
        self._ci_items.extend(items)

    def __repr__(self) -> str:
        return f"<opaque {self._ci_global}>"

    @property
    def attributes(self) -> dict:
        """The object's attributes as the pickle set them (its state, when that is a dict)."""
        state = self._ci_state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):  # (dict state, slot state)
            state = {**state[0], **(state[1] if isinstance(state[1], dict) else {})}
        return {**(state if isinstance(state, dict) else {}), **self._ci_attributes}


def opaque_name(obj: object) -> str | None:
    """``module.name`` of the global an ``Opaque`` object stands for (None for anything else)."""
    return obj._ci_global if isinstance(obj, Opaque) else None


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _kind(value) -> str:
    """A short, one-line description of a value from the pickle, for an error message."""
    text = repr(value) if isinstance(value, (str, bytes, int, float, type(None))) else type(value).__name__
    return printable(text if len(text) <= 60 else text[:57] + "...")


def _ints(values, what: str) -> tuple[int, ...]:
    if (not isinstance(values, (tuple, list)) or len(values) > _MAX_DIMS
            or not all(type(v) is int and 0 <= v <= _MAX_ELEMENTS for v in values)):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of at most {_MAX_DIMS} integers from 0 to "
                                     f"2**62, got {_kind(values)}")
    return tuple(values)


def _tensor_ref(storage, storage_offset, size, stride, dtype=None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError(f"a tensor's storage must come from the archive, got {_kind(storage)}")
    if type(storage_offset) is not int or not 0 <= storage_offset <= _MAX_ELEMENTS:
        raise pickle.UnpicklingError(f"tensor storage offset must be an integer from 0 to 2**62, got "
                                     f"{_kind(storage_offset)}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if math.prod(size) > _MAX_ELEMENTS:
        raise pickle.UnpicklingError(f"a tensor of size {list(size)} has more elements than torch can hold")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {list(size)} and stride {list(stride)} differ in length")
    if dtype is not None and dtype is not storage.dtype:
        if storage.dtype is not torch.uint8:  # an untyped storage takes the tensor's dtype
            raise pickle.UnpicklingError(f"tensor dtype {dtype} on a {storage.dtype} storage")
        element = _element_size(dtype)
        if storage.numel % element:
            raise pickle.UnpicklingError(f"untyped storage of {storage.numel} bytes does not hold {dtype} elements")
        storage = StorageRef(storage.key, dtype, storage.numel // element)
    return TensorRef(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_ref(storage, storage_offset, size, stride)


def _check_metadata(metadata) -> None:
    """The conjugate and negative bits (the only tensor metadata torch pickles) must be unset."""
    if metadata is None or (isinstance(metadata, dict) and not any(metadata.values())):
        return
    raise pickle.UnpicklingError(f"tensor metadata {_kind(metadata)} (conjugate or negative bit) is not supported")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_metadata(metadata)
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f"tensor dtype must be a torch dtype, got {_kind(dtype)}")
    _check_metadata(metadata)
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError(f"a parameter must wrap a tensor, got {_kind(data)}")
    return data  # a parameter is read as the tensor it wraps


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter):
        raise pickle.UnpicklingError(f"tensor subclass rebuilt by {_kind(func)}, which this reader does not run")
    if not isinstance(args, tuple):
        raise pickle.UnpicklingError("tensor subclass arguments must be a tuple")
    return func(*args)  # the subclass (``new_type``) and its Python state are dropped: only the tensor is kept


_REBUILDERS = frozenset({_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter,
                         _rebuild_from_type_v2})
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,  # its module's name before torch 1.9
    ("collections", "OrderedDict"): OrderedDict,
}


class _StorageType(_Inert):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, name, value):
        raise AttributeError("read-only")


_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()}


class _RestrictedUnpickler(BoundedUnpickler):
    """Resolves globals from the allowlist above; everything else becomes an ``Opaque`` placeholder class.

    Of the allowed callables only the tensor-rebuild functions run (on their own records), and
    ``OrderedDict`` only empty, as ``torch.save`` writes it (its items follow as SETITEMS): built from
    arguments it would copy them, which a pickle could repeat without end.
    """

    def __init__(self, data: bytes, storages: dict[str, zipfile.ZipInfo]):
        super().__init__(data)
        self._storages = storages
        self._placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):  # noqa: D102 - never imports: see the module docstring
        module, name = str(module), str(name)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        # Python 2 names (protocol 2 writes __builtin__ for builtins) are reported by their Python 3 names.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key not in self._placeholders:
            if len(self._placeholders) >= _MAX_PLACEHOLDERS:
                raise pickle.UnpicklingError(f"the pickle names more than {_MAX_PLACEHOLDERS} classes")
            label = f"{module[:200]}.{name[:200]}"
            self._placeholders[key] = type(f"Opaque[{label}]", (Opaque,), {"_ci_global": label, "__slots__": ()})
        return self._placeholders[key]

    def identity_key(self, key):
        # Placeholders, their classes and tensor records keep object's identity hash (none defines __hash__).
        return isinstance(key, (Opaque, _Inert)) or (isinstance(key, type) and issubclass(key, Opaque))

    def call(self, func, args):
        if func is OrderedDict:
            if args:
                raise pickle.UnpicklingError("an OrderedDict built from arguments (torch.save writes it empty, "
                                             "then its items)")
            return self.built(OrderedDict())
        if func in _REBUILDERS:
            return self.built(func(*args), args)
        if isinstance(func, type) and issubclass(func, Opaque):
            return self.built(func(*args), args)
        raise pickle.UnpicklingError(f"the pickle calls {_kind(func)}, which this reader does not run")

    def new_object(self, cls, args, kwargs):
        if cls is OrderedDict and not args and not kwargs:
            return self.built(OrderedDict())
        if isinstance(cls, type) and issubclass(cls, Opaque):
            return self.built(cls.__new__(cls, *args, **kwargs), (*args, *kwargs.values()))
        raise pickle.UnpicklingError(f"the pickle creates an object of {_kind(cls)}, which this reader does not")

    def set_state(self, obj, state):
        if isinstance(obj, Opaque):
            self.grown(obj, [state])
            obj.__setstate__(state)
        elif type(obj) is OrderedDict and isinstance(state, dict):
            # A state dict's state is its _metadata (module versions): kept as attributes, like pickle does.
            self.grown(obj, list(state.values()))
            for name, value in state.items():
                if type(name) is str and name.isidentifier():
                    setattr(obj, name[:100], value)
        elif isinstance(obj, _Inert):
            obj.__setstate__(state)  # refuses
        else:
            raise pickle.UnpicklingError(f"the pickle sets the state of a {type(obj).__name__}")

    def add_items(self, obj, items):
        if not isinstance(obj, Opaque):
            raise pickle.UnpicklingError(f"the pickle appends to a {type(obj).__name__}")
        self.grown(obj, items)
        obj.extend(items)

    def set_items(self, obj, pairs):
        if not isinstance(obj, Opaque):
            raise pickle.UnpicklingError(f"the pickle sets items of a {type(obj).__name__}")
        self.grown(obj, [part for pair in pairs for part in pair])
        for key, value in pairs:
            obj[key] = value

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise pickle.UnpicklingError(f"unexpected persistent id {_kind(pid)} (expected a torch storage)")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage of unknown type {_kind(storage_type)}")
        key = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        if not isinstance(key, str) or key not in self._storages:
            raise pickle.UnpicklingError(f"storage {_kind(key)} has no record in the archive")
        if type(numel) is not int or not 0 <= numel <= _MAX_ELEMENTS:
            raise pickle.UnpicklingError(f"storage {key!r}: bad element count {_kind(numel)}")
        ref = StorageRef(key, storage_type.dtype, numel)
        if self._storages[key].file_size < ref.nbytes:
            raise pickle.UnpicklingError(f"storage {key!r}: {numel} elements of {ref.dtype} need {ref.nbytes} bytes, "
                                         f"its record has {self._storages[key].file_size}")
        return self.built(ref)

    @property
    def opaque(self) -> tuple[str, ...]:
        return tuple(sorted(cls._ci_global for cls in self._placeholders.values()))  # names cut to 200 characters


class Archive:
    """An opened torch zip archive: its unpickled ``root`` (with ``TensorRef``s and ``Opaque``s) and its storages.

    Use as a context manager (the zip file stays open until the end of the ``with`` block).
    """

    def __init__(self, path: Path, error_cls: type[CIError], what: str):
        self.path = path
        self._error, self._what = error_cls, what
        self._zip = _open_zip(path, error_cls, what)
        try:
            self.prefix = _single_folder(self._zip, path, error_cls, what)
            names = set(self._zip.namelist())
            self.is_torchscript = f"{self.prefix}constants.pkl" in names or any(
                n.startswith(f"{self.prefix}code/") for n in names)
            self.little_endian = self._byteorder() == "little"
            storages = {n[len(self.prefix) + 5:]: self._zip.getinfo(n) for n in names
                        if n.startswith(f"{self.prefix}data/") and not n.endswith("/")}
            unpickler = _RestrictedUnpickler(self._record("data.pkl", MAX_PICKLE_BYTES), storages)
            try:
                self.root = unpickler.load()
            except Exception as exc:  # nothing but this module's own code ran: any failure means a malformed pickle
                detail = printable(f"{type(exc).__name__}: {exc}")
                detail = detail if len(detail) <= 300 else detail[:297] + "..."
                raise self._fail(f"its pickle data.pkl cannot be read safely ({detail})") from None
            self.opaque = unpickler.opaque
            self._storages = storages
            self._bytes: dict[str, bytearray] = {}
        except BaseException:
            self._zip.close()
            raise

    def __enter__(self) -> "Archive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._bytes.clear()

    def _fail(self, message: str) -> CIError:
        return self._error(f"{self.path}: {message}; expected {self._what}")

    def _byteorder(self) -> str:
        name = f"{self.prefix}byteorder"
        if name not in self._zip.NameToInfo:
            return "little"  # torch writes the mark since 1.13; files before it are little-endian
        order = self._record("byteorder", 16).decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise self._fail(f"unknown byte order {order!r} in its byteorder record")
        return order

    def _record(self, name: str, limit: int) -> bytes:
        info = self._zip.getinfo(f"{self.prefix}{name}") if f"{self.prefix}{name}" in self._zip.NameToInfo else None
        if info is None:
            raise self._fail(f"no {self.prefix}{name} in the archive (not a torch.save file?)")
        if info.compress_type != zipfile.ZIP_STORED:
            raise self._fail(f"record {info.filename} is compressed, which torch never writes")
        if info.file_size > limit:
            raise self._fail(f"record {info.filename} has {info.file_size} bytes, more than the {limit} allowed")
        try:
            return self._zip.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, ValueError) as exc:
            raise self._fail(f"record {info.filename} is unreadable ({exc}); is the file truncated?") from exc

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """The tensor ``ref`` points to, read from the archive (a fresh CPU tensor that owns its memory)."""
        storage = ref.storage
        if storage.key not in self._bytes:
            self._bytes[storage.key] = bytearray(self._record(f"data/{storage.key}", self._storages[storage.key].file_size))
        raw = self._bytes[storage.key]
        if len(raw) < storage.nbytes:
            raise self._fail(f"storage {storage.key!r} holds {len(raw)} bytes, fewer than its {storage.nbytes}")
        numel = 1
        for n in ref.size:
            numel *= n
        if any(n < 0 for n in ref.size) or any(s < 0 for s in ref.stride) or ref.offset < 0:
            raise self._fail(f"a tensor of size {list(ref.size)}, stride {list(ref.stride)}, offset {ref.offset} "
                             "is not a valid view of its storage")
        if numel:
            last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
            if last >= storage.numel:
                raise self._fail(f"a tensor of size {list(ref.size)} at offset {ref.offset} reaches element {last} "
                                 f"of storage {storage.key!r}, which has {storage.numel}")
        if storage.numel == 0 or numel == 0:  # nothing to read, whatever the offset says
            return torch.empty(ref.size, dtype=storage.dtype)
        flat = torch.frombuffer(raw, dtype=torch.uint8, count=storage.nbytes)
        element = _element_size(storage.dtype)
        if self.little_endian != (sys.byteorder == "little") and element > 1:
            unit = element // 2 if storage.dtype.is_complex else element  # a complex number swaps per part
            flat = flat.view(-1, unit).flip(-1).reshape(-1)  # the file's byte order is not this machine's
        values = flat.view(storage.dtype)
        return values.as_strided(ref.size, ref.stride, ref.offset).clone()


def _open_zip(path: Path, error_cls: type[CIError], what: str) -> zipfile.ZipFile:
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_LEGACY_PREFIX))
    except OSError as exc:
        raise error_cls(f"{path}: cannot be read ({exc}); expected {what}") from exc
    if head.startswith(_LEGACY_PREFIX):
        raise error_cls(f"{path}: a torch file in the legacy (pre-1.6, non-zip) format, which is not read here "
                        f"(it cannot be checked without unpickling it); re-save it with torch.save in torch >= 1.6; "
                        f"expected {what}")
    if not head.startswith(_ZIP_PREFIX):
        raise error_cls(f"{path}: not a torch zip archive (it starts with {head[:4]!r}, not 'PK\\x03\\x04'); "
                        f"expected {what}")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise error_cls(f"{path}: not a readable zip archive ({exc}); is the file truncated? expected {what}") from exc


def _check_names(archive: zipfile.ZipFile, path: Path, error_cls: type[CIError], what: str) -> None:
    """No two entries whose names are equal or differ in case only, and none encrypted.

    zipfile finds an entry by its exact name, and the last of equal names; torch's reader (miniz) matches
    names ignoring case and takes the first: with ``archive/DATA.PKL`` before ``archive/data.pkl`` torch
    loads the first, zipfile the second.  Such an archive has two readings, so it is refused.
    """
    seen: dict[str, str] = {}
    for info in archive.infolist():
        if info.flag_bits & 0x1:
            raise error_cls(f"{path}: zip entry {printable(info.filename[:200])!r} is encrypted, which torch never "
                            f"writes; expected {what}")
        folded = info.filename.casefold()
        if folded in seen:
            same = "the same name" if seen[folded] == info.filename else "names that differ only in case"
            raise error_cls(f"{path}: zip entries {printable(seen[folded][:200])!r} and "
                            f"{printable(info.filename[:200])!r} have {same}: torch reads the first of them, ignoring "
                            f"case, other zip readers another, so the archive has two readings; expected {what}")
        seen[folded] = info.filename


def _single_folder(archive: zipfile.ZipFile, path: Path, error_cls: type[CIError], what: str) -> str:
    _check_names(archive, path, error_cls, what)
    tops = {name.split("/", 1)[0] for name in archive.namelist()}
    if len(tops) != 1 or not all("/" in name for name in archive.namelist()):
        raise error_cls(f"{path}: a zip archive whose entries are not under one folder "
                        f"({printable(str([t[:40] for t in sorted(tops)[:5]]))}), "
                        f"unlike every torch.save file; expected {what}")
    return f"{tops.pop()}/"


def open_archive(path: str | Path, error_cls: type[CIError], what: str) -> Archive:
    """Open the torch zip archive at ``path`` and unpickle its ``data.pkl`` safely.

    Any problem (not a zip, truncated, legacy format, a pickle that cannot be read without running code)
    raises ``error_cls`` naming the file and ``what`` it should be.
    """
    return Archive(Path(path), error_cls, what)


def script_tensors(archive: Archive) -> dict[str, TensorRef]:
    """The tensors of a TorchScript module archive, keyed by their dotted attribute path (``visual.conv1.weight``).

    TorchScript pickles each module as an object of class ``__torch__.<...>`` whose state is the dict of
    its attributes (parameters, buffers, submodules and plain values): the walk keeps the tensors and
    descends into the submodules.
    """
    found: dict[str, TensorRef] = {}

    def walk(obj: Opaque, prefix: str, depth: int) -> None:
        if depth > 64:
            raise archive._fail("its modules are nested more than 64 deep")
        for name, value in obj.attributes.items():
            if not isinstance(name, str):
                continue
            if isinstance(value, TensorRef):
                found[prefix + name] = value
            elif isinstance(value, Opaque) and value._ci_global.startswith("__torch__."):
                walk(value, f"{prefix}{name}.", depth + 1)

    if not isinstance(archive.root, Opaque) or not archive.root._ci_global.startswith("__torch__."):
        raise archive._fail(f"its data.pkl holds {type(archive.root).__name__}, not a TorchScript module")
    walk(archive.root, "", 0)
    return found
