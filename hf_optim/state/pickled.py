"""Reading torch pickles (``torch.save`` archives) of other tools' checkpoints, for conversion only.

Nothing here unpickles code: :func:`torch_load` is ``torch.load(weights_only=True)``; :func:`load_torch_archive`
first lists every global the archive's pickle names (reading opcodes, executing nothing) and refuses, by name, any
outside an exact allow-list, then loads it memory-mapped with stand-ins for the allowed foreign classes.
:func:`check_stored_sizes` refuses what would grow when rewritten as safetensors.
"""

from __future__ import annotations

import itertools
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

from hf_optim.errors import CheckpointError
from hf_optim.state.format import MAX_JSON_DEPTH, MAX_VALUE_NODES

__all__ = [
    "MAX_PICKLE_BYTES",
    "MAX_PICKLE_OPCODES",
    "TENSOR_GLOBALS",
    "check_stored_sizes",
    "check_torch_state_dict",
    "infer_optimizer_class",
    "load_torch_archive",
    "pickle_globals",
    "plain_tree",
    "torch_load",
]

#: the largest pickle (the archive's ``data.pkl``, without the tensors' data) read: far above any optimizer's
MAX_PICKLE_BYTES = 1 << 30
#: the most opcodes a pickle may hold (each can build an object: a few hundred MB at most), far above what an
#: optimizer's state needs (tens per parameter)
MAX_PICKLE_OPCODES = 5_000_000

#: the globals ``torch.save`` writes for tensors, their storages and ``OrderedDict`` / ``torch.Size`` containers
TENSOR_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._tensor._rebuild_from_type_v2",
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.Size",
        *(
            f"torch.{kind}Storage"
            for kind in (
                "Float",
                "Double",
                "Half",
                "BFloat16",
                "Long",
                "Int",
                "Short",
                "Char",
                "Byte",
                "Bool",
            )
        ),
    }
)


def pickle_globals(path: str, data: bytes) -> set[str]:
    """Every global (``module.name``) the pickle ``data`` names, read from its opcodes without running it.

    ``torch.save`` writes protocol 2, which names globals with ``GLOBAL`` only; a ``STACK_GLOBAL`` (protocol 4,
    whose operands may come from the memo), ``INST`` / ``OBJ`` or an extension-registry code (``EXT*``) is
    refused rather than guessed at."""
    found: set[str] = set()
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(data)):
            if count >= MAX_PICKLE_OPCODES:
                raise CheckpointError(
                    f"{path}: its pickle holds over {MAX_PICKLE_OPCODES:,} opcodes: refused"
                )
            if opcode.name == "GLOBAL":
                found.add(str(arg).replace(" ", "."))
            elif opcode.name in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                raise CheckpointError(
                    f"{path}: its pickle uses the {opcode.name} opcode, which torch.save does not write: refused"
                )
    except CheckpointError:
        raise
    except (ValueError, pickle.UnpicklingError) as err:  # a truncated or malformed opcode stream
        raise CheckpointError(f"{path}: its pickle is malformed: {err}") from None
    return found


def load_torch_archive(
    path: str, what: str, *, allowed: Mapping[str, Any], reader_path: str | None = None
) -> Any:
    """The object in the ``torch.save`` zip archive ``path`` (opened at ``reader_path`` when given: a checked
    descriptor), memory-mapped: tensors are read from the file as they are used, not loaded whole.

    The pickle may name only :data:`TENSOR_GLOBALS` and the keys of ``allowed`` (a foreign class's
    ``module.name`` mapped to the stand-in that ``torch.load(weights_only=True)`` builds in its place); any other
    global is refused by name before anything is unpickled. ``what`` (the file's kind) words the errors."""
    source = reader_path or path
    try:
        with zipfile.ZipFile(source) as archive:
            pickles = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
            if len(pickles) != 1:
                raise CheckpointError(f"{path}: not a torch.save archive (no single data.pkl)")
            entry = archive.getinfo(pickles[0])
            if entry.compress_type != zipfile.ZIP_STORED or entry.file_size > MAX_PICKLE_BYTES:
                # torch.save stores it uncompressed; a compressed one could unfold into anything
                raise CheckpointError(
                    f"{path}: its pickle is compressed or over {MAX_PICKLE_BYTES:,} bytes, unlike torch.save's"
                )
            data = archive.read(entry)
    except (OSError, zipfile.BadZipFile, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a torch.save zip archive ({err})") from None
    refused = sorted(pickle_globals(path, data) - TENSOR_GLOBALS - set(allowed))
    if refused:
        raise CheckpointError(
            f"{path}: refused: its pickle names {', '.join(refused)}, which {what} does not hold "
            "(allowed: tensors, plain containers and " + ", ".join(sorted(allowed)) + ")"
        )
    try:
        with (
            warnings.catch_warnings(),
            torch.serialization.safe_globals(
                [(stand_in, qualified) for qualified, stand_in in allowed.items()]
            ),
        ):
            warnings.simplefilter("ignore")
            loaded = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as err:  # torch raises many types for refused or malformed pickles
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not readable as {what} ({first})") from None
    return plain_tree(loaded, path)


def torch_load(path: str) -> Any:
    """``torch.load(weights_only=True)`` (tensors and plain containers only, as a :func:`plain_tree`); any
    failure names the file."""
    try:
        with (
            warnings.catch_warnings()
        ):  # e.g. torch's note on the pickle protocol: the error below says it all
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(read with torch.load(weights_only=True)): {str(err).splitlines()[0]}"
        ) from None
    except Exception as err:  # torch raises many types for malformed archives
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {first}") from None
    return plain_tree(loaded, path)


def plain_tree(value: Any, path: str) -> Any:
    """``value`` (what ``torch.load(weights_only=True)`` returned) with every dict, ``OrderedDict`` and list
    copied into a plain ``dict`` / ``list`` through the base types' own methods, so that nothing read later can be
    steered by attributes the pickle set on an instance (an ``OrderedDict`` whose ``items`` it replaced, a tensor
    whose ``numel`` it replaced). Shared containers stay shared; a cycle or nesting deeper than
    :data:`~hf_optim.state.format.MAX_JSON_DEPTH` is refused."""
    copies: dict[int, Any] = {}
    active: set[int] = set()

    def copy(node: Any, depth: int) -> Any:
        if isinstance(node, torch.Tensor):
            shadowed = sorted(k for k in getattr(node, "__dict__", {}) if hasattr(torch.Tensor, k))
            if shadowed:
                raise CheckpointError(f"{path}: a tensor whose pickle sets its {shadowed[0]!r}: refused")
            return node
        if not isinstance(node, (dict, list)) or isinstance(node, torch.Size):
            return node
        if id(node) in copies:
            return copies[id(node)]
        if id(node) in active:
            raise CheckpointError(f"{path}: the pickle holds a container that contains itself")
        if depth > MAX_JSON_DEPTH:
            raise CheckpointError(f"{path}: the pickle nests more than {MAX_JSON_DEPTH} levels deep")
        shadowed = sorted(k for k in getattr(node, "__dict__", {}) if hasattr(type(node), k))
        if shadowed:  # (a state dict's own ``_metadata`` is fine)
            raise CheckpointError(
                f"{path}: a {type(node).__name__} whose pickle sets its {shadowed[0]!r}: refused"
            )
        active.add(id(node))
        if isinstance(node, dict):
            out: Any = {k: copy(v, depth + 1) for k, v in dict.items(node)}
        else:
            out = [copy(v, depth + 1) for v in list.__iter__(node)]
        active.discard(id(node))
        copies[id(node)] = out
        return out

    return copy(value, 0)


def check_stored_sizes(value: Any, path: str) -> None:
    """Refuse what would grow on conversion: a tensor whose bytes exceed its storage's (a stride-0 ``expand``,
    overlapping strides) or a storage reached twice, since safetensors stores every tensor whole; and a value tree
    (one parameter's state, one param group, a scheduler's state) that unfolds into more than
    :data:`~hf_optim.state.format.MAX_VALUE_NODES` values or nests deeper than
    :data:`~hf_optim.state.format.MAX_JSON_DEPTH` (a shared container counts each time it is reached, as the saved
    JSON spells it out each time), or holds a cycle. Sizes are memoised, so the check itself stays linear."""
    storages: dict[int, str] = {}
    extents: list[tuple[int, int, str]] = []  # each storage's bytes (memory-mapped storages lie in one file)
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any, where: str, depth: int) -> int:
        if isinstance(node, torch.Tensor):
            storage = node.untyped_storage()
            nbytes = node.numel() * node.element_size()
            if nbytes > storage.nbytes():
                raise CheckpointError(
                    f"{path}: {where or 'a tensor'} of shape {tuple(node.shape)} is a view repeating "
                    f"{storage.nbytes():,} stored bytes (strides {node.stride()}); converting it would write "
                    f"{nbytes:,}"
                )
            if nbytes and storage.data_ptr() in storages:
                raise CheckpointError(
                    f"{path}: {where} and {storages[storage.data_ptr()]} share one storage; converting would "
                    "store it twice"
                )
            storages[storage.data_ptr()] = where
            if storage.nbytes():
                extents.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes(), where))
            return 1
        if not isinstance(node, (list, tuple, dict)):
            return 1
        if depth > MAX_JSON_DEPTH:
            raise CheckpointError(f"{path}: {where} nests more than {MAX_JSON_DEPTH} levels deep")
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in active:
            raise CheckpointError(f"{path}: {where} contains itself")
        active.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        total = 1 + sum(size(v, f"{where}[{k!r}]", depth + 1) for k, v in items)
        active.discard(id(node))
        if total > MAX_VALUE_NODES:
            raise CheckpointError(
                f"{path}: {where or 'the state'} unfolds into more than {MAX_VALUE_NODES:,} values (shared "
                "containers counted each time they are reached); refusing to convert"
            )
        sizes[id(node)] = total
        return total

    if isinstance(value, Mapping) and isinstance(value.get("state"), Mapping):  # an optimizer state_dict
        for index, entry in value["state"].items():
            size(entry, f"['state'][{index!r}]", 1)
        for i, group in enumerate(value.get("param_groups") or ()):
            size(group, f"['param_groups'][{i}]", 1)
    else:
        size(value, "", 0)
    extents.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(extents):
        if start < end:  # storages claiming more bytes than their record reach into the next one's
            raise CheckpointError(
                f"{path}: {second} and {first} overlap in the file; converting would copy it twice"
            )


def check_torch_state_dict(state_dict: Any, path: str) -> None:
    """The structure ``torch.optim.Optimizer.state_dict()`` produces; anything else names the file."""
    if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
        raise CheckpointError(f"{path} is not an optimizer state_dict (no 'state' / 'param_groups')")
    groups = state_dict["param_groups"]
    if not isinstance(groups, list) or not all(
        isinstance(g, dict)
        and isinstance(g.get("params"), list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in g["params"])
        and all(isinstance(k, str) for k in g)
        for g in groups
    ):
        raise CheckpointError(f"{path}: 'param_groups' is not a list of groups with integer 'params'")
    state = state_dict["state"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Mapping) for v in state.values()):
        raise CheckpointError(f"{path}: 'state' is not a mapping of per-parameter dicts")
    indices = [i for g in groups for i in g["params"]]
    if len(set(indices)) != len(indices) or not set(state) <= set(indices):
        raise CheckpointError(f"{path}: parameter indices are repeated or state belongs to no group")


def infer_optimizer_class(state_dict: Mapping[str, Any]) -> tuple[str | None, str]:
    """Guess the optimizer class of a torch-format state dict from its state and group keys: (class, reason)."""
    groups = state_dict.get("param_groups") or []
    group_keys: set[str] = set().union(*(set(g) for g in groups)) if groups else set()
    states = list((state_dict.get("state") or {}).values())
    state_keys: set[str] = set().union(*(set(s) for s in states)) if states else set()
    if {"next_m", "next_v"} <= state_keys or {"b1", "b2", "e", "max_grad_norm", "schedule"} <= group_keys:
        if "vector_l2" in group_keys:
            return (
                "hf_optim.optimizers.openai_adam.OpenAIAdam",
                "pytorch-pretrained-bert OpenAIAdam group keys",
            )
        return (
            "hf_optim.optimizers.bert_adam.BertAdam",
            "pytorch-pretrained-bert BertAdam state and group keys",
        )
    if {"exp_avg", "exp_avg_sq"} <= state_keys or {"betas", "eps"} <= group_keys:
        if "correct_bias" in group_keys:
            return "hf_optim.optimizers.adamw.AdamW", "Adam moments and a correct_bias group key"
        if "decoupled_weight_decay" in group_keys:
            if any(g.get("decoupled_weight_decay") for g in groups):
                return "torch.optim.adamw.AdamW", "Adam moments and decoupled_weight_decay=True"
            return "torch.optim.adam.Adam", "Adam moments and decoupled_weight_decay=False"
        return None, "Adam moments, but the group keys do not tell Adam from AdamW"
    if "momentum_buffer" in state_keys or {"momentum", "nesterov", "dampening"} <= group_keys:
        return "torch.optim.sgd.SGD", "momentum / nesterov / dampening group keys"
    return None, "no state or group keys identify the class"
