"""The EnOS sign against every test vector of the protocol notes (§1.7)."""

from __future__ import annotations

import pytest

from gatewayd.uplinks.enos.sign import (
    device_sign,
    mqtt_credentials,
    parse_client_id,
    sign,
    sign_content,
    verify,
)


def test_vector_a_static_sha256() -> None:
    cid, user, pw = mqtt_credentials("pk123456", "dk_gateway01", "ds_secret_ABC", 2,
                                     "1700000000000")
    assert cid == "dk_gateway01|securemode=2,signmethod=sha256,timestamp=1700000000000|"
    assert user == "dk_gateway01&pk123456"
    assert pw == "ad680ee6b7f983835ccf65a86c0916380e77c54dcb87590c552a35aafe7ba8ed"
    params = {"productKey": "pk123456", "deviceKey": "dk_gateway01",
              "clientId": "dk_gateway01", "timestamp": "1700000000000"}
    assert sign_content(params, "ds_secret_ABC") == (
        "clientIddk_gateway01deviceKeydk_gateway01productKeypk123456timestamp1700000000000"
        "ds_secret_ABC")
    assert verify(params, "ds_secret_ABC", "sha256", pw.upper())


def test_vector_b_dynamic_product_secret() -> None:
    cid, user, pw = mqtt_credentials("PKdyn01", "sn-0001", "ps_XYZ987", 3, "1700000001234")
    assert cid == "sn-0001|securemode=3,signmethod=sha256,timestamp=1700000001234|"
    assert user == "sn-0001&PKdyn01"
    assert pw == "a8199c758dc3f09d17864c1809b0fbc76c7df747562ee1a54b7fdcd9d558dd79"


def test_vector_c_docs_client_id_differs() -> None:
    cid, user, pw = mqtt_credentials("654321", "test", "abcdefg", 2, "1548753362502",
                                     client_id="123456")
    assert cid == "123456|securemode=2,signmethod=sha256,timestamp=1548753362502|"
    assert user == "test&654321"
    assert pw == "b99032d49c706f7b27b22ab5cd2dd3c56a31e1bcbbc83ba0a2a6bb3272fbb166"


def test_vector_d_python_sdk_float_timestamp_hmac_alias() -> None:
    cid, _, pw = mqtt_credentials("pk123456", "dk_gateway01", "ds_secret_ABC", 2,
                                  "1700000000000.123", method="hmacsha256")
    assert cid == "dk_gateway01|securemode=2,signmethod=hmacsha256,timestamp=1700000000000.123|"
    assert pw == "101d5ef2ff9ed48a6d3efcb97c2941ff082880659bbf0a06e3a0475f90cea2e2"


@pytest.mark.parametrize("method", ["sha1", "hmacsha1", "SHA1"])
def test_vector_e_sha1_upper_case(method: str) -> None:
    pw = device_sign("pk123456", "dk_gateway01", "ds_secret_ABC", "dk_gateway01",
                     "1700000000000", method)
    assert pw == "E73622684881F4AD554FA02943DD155329DD6F74"


def test_sub_device_login_sign() -> None:
    assert device_sign("subPK01", "meter-001", "subSecret001", "subPK01.meter-001.1700000002000",
                       "1700000002000") == (
        "70ac2a1cf709ad4b7a65adabf31606300b310c2f8a9db8cf2601812da5932797")
    with_clean = {"productKey": "subPK01", "deviceKey": "meter-001",
                  "clientId": "subPK01.meter-001.1700000002000", "timestamp": "1700000002000",
                  "cleanSession": "true"}
    assert sign(with_clean, "subSecret001") == (
        "2ab208c1aad77725dbb9cba5f21672f8294f5939c47facf61a5d7ddc48479590")


def test_batch_login_signs() -> None:
    assert device_sign("subPK01", "meter-001", "subSecret001", "login.batch", "1700000003000") == (
        "e529a8eca38036db9cbfff88abc89d081d23dd62c62c193d6cc90c932afc444a")
    assert device_sign("subPK01", "meter-002", "subSecret002", "login.batch", "1700000003000") == (
        "129f8e5218f9dba36f72b887f8b9586b06bb09cee5da5651e34d2f4e1f5dc40e")


def test_verify_refuses_wrong_secret_and_unknown_method() -> None:
    params = {"productKey": "p", "deviceKey": "d", "clientId": "d", "timestamp": "1"}
    good = sign(params, "s")
    assert verify(params, "s", "hmacsha256", good)
    assert not verify(params, "wrong", "sha256", good)
    assert not verify(params, "s", "sha512", good)
    with pytest.raises(ValueError):
        sign(params, "s", "sha512")


def test_parse_client_id_tolerates_order_spaces_and_java_braces() -> None:
    sid, attrs = parse_client_id(
        "dk01{ip=10.0.0.5,version=x,compress=DEFAULT}|timestamp=17, securemode=2,signmethod=SHA256|")
    assert sid == "dk01{ip=10.0.0.5,version=x,compress=DEFAULT}"
    assert attrs == {"timestamp": "17", "securemode": "2", "signmethod": "SHA256"}
    with pytest.raises(ValueError):
        parse_client_id("no-attributes")
