"""Pure MMS logic: config parsing, reading -> message mapping, answer classification."""

from __future__ import annotations

from pathlib import Path

import pytest

from drivers.base import Reading
from gatewayd.config import parse
from gatewayd.errors import ConfigError
from gatewayd.uplinks.base import Item
from gatewayd.uplinks.mms import (
    Kind,
    Mapper,
    MessageMap,
    MmsConfig,
    ack_confirms,
    classify,
    classify_frame,
    encode_ts,
)


def _doc(**mms: object) -> dict:
    return {
        "gateway": {"id": "gw", "state_dir": "/tmp/x"},
        "devices": [{"name": "boiler", "driver": "sim", "points": {"t": {"shape": "sine"}}}],
        "uplinks": {"cloud": {"type": "mms", "device_id": "dev-1", "token_env": "MMS_TOKEN", **mms}},
    }


def test_config_from_toml_with_maps_and_secret_from_env() -> None:
    cfg = parse(
        _doc(
            account="p1234567trial",
            landscape="hanatrial.ondemand.com",
            transport="http",
            poll_interval="2s",
            messages=[
                {
                    "message_type": "4c1d0e9a7b3f2a6d8e10",
                    "devices": ["boiler"],
                    "point_fields": {"temp_c": "boiler_temp"},
                    "timestamp_format": "iso",
                }
            ],
        ),
        Path("/etc/gatewayd/config.toml"),
        env={"MMS_TOKEN": "s3cret"},
    )
    (up,) = cfg.uplinks
    opts: MmsConfig = up.options
    assert opts.token.reveal() == "s3cret" and "s3cret" not in repr(opts)
    assert opts.api_url == (
        "https://iotmmsp1234567trial.hanatrial.ondemand.com/com.sap.iotservices.mms/v1/api/"
    )
    assert opts.ws_url == (
        "wss://iotmmsp1234567trial.hanatrial.ondemand.com/com.sap.iotservices.mms/v1/api/ws/data/dev-1"
    )
    assert opts.poll_interval == 2.0 and opts.messages[0].point_fields == {"temp_c": "boiler_temp"}


@pytest.mark.parametrize(
    ("host", "api"),
    [
        ("iotmmsacme.hana.ondemand.com", "https://iotmmsacme.hana.ondemand.com"),
        ("https://iotmmsacme.hana.ondemand.com/", "https://iotmmsacme.hana.ondemand.com"),
        (
            "https://iotmmsacme.hana.ondemand.com/com.sap.iotservices.mms/v1/api",
            "https://iotmmsacme.hana.ondemand.com",
        ),
        ("http://127.0.0.1:8443", "http://127.0.0.1:8443"),
    ],
)
def test_host_forms(host: str, api: str) -> None:
    cfg = parse(_doc(host=host), Path("c.toml"), env={"MMS_TOKEN": "t"}).uplinks[0].options
    assert cfg.api_url == api + "/com.sap.iotservices.mms/v1/api/"


@pytest.mark.parametrize(
    ("mms", "needle"),
    [
        ({}, "set host"),
        ({"host": "a.b", "account": "x"}, "either host or account"),
        ({"host": "a.b", "transport": "mqtt"}, 'uplinks.cloud.transport: expected one of "ws", "http"'),
        (
            {"host": "a.b", "messages": [{"message_type": "x", "fields": {"v": "valu"}}]},
            "fields.v: expected one of device, point, sensor, value, quality",
        ),
        ({"host": "a.b", "messages": []}, "at least one message type"),
        ({"host": "a.b", "batch_size": 0}, "uplinks.cloud.batch_size: expected a value from 1"),
        ({"host": "a.b", "tokn": "x"}, "uplinks.cloud.tokn: unknown key"),
    ],
)
def test_config_errors_name_the_key(mms: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(_doc(**mms), Path("c.toml"), env={"MMS_TOKEN": "t"})
    assert needle in str(err.value)


def test_missing_token_env_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse(_doc(host="a.b"), Path("c.toml"), env={})
    assert "environment variable MMS_TOKEN is not set" in str(err.value)


@pytest.mark.parametrize(
    ("fmt", "expected"), [("s", 1718000000), ("ms", 1718000000123), ("iso", "2024-06-10T06:13:20.123Z")]
)
def test_timestamp_encodings(fmt: str, expected: object) -> None:
    assert encode_ts(1_718_000_000_123, fmt) == expected


def _items(*readings: Reading) -> list[Item]:
    return [Item(i + 1, r, False) for i, r in enumerate(readings)]


def test_mapper_routes_groups_and_reports_unmapped() -> None:
    wide = MessageMap(
        "wide",
        devices=["attic"],
        fields={"device": "device"},
        point_fields={"t": "temperature", "h": "humidity"},
        timestamp_field="ts",
        timestamp_format="ms",
    )
    rows = MessageMap("rows", devices=["cellar"], fields={"sensor": "sensor", "v": "value", "q": "quality"})
    items = _items(
        Reading("attic", "t", 1.5, 1000),
        Reading("attic", "h", 40, 1000),
        Reading("attic", "t", 1.6, 2000),
        Reading("attic", "t", 1.7, 2000),
        Reading("cellar", "x", {"a": 1}, 3000, 1),
        Reading("garage", "t", 3, 4000),
        Reading("attic", "unknown_point", 0, 5000),
    )
    runs = Mapper([wide, rows]).runs(items)
    assert [(t, [it.seq for it in run]) for t, run, _ in runs] == [
        ("wide", [1, 2, 3, 4]), ("rows", [5]), (None, [6, 7])]  # runs in seq order; no map: None
    assert runs[0][2] == [
        {"device": "attic", "temperature": 1.5, "humidity": 40, "ts": 1000},
        {"device": "attic", "temperature": 1.6, "ts": 2000},
        {"device": "attic", "temperature": 1.7, "ts": 2000},  # same point twice: a new message
    ]
    assert runs[1][2] == [{"sensor": "cellar.x", "v": '{"a":1}', "q": 1, "timestamp": 3}]
    assert runs[2][2] == []


@pytest.mark.parametrize(
    ("status", "text", "mode", "kind"),
    [
        (200, '{"msg":"3 message(s) received from device [d]"}', "sync", Kind.OK),
        (202, '{"msg":"accepted"}', "async", Kind.OK),
        (202, '{"msg":"https://h/x/http/ack/d/u-1","retryAfterHeaderValue":"60"}', "sync", Kind.PENDING),
        (200, "<html><form>login</form></html>", "sync", Kind.TRANSIENT),
        (200, "", "sync", Kind.TRANSIENT),
        (202, "<html/>", "async", Kind.TRANSIENT),
        (400, '{"msg":"The message doesn\'t conform to the given message type"}', "sync", Kind.REJECTED),
        (400, "<html>Bad Request</html>", "sync", Kind.TRANSIENT),  # a proxy's page, not MMS
        (400, '{"error":"x"}', "sync", Kind.TRANSIENT),  # not the documented shape
        (413, "too big", "sync", Kind.TRANSIENT),  # not documented: retried, never dropped
        (404, '{"msg":"Device [d] not found"}', "sync", Kind.TRANSIENT),
        (401, "Access to the requested resource is not authorized (HTTP 401)", "sync", Kind.AUTH),
        (403, "<html/>", "sync", Kind.AUTH),
        (500, '{"msg":"Processing 1 message(s) received from device [d] failed"}', "sync", Kind.TRANSIENT),
        (503, "", "sync", Kind.TRANSIENT),
        (429, "", "sync", Kind.TRANSIENT),
    ],
)
def test_classify(status: int, text: str, mode: str, kind: Kind) -> None:
    assert classify(status, text, mode).kind is kind


def test_classify_202_details() -> None:
    a = classify(202, '{"msg":"https://h/api/http/ack/d/u-1","retryAfterHeaderValue":"60"}', "sync")
    assert (a.ack_url, a.retry_after_s) == ("https://h/api/http/ack/d/u-1", 60.0)
    a = classify(202, '{"msg":"busy","retryAfterHeaderValue":"soon"}', "sync")
    assert (a.ack_url, a.retry_after_s) == ("", 0.0)


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        ({"msg": "1 message(s) received from device [d]"}, Kind.OK),
        ({"msg": "Processing 1 message(s) received from device [d] failed"}, Kind.TRANSIENT),
        ({"msg": "The message doesn't conform to the given message type"}, Kind.REJECTED),
        ({"msg": "https://h/http/ack/d/1", "retryAfterHeaderValue": "60"}, Kind.PENDING),
        ({"msg": "whatever", "code": 200}, Kind.OK),
        ({"msg": "nope", "code": 401}, Kind.AUTH),
        ({"msg": "nope", "code": "400"}, Kind.REJECTED),
        ({"msg": "Parse error. Expected [messageType] of type [string]"}, Kind.REJECTED),
        ({"msg": "OK"}, Kind.UNKNOWN),  # other wording: never a refusal
        ({"msg": "Bad message"}, Kind.UNKNOWN),
        ({"msg": "accepted", "code": 299}, Kind.UNKNOWN),
        ({"msg": "busy", "code": 503}, Kind.TRANSIENT),
        ({"msg": 7}, Kind.UNKNOWN),
    ],
)
def test_classify_frame_with_and_without_code(frame: dict, kind: Kind) -> None:
    assert classify_frame(frame, "sync").kind is kind


def test_unrecognised_async_answer_is_not_a_rejection() -> None:
    assert classify_frame({"msg": "OK"}, "async").kind is Kind.UNKNOWN


def test_check_devices_names_the_key_path() -> None:
    with pytest.raises(ConfigError) as err:
        parse(
            _doc(
                host="http://127.0.0.1:1",
                command_device="relya",
                messages=[{"message_type": "m0t0y0p0e1"}, {"message_type": "x", "devices": ["boiler", "boilr"]}],
            ),
            Path("c.toml"),
            env={"MMS_TOKEN": "t"},
        )
    text = str(err.value)
    assert "uplinks.cloud: messages[1].devices[1]: no device or actuator named 'boilr'" in text
    assert "command_device: no device or actuator named 'relya'" in text
    assert "messages[1].devices[0]" not in text


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        ([{"sequence": "u-1", "status": "SUCCESS"}], True),
        ([{"sequence": "u-2", "status": "SUCCESS"}], False),
        ([{"sequence": "u-1", "status": "FAILED"}], False),
        ({"status": 200}, True),
        ("garbage", False),
        (None, False),
    ],
)
def test_ack_confirms(body: object, ok: bool) -> None:
    assert ack_confirms(body, "u-1") is ok
