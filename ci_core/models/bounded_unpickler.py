"""A pickle interpreter whose work and memory are bounded by limits checked before anything is allocated.

``pickle.Unpickler`` (C or Python) trusts the pickle with its resources: a memo
index of 2**32 - 1 allocates a 64 GiB memo, a million nested tuples used as a
dict key overflow the C stack while hashing (a segfault), integer keys that
share one hash make every dict insertion scan all the others (quadratic), and a
1 MB pickle that rebuilds a 200k-entry dict thousands of times asks for tens of
gigabytes.  This interpreter reads the opcodes itself, with no recursion, and
refuses a pickle as soon as it would pass one of ``Limits``:

* ``objects``: the work done, counted as objects created plus items stored in
  containers, so that copying a container again and again counts every copy;
* ``memo``: entries in the memo (a dict, so a huge index costs one entry);
* ``items``: items of one container or one argument tuple;
* ``depth``: nesting of containers, tracked as each one is built;
* ``key_chars``: length of a dict key or set element.

Dict keys and set elements must be strings, bytes, booleans, None, integers
below 2**61 - 1 in size, or objects of the subclass that hash by identity (a
pickled optimizer keys its state by parameter): Python hashes strings with a
per-process random key, and those integers to themselves, so no pickle can
make them collide.  A
container may not change after it was stored in another one, which only a
cyclic structure needs (a checkpoint has none): that keeps the depth exact and
every result acyclic, so that callers may walk it.

What a global resolves to, what a persistent id means and which callables may
be called is the subclass's (``find_class``, ``persistent_load``, ``call``,
``new_object``, ``set_state``); the interpreter itself builds only the plain
containers and scalars.  Extension codes and out-of-band buffers are refused.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class Limits:
    """Bounds on one pickle's work (see the module docstring); the defaults hold OpenAI's largest CLIP archive."""

    objects: int = 2_000_000
    memo: int = 1_000_000
    items: int = 1_000_000
    depth: int = 100
    key_chars: int = 1_000


class PickleLimitError(ValueError):
    """A pickle that passes one of the ``Limits``, or that only an unbounded reader could read."""


class _Mark:
    __slots__ = ()


_MARK = _Mark()
# |k| below the modulus of Python's integer hash: such integers hash to themselves, so no two collide
# (except -1 and -2, one pair).
_MAX_KEY_INT = 2**61 - 1
_MUTABLE = (list, dict, set)
_LINE_LIMIT = 4_400  # a text-protocol line: Python converts integers of at most 4,300 digits


class BoundedUnpickler:
    """Reads one pickle from ``data`` within ``limits``; see the module docstring for what subclasses decide."""

    def __init__(self, data: bytes, limits: Limits = Limits()):
        self._data = memoryview(data)
        self._pos = 0
        self.limits = limits
        self._stack: list = []
        self._marks: list[list] = []
        self._memo: dict[int, Any] = {}
        self._work = 0
        # id -> nesting depth of every container built; the containers stay referenced in _alive so their ids
        # are never reused while the pickle is read.
        self._depth: dict[int, int] = {}
        self._alive: list = []
        self._sealed: set[int] = set()

    # ------------------------------------------------------------------ for subclasses

    def find_class(self, module: str, name: str) -> Any:
        raise PickleLimitError(f"global {module}.{name} is not resolved by this reader")

    def persistent_load(self, pid: Any) -> Any:
        raise PickleLimitError("persistent ids are not resolved by this reader")

    def call(self, func: Any, args: tuple) -> Any:
        """REDUCE: ``func(*args)``, for the callables the subclass allows."""
        raise PickleLimitError(f"the pickle calls {func!r}, which this reader does not run")

    def new_object(self, cls: Any, args: tuple, kwargs: dict) -> Any:
        """NEWOBJ, NEWOBJ_EX, INST, OBJ: ``cls.__new__(cls, *args, **kwargs)``."""
        raise PickleLimitError(f"the pickle creates an object of {cls!r}, which this reader does not create")

    def set_state(self, obj: Any, state: Any) -> None:
        """BUILD on an object the subclass made."""
        raise PickleLimitError(f"the pickle sets the state of {type(obj).__name__}, which this reader does not do")

    def add_items(self, obj: Any, items: list) -> None:
        """APPEND(S) on an object the subclass made."""
        raise PickleLimitError(f"the pickle appends to {type(obj).__name__}")

    def set_items(self, obj: Any, pairs: list[tuple]) -> None:
        """SETITEM(S) on an object the subclass made."""
        raise PickleLimitError(f"the pickle sets items of {type(obj).__name__}")

    def identity_key(self, key: Any) -> bool:
        """Whether ``key``, an object the subclass made, hashes by identity (so it may be a key too)."""
        return False

    # ------------------------------------------------------------------ bookkeeping the subclass uses too

    def built(self, obj: Any, parts=()) -> Any:
        """Record ``obj``, a new container made of ``parts``: counts the work and checks its depth."""
        self._count(1 + len(parts))
        depth = 1 + max((self.depth_of(p) for p in parts), default=0)
        if depth > self.limits.depth:
            raise PickleLimitError(f"the pickle nests containers more than {self.limits.depth} deep")
        for part in parts:
            self._seal(part)
        self._depth[id(obj)] = depth
        self._alive.append(obj)
        return obj

    def grown(self, obj: Any, parts) -> None:
        """Record that ``parts`` were stored in the existing container ``obj``."""
        if id(obj) in self._sealed or any(part is obj for part in parts):
            raise PickleLimitError("the pickle changes a container after storing it in another, or stores it in "
                                   "itself (a cyclic structure, which a checkpoint never holds)")
        self._count(len(parts))
        depth = 1 + max((self.depth_of(p) for p in parts), default=0)
        if depth > self.limits.depth:
            raise PickleLimitError(f"the pickle nests containers more than {self.limits.depth} deep")
        for part in parts:
            self._seal(part)
        self._depth[id(obj)] = max(self._depth.get(id(obj), 1), depth)

    def depth_of(self, obj: Any) -> int:
        return self._depth.get(id(obj), 0)

    def check_key(self, key: Any) -> Any:
        """``key`` if it may be a dict key or set element (see the module docstring), else an error."""
        kind = type(key)
        if kind in (str, bytes):
            if len(key) > self.limits.key_chars:
                raise PickleLimitError(f"a dict key of {len(key)} characters (at most {self.limits.key_chars} "
                                       f"allowed): {key[:40]!r}...")
        elif kind is int:
            if not -_MAX_KEY_INT < key < _MAX_KEY_INT:
                raise PickleLimitError(f"an integer dict key beyond +-(2**61 - 1) (keys that large can be made to "
                                       "share one hash)")
        elif kind not in (bool, type(None)) and not self.identity_key(key):
            raise PickleLimitError(f"a dict key or set element of type {kind.__name__} (only strings, bytes, "
                                   "integers, booleans and None are read)")
        return key

    def _count(self, units: int) -> None:
        self._work += units
        if self._work > self.limits.objects:
            raise PickleLimitError(f"the pickle builds more than {self.limits.objects} objects and items")

    def _seal(self, part: Any) -> None:
        if id(part) in self._depth and not isinstance(part, tuple):
            self._sealed.add(id(part))

    # ------------------------------------------------------------------ reading

    def _read(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._data):
            raise PickleLimitError(f"the pickle ends inside an opcode's argument (wants {n} bytes at offset "
                                   f"{self._pos}, has {len(self._data) - self._pos})")
        chunk = self._data[self._pos:self._pos + n]
        self._pos += n
        return chunk

    def _unpack(self, fmt: str) -> int | float:
        return struct.unpack(fmt, self._read(struct.calcsize(fmt)))[0]

    def _line(self) -> bytes:
        end = bytes(self._data[self._pos:self._pos + _LINE_LIMIT]).find(b"\n")
        if end < 0:
            raise PickleLimitError(f"a text opcode's argument at offset {self._pos} has no end of line within "
                                   f"{_LINE_LIMIT} bytes")
        line = bytes(self._read(end + 1))[:-1]
        return line

    def _sized(self, fmt: str) -> memoryview:
        size = self._unpack(fmt)
        return self._read(size)

    def _text(self, raw: memoryview) -> str:
        return str(raw, "utf-8", "surrogatepass")

    def _pop_mark(self) -> list:
        if not self._marks:
            raise PickleLimitError("the pickle uses a MARK it never set")
        items = self._stack
        self._stack = self._marks.pop()
        if len(items) > self.limits.items:
            raise PickleLimitError(f"a container or call of {len(items)} items (at most {self.limits.items} allowed)")
        return items

    def _pop(self) -> Any:
        if not self._stack:
            raise PickleLimitError("the pickle pops an empty stack")
        return self._stack.pop()

    def _top(self) -> Any:
        if not self._stack:
            raise PickleLimitError("the pickle uses an empty stack")
        return self._stack[-1]

    def _push(self, value: Any) -> None:
        self._stack.append(value)

    def _memo_put(self, index: int) -> None:
        if index < 0:
            raise PickleLimitError(f"negative memo index {index}")
        if index not in self._memo and len(self._memo) >= self.limits.memo:
            raise PickleLimitError(f"the pickle memoises more than {self.limits.memo} objects")
        self._memo[index] = self._top()

    def _memo_get(self, index: int) -> None:
        self._count(1)  # a reference costs little, but a pickle of GETs alone could still fill memory with them
        if index not in self._memo:
            raise PickleLimitError(f"memo index {index} was never set")
        self._push(self._memo[index])

    def load(self) -> Any:
        """The pickled object (reading stops at STOP; anything after it is ignored, as pickle does)."""
        dispatch = _DISPATCH
        while True:
            if self._pos >= len(self._data):
                raise PickleLimitError("the pickle ends without a STOP opcode")
            code = self._data[self._pos]
            self._pos += 1
            handler = dispatch.get(code)
            if handler is None:
                raise PickleLimitError(f"opcode {bytes([code])!r} at offset {self._pos - 1} is not read here")
            if handler(self) is _STOP:
                if self._marks or len(self._stack) != 1:
                    raise PickleLimitError("the pickle stops with an unbalanced stack")
                return self._stack[0]

    # ------------------------------------------------------------------ opcodes

    def _op_mark(self):
        self._marks.append(self._stack)
        self._stack = []
        if len(self._marks) > self.limits.depth:
            raise PickleLimitError(f"the pickle opens more than {self.limits.depth} MARKs at once")

    def _op_stop(self):
        return _STOP

    def _op_pop(self):
        if self._stack:
            self._stack.pop()
        else:
            self._pop_mark()

    def _op_pop_mark(self):
        self._pop_mark()

    def _op_dup(self):
        self._count(1)
        self._push(self._top())

    def _op_proto(self):
        proto = self._read(1)[0]
        if proto > 5:
            raise PickleLimitError(f"pickle protocol {proto} is newer than 5")

    def _op_frame(self):
        self._unpack("<Q")  # frames only group opcodes; the data follows inline

    def _scalar(self, value) -> None:
        self._count(1)
        self._push(value)

    def _op_none(self):
        self._scalar(None)

    def _op_true(self):
        self._scalar(True)

    def _op_false(self):
        self._scalar(False)

    def _op_binint(self):
        self._scalar(self._unpack("<i"))

    def _op_binint1(self):
        self._scalar(self._read(1)[0])

    def _op_binint2(self):
        self._scalar(self._unpack("<H"))

    def _op_long1(self):
        self._scalar(int.from_bytes(self._sized("<B"), "little", signed=True))

    def _op_long4(self):
        raw = self._sized("<i")
        if len(raw) > 1_000:
            raise PickleLimitError(f"an integer of {len(raw)} bytes")
        self._scalar(int.from_bytes(raw, "little", signed=True))

    def _op_int(self):
        line = self._line()
        self._scalar(False if line == b"00" else True if line == b"01" else int(line))

    def _op_long(self):
        self._scalar(int(self._line().rstrip(b"L")))

    def _op_binfloat(self):
        self._scalar(self._unpack(">d"))

    def _op_float(self):
        self._scalar(float(self._line()))

    def _op_binunicode(self):
        self._scalar(self._text(self._sized("<I")))

    def _op_short_binunicode(self):
        self._scalar(self._text(self._sized("<B")))

    def _op_binunicode8(self):
        self._scalar(self._text(self._sized("<Q")))

    def _op_unicode(self):
        self._scalar(self._line().decode("raw-unicode-escape"))

    def _op_binbytes(self):
        self._scalar(bytes(self._sized("<I")))

    def _op_short_binbytes(self):
        self._scalar(bytes(self._sized("<B")))

    def _op_binbytes8(self):
        self._scalar(bytes(self._sized("<Q")))

    def _op_bytearray8(self):
        self._scalar(bytearray(self._sized("<Q")))

    def _op_binstring(self):
        self._scalar(bytes(self._sized("<i")).decode("ascii"))  # Python 2 str: ASCII, as torch reads it

    def _op_short_binstring(self):
        self._scalar(bytes(self._sized("<B")).decode("ascii"))

    def _op_empty_tuple(self):
        self._push(self.built((), ()))

    def _tuple(self, n: int) -> None:
        if len(self._stack) < n:
            raise PickleLimitError("the pickle builds a tuple from an empty stack")
        items = tuple(self._stack[-n:])
        del self._stack[-n:]
        self._push(self.built(items, items))

    def _op_tuple1(self):
        self._tuple(1)

    def _op_tuple2(self):
        self._tuple(2)

    def _op_tuple3(self):
        self._tuple(3)

    def _op_tuple(self):
        items = tuple(self._pop_mark())
        self._push(self.built(items, items))

    def _op_empty_list(self):
        self._push(self.built([]))

    def _op_list(self):
        items = self._pop_mark()
        self._push(self.built(list(items), items))

    def _op_empty_dict(self):
        self._push(self.built({}))

    def _op_dict(self):
        items = self._pop_mark()
        if len(items) % 2:
            raise PickleLimitError("DICT with an odd number of items")
        result = self.built({}, items)
        for k in range(0, len(items), 2):
            result[self.check_key(items[k])] = items[k + 1]
        self._push(result)

    def _op_empty_set(self):
        self._push(self.built(set()))

    def _op_frozenset(self):
        items = self._pop_mark()
        self._push(self.built(frozenset(self.check_key(i) for i in items), items))

    def _op_append(self):
        item = self._pop()
        self._append(self._top(), [item])

    def _op_appends(self):
        items = self._pop_mark()
        self._append(self._top(), items)

    def _append(self, target, items: list) -> None:
        if type(target) is list:
            self.grown(target, items)
            if len(target) + len(items) > self.limits.items:
                raise PickleLimitError(f"a list of more than {self.limits.items} items")
            target.extend(items)
        else:
            self.add_items(target, items)

    def _op_additems(self):
        items = self._pop_mark()
        target = self._top()
        if type(target) is not set:
            raise PickleLimitError(f"ADDITEMS on {type(target).__name__}, not a set")
        self.grown(target, items)
        if len(target) + len(items) > self.limits.items:
            raise PickleLimitError(f"a set of more than {self.limits.items} items")
        target.update(self.check_key(i) for i in items)

    def _op_setitem(self):
        value = self._pop()
        key = self._pop()
        self._setitems(self._top(), [(key, value)])

    def _op_setitems(self):
        items = self._pop_mark()
        if len(items) % 2:
            raise PickleLimitError("SETITEMS with an odd number of items")
        self._setitems(self._top(), [(items[k], items[k + 1]) for k in range(0, len(items), 2)])

    def _setitems(self, target, pairs: list[tuple]) -> None:
        if type(target) in (dict, OrderedDict):
            self.grown(target, [part for pair in pairs for part in pair])
            if len(target) + len(pairs) > self.limits.items:
                raise PickleLimitError(f"a dict of more than {self.limits.items} items")
            for key, value in pairs:
                target[self.check_key(key)] = value
        else:
            for key, _ in pairs:
                self.check_key(key)
            self.set_items(target, pairs)

    def _op_put(self):
        self._memo_put(int(self._line()))

    def _op_binput(self):
        self._memo_put(self._read(1)[0])

    def _op_long_binput(self):
        self._memo_put(self._unpack("<I"))

    def _op_memoize(self):
        self._memo_put(len(self._memo))

    def _op_get(self):
        self._memo_get(int(self._line()))

    def _op_binget(self):
        self._memo_get(self._read(1)[0])

    def _op_long_binget(self):
        self._memo_get(self._unpack("<I"))

    def _global(self, module: str, name: str) -> None:
        self._count(1)
        self._push(self.find_class(module, name))

    def _op_global(self):
        module = self._line().decode("utf-8")
        name = self._line().decode("utf-8")
        self._global(module, name)

    def _op_stack_global(self):
        name, module = self._pop(), self._pop()
        if type(module) is not str or type(name) is not str:
            raise PickleLimitError("STACK_GLOBAL takes two strings")
        self._global(module, name)

    def _op_reduce(self):
        args = self._pop()
        func = self._pop()
        if type(args) is not tuple:
            raise PickleLimitError(f"REDUCE arguments are {type(args).__name__}, not a tuple")
        self._push(self.call(func, args))

    def _op_newobj(self):
        args = self._pop()
        cls = self._pop()
        if type(args) is not tuple:
            raise PickleLimitError(f"NEWOBJ arguments are {type(args).__name__}, not a tuple")
        self._push(self.new_object(cls, args, {}))

    def _op_newobj_ex(self):
        kwargs, args, cls = self._pop(), self._pop(), self._pop()
        if type(args) is not tuple or type(kwargs) is not dict:
            raise PickleLimitError("NEWOBJ_EX takes a tuple and a dict")
        self._push(self.new_object(cls, args, kwargs))

    def _op_inst(self):
        module = self._line().decode("utf-8")
        name = self._line().decode("utf-8")
        args = tuple(self._pop_mark())
        self._count(1)
        self._push(self.new_object(self.find_class(module, name), self.built(args, args), {}))

    def _op_obj(self):
        items = self._pop_mark()
        if not items:
            raise PickleLimitError("OBJ without a class")
        args = tuple(items[1:])
        self._push(self.new_object(items[0], self.built(args, args), {}))

    def _op_build(self):
        state = self._pop()
        self.set_state(self._top(), state)

    def _op_binpersid(self):
        self._push(self.persistent_load(self._pop()))

    def _op_persid(self):
        self._push(self.persistent_load(self._line().decode("ascii")))


_STOP = object()
_OPCODES = {
    b"(": "mark", b".": "stop", b"0": "pop", b"1": "pop_mark", b"2": "dup", b"\x80": "proto", b"\x95": "frame",
    b"N": "none", b"\x88": "true", b"\x89": "false", b"J": "binint", b"K": "binint1", b"M": "binint2",
    b"\x8a": "long1", b"\x8b": "long4", b"I": "int", b"L": "long", b"G": "binfloat", b"F": "float",
    b"X": "binunicode", b"\x8c": "short_binunicode", b"\x8d": "binunicode8", b"V": "unicode",
    b"B": "binbytes", b"C": "short_binbytes", b"\x8e": "binbytes8", b"\x96": "bytearray8",
    b"T": "binstring", b"U": "short_binstring",
    b")": "empty_tuple", b"\x85": "tuple1", b"\x86": "tuple2", b"\x87": "tuple3", b"t": "tuple",
    b"]": "empty_list", b"l": "list", b"}": "empty_dict", b"d": "dict", b"\x8f": "empty_set", b"\x91": "frozenset",
    b"a": "append", b"e": "appends", b"\x90": "additems", b"s": "setitem", b"u": "setitems",
    b"p": "put", b"q": "binput", b"r": "long_binput", b"\x94": "memoize", b"g": "get", b"h": "binget",
    b"j": "long_binget", b"c": "global", b"\x93": "stack_global", b"R": "reduce", b"\x81": "newobj",
    b"\x92": "newobj_ex", b"i": "inst", b"o": "obj", b"b": "build", b"Q": "binpersid", b"P": "persid",
}
_DISPATCH = {code[0]: getattr(BoundedUnpickler, f"_op_{name}") for code, name in _OPCODES.items()}
