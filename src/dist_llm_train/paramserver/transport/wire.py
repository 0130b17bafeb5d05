"""Mapping between the transport-neutral types and the two wire formats.

Protobuf messages for gRPC, plain dicts (msgpack) for ZMQ. Servers and clients of both
transports import from here, so a field added to a type is added to both wires in one place.
Decoding a dict from the network validates its shape and raises `PSError(INVALID_ARGUMENT)`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from typing import Any, get_args, get_origin, get_type_hints

import grpc
import msgpack
import numpy as np
from google.protobuf.message import DecodeError

from dist_llm_train.core.codecs import Encoded
from dist_llm_train.core.downlink import Delta, DeltaReply, apply_deltas
from dist_llm_train.core.job import JobSpec, WireJobSpec
from dist_llm_train.core.types import (
    ErrorCode,
    JobStats,
    PSError,
    PulledParams,
    PushHeader,
    PushOutcome,
    PushResult,
    TensorSpec,
    WorkerStats,
)
from dist_llm_train.netem.profile.classes import DSCP
from dist_llm_train.proto import paramserver_pb2 as pb

Buffer = bytes | bytearray | memoryview

FLOAT32 = "<f4"  # parameters travel as little-endian float32
FRAMING_SLACK = 64 << 10  # protobuf framing on top of a chunk


SERVICE = "dist_llm_train.v1.ParameterServer"
_DATA_TAG = b"\x12"  # field 2, length-delimited: `bytes data = 2` in InitJobChunk, ParamChunk and PushChunk


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """gRPC options shared by server and client so neither side refuses the other's chunks.
    Larger TCP reads cut per-read overhead for multi-MB messages (measured in ps_throughput)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
        ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
        ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
        ("grpc.http2.lookahead_bytes", 32 << 20),
        # Every PS byte is the ps_sync traffic class: the DSCP mark lets the kernel shaping backends classify it.
        ("grpc.dscp", DSCP["ps_sync"]),
        # A PS restarted by its supervisor is back within seconds: reconnect soon after, not after gRPC's
        # default backoff (which grows to 120 s) — docs/operations.md.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


# -- chunk fast path ------------------------------------------------------------------------
# A data chunk is the protobuf encoding of a one-field message: tag 0x12, varint length, bytes.
# Writing and reading that by hand saves a full copy of every chunk on each side compared with
# building protobuf objects, and the bytes on the wire are identical, so any gRPC client that
# uses the .proto still interoperates.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_data_chunk(data: memoryview | bytes) -> bytes:
    """Serialized `XChunk(data=data)` with a single copy of `data`."""
    return b"".join((_DATA_TAG, _varint(len(data)), data))


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`; (-1, pos) if it is cut off or too long."""
    value = shift = 0
    end = min(len(raw), pos + 10)
    while pos < end:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos
    return -1, pos


def data_chunk_view(raw: bytes) -> memoryview | None:
    """The payload of a serialized data chunk without copying, or None if `raw` is not one."""
    if raw[:1] != _DATA_TAG:
        return None
    size, pos = _read_varint(raw, 1)
    return memoryview(raw)[pos:] if size >= 0 and len(raw) - pos == size else None


# `PushRequest{header = 1, data = 2, padding = 3}` for the unary push, built and split the
# same way. The padding field goes between header and data and places the payload at a
# multiple of PAYLOAD_ALIGN bytes into the message, so the float32 view the server takes of
# the received bytes can be aligned: numpy's BLAS dot refuses misaligned arrays and its slow
# fallback costs ~6x more (0.9 vs 0.14 ms for 4 MB). Receivers ignore the field; a message
# without it parses the same, and `numerics.decode_update` copies a misaligned payload.
_HEADER_TAG = b"\x0a"  # field 1, length-delimited
_PADDING_TAG = b"\x1a"  # field 3, length-delimited
PAYLOAD_ALIGN = 64
PUSH_REQUEST_FRAMING = 3 * (1 + 10) + PAYLOAD_ALIGN  # three tags and varint lengths at most, padding


def encode_push_request(head: bytes, payload: memoryview | bytes) -> bytes:
    """Serialized `PushRequest(header=<head>, data=payload, padding=...)`, `head` being a
    serialized PushHeader, with a single copy of `payload` (protobuf would copy it twice)."""
    prefix = _HEADER_TAG + _varint(len(head)) + head
    data_prefix = _DATA_TAG + _varint(len(payload))
    pad = -(len(prefix) + 2 + len(data_prefix)) % PAYLOAD_ALIGN  # < 128: a one-byte length
    return b"".join((prefix, _PADDING_TAG, bytes((pad,)), bytes(pad), data_prefix, payload))


def _push_request_fields(raw: bytes) -> dict[int, memoryview] | None:
    """The top-level fields 1 to 3 of a serialized PushRequest as views, or None for anything
    this fast path does not handle (other fields, repeats, other wire types, bad lengths)."""
    view = memoryview(raw)
    found: dict[int, memoryview] = {}
    pos = 0
    while pos < len(raw):
        key, pos = _read_varint(raw, pos)
        if key not in (0x0A, 0x12, 0x1A) or key >> 3 in found:
            return None
        size, pos = _read_varint(raw, pos)
        if size < 0 or pos + size > len(raw):
            return None
        found[key >> 3] = view[pos : pos + size]
        pos += size
    return found


def push_request_deserializer(raw: bytes) -> tuple[Any, memoryview]:
    """(pb.PushHeader, payload view) of a serialized PushRequest. The payload is a view of
    `raw`, not a copy; any encoding the fast path does not cover goes through protobuf.
    A message protobuf cannot parse gives a None header, for the servicer to refuse."""
    fields_ = _push_request_fields(raw)
    try:
        if fields_ is None:
            msg = pb.PushRequest.FromString(raw)
            return msg.header, memoryview(msg.data)
        header = pb.PushHeader.FromString(fields_[1]) if 1 in fields_ else pb.PushHeader()
    except DecodeError:
        return None, memoryview(b"")
    return header, fields_.get(2, memoryview(b""))


def chunk_deserializer(cls: Any) -> Callable[[bytes], Any]:
    """Deserializer yielding a memoryview for data chunks and a parsed message otherwise."""

    def parse(raw: bytes) -> Any:
        view = data_chunk_view(raw)
        return view if view is not None else cls.FromString(raw)

    return parse


def passthrough(data: bytes) -> bytes:
    return data


# -- error codes ---------------------------------------------------------------------------
def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    return grpc.StatusCode[code.value]


_SERVER_FAULTS = {"UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"}


def error_from_status(status: grpc.StatusCode | None, details: str | None) -> PSError:
    """gRPC status -> PSError. Statuses without an ErrorCode of their own become INTERNAL when
    they mean a server fault and UNAVAILABLE otherwise (CANCELLED: went away mid-call). ABORTED is the PS's own
    (`ErrorCode.ABORTED`, an update based on a version the restarted server does not have); gRPC's library
    never produces it."""
    name = status.name if status is not None else "UNKNOWN"
    try:
        return PSError(ErrorCode(name), details or name)
    except ValueError:
        code = ErrorCode.INTERNAL if name in _SERVER_FAULTS else ErrorCode.UNAVAILABLE
        return PSError(code, f"{name}: {details}")


# -- protobuf ------------------------------------------------------------------------------
def spec_to_pb(s: JobSpec) -> pb.JobSpec:
    w = s.to_wire()
    return pb.JobSpec(
        job_id=w.job_id,
        mode=w.mode,
        max_staleness=w.max_staleness,
        straggler_timeout_s=w.straggler_timeout_s,
        optimizer=w.optimizer,
        learning_rate=w.learning_rate,
        momentum=w.momentum,
        aggregation=w.aggregation,
        aggregation_params=w.aggregation_params,
        total_steps=w.total_steps,
        options=w.options,
    )


_DEFAULT_SPEC = WireJobSpec(job_id="")


def spec_from_pb(m: pb.JobSpec) -> JobSpec:
    """The typed spec, parsed once here; proto3 cannot tell "unset" from "", so empty names mean defaults."""
    d = _DEFAULT_SPEC
    return _parsed(
        WireJobSpec(
            job_id=m.job_id,
            mode=m.mode or d.mode,
            optimizer=m.optimizer or d.optimizer,
            aggregation=m.aggregation or d.aggregation,
            max_staleness=m.max_staleness,
            straggler_timeout_s=m.straggler_timeout_s,
            learning_rate=m.learning_rate,
            momentum=m.momentum,
            aggregation_params=dict(m.aggregation_params),
            total_steps=m.total_steps,
            options=dict(m.options),
        )
    )


def _parsed(w: WireJobSpec) -> JobSpec:
    try:
        return JobSpec.from_wire(w)
    except ValueError as err:
        raise PSError(ErrorCode.INVALID_ARGUMENT, str(err)) from None


def layout_to_pb(layout: list[TensorSpec]) -> list[pb.TensorSpec]:
    return [pb.TensorSpec(name=t.name, shape=list(t.shape), offset=t.offset) for t in layout]


def layout_from_pb(items: Any) -> list[TensorSpec]:
    return [TensorSpec(t.name, tuple(int(d) for d in t.shape), int(t.offset)) for t in items]


def header_to_pb(h: PushHeader) -> pb.PushHeader:
    return pb.PushHeader(**asdict(h))


def header_from_pb(m: pb.PushHeader) -> PushHeader:
    h = PushHeader(**{f.name: getattr(m, f.name) for f in fields(PushHeader)})
    h.codec = h.codec or "none"  # proto3: unset == ""
    h.kind = h.kind or "gradient"
    return h


def result_from_pb(m: pb.PushResponse) -> PushResult:
    try:
        outcome = PushOutcome(pb.PushOutcome.Name(m.outcome))
    except ValueError:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"server sent unknown push outcome {m.outcome}") from None
    return PushResult(outcome, m.version, m.staleness, m.message)


def result_to_pb(r: PushResult) -> pb.PushResponse:
    return pb.PushResponse(
        outcome=pb.PushOutcome.Value(r.outcome.value),
        version=r.version,
        staleness=r.staleness,
        message=r.message,
    )


def stats_to_pb(s: JobStats) -> pb.JobStats:
    d = asdict(s)
    d["workers"] = [pb.WorkerStats(**w) for w in d["workers"]]
    return pb.JobStats(**d)


def stats_from_pb(m: pb.JobStats) -> JobStats:
    return JobStats(
        job_id=m.job_id,
        version=m.version,
        mode=m.mode,
        members=list(m.members),
        counters=dict(m.counters),
        last_loss=m.last_loss,
        complete=m.complete,
        num_params=m.num_params,
        workers=[WorkerStats(**{f.name: getattr(w, f.name) for f in fields(WorkerStats)}) for w in m.workers],
    )


# -- msgpack dicts ---------------------------------------------------------------------------
# msgpack carries any integer up to 2^64 - 1; the proto fields are int64 (and max_staleness int32). A ZMQ
# request may hold exactly what a gRPC one can, so the two transports refuse the same values.
INT64 = (-(1 << 63), (1 << 63) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)
_NARROW_INTS: dict[tuple[type, str], tuple[int, int]] = {(WireJobSpec, "max_staleness"): INT32}


def check_int_range(value: int, what: str, bounds: tuple[int, int] = INT64) -> int:
    """`value` if it fits the proto field's integer type, else PSError(INVALID_ARGUMENT) naming it."""
    low, high = bounds
    if not low <= value <= high:
        bits = 32 if bounds == INT32 else 64
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"{what} = {value} does not fit the wire's int{bits}")
    return value


def _matches(value: Any, hint: Any) -> bool:
    if get_origin(hint) is dict:
        _, item = get_args(hint)
        return isinstance(value, dict) and all(isinstance(k, str) and _matches(x, item) for k, x in value.items())
    if isinstance(value, bool) or hint is bool:
        return isinstance(value, bool) and hint is bool
    if hint is float:
        return isinstance(value, int | float)
    return isinstance(value, hint)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)  # slow (evaluates annotation strings): once per class


def _typed(d: Any, cls: type, what: str) -> Any:
    """Build dataclass `cls` from a map received off the wire, checking names and types first."""
    if not isinstance(d, dict):
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"{what} must be a map")
    hints = _hints(cls)
    unknown = sorted(str(k) for k in d if k not in hints)
    if unknown:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"{what}: unknown fields {unknown}")
    for name, value in d.items():
        if not _matches(value, hints[name]):
            raise PSError(
                ErrorCode.INVALID_ARGUMENT,
                f"{what}.{name} must be {getattr(hints[name], '__name__', hints[name])}, got {type(value).__name__}",
            )
        if hints[name] is int:
            check_int_range(value, f"{what}.{name}", _NARROW_INTS.get((cls, name), INT64))
    try:
        return cls(**{k: float(x) if hints[k] is float else x for k, x in d.items()})
    except TypeError as err:  # a required field is missing
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"{what}: {err}") from None


def spec_from_dict(d: Any) -> JobSpec:
    return _parsed(_typed(d, WireJobSpec, "spec"))


def header_from_dict(d: Any) -> PushHeader:
    return _typed(d, PushHeader, "header")  # type: ignore[no-any-return]


def layout_to_list(layout: list[TensorSpec]) -> list[list[Any]]:
    return [[t.name, list(t.shape), t.offset] for t in layout]


def layout_from_list(items: Any) -> list[TensorSpec]:
    if not isinstance(items, list):
        raise PSError(ErrorCode.INVALID_ARGUMENT, "layout must be a list")
    try:
        out = [TensorSpec(n, tuple(_wire_int(d) for d in shape), _wire_int(off)) for n, shape, off in items]
    except (TypeError, ValueError) as err:
        raise PSError(ErrorCode.INVALID_ARGUMENT, f"layout entries must be [name, shape, offset]: {err}") from None
    if not all(isinstance(t.name, str) for t in out):
        raise PSError(ErrorCode.INVALID_ARGUMENT, "layout names must be strings")
    return out


def _wire_int(value: Any) -> int:
    """An integer as gRPC's int64 carries it: no floats, no booleans, nothing wider."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return check_int_range(value, "layout value")


def stats_to_dict(s: JobStats) -> dict[str, Any]:
    return asdict(s)


def stats_from_dict(d: dict[str, Any]) -> JobStats:
    workers = [WorkerStats(**w) for w in d.get("workers", [])]
    return JobStats(**{**d, "workers": workers})


# -- downlink deltas (`core.downlink`): one header per delta, payloads concatenated as the data ---------
def delta_headers(reply: DeltaReply) -> list[dict[str, Any]]:
    """The ZMQ form of a delta reply's headers (the gRPC form is `pb.DeltaHeader` with the same fields)."""
    return [
        {
            "version": d.version,
            "codec": d.codec,
            "codec_meta": msgpack.packb(d.encoded.meta),
            "payload_bytes": d.nbytes,
        }
        for d in reply.deltas
    ]


def deltas_to_pb(reply: DeltaReply) -> list[pb.DeltaHeader]:
    return [pb.DeltaHeader(**h) for h in delta_headers(reply)]


def delta_payloads(reply: DeltaReply) -> list[memoryview]:
    return [memoryview(d.encoded.payload).cast("B") for d in reply.deltas]


def _delta_field(h: Any, name: str, kind: type) -> Any:
    value = h.get(name) if isinstance(h, dict) else getattr(h, name, None)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise PSError(ErrorCode.INTERNAL, f"downlink delta header field {name!r} is not a {kind.__name__}")
    return value


def params_from_deltas(
    have: PulledParams | None, epoch: int, base_version: int, version: int, headers: Sequence[Any], data: Buffer
) -> np.ndarray:
    """Rebuild the published parameters from a delta reply: `have` + every delta, in order, bit for bit
    as the PS computed them. PSError(INTERNAL) when the reply does not fit what the client holds."""
    if have is None or have.epoch != epoch or have.version != base_version:
        held = "nothing" if have is None else f"version {have.version} of lineage {have.epoch}"
        raise PSError(
            ErrorCode.INTERNAL,
            f"server sent deltas from version {base_version} of lineage {epoch}; client holds {held}",
        )
    view = memoryview(data).cast("B")
    deltas: list[Delta] = []
    offset = 0
    for i, h in enumerate(headers):
        produces = _delta_field(h, "version", int)
        if produces != base_version + i + 1:
            raise PSError(
                ErrorCode.INTERNAL, f"downlink delta {i} produces version {produces}, not {base_version + i + 1}"
            )
        size = _delta_field(h, "payload_bytes", int)
        if size < 0 or offset + size > len(view):
            raise PSError(ErrorCode.INTERNAL, "downlink deltas announce more bytes than were sent")
        meta = msgpack.unpackb(_delta_field(h, "codec_meta", bytes), raw=False) or {}
        if not isinstance(meta, dict):
            raise PSError(ErrorCode.INTERNAL, "downlink delta meta is not a map")
        payload = bytes(view[offset : offset + size])
        deltas.append(Delta(produces, _delta_field(h, "codec", str), Encoded(payload, meta)))
        offset += size
    if offset != len(view) or base_version + len(deltas) != version:
        raise PSError(ErrorCode.INTERNAL, f"downlink reply: {len(view) - offset} stray bytes or a missing delta")
    try:
        return apply_deltas(have.params, deltas)
    except ValueError as err:
        raise PSError(ErrorCode.INTERNAL, f"cannot apply downlink delta: {err}") from None
