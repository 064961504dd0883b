"""Our proto/ schema must be Cloud KMS v1 on the wire (DESIGN.md §1).

The reference is what the installed google-cloud-kms client actually uses: the
descriptors it ships and the method table of its gRPC transport. Our side is
proto/ compiled by protoc, and the betterproto2 code in valv/_proto.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import betterproto2
import grpc_tools
import pytest
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import grpc as kms_grpc
from google.protobuf import (
    descriptor_pb2,
    duration_pb2,
    field_mask_pb2,
    timestamp_pb2,
    wrappers_pb2,
)
from google.protobuf.message import Message as PbMessage

from valv._proto.google.cloud.kms import v1 as ours

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "google.cloud.kms.v1"
SERVICE = f"{PACKAGE}.KeyManagementService"
FDP = descriptor_pb2.FieldDescriptorProto


# --- both sides as plain facts ------------------------------------------------

MessageFacts = dict[str, Any]


def _walk(
    scope: str,
    messages: Iterable[descriptor_pb2.DescriptorProto],
    enums: Iterable[descriptor_pb2.EnumDescriptorProto],
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto | descriptor_pb2.EnumDescriptorProto]]:
    for enum in enums:
        yield f"{scope}.{enum.name}", enum
    for msg in messages:
        name = f"{scope}.{msg.name}"
        yield name, msg
        yield from _walk(name, msg.nested_type, msg.enum_type)


def schema_facts(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
) -> tuple[dict[str, MessageFacts], dict[str, dict[str, int]]]:
    """Every message and enum of package PACKAGE in `files`, keyed by full name
    (with leading dot, as in type_name), reduced to what matters on the wire."""
    messages: dict[str, MessageFacts] = {}
    enums: dict[str, dict[str, int]] = {}
    files = [f for f in files if f.package == PACKAGE]
    map_entries = {
        name
        for f in files
        for name, d in _walk(f".{f.package}", f.message_type, f.enum_type)
        if isinstance(d, descriptor_pb2.DescriptorProto) and d.options.map_entry
    }
    for f in files:
        for name, d in _walk(f".{f.package}", f.message_type, f.enum_type):
            if isinstance(d, descriptor_pb2.EnumDescriptorProto):
                values = {v.name: v.number for v in d.value}
                assert len(values) == len(d.value), f"duplicate value names in {name}"
                enums[name] = values
                continue
            fields = {}
            for fl in d.field:
                fields[fl.name] = {
                    "number": fl.number,
                    "type": FDP.Type.Name(fl.type),
                    "type_name": fl.type_name,
                    "label": FDP.Label.Name(fl.label),
                    "oneof": (
                        d.oneof_decl[fl.oneof_index].name if fl.HasField("oneof_index") else None
                    ),
                    "proto3_optional": fl.proto3_optional,
                    "map": fl.type_name in map_entries,
                }
            assert len(fields) == len(d.field), f"duplicate field names in {name}"
            messages[name] = {
                "fields": fields,
                "oneofs": sorted(o.name for o in d.oneof_decl),
                "map_entry": d.options.map_entry,
                "nested_messages": sorted(n.name for n in d.nested_type),
                "nested_enums": sorted(e.name for e in d.enum_type),
            }
    return messages, enums


def used_types(messages: dict[str, MessageFacts], roots: Iterable[str]) -> set[str]:
    """Messages and enums of our package reachable from `roots` through fields."""
    seen: set[str] = set()
    todo = [r for r in roots if r.startswith(f".{PACKAGE}.")]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for fl in messages.get(name, {"fields": {}})["fields"].values():
            if fl["type_name"].startswith(f".{PACKAGE}."):
                todo.append(fl["type_name"])
    return seen


# --- the reference: google-cloud-kms ------------------------------------------


def _full_name(message_class: Any) -> str:
    if hasattr(message_class, "pb"):  # proto-plus wrapper
        message_class = message_class.pb()
    return f".{message_class.DESCRIPTOR.full_name}"


def client_methods() -> dict[str, tuple[str, str]]:
    """{path: (request type, response type)} as the client's transport calls them.

    Read from the transport's source, so it is independent of how
    scripts/gen_kms_proto.py collects the same facts.
    """
    source = Path(kms_grpc.__file__).read_text()
    pattern = re.compile(
        rf'"(/{re.escape(SERVICE)}/\w+)",\s*'
        r"request_serializer=(\w+)\.(\w+)\.\w+,\s*"
        r"response_deserializer=(\w+)\.(\w+)\.\w+,"
    )
    methods = {}
    for path, req_mod, req, resp_mod, resp in pattern.findall(source):
        methods[path] = (
            _full_name(getattr(getattr(kms_grpc, req_mod), req)),
            _full_name(getattr(getattr(kms_grpc, resp_mod), resp)),
        )
    # Every path in the source must have been understood by the pattern.
    assert len(methods) == len(set(re.findall(rf'"/{re.escape(SERVICE)}/\w+"', source)))
    return methods


def google_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The google-cloud-kms files our package's types live in, reached from the
    files of the service's request/response types."""
    pending = [kms_v1.EncryptRequest.pb().DESCRIPTOR.file]
    pending += [
        getattr(kms_v1, name.rsplit(".", 1)[1]).pb().DESCRIPTOR.file
        for types in client_methods().values()
        for name in types
        if name.startswith(f".{PACKAGE}.")
    ]
    out: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    while pending:
        fd = pending.pop()
        if fd.name in out or fd.package != PACKAGE:
            continue
        out[fd.name] = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(out[fd.name])
        pending.extend(fd.dependencies)
    return list(out.values())


# --- our side: proto/ compiled by protoc --------------------------------------


def _include_dir_with(relative: str) -> Path:
    for entry in sys.path:
        if entry and (Path(entry) / relative).is_file():
            return Path(entry)
    raise AssertionError(f"{relative} is not on sys.path; install the dev extras")


@pytest.fixture(scope="module")
def our_files(tmp_path_factory: pytest.TempPathFactory) -> list[descriptor_pb2.FileDescriptorProto]:
    out = tmp_path_factory.mktemp("descriptors") / "kms.pb"
    wkt = Path(grpc_tools.__file__).parent / "_proto"
    site = _include_dir_with("google/longrunning/operations_proto.proto")
    kms_dir = REPO / "proto/google/cloud/kms/v1"
    inputs = sorted(str(p.relative_to(REPO / "proto")) for p in kms_dir.glob("*.proto"))
    assert inputs, f"no .proto files in {kms_dir}"
    result = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc",
            f"-I{REPO / 'proto'}", f"-I{wkt}", f"-I{site}",
            f"--descriptor_set_out={out}", "--include_imports",
            *inputs,
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)


# --- schema parity ------------------------------------------------------------


def test_same_messages_and_enums(our_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    g_messages, g_enums = schema_facts(google_files())
    o_messages, o_enums = schema_facts(our_files)
    assert ".google.cloud.kms.v1.CryptoKey.LabelsEntry" in g_messages  # sanity of the walk
    assert sorted(set(g_messages) - set(o_messages)) == [], "messages missing from proto/"
    assert sorted(set(o_messages) - set(g_messages)) == [], "messages not in google-cloud-kms"
    assert sorted(set(g_enums) - set(o_enums)) == [], "enums missing from proto/"
    assert sorted(set(o_enums) - set(g_enums)) == [], "enums not in google-cloud-kms"


def test_fields_and_enum_values_match(our_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    g_messages, g_enums = schema_facts(google_files())
    o_messages, o_enums = schema_facts(our_files)
    diffs = [
        (name, "google", g_messages[name], "ours", o_messages[name])
        for name in sorted(g_messages.keys() & o_messages.keys())
        if g_messages[name] != o_messages[name]
    ] + [
        (name, "google", g_enums[name], "ours", o_enums[name])
        for name in sorted(g_enums.keys() & o_enums.keys())
        if g_enums[name] != o_enums[name]
    ]
    assert diffs == []
    # The comparison covers the interesting shapes, so it is not vacuous.
    key = o_messages[".google.cloud.kms.v1.CryptoKey"]["fields"]
    assert key["labels"]["map"] and key["rotation_period"]["oneof"] == "rotation_schedule"
    decap = o_messages[".google.cloud.kms.v1.DecapsulateResponse"]["fields"]
    assert decap["shared_secret_crc32c"]["proto3_optional"]


def test_fields_declared_in_number_order(
    our_files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    # betterproto2 encodes in declaration order; number order is the canonical
    # encoding, so this is what makes our bytes equal Google's.
    out_of_order = [
        name
        for f in our_files
        if f.package == PACKAGE
        for name, d in _walk(f".{f.package}", f.message_type, f.enum_type)
        if isinstance(d, descriptor_pb2.DescriptorProto)
        and [fl.number for fl in d.field] != sorted(fl.number for fl in d.field)
    ]
    assert out_of_order == []


def test_service_uses_the_same_types(our_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    methods = client_methods()
    roots = [t for types in methods.values() for t in types]
    g_used = used_types(schema_facts(google_files())[0], roots)
    o_used = used_types(schema_facts(our_files)[0], roots)
    assert ".google.cloud.kms.v1.CryptoKeyVersion.CryptoKeyVersionState" in g_used
    assert g_used == o_used


def test_service_methods_match_client(our_files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    expected = client_methods()
    assert len(expected) >= 35
    assert "/google.cloud.kms.v1.KeyManagementService/DeleteCryptoKey" in expected
    ours_by_path = {}
    for f in our_files:
        for service in f.service:
            if f"{f.package}.{service.name}" != SERVICE:
                continue
            for m in service.method:
                assert not (m.client_streaming or m.server_streaming), m.name
                ours_by_path[f"/{SERVICE}/{m.name}"] = (m.input_type, m.output_type)
    assert ours_by_path == expected


def test_generated_server_routes_match_client() -> None:
    # valv/_proto is what the server actually registers with grpclib.
    assert set(ours.KeyManagementServiceBase().__mapping__()) == set(client_methods())


# --- wire round trips ---------------------------------------------------------


def _ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _version(n: int) -> PbMessage:
    v = kms_v1.CryptoKeyVersion.pb()
    return v(
        name=f"projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/{n}",
        state=kms_v1.CryptoKeyVersion.CryptoKeyVersionState.DESTROY_SCHEDULED,
        protection_level=kms_v1.ProtectionLevel.SOFTWARE,
        algorithm=kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
        create_time=_ts(1_700_000_000, 123_456_000),  # datetime keeps microseconds only
        generate_time=_ts(1_700_000_001),
        destroy_time=_ts(1_702_592_000),
        reimport_eligible=True,
    )


def _crypto_key() -> PbMessage:
    return kms_v1.CryptoKey.pb()(
        name="projects/p/locations/global/keyRings/r/cryptoKeys/k",
        primary=_version(1),
        purpose=kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT,
        create_time=_ts(1_700_000_000),
        next_rotation_time=_ts(1_702_592_000),
        rotation_period=duration_pb2.Duration(seconds=30 * 86400),
        version_template=kms_v1.CryptoKeyVersionTemplate.pb()(
            protection_level=kms_v1.ProtectionLevel.SOFTWARE,
            algorithm=kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
        ),
        labels={"env": "prod", "team": "infra"},
        destroy_scheduled_duration=duration_pb2.Duration(seconds=86400, nanos=500_000_000),
    )


SAMPLES: dict[str, PbMessage] = {
    "EncryptRequest": kms_v1.EncryptRequest.pb()(
        name="projects/p/locations/global/keyRings/r/cryptoKeys/k",
        plaintext=b"hello",
        additional_authenticated_data=b"aad",
        plaintext_crc32c=wrappers_pb2.Int64Value(value=0x9A71BB4C),
        additional_authenticated_data_crc32c=wrappers_pb2.Int64Value(value=0),
    ),
    "EncryptResponse": kms_v1.EncryptResponse.pb()(
        name="projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
        ciphertext=b"\x01" * 40,
        ciphertext_crc32c=wrappers_pb2.Int64Value(value=4_294_967_295),
        verified_plaintext_crc32c=True,
        protection_level=kms_v1.ProtectionLevel.SOFTWARE,
    ),
    "DecryptRequest": kms_v1.DecryptRequest.pb()(
        name="projects/p/locations/global/keyRings/r/cryptoKeys/k",
        ciphertext=b"\x01" * 40,
        additional_authenticated_data=b"aad",
        ciphertext_crc32c=wrappers_pb2.Int64Value(value=12345),
    ),
    "DecryptResponse": kms_v1.DecryptResponse.pb()(
        plaintext=b"hello",
        plaintext_crc32c=wrappers_pb2.Int64Value(value=0x9A71BB4C),
        used_primary=True,
    ),
    "CryptoKey": _crypto_key(),
    "CryptoKeyVersion": _version(7),
    "ListCryptoKeysResponse": kms_v1.ListCryptoKeysResponse.pb()(
        crypto_keys=[_crypto_key(), kms_v1.CryptoKey.pb()(name="k2")],
        next_page_token="tok",
        total_size=2,
    ),
    "UpdateCryptoKeyRequest": kms_v1.UpdateCryptoKeyRequest.pb()(
        crypto_key=_crypto_key(),
        update_mask=field_mask_pb2.FieldMask(paths=["rotation_period", "labels"]),
    ),
    "DecapsulateResponse": kms_v1.DecapsulateResponse.pb()(
        name="v", shared_secret=b"s", shared_secret_crc32c=0
    ),
    "AsymmetricSignRequest": kms_v1.AsymmetricSignRequest.pb()(
        name="v", digest=kms_v1.Digest.pb()(sha256=b"\x00" * 32)
    ),
}


def _ours(name: str) -> type[betterproto2.Message]:
    cls: type[betterproto2.Message] = getattr(ours, name)
    return cls


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_google_to_ours(name: str) -> None:
    wire = SAMPLES[name].SerializeToString(deterministic=True)
    parsed = _ours(name).parse(wire)
    assert bytes(parsed) == wire


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_ours_to_google(name: str) -> None:
    ours_msg = _ours(name).parse(SAMPLES[name].SerializeToString(deterministic=True))
    wire = bytes(ours_msg)
    google = type(SAMPLES[name]).FromString(wire)
    assert google == SAMPLES[name]
    assert google.SerializeToString(deterministic=True) == wire


def test_presence_survives_zero_values() -> None:
    # A CRC32C of 0 is a real checksum (of empty input): the wrapper must stay present.
    req = ours.EncryptRequest(name="k", plaintext=b"", plaintext_crc32c=0)
    google = kms_v1.EncryptRequest.pb().FromString(bytes(req))
    assert google.HasField("plaintext_crc32c") and google.plaintext_crc32c.value == 0
    assert not google.HasField("additional_authenticated_data_crc32c")
    resp = ours.DecapsulateResponse(shared_secret_crc32c=0)
    assert kms_v1.DecapsulateResponse.pb().FromString(bytes(resp)).HasField("shared_secret_crc32c")


def test_well_known_types_are_python_values() -> None:
    # Handlers work with datetime/timedelta/int; check the mapping once here.
    key = ours.CryptoKey.parse(SAMPLES["CryptoKey"].SerializeToString())
    assert key.next_rotation_time == datetime.datetime(
        2023, 12, 14, 22, 13, 20, tzinfo=datetime.UTC
    )
    assert key.rotation_period == datetime.timedelta(days=30)
    assert key.primary is not None
    assert key.primary.state == ours.CryptoKeyVersionCryptoKeyVersionState.DESTROY_SCHEDULED
    req = ours.EncryptRequest.parse(SAMPLES["EncryptRequest"].SerializeToString())
    assert req.plaintext_crc32c == 0x9A71BB4C
