"""ABCI wire framing: each protobuf message is preceded by its length as an unsigned varint
(CometBFT v0.38's protoio delimited format)."""

from __future__ import annotations


def encode_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class FrameDecoder:
    """Accumulates bytes as they arrive, however they are split, and yields whole frames."""

    MAX_FRAME = 64 * 1024 * 1024

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames: list[bytes] = []
        while True:
            length, offset = self._read_length()
            if length is None or len(self._buffer) < offset + length:
                return frames
            frames.append(bytes(self._buffer[offset : offset + length]))
            del self._buffer[: offset + length]

    def _read_length(self) -> tuple[int | None, int]:
        value = 0
        for position, byte in enumerate(self._buffer):
            if position >= 10:
                raise ValueError("varint length prefix longer than 10 bytes")
            value |= (byte & 0x7F) << (7 * position)
            if not byte & 0x80:
                if value > self.MAX_FRAME:
                    raise ValueError(f"frame of {value} bytes exceeds {self.MAX_FRAME}")
                return value, position + 1
        return None, 0
