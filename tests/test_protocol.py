"""The sans-IO protocol, tested as two ends wired back to back in memory: no processes."""

from __future__ import annotations

import functools
import pickle
import struct
import threading
import traceback
import weakref
from collections.abc import Sequence
from typing import Any

import pytest

from pipe_rpc import MethodNotFoundError, ProtocolError, SerializationError
from pipe_rpc._codec import OOB_BYTES, Codec
from pipe_rpc._dispatch import Dispatcher
from pipe_rpc._messages import Call, Channel, Fail, Hello, OpenChannel, Raise, Shutdown, Tag
from pipe_rpc._pickling import dumps
from pipe_rpc._protocol import ClientProtocol, ServerProtocol
from pipe_rpc._remote_errors import _format_exception_only, format_traceback
from pipe_rpc._wire import BIG_FRAME, SPARE_MAX, Body, Buffer, FrameReader, FrameTooLargeError


def _join(segments: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(memoryview(s).cast("B")) for s in segments)


class Service:
    def add(self, a: int, b: int) -> int:
        return a + b

    def boom(self) -> None:
        raise KeyError("missing")

    def lock(self) -> threading.Lock:
        return threading.Lock()

    @property
    def prop(self) -> int:
        raise AssertionError("a property getter must never run")

    not_callable = 3

    def _private(self) -> None:
        raise AssertionError("never runs")


class Recorder:
    """A slot that records each outcome it is given as ``(name, ok, value)``."""

    def __init__(self, name: str, replies: list[tuple[str, bool, Any]]) -> None:
        self.name = name
        self.replies = replies

    def settle(self, ok: bool, value: Any) -> None:
        self.replies.append((self.name, ok, value))


class Pair:
    """A client protocol and a server protocol joined by two in-memory byte streams."""

    def __init__(self) -> None:
        self.client: ClientProtocol[Recorder] = ClientProtocol(Codec())
        self.server = ServerProtocol(Codec())
        self.dispatcher = Dispatcher(Service())
        self.to_server = FrameReader()
        self.to_client = FrameReader()
        self.replies: list[tuple[str, bool, Any]] = []
        self._serve(self.client.greeting())
        self._answer(self.server.greeting())

    def _serve(self, segments: Sequence[Buffer]) -> list[bytes]:
        out: list[bytes] = []
        for body in self.to_server.feed(_join(segments)):
            message = self.server.receive(body)
            if isinstance(message, Call):
                ok, value = self.dispatcher.run(message)
                out.append(_join(self.server.reply(message.call_id, ok, value)))
            elif isinstance(message, Fail):
                out.append(_join(self.server.reply(message.call_id, False, message)))
        return out

    def _answer(self, segments: Sequence[Buffer]) -> None:
        for body in self.to_client.feed(_join(segments)):
            self.client.receive(body)

    def slot(self, name: str) -> Recorder:
        return Recorder(name, self.replies)

    def call(self, method: str, *args: Any, slot: str = "slot") -> list[bytes]:
        """Send a call; return the server's reply bytes without delivering them."""
        _, frame = self.client.start(method, args, {}, self.slot(slot))
        return self._serve(frame)

    def deliver(self, data: list[bytes]) -> None:
        for chunk in data:
            self._answer([chunk])


def test_call_round_trip_delivers_value_to_its_slot() -> None:
    pair = Pair()
    pair.deliver(pair.call("add", 1, 2, slot="a"))
    assert pair.replies == [("a", True, 3)]
    assert pair.client.pending_count == 0


def test_replies_in_any_order_reach_their_own_slots() -> None:
    pair = Pair()
    first = pair.call("add", 1, 1, slot="first")
    second = pair.call("add", 2, 2, slot="second")
    pair.deliver(second + first)
    assert pair.replies == [("second", True, 4), ("first", True, 2)]


def test_remote_exception_is_rebuilt_with_remote_traceback() -> None:
    pair = Pair()
    pair.deliver(pair.call("boom"))
    _, ok, error = pair.replies[0]
    assert not ok
    assert type(error) is KeyError
    assert error.args == ("missing",)
    assert "in boom" in str(error.__cause__)


@pytest.mark.parametrize("name", ["_private", "__class__", "a.b", "prop", "not_callable", "nope"])
def test_refused_names_give_method_not_found_and_run_nothing(name: str) -> None:
    pair = Pair()
    pair.deliver(pair.call(name))
    _, ok, error = pair.replies[0]
    assert not ok
    assert isinstance(error, MethodNotFoundError)


def test_unpicklable_result_fails_only_its_call() -> None:
    pair = Pair()
    pair.deliver(pair.call("lock"))
    pair.deliver(pair.call("add", 2, 3, slot="next"))
    (_, ok, error), after = pair.replies
    assert not ok
    assert isinstance(error, SerializationError)
    assert after == ("next", True, 5)


def test_unpicklable_argument_raises_before_registering() -> None:
    pair = Pair()
    with pytest.raises(SerializationError, match="arguments of add"):
        pair.client.start("add", (threading.Lock(), 1), {}, pair.slot("slot"))
    assert pair.client.pending_count == 0


def test_argument_that_fails_to_unpickle_in_server_fails_its_call() -> None:
    pair = Pair()
    _, frame = pair.client.start("add", (1, 2), {}, pair.slot("bad"))
    body = bytearray(_join(frame))
    body[-3:] = b"\xff\xff\xff"  # corrupt the pickle, not the frame header
    pair.deliver(pair._serve([bytes(body)]))
    _, ok, error = pair.replies[0]
    assert not ok
    assert isinstance(error, SerializationError)


def test_abandoned_call_late_reply_is_dropped_and_counted() -> None:
    pair = Pair()
    late = pair.call("add", 1, 2, slot="late")
    assert pair.client.abandon(1)
    following = pair.call("add", 5, 5, slot="next")
    pair.deliver(late + following)
    assert pair.replies == [("next", True, 10)]
    assert pair.client.late_replies == 1


def test_a_reply_delivered_twice_settles_its_call_once_then_counts_as_late() -> None:
    # A reader interrupted between settling a call and taking its frame off the
    # queue hands the same frame out again: the second copy must change nothing.
    pair = Pair()
    (reply,) = pair.call("add", 1, 2, slot="a")
    pair.deliver([reply, reply])
    assert pair.replies == [("a", True, 3)]
    assert pair.client.late_replies == 1


def test_a_reply_to_a_call_never_made_is_a_protocol_error() -> None:
    pair = Pair()
    body = _join(Codec().encode_return(99, 3))[4:]
    with pytest.raises(ProtocolError, match="never made"):
        pair.client.receive(body)


def test_a_late_reply_to_the_last_call_made_is_dropped_and_one_past_it_is_an_error() -> None:
    pair = Pair()
    pair.call("add", 1, 2, slot="a")
    pair.call("add", 3, 4, slot="b")
    last = max(pair.client.pending)  # ids are given in order
    assert pair.client.abandon(last)
    pair.client.receive(_join(Codec().encode_return(last, 7))[4:])
    assert pair.client.late_replies == 1
    with pytest.raises(ProtocolError, match="never made"):
        pair.client.receive(_join(Codec().encode_return(last + 1, 7))[4:])


def test_fail_all_settles_every_pending_call_with_its_own_error() -> None:
    pair = Pair()
    pair.call("add", 1, 1, slot="first")
    pair.call("add", 2, 2, slot="second")
    pair.client.fail_all(lambda: ProtocolError("gone"))
    assert sorted(name for name, _, _ in pair.replies) == ["first", "second"]
    first, second = (error for _, _, error in pair.replies)
    assert first is not second
    assert pair.client.pending_count == 0


def test_abandon_after_reply_taken_says_false() -> None:
    pair = Pair()
    pair.deliver(pair.call("add", 1, 2))
    assert not pair.client.abandon(1)


def test_client_refuses_anything_but_hello_first() -> None:
    client: ClientProtocol[Recorder] = ClientProtocol(Codec())
    frame = _join(Codec().encode_return(1, 3))
    (body,) = FrameReader().feed(frame)
    with pytest.raises(ProtocolError, match="hello"):
        client.receive(body)


def test_server_refuses_calls_before_hello() -> None:
    server = ServerProtocol(Codec())
    (body,) = FrameReader().feed(_join(Codec().encode(Call(1, "add", (1, 2), {}))))
    with pytest.raises(ProtocolError, match="hello"):
        server.receive(body)


def test_hello_of_other_version_is_a_protocol_error() -> None:
    codec = Codec()
    (body,) = FrameReader().feed(_join(codec.encode(Hello(version=99, pid=1))))
    with pytest.raises(ProtocolError, match="version 99"):
        codec.decode(body)


@pytest.mark.parametrize(
    "body",
    [b"", b"\x03", b"\x63" + b"\x00" * 8 + b"junk", b"garbage that is not a pipe_rpc hello"],
)
def test_garbage_bodies_are_protocol_errors(body: bytes) -> None:
    client: ClientProtocol[Recorder] = ClientProtocol(Codec())
    with pytest.raises(ProtocolError):
        client.receive(body)


def test_shutdown_reaches_server() -> None:
    pair = Pair()
    (body,) = FrameReader().feed(_join(Codec().encode(Shutdown())))
    assert pair.server.receive(body) == Shutdown()


@pytest.mark.parametrize("doorbell", [False, True])
def test_a_channel_request_says_whether_a_doorbell_comes_with_the_socket(doorbell: bool) -> None:
    pair = Pair()
    for make in (OpenChannel, functools.partial(Channel, doorbell=doorbell)):
        call_id, frame = pair.client.request(make, pair.slot("slot"))
        (body,) = FrameReader().feed(_join(frame))
        assert pair.server.receive(body) == make(call_id)
    assert Channel(7) == Channel(7, doorbell=False) != Channel(7, doorbell=True)


@pytest.mark.parametrize("payload", [b"\x02", b"\x01\x01", b"\x00"])
def test_a_channel_frame_with_another_payload_is_a_protocol_error(payload: bytes) -> None:
    pair = Pair()
    body = struct.pack("!BQ", Tag.CHANNEL, 5) + payload
    with pytest.raises(ProtocolError, match="channel frame"):
        pair.server.receive(body)


def test_frame_reader_splits_any_chunking() -> None:
    frames = [_join(Codec().encode_return(i, "x" * i)) for i in range(1, 40)]
    stream = b"".join(frames)
    for step in (1, 3, 7, 64, len(stream)):
        reader = FrameReader()
        got: list[bytes] = []
        for start in range(0, len(stream), step):
            got += [bytes(b) for b in reader.feed(stream[start : start + step])]
        assert got == [f[4:] for f in frames]
        assert reader.idle


def test_frame_reader_reads_big_frames_in_place() -> None:
    payload = bytes(range(256)) * (BIG_FRAME // 128)
    frame = _join(Codec().encode_return(7, payload))
    reader = FrameReader()
    assert reader.feed(frame[:1000]) == []
    target = reader.read_target()
    assert target is not None
    rest = frame[1000:]
    target[: len(rest)] = rest
    (body,) = reader.filled(len(rest))
    assert Codec().decode(body).value == payload  # type: ignore[union-attr]
    assert reader.read_target() is None


def test_frame_reader_matches_connection_framing_for_long_lengths() -> None:
    reader = FrameReader(max_frame=100)
    with pytest.raises(FrameTooLargeError):
        reader.feed(struct.pack("!iQ", -1, 1 << 33))
    with pytest.raises(ProtocolError):
        FrameReader().feed(struct.pack("!i", -7))


def test_a_frame_too_large_to_allocate_is_a_protocol_error() -> None:
    # Far beyond any address space: the stream cannot be read past it.
    with pytest.raises(FrameTooLargeError, match="cannot be allocated"):
        FrameReader().feed(struct.pack("!iQ", -1, 1 << 50) + b"x" * 100)


def test_out_of_band_buffers_round_trip_without_copy() -> None:
    data = bytearray(b"abc" * 1000)
    frame = _join(Codec().encode_return(3, pickle.PickleBuffer(data)))
    (body,) = FrameReader().feed(frame)
    value = Codec().decode(body).value  # type: ignore[union-attr]
    assert bytes(value) == bytes(data)


def test_big_bytes_go_out_of_band_without_a_copy_and_come_back_as_bytes() -> None:
    value = bytes(range(256)) * (OOB_BYTES // 256)
    codec = Codec()
    segments = codec.encode_return(1, value)
    # The bytes object itself is a segment: written with writev, never copied into the pickle.
    assert any(isinstance(s, memoryview) and s.obj is value for s in segments)
    for decoder in (codec, Codec(untrusted=True)):
        (body,) = FrameReader().feed(_join(segments))
        got = decoder.decode(body).value  # type: ignore[union-attr]
        assert type(got) is bytes
        assert got == value


def test_big_bytes_arguments_go_out_of_band_positional_and_keyword() -> None:
    big, small = b"\x01" * OOB_BYTES, b"\x02" * 10
    segments = Codec().encode_call(4, "f", (small, big, [big]), {"k": big, "s": small})
    assert sum(isinstance(s, memoryview) and s.obj is big for s in segments) == 2
    (body,) = FrameReader().feed(_join(segments))
    call = Codec().decode(body)
    assert isinstance(call, Call)
    assert call.args == (small, big, [big])
    assert call.kwargs == {"k": big, "s": small}
    assert [type(a) for a in call.args[:2]] == [bytes, bytes]
    assert type(call.kwargs["k"]) is bytes


def test_a_callers_own_picklebuffer_of_bytes_stays_a_memoryview() -> None:
    # Only the bytes the codec wraps itself come back as bytes.
    segments = Codec().encode_return(1, [pickle.PickleBuffer(b"abc" * OOB_BYTES)])
    (body,) = FrameReader().feed(_join(segments))
    (got,) = Codec().decode(body).value  # type: ignore[union-attr]
    assert type(got) is memoryview
    assert bytes(got[:3]) == b"abc"


def test_small_bytes_stay_in_one_joined_segment() -> None:
    assert len(Codec().encode_return(1, b"x" * (OOB_BYTES - 100))) == 1


def test_consecutive_big_frames_each_decode_their_own_bytes() -> None:
    codec = Codec()
    reader = FrameReader()
    firsts = [bytes([n]) * (BIG_FRAME + 1000) for n in (1, 2, 3)]
    for payload in firsts:
        frame = _join(codec.encode_return(1, payload))
        assert reader.feed(frame[:500]) == []
        target = reader.read_target()
        assert target is not None
        target[: len(frame) - 500] = frame[500:]
        (body,) = reader.filled(len(frame) - 500)
        assert codec.decode(body).value == payload  # type: ignore[union-attr]


def _read_in_place(reader: FrameReader, frame: bytes) -> tuple[weakref.ref[Any], Body]:
    """Feed ``frame`` as a big frame is read: a head, then the rest in place.

    Returns a weak reference to the buffer it was read into (a strong one would
    keep the reader from reusing it) and the body.
    """
    assert reader.feed(frame[:100]) == []
    target = reader.read_target()
    assert target is not None
    target[: len(frame) - 100] = frame[100:]
    buffer = weakref.ref(target.obj)
    del target
    (body,) = reader.filled(len(frame) - 100)
    return buffer, body


def test_a_big_frame_buffer_is_reused_once_nothing_refers_to_it() -> None:
    codec, reader = Codec(), FrameReader()
    frame = _join(codec.encode_return(1, b"\x05" * (BIG_FRAME + 10)))
    first, body = _read_in_place(reader, frame)
    assert codec.decode(body).value == b"\x05" * (BIG_FRAME + 10)  # type: ignore[union-attr]
    del body
    second, body = _read_in_place(reader, frame)
    assert second() is first()
    kept = memoryview(body)  # a decoded object holding on to the buffer
    del body
    other = _join(codec.encode_return(1, b"\x06" * (BIG_FRAME + 10)))
    third, _ = _read_in_place(reader, other)
    assert third() is not first()
    assert kept[-5:] == b"\x05" * 5  # not overwritten by the third frame


def test_frames_read_ahead_of_their_decoding_reuse_buffers_too() -> None:
    """A stream's items come several frames at a time: each needs a buffer while the
    others are held, and once all are let go, the next frames reuse those buffers
    (a new buffer's every page costs a fault) instead of making new ones."""
    codec, reader = Codec(), FrameReader()
    frame = _join(codec.encode_return(1, b"\x07" * (1 << 20)))
    first, body_a = _read_in_place(reader, frame)
    second, body_b = _read_in_place(reader, frame)  # the first is still held
    assert second() is not first()
    del body_a, body_b
    third, body_c = _read_in_place(reader, frame)
    fourth, body_d = _read_in_place(reader, frame)
    assert {id(third()), id(fourth())} == {id(first()), id(second())}
    assert bytes(body_d[-3:]) == b"\x07" * 3
    del body_c, body_d
    big = _join(codec.encode_return(1, b"\x08" * (SPARE_MAX - (1 << 20))))
    _read_in_place(reader, big)  # the spares stay within SPARE_MAX bytes in all
    assert sum(len(spare) for spare in reader._spares) <= SPARE_MAX


def test_a_buffer_over_the_spare_bound_is_not_kept() -> None:
    reader = FrameReader()
    frame = _join(Codec().encode_return(1, b"\x01" * (SPARE_MAX + 1)))
    first, body = _read_in_place(reader, frame)
    del body
    assert first() is None  # nothing holds it: not even the reader


def test_big_out_of_band_frames_get_buffers_of_their_own() -> None:
    codec = Codec()
    reader = FrameReader()
    values = []
    for n in (7, 9):
        data = bytearray([n]) * (BIG_FRAME + 10)
        frame = _join(codec.encode_return(1, pickle.PickleBuffer(data)))
        assert reader.feed(frame[:100]) == []
        target = reader.read_target()
        assert target is not None
        target[: len(frame) - 100] = frame[100:]
        (body,) = reader.filled(len(frame) - 100)
        values.append(codec.decode(body).value)  # type: ignore[union-attr]
    assert bytes(values[0][:3]) == b"\x07\x07\x07"  # not overwritten by the second frame
    assert bytes(values[1][:3]) == b"\x09\x09\x09"


def _chained() -> None:
    try:
        Service().boom()
    except KeyError as exc:
        raise RuntimeError("outer", [1, 2][5 - 5]) from exc


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


class _ExitingStr(Exception):
    def __str__(self) -> str:
        raise SystemExit(3)


class _Point:
    value = 1


def _with_note() -> Exception:
    error = KeyError("k")
    error.add_note("a note\non two lines")
    return error


@pytest.mark.parametrize(
    "error",
    [
        ValueError("boom"),
        ValueError(),
        KeyError("key"),
        OSError(2, "No such file", "/nowhere"),
        _BadStr("x"),
        _ExitingStr("x"),
        AttributeError("'_Point' object has no attribute 'valeu'", name="valeu", obj=_Point()),
        NameError("name 'valeu' is not defined", name="valeu"),
        MethodNotFoundError("pipe_rpc's own"),
        _with_note(),
        SyntaxError("bad", ("f.py", 3, 5, "x = = 1\n")),
        ValueError(""),
    ],
    ids=repr,
)
def test_the_last_line_is_the_standard_one(error: BaseException) -> None:
    assert _format_exception_only(error) == traceback.format_exception_only(error)


def test_an_exception_whose_str_exits_still_travels() -> None:
    (body,) = FrameReader().feed(_join(Codec().encode(Raise(1, _ExitingStr("x")))))
    error = Codec().decode(body).error  # type: ignore[union-attr]
    assert type(error) is _ExitingStr


def test_a_builtin_exception_with_reshaped_args_keeps_its_type() -> None:
    error = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    error.args = ("reshaped",)  # its constructor would refuse these
    (body,) = FrameReader().feed(_join(Codec().encode(Raise(1, error))))
    got = Codec().decode(body).error  # type: ignore[union-attr]
    assert type(got) is UnicodeDecodeError
    assert got.args == ("reshaped",)


def test_traceback_text_is_the_standard_layout_without_column_markers() -> None:
    with pytest.raises(RuntimeError) as info:
        _chained()
    standard = "".join(traceback.format_exception(info.value)).splitlines()
    expected = [line for line in standard if not line.strip() or set(line.strip()) - set("~^")]
    assert format_traceback(info.value).splitlines() == expected
    assert "in _chained" in format_traceback(info.value)


@pytest.mark.parametrize(
    "args",
    [(1, 2), (True, None, 2.5, "__main__", b"x" * 100), (), (2**100, -1, "é")],
    ids=["ints", "every-plain-kind", "none", "big-int-and-text"],
)
def test_plain_arguments_take_the_short_path_to_the_same_frame(args: tuple[Any, ...]) -> None:
    """Arguments of plain types skip the buffer and ``__main__`` checks, and frame the same."""
    segments = Codec().encode_call(7, "f", args, {})
    assert len(segments) == 1
    payload = pickle.dumps(("f", args, {}), 5)
    assert bytes(segments[0]) == struct.pack("!iBQ", len(payload) + 9, 2, 7) + payload
    (body,) = FrameReader().feed(_join(segments))
    call = Codec().decode(body)
    assert call == Call(7, "f", args, {})


def test_arguments_that_are_not_plain_still_go_by_the_full_path() -> None:
    class Local:  # not importable by name: the full path pickles it with cloudpickle
        pass

    segments = Codec().encode_call(8, "f", (1, Local), {})
    (body,) = FrameReader().feed(_join(segments))
    call = Codec().decode(body)
    assert isinstance(call, Call)
    assert call.args[1].__name__ == "Local"


@pytest.mark.parametrize("kind", ["GeneratorExit", "OwnBaseException"])
def test_dumps_turns_any_base_exception_of_a_reduce_into_serialization_error(kind: str) -> None:
    from tests.calc_service import RefusesToPickle

    with pytest.raises(SerializationError, match=f"the value could not be pickled: .*{kind}"):
        dumps(RefusesToPickle(kind), what="the value")
