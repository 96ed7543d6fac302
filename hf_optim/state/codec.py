"""Nested Python values <-> JSON + tensors (``docs/FORMAT.md``, section "Values").

:class:`Encoder` turns a value tree into JSON and collects its tensors under dotted names; :func:`decode` is
its inverse and constructs nothing but containers, numbers, strings, tensors it is handed, and objects of the
types registered with :func:`register_json_type` (an allow-list, by name).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.json_types import JsonType, on_json_type
from hf_optim.state.format import MAX_JSON_DEPTH, MAX_VALUE_NODES, dtype_from_name, dtype_name, is_shape

__all__ = [
    "Encoder",
    "TensorHeader",
    "check_tensor_nodes",
    "decode",
    "register_json_type",
    "tensor_refs",
]

SUPPORTED_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.complex64,
        torch.uint64,
        torch.uint32,
        torch.uint16,
    }
)
#: JSON levels a saved value may use: the file's own structure around a value takes at most 4
#: (metadata -> param_groups -> group -> hyperparameters)
_MAX_VALUE_DEPTH = MAX_JSON_DEPTH - 4
#: the tensors that hold a Python number of optimizer state
PYTHON_NUMBERS = {"int": torch.int64, "float": torch.float64}


@dataclass(frozen=True)
class TensorHeader:
    """What a safetensors header says about one tensor."""

    file: str  #: path of the file holding it
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class _JsonType:
    cls: type
    name: str
    to_json: Callable[[Any], dict]
    from_json: Callable[[dict], Any]


_TYPES_BY_CLASS: dict[type, _JsonType] = {}
_TYPES_BY_NAME: dict[str, _JsonType] = {}


def register_json_type(
    cls: type, *, name: str, to_json: Callable[[Any], dict], from_json: Callable[[dict], Any]
) -> None:
    """Let values of exactly ``cls`` be saved as ``{"object": name, "json": to_json(value)}``.

    Decoding constructs only registered names, calling ``from_json`` with plain JSON (a dict of str, numbers,
    bool, None, lists and dicts, checked first); anything it raises becomes a ``CheckpointError``. A checkpoint
    thus names a class but never runs code of its choosing.

    Args:
        cls: The class whose instances are saved this way (not its subclasses).
        name: The name stored in the file; decoding looks it up.
        to_json: Turns a value into a dict of plain JSON.
        from_json: Builds the value back from that dict.

    Raises:
        TypeError: If ``cls`` is not a class, or ``to_json`` / ``from_json`` are not callable.
        ValueError: If ``name`` is empty or already registered.

    Example:
        ```python
        import hf_optim


        class Window:
            def __init__(self, start, end):
                self.start, self.end = start, end

            def __eq__(self, other):
                return vars(self) == vars(other)


        hf_optim.register_json_type(Window, name="docs.Window", to_json=vars, from_json=lambda j: Window(**j))
        hf_optim.save_object_state("window.safetensors", {"window": Window(3, 8)}, kind="window")
        assert hf_optim.load_object_state("window.safetensors", kind="window") == {"window": Window(3, 8)}
        ```
    """
    if not isinstance(cls, type):
        raise TypeError(f"cls must be a class, got {cls!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not (callable(to_json) and callable(from_json)):
        raise TypeError("to_json and from_json must be callables")
    known = _TYPES_BY_NAME.get(name)
    if known is not None and known.cls is not cls:
        raise ValueError(f"json type name {name!r} is already registered for {known.cls.__qualname__}")
    entry = _JsonType(cls, name, to_json, from_json)
    _TYPES_BY_CLASS[cls] = entry
    _TYPES_BY_NAME[name] = entry


def _is_plain_json(value: Any) -> bool:
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                return False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif not (
            node is None
            or isinstance(node, (bool, int, str))
            or (isinstance(node, float) and math.isfinite(node))
        ):
            return False
    return True


class Encoder:
    """Turns nested Python values into JSON, moving tensors into ``self.tensors`` under dotted keys."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._depth = 0
        self._nodes = 0

    def tensor(self, key: str, value: torch.Tensor, where: str, python: str | None = None) -> dict[str, Any]:
        if key in self.tensors:
            raise ValueError(
                f"{where}: two values map to the same tensor name {key!r} (parameter names and state keys "
                "joined with '.' collide); rename the parameters"
            )
        if value.layout != torch.strided:
            raise ValueError(f"{where}: only dense tensors can be saved, got layout {value.layout}")
        if value.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{where}: tensors of dtype {value.dtype} cannot be stored in safetensors")
        self.tensors[key] = value.detach()
        node: dict[str, Any] = {"tensor": key, "dtype": dtype_name(value.dtype), "shape": list(value.shape)}
        if python is not None:
            node["python"] = python
        return node

    def encode(self, value: Any, key: str, where: str, *, numbers_as_tensors: bool = False) -> Any:
        """The JSON node of ``value``; containers nested so deep that the file's JSON would exceed
        :data:`~hf_optim.state.format.MAX_JSON_DEPTH` (which readers refuse) are a ``ValueError``."""
        self._depth = 0
        self._nodes = 0
        return self._encode(value, key, where, numbers_as_tensors)

    def _nest(self, levels: int, where: str) -> None:
        self._depth += levels
        if self._depth > _MAX_VALUE_DEPTH:
            raise ValueError(
                f"{where}: nested too deeply to be saved (its JSON would exceed {MAX_JSON_DEPTH} levels)"
            )

    def _encode(self, value: Any, key: str, where: str, numbers_as_tensors: bool = False) -> Any:
        self._nodes += 1
        if self._nodes > MAX_VALUE_NODES:
            raise ValueError(
                f"{where}: more than {MAX_VALUE_NODES:,} values (shared containers counted each time they are "
                "reached) cannot be saved"
            )
        if isinstance(value, torch.Tensor):
            return self.tensor(key, value, where)
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, numbers.Integral):
            value = int(value)
            if numbers_as_tensors and -(2**63) <= value < 2**63:
                return self.tensor(key, torch.tensor(value, dtype=torch.int64), where, python="int")
            return value
        if isinstance(value, numbers.Real):
            value = float(value)
            if numbers_as_tensors:
                return self.tensor(key, torch.tensor(value, dtype=torch.float64), where, python="float")
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, (tuple, list, Mapping)):
            string_keys = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
            levels = 1 if isinstance(value, list) else 2 if isinstance(value, tuple) or string_keys else 3
            self._nest(levels, where)
            try:
                return self._container(value, key, where, string_keys)
            finally:
                self._depth -= levels
        return self._object(value, where)

    def _container(self, value: Any, key: str, where: str, string_keys: bool) -> Any:
        if isinstance(value, tuple):
            return {"tuple": [self._encode(v, f"{key}.{i}", where) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self._encode(v, f"{key}.{i}", where) for i, v in enumerate(value)]
        if string_keys:
            return {"dict": {k: self._encode(v, f"{key}.{k}", where) for k, v in value.items()}}
        items = []
        for i, (k, v) in enumerate(value.items()):
            if isinstance(k, torch.Tensor):
                raise ValueError(f"{where}: tensors cannot be dictionary keys")
            items.append([self._encode(k, f"{key}.{i}.key", where), self._encode(v, f"{key}.{i}", where)])
        return {"items": items}

    def _object(self, value: Any, where: str) -> Any:
        registered = _TYPES_BY_CLASS.get(type(value))
        if registered is not None:
            doc = registered.to_json(value)
            if not isinstance(doc, dict) or not _is_plain_json(doc):
                raise ValueError(f"{where}: to_json of {registered.name!r} must return a dict of plain JSON")
            return {"object": registered.name, "json": doc}
        raise TypeError(
            f"{where}: values of type {type(value).__module__}.{type(value).__qualname__} cannot be saved "
            "(supported: tensors, numbers, bool, str, None, and lists/tuples/dicts of them)"
        )


def tensor_refs(node: Any) -> Iterable[dict[str, Any]]:
    """Every tensor node inside an encoded value, following the encoding's tags as :func:`decode` does.

    Pass encoded values only: a mapping keyed by parameter names, state keys or hyperparameter names (any of which
    may be ``"tensor"``) is not one; wrap it as ``{"dict": mapping}``. Iterative: safe for any depth.
    """
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            if "tensor" in item:
                yield item
            elif len(item) == 1:
                ((tag, inner),) = item.items()
                if tag == "dict" and isinstance(inner, dict):
                    stack.extend(reversed(list(inner.values())))
                elif tag in ("tuple", "items") and isinstance(inner, list):
                    stack.extend(reversed(inner))


def decode(node: Any, tensors: Mapping[str, Any], where: str) -> Any:
    """Inverse of :meth:`Encoder.encode`; ``tensors`` holds the already loaded referenced tensors."""
    if node is None or isinstance(node, (bool, str, int, float)):
        return node
    if isinstance(node, list):
        return [decode(item, tensors, where) for item in node]
    if isinstance(node, dict):
        if "tensor" in node:
            key = node["tensor"]
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(f"{where}: tensor {key!r} is not in the file(s)")
            value = tensors[key]
            python = node.get("python")  # None, "int" or "float" (checked by check_tensor_nodes)
            if python is None or not isinstance(value, torch.Tensor):  # not a tensor: a display placeholder
                return value
            return int(value.item()) if python == "int" else float(value.item())
        if len(node) == 1:
            ((tag, inner),) = node.items()
            if tag == "tuple" and isinstance(inner, list):
                return tuple(decode(item, tensors, where) for item in inner)
            if tag == "dict" and isinstance(inner, dict):
                return {k: decode(v, tensors, where) for k, v in inner.items()}
            if tag == "items" and isinstance(inner, list):
                out = {}
                for pair in inner:
                    if not (isinstance(pair, list) and len(pair) == 2):
                        raise CheckpointError(f"{where}: malformed dictionary item {pair!r}")
                    key = decode(pair[0], tensors, where)
                    try:
                        out[key] = decode(pair[1], tensors, where)
                    except TypeError:
                        raise CheckpointError(f"{where}: unhashable dictionary key {pair[0]!r}") from None
                return out
            if tag == "float" and inner in ("nan", "inf", "-inf"):
                return float(inner)
        if set(node) == {"object", "json"}:
            return _decode_object(node["object"], node["json"], where)
    raise CheckpointError(f"{where}: cannot decode value {str(node)[:200]}")


def _decode_object(name: Any, doc: Any, where: str) -> Any:
    registered = _TYPES_BY_NAME.get(name) if isinstance(name, str) else None
    if registered is None:
        raise CheckpointError(f"{where}: object type {name!r} is not registered (register_json_type)")
    if not isinstance(doc, dict) or not _is_plain_json(doc):
        raise CheckpointError(f"{where}: the arguments of {name!r} are not a JSON object")
    try:
        return registered.from_json(doc)
    except Exception as err:  # from_json validates its arguments: any failure means a bad file
        raise CheckpointError(f"{where}: cannot build {name!r} from {doc!r}: {err}") from None


def check_tensor_nodes(node: Any, headers: Mapping[str, TensorHeader], where: str) -> None:
    """Each referenced tensor exists in the files with the dtype and shape the metadata records, and is
    referenced once: two values sharing one stored tensor would alias state between parameters."""
    seen: set[str] = set()
    for ref in tensor_refs(node):
        key = ref["tensor"]
        entry = headers.get(key) if isinstance(key, str) else None
        if entry is not None:
            if key in seen:
                raise CheckpointError(f"{where}: tensor {key!r} is referenced more than once in the metadata")
            seen.add(key)
        if entry is None:
            raise CheckpointError(
                f"{where}: tensor {key!r} is listed in the metadata but is not in the file(s)"
            )
        dtype = dtype_from_name(ref.get("dtype"), f"{where}: tensor {key!r}")
        shape = ref.get("shape")
        if not is_shape(shape):
            raise CheckpointError(f"{where}: tensor {key!r} has a malformed shape {shape!r} in the metadata")
        if dtype != entry.dtype or shape != list(entry.shape):
            raise CheckpointError(
                f"{where}: tensor {key!r} is {dtype_name(entry.dtype)} {list(entry.shape)} in {entry.file} but "
                f"the metadata says {ref.get('dtype')} {shape}"
            )
        python = ref.get("python")
        if python is not None and (
            not isinstance(python, str) or PYTHON_NUMBERS.get(python) != dtype or shape != []
        ):
            raise CheckpointError(
                f"{where}: tensor {key!r} ({ref.get('dtype')} {shape}) cannot hold a Python {python!r} "
                "(an int is a 0-d int64 tensor, a float a 0-d float64 tensor)"
            )


def _register_declared(entry: JsonType) -> None:
    # Types declared by the layers below (hf_optim.json_types), e.g. BertAdam's schedules.
    register_json_type(entry.cls, name=entry.name, to_json=entry.to_json, from_json=entry.from_json)


on_json_type(_register_declared)
