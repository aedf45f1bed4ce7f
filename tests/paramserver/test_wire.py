import os

import numpy as np
import pytest
import torch

pytest.importorskip("google.protobuf")

from megaclass.paramserver import wire  # noqa: E402


def test_proto_parse_matches_protoc(tmp_path):
    """The runtime parse of megaclass.proto is the descriptor protoc itself builds."""
    protoc = pytest.importorskip("grpc_tools.protoc")
    from google.protobuf import descriptor_pb2

    path = tmp_path / "megaclass.proto"
    path.write_text(wire.proto_text())
    out = tmp_path / "out.pb"
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--descriptor_set_out={out}", str(path)]) == 0
    reference = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    parsed, methods = wire.parse_proto(wire.proto_text())
    assert parsed == reference
    assert [m.name for m in methods] == [m.name for m in reference.service[0].method]


def test_parse_rejects_unsupported_constructs():
    with pytest.raises(ValueError, match="unsupported construct 'enum'"):
        wire.parse_proto('syntax = "proto3"; package p; enum E { A = 0; }')
    with pytest.raises(ValueError, match="malformed field"):
        wire.parse_proto('syntax = "proto3"; package p; message M { int64 x = ; }')


@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (7, 3), (3,), (2, 3, 4)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_array_round_trip(shape, dtype):
    tensor = torch.randn(shape)
    array = wire.message("Array").FromString(wire.encode_array(tensor, dtype).SerializeToString())
    decoded = wire.decode_array(array, what="x")
    assert decoded.dtype == wire.DTYPES[dtype] and tuple(decoded.shape) == shape
    torch.testing.assert_close(decoded, tensor.to(wire.DTYPES[dtype]), rtol=0, atol=0)


def test_array_bytes_are_little_endian():
    array = wire.encode_array(torch.tensor([1.0, -2.0]))
    assert array.data == np.asarray([1.0, -2.0], dtype="<f4").tobytes()
    assert wire.encode_ids(torch.tensor([1, 2**40])) == np.asarray([1, 2**40], dtype="<i8").tobytes()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"dtype": "float64", "shape": [1], "data": b"\0" * 8}, "dtype 'float64'"),
        ({"dtype": "float32", "shape": [2, 3], "data": b"\0" * 20}, "needs 24 bytes"),
        ({"dtype": "float32", "shape": [-1, 2], "data": b""}, "negative size"),
        ({"dtype": "bfloat16", "shape": [3], "data": b"\0" * 6}, "expected 2 dimensions"),
    ],
)
def test_decode_array_rejects(fields, match):
    with pytest.raises(ValueError, match=match):
        wire.decode_array(wire.message("Array", **fields), what="grads", ndim=2)


def test_decode_ids_rejects_partial_ids():
    with pytest.raises(ValueError, match="13 bytes"):
        wire.decode_ids(b"\0" * 13, what="ids")
    assert wire.decode_ids(b"", what="ids").shape == (0,)


def test_proto_ships_with_the_package():
    import megaclass.paramserver

    assert os.path.exists(os.path.join(os.path.dirname(megaclass.paramserver.__file__), "megaclass.proto"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (5, 3)])
def test_appended_array_field_parses_as_the_full_message(dtype, shape):
    tensor = torch.randn(shape)
    message = wire.message("PushGradientsRequest", ids=wire.encode_ids(range(shape[0])), step=3, trainer=1)
    message.lr.value = 0.25
    parsed = wire.MESSAGES["PushGradientsRequest"].FromString(
        wire.serialize_with_array(message, 2, tensor, dtype)
    )
    expected = wire.message("PushGradientsRequest")
    expected.CopyFrom(message)
    expected.grads.CopyFrom(wire.encode_array(tensor, dtype))
    assert parsed == expected


def test_encoded_request_takes_a_new_incarnation():
    message = wire.message("PushGradientsRequest", step=2, incarnation=5)
    encoded = wire.Encoded(message.SerializeToString(), 6, 5)
    encoded.incarnation = 2**64 - 1
    parsed = wire.MESSAGES["PushGradientsRequest"].FromString(wire.serialize(encoded))
    assert parsed.incarnation == 2**64 - 1 and parsed.step == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_copy_pull_parse_matches_protobuf(dtype):
    rows = torch.randn(4, 3)
    message = wire.message(
        "PullRowsResponse", ids=wire.encode_ids([7, 1]), version=2**40, incarnation=2**63 + 5
    )
    message.rows.CopyFrom(wire.encode_array(rows, dtype))
    data = message.SerializeToString()
    unknown = b"\x48\x01" + b"\x51" + b"\0" * 8 + b"\x5d" + b"\0" * 4  # fields 9 (varint), 10 (i64), 11 (i32)
    split = wire.message("PullRowsResponse")
    split.rows.dtype = dtype  # a first, partial occurrence of the rows field: occurrences merge
    bare = wire.message(
        "PullRowsResponse", ids=message.ids, version=message.version, incarnation=message.incarnation
    )
    prepared = wire.serialize(wire.Prepared(bare, 1, rows, dtype))
    for variant in (data, prepared, split.SerializeToString() + data, unknown + data + unknown):
        view = wire.parse_pull_response(variant)
        assert (view.version, view.incarnation, bytes(view.ids)) == (2**40, 2**63 + 5, message.ids)
        assert view.rows.dtype == dtype and view.rows.shape == (4, 3)
        expected = wire.decode_array(message.rows, what="rows")
        got = torch.from_numpy(view.rows.numpy(what="rows").copy())
        assert torch.equal(got.view(torch.bfloat16) if dtype == "bfloat16" else got, expected)
        assert wire.MESSAGES["PullRowsResponse"].FromString(variant).rows == message.rows  # protobuf agrees


@pytest.mark.parametrize("data", [b"\x0a\x05ab", b"\x08\xff\xff", b"\x0b", b"\x0d\x00"])
def test_zero_copy_parse_rejects_malformed_bytes(data):
    with pytest.raises(ValueError):
        wire.parse_pull_response(data)


def test_array_view_checks_its_size():
    view = wire.parse_pull_response(
        wire.message(
            "PullRowsResponse", rows=wire.message("Array", dtype="float32", shape=[2, 2], data=b"\0" * 12)
        ).SerializeToString()
    )
    with pytest.raises(ValueError, match="does not match 12 bytes"):
        view.rows.numpy(what="rows")


@pytest.mark.parametrize("lr", [None, 0.0, 0.125])
@pytest.mark.parametrize("trainer", [0, 5, -1])
def test_zero_copy_push_parse_matches_protobuf(lr, trainer):
    grads = torch.randn(3, 2)
    message = wire.message(
        "PushGradientsRequest", ids=wire.encode_ids([4, 0, 9]), step=2**40, trainer=trainer
    )
    if lr is not None:
        message.lr.value = lr
    for data in (
        wire.serialize_with_array(message, 2, grads, "float32"),
        wire.serialize(wire.Encoded(wire.serialize_with_array(message, 2, grads, "bfloat16"), 6, 2**63)),
    ):
        reference = wire.MESSAGES["PushGradientsRequest"].FromString(data)
        view = wire.parse_push_request(data)
        assert (view.step, view.trainer, view.incarnation) == (
            reference.step,
            reference.trainer,
            reference.incarnation,
        )
        assert bytes(view.ids) == reference.ids
        assert view.lr == (reference.lr.value if reference.HasField("lr") else None)
        torch.testing.assert_close(
            wire.decode_array(view.grads, what="grads"),
            wire.decode_array(reference.grads, what="grads"),
            rtol=0,
            atol=0,
        )
