"""The Operations Hub REST session: login, and calls with a silent re-login. It knows the site's
answers, not the uplink: it returns decoded answers or raises a classified error."""

from __future__ import annotations

import asyncio
import json
import math
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp

from gatewayd.errors import UplinkAuthError, UplinkRejectedError, UplinkUnavailableError
from gatewayd.uplinks.opshub.codec import loads_lenient
from gatewayd.uplinks.opshub.config import OpsHubConfig

REST_PREFIX = "/app/iqp/rest"


class TokenInvalid(Exception):
    """The server no longer accepts the token (or answered like a login page)."""


class BodyRejected(Exception):
    """The server refused the whole body: error code 1 (bad JSON format), the documented one."""


_YOUNG_S = 10.0  # a token refused sooner after its login was most likely ended by another login
_RELOGINS_PER_CALL = 4


class LoginPacer:
    """Spaces logins out, across sessions. [open]: a new login may end the earlier token; two
    gateways on one account would then end each other's tokens and take turns logging in many
    times a second. Logins are at least `gap_s` apart; each token refused within `_YOUNG_S` of
    its login doubles the gap (with jitter, up to `cap_s`); a token that lived longer resets it."""

    def __init__(self, gap_s: float, cap_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.gap_s = gap_s
        self.cap_s = max(cap_s, gap_s)
        self.clock = clock
        self.streak = 0
        self.last_login = -math.inf

    def wait_s(self, refused: bool) -> float:
        """Seconds to wait before the next login; `refused`: the current token was refused."""
        now = self.clock()
        if refused:
            self.streak = self.streak + 1 if now - self.last_login < _YOUNG_S else 0
        gap = self.gap_s
        if self.streak > 1:
            gap = min(self.cap_s, self.gap_s * 2 ** min(self.streak - 1, 20)) * random.uniform(0.5, 1.0)
        return max(0.0, self.last_login + gap - now)

    def logged_in(self) -> None:
        self.last_login = self.clock()


class OpsHubApi:
    """One HTTP session to the site: login, and calls with a silent, paced re-login and retry."""

    def __init__(self, config: OpsHubConfig, log: Any, counters: Counter[str] | None = None,
                 pacer: LoginPacer | None = None) -> None:
        self.config = config
        self.log = log
        self.pacer = pacer or LoginPacer(config.min_login_interval, config.backoff_cap)
        self.base = config.url.rstrip("/") + REST_PREFIX
        self.token: str | None = None
        self.counters = counters if counters is not None else Counter()  # logins, relogins
        self._login_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpsHubApi:
        tls: ssl.SSLContext | bool = False
        if self.config.url.lower().startswith("https://"):
            # verification stays on; a private CA is added, never a bypass
            tls = ssl.create_default_context(cafile=self.config.ca_bundle or None)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls, limit=4),
            headers={"Content-Type": "application/json", "Accept": "application/json"})
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _post(self, stage: str, body: bytes) -> Any:
        """POST one body; the decoded answer, or the exception that classifies it."""
        assert self._http is not None
        try:
            async with asyncio.timeout(self.config.request_timeout):
                async with self._http.post(f"{self.base}/{stage}", data=body) as resp:
                    status = resp.status
                    text = await resp.text(errors="replace")
        except (aiohttp.ClientError, OSError) as exc:
            raise UplinkUnavailableError(f"{stage}: {type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            raise UplinkUnavailableError(
                f"{stage}: no answer in {self.config.request_timeout}s") from exc
        if status in (401, 403):
            raise TokenInvalid(f"HTTP {status}")
        if status >= 300:  # no status but 401/403 is documented: retried, never a refusal
            hint = " (check the site url)" if status < 500 and status != 429 else ""
            raise UplinkUnavailableError(f"{stage}: HTTP {status}{hint}")
        try:
            answer = loads_lenient(text)
        except ValueError:
            # a proxy or SSO front end answers an expired session with its HTML sign-in page
            raise TokenInvalid(f"HTTP {status} body is not JSON: {text[:60]!r}") from None
        hs = answer.get("handshake") if isinstance(answer, dict) else None
        if isinstance(hs, dict) and hs.get("stage") == "error":
            code = str(hs.get("code")).strip()
            if code == "2":
                raise TokenInvalid("error code 2 (unauthorized)")
            if code == "1":
                raise BodyRejected("error code 1 (bad JSON format)")
            raise UplinkRejectedError(f"{stage}: error code {code}")
        return answer

    async def login(self) -> None:
        """Exchange the credentials for a token. Raises UplinkAuthError if refused."""
        body = json.dumps({"handshake": {"stage": "login"},
                           "login": {"username": self.config.username,
                                     "password": self.config.password.reveal()}},
                          separators=(",", ":")).encode()
        try:
            answer = await self._post("login", body)
        except TokenInvalid as exc:
            if str(exc).startswith("HTTP 40"):  # 401/403 on the login itself: credentials
                raise UplinkAuthError(f"login refused for user {self.config.username!r} "
                                      f"({exc})") from None
            raise UplinkUnavailableError(f"login: {exc}") from None
        except BodyRejected as exc:
            raise UplinkUnavailableError(f"login: {exc}") from None
        hs = answer.get("handshake") if isinstance(answer, dict) else None
        code = str(hs.get("code")).strip() if isinstance(hs, dict) else ""
        token = answer.get("token") if isinstance(answer, dict) else None
        if code == "1" and isinstance(token, str) and token:
            self.token = token
            self.counters["logins"] += 1
            self.log.info("opshub_logged_in", user=self.config.username)
            return
        self.token = None
        if code == "0":
            raise UplinkAuthError(f"login refused for user {self.config.username!r}")
        raise UplinkUnavailableError(f"login: unexpected answer {str(answer)[:120]}")

    async def ensure_login(self) -> None:
        """Log in (paced) unless a token is held. Raises UplinkAuthError if refused."""
        if self.token is None:
            await self._relogin(None)

    async def _relogin(self, failed_token: str | None) -> None:
        async with self._login_lock:
            if self.token is not None and self.token != failed_token:
                return  # a concurrent call logged in already
            wait = self.pacer.wait_s(refused=failed_token is not None)
            if wait > 0:
                if self.pacer.streak > 1:
                    self.log.info("opshub_login_paced", wait_s=round(wait, 2), streak=self.pacer.streak,
                                  hint="tokens end soon after login: another login on this account?")
                await asyncio.sleep(wait)
            self.pacer.logged_in()  # counts the attempt, refused or not
            await self.login()

    async def call(self, stage: str, fields: bytes) -> Any:
        """POST `{"handshake":{"stage":..},"token":..,<fields>}`; re-login and retry once if the
        token is refused. `fields` is the JSON text of the remaining keys, without braces.

        Raises BodyRejected, UplinkAuthError, UplinkUnavailableError or UplinkRejectedError.
        """
        if self.token is None:
            await self._relogin(None)
        for attempt in range(_RELOGINS_PER_CALL + 1):
            token = self.token
            body = b'{"handshake":{"stage":"%s"},"token":%s,%s}' % (
                stage.encode(), json.dumps(token).encode(), fields)
            try:
                return await self._post(stage, body)
            except TokenInvalid as exc:
                if attempt == _RELOGINS_PER_CALL:
                    raise UplinkUnavailableError(
                        f"{stage}: token refused right after each new login ({exc})") from None
                self.log.info("opshub_token_invalid", stage=stage, sign=str(exc))
                self.token = None if self.token == token else self.token
                await self._relogin(token)
                self.counters["relogins"] += 1
        raise AssertionError("unreachable")

