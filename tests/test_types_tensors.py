"""Tensors torch can pickle but that are not dense (issue 11, item 4), and every received
buffer on a 64-byte boundary (issue 11, item 2, the codec's part).

Sent whole (num_shards=1), a tensor of any kind arrives equal -- same class, layout, dtype,
values and requires_grad (a leaf if it required grad) -- alone or inside a dict or list;
split, a tensor that has no row views raises UnsupportedType naming its kind, never torch's
own error. Dense tensors (requires_grad ones, Parameters and subclasses included) still
arrive as views of the received buffer.

Alignment: deserialized from a buffer that starts on a 64-byte boundary (as the store's
blobs do), every pandas block and every tensor starts on one too, and is a view of that
buffer (Arrow buffers: test_types_arrow.py).
"""

from __future__ import annotations


import os
import pickle
from typing import Any, Callable

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from shmchannel import DataReceiver, DataSender, UnsupportedType
from shmchannel.serialization import row_count, split, splittable

from .conftest import ADDRESS
from .test_types import OTHERS, exact
from .test_types_codec import _in
from .test_types_subclasses import _round_trip

torch = pytest.importorskip("torch", reason="the torch extra is not installed")

#: torch's own warnings when these kinds are made (once per process) or, for quantized
#: tensors, rebuilt by its pickling (TypedStorage); they are torch's, about torch's APIs.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage:UserWarning"),
    pytest.mark.filterwarnings("ignore:Sparse [A-Z]+ tensor support is in beta state:UserWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor, torch.quantize_per_channel:UserWarning"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated:UserWarning"),
]


class Labelled(torch.Tensor):
    """A user-defined tensor subclass that keeps Tensor's pickling."""


class Refusing(torch.Tensor):
    """A tensor subclass whose __torch_function__ refuses every call but pickling."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.__reduce_ex__:
            return super().__torch_function__(func, types, args, kwargs or {})
        raise ValueError("refused")


def _labelled() -> Any:
    tensor = torch.arange(6.0).reshape(3, 2).as_subclass(Labelled)
    tensor.label = "weights"
    return tensor


#: Every kind of CPU tensor torch pickles, by name.
KINDS: dict[str, Callable[[], Any]] = {
    "nested": lambda: torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)]),
    "nested-jagged": lambda: torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)], layout=torch.jagged),
    "sparse-coo": lambda: (torch.eye(4) * 3).to_sparse(),
    "sparse-csr": lambda: (torch.eye(4) * 3).to_sparse_csr(),
    "sparse-csc": lambda: (torch.eye(4) * 3).to_sparse_csc(),
    "sparse-bsr": lambda: (torch.eye(4) * 3).to_sparse_bsr((2, 2)),
    "sparse-bsc": lambda: (torch.eye(4) * 3).to_sparse_bsc((2, 2)),
    "quantized-per-tensor": lambda: torch.quantize_per_tensor(torch.arange(6.0), 0.5, 2, torch.quint8),
    "quantized-per-channel": lambda: torch.quantize_per_channel(
        torch.arange(8.0).reshape(2, 4), torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), 0, torch.qint8
    ),
    "requires-grad": lambda: torch.arange(6.0).reshape(3, 2).requires_grad_(),
    "parameter": lambda: torch.nn.Parameter(torch.arange(6.0).reshape(3, 2)),
    "subclass": _labelled,
    "conjugate": lambda: torch.tensor([1 + 2j, 3 - 4j]).conj(),
    "negative": lambda: torch.tensor([1 + 2j, 3 - 4j]).conj().imag,
    "non-contiguous": lambda: torch.arange(24.0).reshape(4, 6)[::2, 1::2].t(),
    "meta": lambda: torch.zeros(4, 2, device="meta"),
}

#: Kinds split refuses, and the kind its message names.
UNSPLITTABLE = {
    "nested": "a nested torch.Tensor (its rows differ in shape)",
    "nested-jagged": "layout torch.jagged",
    "sparse-coo": "layout torch.sparse_coo",
    "sparse-csr": "layout torch.sparse_csr",
    "sparse-csc": "layout torch.sparse_csc",
    "sparse-bsr": "layout torch.sparse_bsr",
    "quantized-per-tensor": "a quantized torch.Tensor (torch.quint8)",
    "quantized-per-channel": "a quantized torch.Tensor (torch.qint8)",
}


def _values(tensor: Any) -> Any:
    """The values of a tensor of any kind, as Python lists."""
    tensor = tensor.detach()
    if tensor.device.type == "meta":  # no data: its shape is all there is
        return list(tensor.shape)
    if tensor.is_nested:
        return [row.tolist() for row in tensor.unbind()]
    if tensor.is_quantized:
        scheme = tensor.qscheme()
        if scheme == torch.per_tensor_affine:
            params = (tensor.q_scale(), tensor.q_zero_point())
        else:
            params = (tensor.q_per_channel_scales().tolist(), tensor.q_per_channel_zero_points().tolist(), tensor.q_per_channel_axis())
        return tensor.int_repr().tolist(), str(scheme), params
    if tensor.layout is not torch.strided:
        return tensor.to_dense().tolist()
    return tensor.resolve_conj().resolve_neg().tolist()


def _tensor_difference(got: Any, expected: Any) -> str:
    """'' if ``got`` equals ``expected`` as a received tensor must: class, layout, dtype,
    requires_grad (and being a leaf when it does), Python attributes and values."""

    def facts(t: Any) -> tuple[Any, ...]:
        return type(t), t.device, t.layout, t.dtype, t.requires_grad, t.requires_grad and t.is_leaf, getattr(t, "label", None)

    if facts(got) != facts(expected):
        return f"{facts(got)}, expected {facts(expected)}"
    return "" if _values(got) == _values(expected) else "values differ"


# -- sent whole, split -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tensor_of_any_kind_sent_whole_arrives_equal(broker: int, kind: str) -> None:
    """A tensor of any kind sent with num_shards=1 arrives equal, alone, in a dict and in a list."""
    tensor = KINDS[kind]()
    name = f"whole-{kind}-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name, num_shards=1) as sender, DataReceiver(ADDRESS, dataset_name=name) as receiver:
        sender.send(tensor)
        sender.send({"t": tensor, "n": np.arange(3)})
        sender.send([tensor, "tag"])
        alone, in_dict, in_list = (receiver.recv(timeout=10) for _ in range(3))
    assert _tensor_difference(alone, tensor) == ""
    assert list(in_dict) == ["t", "n"] and _tensor_difference(in_dict["t"], tensor) == ""
    assert in_list[1] == "tag" and _tensor_difference(in_list[0], tensor) == ""


@pytest.mark.parametrize("container", ["alone", "dict"])
@pytest.mark.parametrize("kind", sorted(UNSPLITTABLE))
def test_tensor_without_rows_to_split_raises_unsupported_type(broker: int, kind: str, container: str) -> None:
    """A nested, sparse or quantized tensor sent to 2 shards, alone or as a dict column, raises
    UnsupportedType naming its kind (not torch's error), and queues nothing."""
    tensor = KINDS[kind]()
    obj, param = (tensor, "obj") if container == "alone" else ({"t": tensor}, "obj['t']")
    message = f"{param} must be a strided (dense) torch.Tensor to be split into shards, got {UNSPLITTABLE[kind]}; {OTHERS}"
    with DataSender(ADDRESS, dataset_name=f"unsplit-{kind}-{os.getpid()}", num_shards=2) as sender:
        with pytest.raises(UnsupportedType, match=exact(message)):
            sender.send(obj)
        assert sender.get_queue() == {0: [], 1: []}


def test_meta_tensor_splits_into_meta_blocks(broker: int) -> None:
    """A meta tensor (shape and dtype, no data) sent to 2 shards arrives as a meta block of
    half its rows on each."""
    name = f"meta-split-{os.getpid()}"
    with DataSender(ADDRESS, dataset_name=name, num_shards=2) as sender:
        sender.send(torch.zeros(4, 3, device="meta", dtype=torch.float16))
        for shard in (0, 1):
            with DataReceiver(ADDRESS, dataset_name=name, shard_id=shard) as receiver:
                got = receiver.recv(timeout=10)
                assert (got.device.type, got.shape, got.dtype) == ("meta", (2, 3), torch.float16)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_probing_a_tensor_of_any_kind_raises_only_unsupported_type(kind: str) -> None:
    """row_count, splittable and split of a tensor of any kind, alone or in a dict, either work
    or raise UnsupportedType: no torch error escapes."""
    tensor = KINDS[kind]()
    for obj in (tensor, {"t": tensor}):
        try:
            rows = row_count(obj)
        except UnsupportedType:
            assert splittable(obj) is False
            continue
        assert splittable(obj) is True and len(split(obj, rows)) == rows


def test_split_of_tensor_whose_shape_cannot_be_read_raises_unsupported_type() -> None:
    """A tensor subclass whose __torch_function__ raises is refused by row_count with
    UnsupportedType naming its class and the error (splittable says False)."""
    refusing = torch.arange(4.0).as_subclass(Refusing)
    message = (f"obj must be a torch.Tensor whose shape can be read to be split into shards, got a {__name__}.Refusing "
               f"raising ValueError: refused; {OTHERS}")
    with pytest.raises(UnsupportedType, match=exact(message)):
        row_count(refusing)
    assert splittable(refusing) is False


def test_tensor_subclass_refusing_calls_travels_whole_through_its_pickling() -> None:
    """A tensor subclass whose __torch_function__ raises on all but pickling still arrives whole,
    through torch's own pickling."""
    got, _ = _round_trip(torch.arange(4.0).as_subclass(Refusing))
    assert type(got) is Refusing and got.as_subclass(torch.Tensor).tolist() == [0.0, 1.0, 2.0, 3.0]


# -- requires_grad, Parameter, subclasses: zero-copy kept --------------------------------------------


def _views(tensor: Any, buf: np.ndarray) -> bool:
    return _in(buf, tensor.data_ptr(), tensor.numel() * tensor.element_size())


@pytest.mark.parametrize("read_only", [False, True], ids=["writable", "read-only"])
def test_leaf_requiring_grad_arrives_as_leaf_requiring_grad(read_only: bool) -> None:
    """A leaf that requires grad arrives as a leaf that requires grad (as with torch's pickling):
    a view of writable memory, a copy of read-only memory (64-byte aligned too)."""
    weights = torch.arange(6.0).reshape(3, 2).requires_grad_()
    got, buf = _round_trip(weights, read_only)
    assert got.requires_grad and got.is_leaf and torch.equal(got.detach(), weights.detach())
    assert _views(got, buf) is not read_only and got.data_ptr() % 64 == 0
    got.sum().backward()
    assert torch.equal(got.grad, torch.ones(3, 2))


def test_non_leaf_tensor_arrives_detached() -> None:
    """A tensor computed from one that requires grad arrives with its values only, detached
    (the graph cannot cross processes; torch's pickling refuses such a tensor)."""
    computed = torch.arange(4.0).requires_grad_() * 2
    got, buf = _round_trip(computed)
    assert not got.requires_grad and torch.equal(got, computed.detach()) and _views(got, buf)


def test_parameter_arrives_as_parameter_viewing_the_buffer() -> None:
    """A torch.nn.Parameter arrives as a Parameter that requires grad, its data a view of the buffer."""
    param = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2))
    got, buf = _round_trip(param)
    assert type(got) is torch.nn.Parameter and got.requires_grad and got.is_leaf
    assert torch.equal(got.detach(), param.detach()) and _views(got, buf)


def test_tensor_subclass_arrives_as_its_class_viewing_the_buffer() -> None:
    """A user-defined Tensor subclass arrives as that class with its attributes, a leaf that
    requires grad if it was one, its data a view of the buffer."""
    tensor = _labelled().requires_grad_()
    got, buf = _round_trip(tensor)
    assert type(got) is Labelled and got.label == "weights" and got.requires_grad and got.is_leaf
    assert torch.equal(got.detach().as_subclass(torch.Tensor), tensor.detach().as_subclass(torch.Tensor))
    assert _views(got, buf)


def test_tensor_attributes_travel_with_it() -> None:
    """Python attributes set on a plain tensor arrive with it, as with torch's pickling."""
    tensor = torch.arange(3.0)
    tensor.source = "sensor-7"
    got, buf = _round_trip(tensor)
    assert type(got) is torch.Tensor and got.source == "sensor-7" and _views(got, buf)


# -- 64-byte alignment ----------------------------------------------------------------------------


def test_pandas_blocks_and_tensors_arrive_on_64_byte_boundaries() -> None:
    """The blocks of a pandas DataFrame and of a row slice of it (one column each: a dtype
    each) and tensors in a dict start on 64-byte boundaries and view the buffer."""
    frame = pd.DataFrame({"f8": np.arange(1000.0), "i8": np.arange(1000), "f4": np.arange(1000, dtype=np.float32),
                          "i1": np.arange(1000, dtype=np.int8)})
    obj = {"frame": frame, "rows": frame.iloc[3:500], "float": torch.arange(999.0), "int8": torch.arange(77, dtype=torch.int8)}
    got, buf = _round_trip(obj)
    pd.testing.assert_frame_equal(got["rows"], frame.iloc[3:500])
    arrays = {f"{key}.{column}": got[key][column].to_numpy() for key in ("frame", "rows") for column in frame.columns}
    arrays.update({key: got[key].numpy() for key in ("float", "int8")})
    placed = {key: (a.__array_interface__["data"][0] % 64, _in(buf, a.__array_interface__["data"][0], a.nbytes)) for key, a in arrays.items()}
    assert placed == {key: (0, True) for key in arrays}
