"""HCP IoT MMS v1 uplink: config, codec (messages and answers), transports, uplink."""

from gatewayd.uplinks.mms.codec import (
    Answer,
    Kind,
    Mapper,
    ack_confirms,
    classify,
    classify_frame,
    encode_ts,
    encode_value,
)
from gatewayd.uplinks.mms.config import MessageMap, MmsConfig
from gatewayd.uplinks.mms.uplink import MmsUplink

__all__ = [
    "Answer",
    "Kind",
    "Mapper",
    "MessageMap",
    "MmsConfig",
    "MmsUplink",
    "ack_confirms",
    "classify",
    "classify_frame",
    "encode_ts",
    "encode_value",
]
