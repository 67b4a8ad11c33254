"""tf.train.Example messages without TensorFlow, for reading records (`wire` writes them).

The message layout is TensorFlow's example.proto/feature.proto, registered under our own package
name in a private descriptor pool: the bytes are wire-identical to TensorFlow's, and the classes
never clash with a real TensorFlow imported in the same process.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "beam_extract.tfexample"
_T = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, kind: int, label: int = _T.LABEL_OPTIONAL, type_name: str = "",
           oneof: int | None = None) -> descriptor_pb2.FieldDescriptorProto:
    field = descriptor_pb2.FieldDescriptorProto(name=name, number=number, type=kind, label=label)
    if type_name:
        field.type_name = f".{_PACKAGE}.{type_name}"
    if oneof is not None:
        field.oneof_index = oneof
    return field


def _build_pool() -> descriptor_pool.DescriptorPool:
    repeated = _T.LABEL_REPEATED
    file = descriptor_pb2.FileDescriptorProto(name="beam_extract/tfexample.proto", package=_PACKAGE,
                                              syntax="proto3")
    file.message_type.add(name="BytesList").field.append(_field("value", 1, _T.TYPE_BYTES, repeated))
    file.message_type.add(name="FloatList").field.append(_field("value", 1, _T.TYPE_FLOAT, repeated))
    file.message_type.add(name="Int64List").field.append(_field("value", 1, _T.TYPE_INT64, repeated))
    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    feature.field.extend([
        _field("bytes_list", 1, _T.TYPE_MESSAGE, type_name="BytesList", oneof=0),
        _field("float_list", 2, _T.TYPE_MESSAGE, type_name="FloatList", oneof=0),
        _field("int64_list", 3, _T.TYPE_MESSAGE, type_name="Int64List", oneof=0),
    ])
    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.extend([_field("key", 1, _T.TYPE_STRING), _field("value", 2, _T.TYPE_MESSAGE, type_name="Feature")])
    features.field.append(_field("feature", 1, _T.TYPE_MESSAGE, repeated, type_name="Features.FeatureEntry"))
    file.message_type.add(name="Example").field.append(_field("features", 1, _T.TYPE_MESSAGE, type_name="Features"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return pool


_POOL = _build_pool()
Example = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{_PACKAGE}.Example"))


def decode_example(data: bytes) -> dict[str, list]:
    """Feature name -> list of values (bytes, ints or floats)."""
    example = Example.FromString(data)
    decoded = {}
    for key, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        decoded[key] = list(getattr(feature, kind).value) if kind else []
    return decoded
