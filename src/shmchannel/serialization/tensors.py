"""torch Tensors as numpy slots: dense CPU tensors of any dtype, subclasses and
Parameters keep zero-copy; the others go through torch's own pickling.

torch.Tensor: its data as a numpy array (dtypes numpy lacks, e.g. bfloat16 and float8, as
  same-size integers; conjugate and negative bits resolved), rebuilt with
  ``torch.from_numpy`` (see ``_rebuild_tensor``). A non-leaf would need its autograd graph,
  which cannot cross processes (torch's pickling refuses it): its values arrive. A subclass
  that is no wrapper (``__torch_dispatch__``) is rebuilt like torch's own pickle does
  (``_rebuild_from_type_v2``), then made a leaf again if it required grad (torch's pickle
  leaves an alias). A Parameter pickles itself around ``.data``, a plain tensor that comes
  back here. Nested, sparse and quantized tensors are not dense: numpy cannot view them.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ..errors import UnsupportedType
from .arrays import Slot, aligned_array, fortran, rebuild_ndarray


#: torch dtypes numpy has (same name), so torch.from_numpy takes them (not float128 or
#: complex256, which are kind "f"/"c" too); the others travel as the integer of their size.
NUMPY_TORCH = frozenset(
    "bool uint8 int8 int16 int32 int64 uint16 uint32 uint64 float16 float32 float64 complex64 complex128".split()
)
_CARRIERS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def dense_tensor(tensor: Any) -> bool:
    """Whether ``tensor`` is dense: strided, not nested (a nested tensor reports strided
    too, but has no sizes) and not quantized -- a tensor whose rows split and numpy can view.
    A subclass's ``__torch_function__`` runs here and may raise anything."""
    torch = sys.modules["torch"]
    return bool(tensor.layout is torch.strided and not tensor.is_nested and not tensor.is_quantized)


def _tensor_args(tensor: Any, slot: Slot) -> tuple[Any, ...] | None:
    """``_rebuild_tensor``'s arguments for the data of a dense CPU tensor of class Tensor;
    None if numpy cannot view it (a functorch wrapper, a dtype wider than 8 bytes)."""
    torch = sys.modules["torch"]
    name = str(tensor.dtype).removeprefix("torch.")
    data = tensor.detach().resolve_conj().resolve_neg()  # the resolves copy only if a lazy bit is set
    carrier = None
    if name not in NUMPY_TORCH:
        carrier = _CARRIERS.get(data.element_size())
        if carrier is None:
            return None
        data = data.view(getattr(torch, carrier))  # same item size: a view, whatever the strides
    try:
        arr = data.numpy()
    except (RuntimeError, TypeError):
        return None
    return slot(arr), arr.dtype, arr.shape, fortran(arr), name if carrier else None


def check_device(tensor: Any) -> None:
    """Refuse a tensor whose data is on another device: its memory cannot be shared here.
    A meta tensor has no data (only shape and dtype), which torch's pickling carries.

    Raises:
        UnsupportedType: naming the device and the way out.
    """
    if tensor.device.type not in ("cpu", "meta"):
        raise UnsupportedType(
            f"a torch.Tensor in obj must be on the CPU, got device {str(tensor.device)!r}; move it there with tensor.cpu()"
        )


def reduce_tensor(tensor: Any, slot: Slot) -> Any:
    torch = sys.modules["torch"]
    check_device(tensor)
    if tensor.device.type == "meta":
        return NotImplemented  # no data: torch pickles its shape and dtype
    if not dense_tensor(tensor):
        return NotImplemented  # sparse, nested or quantized: torch pickles it (its dense parts come back here)
    cls = type(tensor)
    plain = tensor if cls is torch.Tensor else tensor.as_subclass(torch.Tensor)
    args = _tensor_args(plain, slot)
    if args is None:
        return NotImplemented
    grad = bool(tensor.requires_grad and tensor.is_leaf)
    state = torch._utils._get_obj_state(tensor)  # Python attributes, as Tensor.__reduce_ex__ takes them
    if cls is torch.Tensor and not state:
        return _rebuild_tensor, (*args, grad) if grad else args
    return _rebuild_tensor_of, (cls, args, state, grad)


def reduce_tensor_subclass(tensor: Any, slot: Slot) -> Any:
    torch = sys.modules["torch"]
    cls = type(tensor)
    try:
        check_device(tensor)  # a wrapper's too (a fake tensor): torch would fail less clearly
        if cls.__reduce_ex__ is not torch.Tensor.__reduce_ex__ or cls.__torch_dispatch__ is not torch.Tensor.__torch_dispatch__:
            return NotImplemented  # its own pickling (Parameter: its .data comes back here), or a wrapper
        return reduce_tensor(tensor, slot)
    except UnsupportedType:
        raise  # on another device
    except Exception:  # noqa: BLE001 -- its __torch_function__ refused something: its own pickling decides
        return NotImplemented


def _rebuild_tensor(
    buf: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool, torch_dtype: str | None, requires_grad: bool = False
) -> Any:
    """A torch.Tensor over ``buf``: a view of it if ``buf`` is writable, else a copy.

    Read-only memory is shared with other receivers (``full_batch``) or is a DataSystem
    value; torch has no read-only tensors (``from_numpy`` warns), and a write through the
    tensor would change what the others read, so such a tensor gets memory of its own,
    64-byte aligned like the memory it copies.
    """
    import torch

    arr = rebuild_ndarray(buf, dtype, shape, fortran)
    if not arr.flags.writeable:
        arr = aligned_array(arr)
    tensor = torch.from_numpy(arr)
    if torch_dtype is not None:
        tensor = tensor.view(getattr(torch, torch_dtype))
    return tensor.requires_grad_() if requires_grad else tensor


def _rebuild_tensor_of(cls: type, args: tuple[Any, ...], state: Any, requires_grad: bool) -> Any:
    """A tensor of class ``cls`` with Python state ``state`` over the data ``args`` describe,
    rebuilt as torch's own pickle does (``as_subclass``, then the state); a leaf."""
    from torch._tensor import _rebuild_from_type_v2

    tensor = _rebuild_from_type_v2(_rebuild_tensor, cls, args, state)
    return tensor.requires_grad_() if requires_grad else tensor
