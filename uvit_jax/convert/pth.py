"""Read and write PyTorch `.pth` state dicts without torch.

Zip format (torch.save since 1.6, what we write): a zip (entries stored, data 64-byte aligned) holding
`<prefix>/data.pkl` (a protocol-2 pickle of the object, tensors pickled as `torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, ...)` with the storage as a persistent id `('storage', torch.<Type>Storage, key, location,
numel)`), the raw little-endian storages `<prefix>/data/<key>`, and `<prefix>/version`, `<prefix>/byteorder`.

Legacy format (before 1.6, or `_use_new_zipfile_serialization=False`; e.g. pytorch-fid's 2019 Inception weights):
a sequence of pickles and raw data in one file, read by `_load_legacy`. (The even older tar format is not read.)

Reading uses a restricted unpickler: only OrderedDict, the tensor/parameter rebuild functions and storage types
are allowed, so loading a file runs no foreign code. A pickle is also refused past generous size limits (bytes,
opcodes, nesting), so a hostile file cannot exhaust memory or the stack either. Tensors unpickle as references and
become numpy arrays once the storages are read. `load_state_dict` also accepts `.npz` files (official names) and
plain dicts.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np

from uvit_jax import console

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
}
_DTYPE_STORAGES = {v: k for k, v in _STORAGE_DTYPES.items()}
_ALIGN = 64  # torch aligns every record's data to 64 bytes (needed for torch.load(mmap=True))
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy (pre-1.6) torch.save file
_LEGACY_PROTOCOL = 1001
_LEGACY_HEAD = pickle.dumps(_LEGACY_MAGIC, protocol=2)
# Limits on one pickle (the object pickle is ~100 bytes and ~25 opcodes per tensor; the data is stored outside it).
_MAX_PICKLE_BYTES = 256 * 2 ** 20
_MAX_PICKLE_OPS = 10_000_000
_MAX_PICKLE_DEPTH = 100


class RefusedPickleError(pickle.UnpicklingError, ValueError):
    """A pickle that is not loaded: it names a disallowed global, or exceeds the size limits."""


class _StorageType:
    """Stand-in for a `torch.<Type>Storage` class inside the pickle."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _StorageRef(NamedTuple):
    """A storage named by a persistent id; `view` = (offset, numel) inside the root storage (legacy views)."""
    key: str
    dtype: np.dtype
    view: tuple[int, int] | None = None


class _TensorRef(NamedTuple):
    """A tensor as pickled: resolved to an array once the storages are read (legacy files store them last)."""
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Allows only the globals in `_ALLOWED` and storage types; records the storages the pickle refers to."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path
        self.storages: dict[str, _StorageRef] = {}  # root key -> its dtype (and no view)

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise RefusedPickleError(f"{self._path}: refusing to unpickle {module}.{name} (only tensors, "
                                 "parameters and OrderedDicts are allowed in a checkpoint)")

    def persistent_load(self, pid):
        # zip format: ('storage', type, key, location, numel); legacy: the same + view_metadata (or None).
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise RefusedPickleError(f"{self._path}: unsupported persistent id {_short_repr(pid)}")
        key, dtype = str(pid[2]), pid[1].dtype
        self.storages[key] = _StorageRef(key, dtype)
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return self.storages[key]
        _view_key, offset, numel = view
        return _StorageRef(key, dtype, (int(offset), int(numel)))


def _tensor_array(ref: _TensorRef, storages: Mapping[str, np.ndarray], path: str) -> np.ndarray:
    """The array a `_TensorRef` describes, copied out of its (flat) storage."""
    if ref.storage.key not in storages:
        raise ValueError(f"{path}: the data of storage {ref.storage.key} is missing")
    storage = storages[ref.storage.key]
    if ref.storage.view is not None:
        start, numel = ref.storage.view
        storage = storage[start:start + numel]
    if int(np.prod(ref.size)) == 0:
        return np.empty(ref.size, storage.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= storage.size:
        raise ValueError(f"{path}: corrupt tensor: offset {ref.offset}, size {ref.size}, stride {ref.stride} "
                         f"exceed its storage of {storage.size} elements")
    view = np.lib.stride_tricks.as_strided(storage[ref.offset:], shape=ref.size,
                                           strides=[s * storage.itemsize for s in ref.stride])
    return np.array(view)  # own, contiguous copy


def _resolve(obj, storages: Mapping[str, np.ndarray], path: str, memo: dict | None = None, depth: int = 0):
    """Replace every `_TensorRef` in the unpickled containers by its array (shared containers are resolved once)."""
    if isinstance(obj, _TensorRef):
        return _tensor_array(obj, storages, path)
    if not isinstance(obj, (Mapping, list, tuple)):
        return obj
    if depth > _MAX_PICKLE_DEPTH:
        raise RefusedPickleError(f"{path}: refusing a pickle nested more than {_MAX_PICKLE_DEPTH} levels deep")
    memo = {} if memo is None else memo
    if id(obj) not in memo:
        if isinstance(obj, Mapping):
            memo[id(obj)] = type(obj)((k, _resolve(v, storages, path, memo, depth + 1)) for k, v in obj.items())
        else:
            memo[id(obj)] = type(obj)(_resolve(v, storages, path, memo, depth + 1) for v in obj)
    return memo[id(obj)]


class _Bounded:
    """Read access to a file that refuses to go more than `limit` bytes past where it started."""

    def __init__(self, f, limit: int, path: str):
        self._f, self._left, self._path = f, limit, path

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise RefusedPickleError(f"{self._path}: refusing a pickle larger than {_MAX_PICKLE_BYTES:,} bytes")
        return data

    def read(self, n: int = -1) -> bytes:
        return self._take(self._f.read(self._left + 1 if n is None or n < 0 else min(n, self._left + 1)))

    def readline(self) -> bytes:
        return self._take(self._f.readline(self._left + 1))


def _check_limits(f, path: str) -> None:
    """Scan one pickle from `f`'s position (without building anything) against the byte and opcode limits."""
    ops = 0
    try:
        for _ in pickletools.genops(_Bounded(f, _MAX_PICKLE_BYTES, path)):
            ops += 1
            if ops > _MAX_PICKLE_OPS:
                raise RefusedPickleError(f"{path}: refusing a pickle of more than {_MAX_PICKLE_OPS:,} opcodes")
    except RefusedPickleError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or garbled pickle: name the file
        raise ValueError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from None


def _unpickle(f, path: str) -> tuple[object, _RestrictedUnpickler]:
    """One pickle from seekable `f` through the restricted unpickler, after checking the limits."""
    start = f.tell()
    _check_limits(f, path)
    f.seek(start)
    unpickler = _RestrictedUnpickler(f, path)
    try:
        return unpickler.load(), unpickler
    except RefusedPickleError:
        raise
    except Exception as e:  # noqa: BLE001 - wrong arguments to an allowed global, bad memo, ...: name the file
        raise ValueError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from None


def _short_repr(obj, limit: int = 200) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def _unwrap(obj, path: str) -> dict[str, np.ndarray]:
    """A state dict, or the one inside a {"state_dict": ...} / {"model": ...} wrapper."""
    if isinstance(obj, Mapping) and not all(isinstance(v, np.ndarray) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                               for k, v in obj.items()):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors (nor a "
                         "{'state_dict': ...} / {'model': ...} wrapper of one)")
    return dict(obj)


def _load_zip(path: str):
    """Unpickled object of a zip-format checkpoint, tensors resolved."""
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path} is not a PyTorch checkpoint (no <name>/data.pkl in the archive)")
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = (prefix + "byteorder" in zf.namelist()
                      and zf.read(prefix + "byteorder").strip() == b"big")
        with zf.open(pkl[0]) as f:
            raw = f.read(_MAX_PICKLE_BYTES + 1)
        if len(raw) > _MAX_PICKLE_BYTES:
            raise RefusedPickleError(f"{path}: refusing {pkl[0]}, larger than {_MAX_PICKLE_BYTES:,} bytes")
        obj, unpickler = _unpickle(io.BytesIO(raw), path)
        storages = {}
        for key, ref in unpickler.storages.items():
            try:
                raw = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise ValueError(f"{path}: storage data/{key} is missing from the archive") from None
            arr = np.frombuffer(raw, ref.dtype.newbyteorder(">") if big_endian else ref.dtype)
            storages[key] = arr.astype(ref.dtype) if big_endian else arr
    return _resolve(obj, storages, path)


def _load_plain_pickle(f, path: str):
    """A header pickle of a legacy file (ints, dicts, lists: no globals, no persistent ids)."""
    return _unpickle(f, path)[0]


def _read_legacy_storage(f, key: str, dtype: np.dtype, path: str) -> np.ndarray:
    """One storage record of a legacy file: int64 element count, then the raw data (both little-endian)."""
    head = f.read(8)
    numel = struct.unpack("<q", head)[0] if len(head) == 8 else -1
    nbytes = numel * dtype.itemsize
    if not 0 <= nbytes <= os.fstat(f.fileno()).st_size - f.tell():
        raise ValueError(f"{path}: truncated legacy PyTorch file (the data of storage {key} is incomplete)")
    return np.frombuffer(f.read(nbytes), dtype.newbyteorder("<")).astype(dtype, copy=False)


def _load_legacy(f, path: str):
    """Unpickled object of a legacy (pre-1.6, `_use_new_zipfile_serialization=False`) checkpoint, tensors resolved.

    Layout: pickles of the magic number (checked by the caller), the protocol version (1001) and a sys_info dict;
    the object pickle, whose persistent ids are ('storage', type, root key, location, numel, view (key, offset,
    numel) or None); a pickle of the list of root storage keys; then one record per key (`_read_legacy_storage`;
    torch writes them little-endian on any host).
    """
    _load_plain_pickle(f, path)  # magic number
    version = _load_plain_pickle(f, path)
    if version != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy PyTorch protocol version {version!r} "
                         f"(only {_LEGACY_PROTOCOL} is known)")
    _load_plain_pickle(f, path)  # sys_info: irrelevant, the records are little-endian whatever it says
    obj, unpickler = _unpickle(f, path)
    storages = {}
    for key in map(str, _load_plain_pickle(f, path)):
        if key not in unpickler.storages:
            raise ValueError(f"{path}: storage {key} has data but no tensor refers to it")
        storages[key] = _read_legacy_storage(f, key, unpickler.storages[key].dtype, path)
    return _resolve(obj, storages, path)


def load_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a torch.save'd state dict (zip format, or the legacy pre-1.6 format) as {name: numpy array}, no torch."""
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _unwrap(_load_zip(path), path)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_HEAD))
        if head == _LEGACY_HEAD:
            f.seek(0)
            return _unwrap(_load_legacy(f, path), path)
    if head[:1] == pickle.PROTO:
        raise ValueError(f"{path} is a pickle but not a PyTorch checkpoint (no legacy serialization header: "
                         "it does not start with torch's magic number)")
    raise ValueError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor legacy serialization)")


def load_state_dict(source) -> dict[str, np.ndarray]:
    """State dict from a dict of arrays, a `.pth` (torch zip or legacy format) or an `.npz` (dispatch on contents)."""
    if isinstance(source, Mapping):
        return {k: np.asarray(v) for k, v in source.items()}
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise console.MissingFileError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if names and all(n.endswith(".npy") for n in names):
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
    return load_torch_file(path)


# --- writing -------------------------------------------------------------------------------------------------


class _PickleWriter:
    """Emits the few protocol-2 pickle opcodes a state dict needs, naming torch globals without importing torch."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.buf.write(pickle.PROTO + b"\x02")

    def op(self, code: bytes):
        self.buf.write(code)

    def global_(self, module: str, name: str):
        self.buf.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def str_(self, s: str):
        b = s.encode("utf-8")
        self.buf.write(pickle.BINUNICODE + struct.pack("<I", len(b)) + b)

    def int_(self, n: int):
        if 0 <= n < 256:
            self.buf.write(pickle.BININT1 + bytes([n]))
        elif -2 ** 31 <= n < 2 ** 31:
            self.buf.write(pickle.BININT + struct.pack("<i", n))
        else:
            b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.buf.write(pickle.LONG1 + bytes([len(b)]) + b)

    def int_tuple(self, values):
        self.op(pickle.MARK)
        for v in values:
            self.int_(int(v))
        self.op(pickle.TUPLE)

    def empty_ordered_dict(self):
        self.global_("collections", "OrderedDict")
        self.op(pickle.EMPTY_TUPLE + pickle.REDUCE)

    def tensor(self, key: str, storage: str, shape: tuple):
        strides, step = [], 1
        for n in reversed(shape):
            strides.insert(0, step)
            step *= n
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.op(pickle.MARK)
        self.op(pickle.MARK)  # persistent id ('storage', torch.<T>Storage, key, 'cpu', numel)
        self.str_("storage")
        self.global_("torch", storage)
        self.str_(key)
        self.str_("cpu")
        self.int_(int(np.prod(shape)))
        self.op(pickle.TUPLE + pickle.BINPERSID)
        self.int_(0)  # storage offset
        self.int_tuple(shape)
        self.int_tuple(strides)
        self.op(pickle.NEWFALSE)  # requires_grad
        self.empty_ordered_dict()  # backward hooks
        self.op(pickle.TUPLE + pickle.REDUCE)


def _aligned_extra(offset: int, name: str) -> bytes:
    """A zip 'extra' field padding the local header so that the entry's data starts on a 64-byte boundary."""
    header = 30 + len(name.encode())
    pad = (-(offset + header + 4)) % _ALIGN
    return b"FB" + struct.pack("<H", pad) + b"Z" * pad


def save_torch_file(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write {name: array} as a .pth file that `torch.load` reads as an OrderedDict of tensors."""
    path = os.fspath(path)
    arrays = {}
    pw = _PickleWriter()
    pw.empty_ordered_dict()
    pw.op(pickle.MARK)
    for i, (name, value) in enumerate(state_dict.items()):
        arr = np.asarray(value)
        if arr.dtype not in _DTYPE_STORAGES:
            raise ValueError(f"cannot save {name!r}: dtype {arr.dtype} has no torch storage type")
        arrays[str(i)] = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False)
        pw.str_(str(name))
        pw.tensor(str(i), _DTYPE_STORAGES[arr.dtype], arr.shape)
    pw.op(pickle.SETITEMS + pickle.STOP)

    prefix = os.path.splitext(os.path.basename(path))[0] or "archive"
    records = [("data.pkl", pw.buf.getvalue()), ("byteorder", b"little")]
    records += [(f"data/{k}", a.tobytes()) for k, a in arrays.items()]
    records += [("version", b"3\n")]
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            info = zipfile.ZipInfo(f"{prefix}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            info.extra = _aligned_extra(f.tell(), info.filename)
            zf.writestr(info, data)
