"""Telnyx Call Control as a `Provider`: Dial, the speak / gather / hangup commands and the
connection's active calls.

Calls are placed with an httpx JSON POST (Bearer key), one deadline per request and no retry: a
Dial's `command_id` dedupes for 60 s only, so a repeated Dial after that is a second call. The
stamp travels as `client_state` (base64; Telnyx echoes it in every event of the call and returns
it with the active-calls list) and the attempt id as the Dial's `command_id`. Speech is a command
sent after `call.answered`, with a `command_id` derived from the attempt, so a retried command
(another replica, the leader's sweep) is not spoken twice. Nothing here knows the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx

from service.privacy import mask_phone
from service.telephony.http import (
    ANSWER_HEADERS,
    HttpAdapter,
    SendRefused,
    describe_failure,
    error_text,
    post_guarded,
    refused_create,
    require_http_url,
)
from service.telephony.provider import (
    MACHINE_DETECTION_WITHIN,
    CallSpec,
    CreateKind,
    CreateResult,
    GreetingWords,
    LiveCall,
    ProviderUnavailable,
    Stamp,
)
from service.telephony.webhook import WEBHOOK_PREFIX

__all__ = [
    "CALL_ENDED_CODE",
    "EVENTS_PATH",
    "RATE_LIMIT_CODE",
    "TelnyxProvider",
    "answer_command_id",
    "gather_command_id",
    "hangup_command_id",
    "last_words_command_id",
    "greeting_command_id",
]

log = logging.getLogger(__name__)

# The route Telnyx posts every event of a call to, under PUBLIC_URL (the webhooks package serves it).
EVENTS_PATH = f"{WEBHOOK_PREFIX}/telnyx/events"
RATE_LIMIT_CODE = "90103"  # 429: over the dials-per-second limit, nothing created
CALL_ENDED_CODE = "90018"  # 422: a command to a call that has already ended
# The dials-per-second window: a 429 without Retry-After is retried after it.
DEFAULT_RETRY_AFTER = 1.0
_MAX_PAGES = 40
_PAGE_SIZE = 250


def greeting_command_id(attempt_id: str) -> str:
    """The `command_id` of the bound call's greeting (its first words): one per call, whoever sends
    it — the events route or the leader's sweep — and however often."""
    return f"greet-{attempt_id}"


def last_words_command_id(attempt_id: str) -> str:
    """The `command_id` of the words after the keypad answer (confirmed, declined, goodbye)."""
    return f"last-{attempt_id}"


def hangup_command_id(attempt_id: str) -> str:
    return f"hangup-{attempt_id}"


def answer_command_id(call_id: str) -> str:
    """The `command_id` of the answer of an incoming call: one per call, however often its
    `call.initiated` is delivered."""
    return f"answer-{call_id}"


def gather_command_id(attempt_id: str, round_: int) -> str:
    """The `command_id` of the keypad question on the bound call, asked the `round_`-th time."""
    return f"gather-{round_}-{attempt_id}"


class TelnyxProvider(HttpAdapter):
    """`Provider` for Telnyx Call Control on one connection (Call Control application).

    `api_url` may carry a path prefix. `public_url` is where Telnyx reaches this service's events
    route. `timeout`, `max_connections` and `transport` go to `HttpAdapter`.
    """

    name = "telnyx"
    dedupes_creation = False

    def __init__(
        self,
        *,
        api_url: str,
        api_key: str,
        connection_id: str,
        public_url: str,
        voice: str = "female",
        language: str = "en-US",
        machine_detection: bool = False,
        **http: Any,
    ) -> None:
        super().__init__(**http)  # timeout, max_connections, transport
        if not api_key or not connection_id:
            raise ValueError("api_key and connection_id are required")
        require_http_url("api_url", api_url)
        require_http_url("public_url", public_url)
        self._api = f"{api_url.rstrip('/')}/v2"
        self._connection_id = connection_id
        self._events_url = f"{public_url.rstrip('/')}{EVENTS_PATH}"
        self._voice, self._language = voice, language
        # Telnyx's answering machine detection: `call.machine.detection.ended` follows `call.answered`
        self.machine_detection = machine_detection
        self._headers = {"Authorization": f"Bearer {api_key}", **ANSWER_HEADERS}

    @property
    def calls_url(self) -> str:
        return f"{self._api}/calls"

    def active_calls_url(self) -> str:
        return f"{self._api}/connections/{self._connection_id}/active_calls"

    def dial_body(self, spec: CallSpec) -> dict[str, Any]:
        """The Dial's JSON: the stamp as `client_state`, the attempt id as `command_id`; with
        `machine_detection`, `answering_machine_detection` (`call.machine.detection.ended` follows)."""
        body = {
            "connection_id": self._connection_id,
            "to": spec.to,
            "from": spec.from_,
            "webhook_url": self._events_url,
            "webhook_url_method": "POST",
            "client_state": spec.stamp.encode(),
            "command_id": spec.attempt_id,
        }
        if self.machine_detection:
            # a machine is greeted after its beep (`call.machine.greeting.ended`), so the
            # voicemail is recorded, not spoken over its greeting
            body["answering_machine_detection"] = "detect_beep"
            # the bound the leader's sweep counts on (it greets a call whose result never came)
            body["answering_machine_detection_config"] = {
                "total_analysis_time_millis": int(MACHINE_DETECTION_WITHIN / timedelta(milliseconds=1))}
        return body

    async def create_call(self, spec: CallSpec, *, may_send: Callable[[], bool] | None = None) -> CreateResult:
        """POST /v2/calls; 2xx → CREATED, 429 → NOT_CREATED, other 4xx → REJECTED, anything
        unknown (5xx, timeout, lost connection) → IN_DOUBT."""
        body = json.dumps(self.dial_body(spec), separators=(",", ":")).encode()
        headers = {**self._headers, "Content-Type": "application/json"}
        try:
            response = await post_guarded(self._send_request, self.calls_url, headers, body, may_send=may_send,
                                          timeout=self._timeout)
        except SendRefused:
            return CreateResult(CreateKind.NOT_SENT, error="not sent: the sender may no longer send")
        except (httpx.HTTPError, TimeoutError) as error:
            return CreateResult(CreateKind.IN_DOUBT, error=describe_failure(error, spec.to))
        result = _classify_dial(response, spec)
        log.debug("telnyx dial to %s (attempt %s): %s %s", mask_phone(spec.to), spec.attempt_id, result.kind,
                  result.status_code)
        return result

    async def live_calls(self, to: str) -> list[LiveCall]:
        """The connection's active calls that carry a stamp (ours), with it. The list has no
        number and no state: the stamp says whose call it is, any listed call may still speak."""
        calls: list[LiveCall] = []
        params: dict[str, str] = {"page[size]": str(_PAGE_SIZE)}
        try:
            async with asyncio.timeout(self._timeout):
                for _ in range(_MAX_PAGES):
                    response = await self._send_request(httpx.Request("GET", self.active_calls_url(), params=params,
                                                              headers=self._headers))
                    if response.status_code != 200:
                        raise ProviderUnavailable(f"listing active calls: HTTP {response.status_code}")
                    page = response.json()
                    for item in page.get("data") or []:
                        stamp = Stamp.decode(item.get("client_state"))
                        if stamp is not None:
                            calls.append(LiveCall(call_id=str(item.get("call_control_id")), status="active", to="",
                                                  stamp=stamp))
                    after = ((page.get("meta") or {}).get("cursors") or {}).get("after")
                    if not after or not page.get("data"):
                        return calls
                    params = {"page[size]": str(_PAGE_SIZE), "page[after]": str(after)}
                raise ProviderUnavailable("listing active calls: too many pages")
        except ProviderUnavailable:
            raise
        except (httpx.HTTPError, TimeoutError, ValueError, AttributeError, TypeError) as error:
            raise ProviderUnavailable(f"listing active calls: {type(error).__name__}") from None

    def _speak_body(self, message: str, *, command_id: str, stamp: Stamp, language: str | None) -> dict[str, Any]:
        return {"payload": message, "payload_type": "text", "voice": self._voice,
                "language": language or self._language, "command_id": command_id, "client_state": stamp.encode()}

    def _gather_body(self, message: str, *, command_id: str, stamp: Stamp, language: str | None, round_: int,
                     valid_digits: str = "0123456789*#", maximum_digits: int = 1,
                     timeout_millis: int = 8000) -> dict[str, Any]:
        return {"payload": message, "voice": self._voice, "language": language or self._language,
                "valid_digits": valid_digits, "minimum_digits": 1, "maximum_digits": maximum_digits,
                "timeout_millis": timeout_millis, "command_id": command_id, "client_state": stamp.encode(round_)}

    async def speak(self, call_id: str, message: str, *, command_id: str, stamp: Stamp,
                    language: str | None = None) -> bool:
        """`actions/speak` (in `language`, default the provider's); True when Telnyx accepted the
        command (a deduped repeat counts) or the call is already over (nothing more can be done
        for it: its hangup event follows)."""
        return await self._command(call_id, "speak", self._speak_body(message, command_id=command_id, stamp=stamp,
                                                                      language=language), ended_is_done=True)

    async def gather_using_speak(self, call_id: str, message: str, *, command_id: str, stamp: Stamp,
                                 language: str | None = None, round_: int = 1) -> bool:
        """`actions/gather_using_speak`: speak, then collect one key (`call.gather.ended`, whose
        `client_state` carries `round_`). Any key is valid: 1 and 2 answer, another one gets the
        question again, as no key does."""
        return await self._command(call_id, "gather_using_speak", self._gather_body(
            message, command_id=command_id, stamp=stamp, language=language, round_=round_))

    async def hang_up(self, call_id: str, *, command_id: str | None = None, stamp: Stamp | None = None) -> bool:
        """`actions/hangup`: ends a call in any state; True if done or already over."""
        body: dict[str, Any] = {}
        if command_id:
            body["command_id"] = command_id
        if stamp is not None:
            body["client_state"] = stamp.encode()
        return await self._command(call_id, "hangup", body, ended_is_done=True)

    async def answer(self, call_id: str, *, command_id: str, client_state: str) -> bool | None:
        """`actions/answer` of an incoming call, `client_state` echoed in its every later event:
        True accepted, False the call is already over, None unknown."""
        return await self._command_result(call_id, "answer", {"command_id": command_id, "client_state": client_state})

    async def say(self, call_id: str, message: str, *, command_id: str, client_state: str) -> bool | None:
        """`actions/speak` of `message` on a call that has no stamp (the neutral message to a caller
        whose call answers no reminder), in the default voice and language."""
        return await self._command_result(call_id, "speak", {
            "payload": message, "voice": self._voice, "language": self._language, "command_id": command_id,
            "client_state": client_state})

    async def cancel(self, call_id: str) -> bool:
        """Telnyx has no separate cancel: a hangup ends a ringing call too."""
        return await self.hang_up(call_id)

    async def greet(self, call_id: str, words: GreetingWords, *, stamp: Stamp) -> bool | None:
        """The bound call's greeting, one command per call (`greeting_command_id`): for a person
        `gather_using_speak` (the message and the keypad question, round 1), for a machine `speak`
        (the voicemail, after its beep). True accepted, False the call is over, None unknown."""
        command_id = greeting_command_id(stamp.attempt_id)
        if words.machine:
            body = self._speak_body(words.text, command_id=command_id, stamp=stamp, language=words.language)
            return await self._command_result(call_id, "speak", body)
        body = self._gather_body(words.text, command_id=command_id, stamp=stamp, language=words.language, round_=1)
        return await self._command_result(call_id, "gather_using_speak", body)

    async def call_state(self, call_id: str) -> str | None:
        """`GET /v2/calls/{id}`: `in-progress` while `is_alive`, else `completed` (the hang-up's
        cause is in its event; a call ended long ago answers 404, over too); None when unknown."""
        if not call_id or "/" in call_id or len(call_id) > 128:
            raise ValueError("not a call control id")
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._send_request(httpx.Request("GET", f"{self._api}/calls/{call_id}",
                                                                  headers=self._headers))
        except (httpx.HTTPError, TimeoutError):
            return None
        if response.status_code == 404:
            return "completed"
        if response.status_code != 200:
            return None
        try:
            alive = response.json()["data"]["is_alive"]
        except (ValueError, KeyError, TypeError):
            return None
        return "in-progress" if alive is True else "completed" if alive is False else None

    async def _command(self, call_id: str, action: str, body: dict[str, Any], *, ended_is_done: bool = False) -> bool:
        """True when Telnyx accepted the command, or (`ended_is_done`) the call is already over."""
        result = await self._command_result(call_id, action, body)
        return result is True or (result is False and ended_is_done)

    async def _command_result(self, call_id: str, action: str, body: dict[str, Any]) -> bool | None:
        """POST a call command: True accepted (a deduped repeat too), False the call is already
        over (422, 90018: nothing was done), None anything else (it may or may not have run)."""
        if not call_id or "/" in call_id or len(call_id) > 128:
            raise ValueError("not a call control id")
        url = f"{self._api}/calls/{call_id}/actions/{action}"
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._send_request(httpx.Request("POST", url, json=body, headers=self._headers))
        except (httpx.HTTPError, TimeoutError) as error:
            log.warning("telnyx: %s on call %s failed: %s", action, call_id, type(error).__name__)
            return None
        if response.status_code < 300:
            return True
        ended = response.status_code == 422 and CALL_ENDED_CODE in _error_codes(response)
        log.info("telnyx: %s on call %s answered HTTP %d%s", action, call_id, response.status_code,
                 " (call already ended)" if ended else "")
        return False if ended else None


def _error_codes(response: httpx.Response) -> list[str]:
    try:
        errors = response.json().get("errors") or []
        return [str(e.get("code")) for e in errors if isinstance(e, dict)]
    except (ValueError, AttributeError):
        return []


def _classify_dial(response: httpx.Response, spec: CallSpec) -> CreateResult:
    status = response.status_code
    if 200 <= status < 300:
        try:
            call_id = response.json()["data"]["call_control_id"]
        except (ValueError, KeyError, TypeError):
            call_id = None
        if isinstance(call_id, str) and call_id:
            return CreateResult(CreateKind.CREATED, call_id=call_id, status_code=status)
        return CreateResult(CreateKind.IN_DOUBT, status_code=status, error=f"HTTP {status} without a call_control_id")
    try:
        first = (response.json().get("errors") or [{}])[0]
        code, title = str(first.get("code") or ""), str(first.get("title") or first.get("detail") or "")
    except (ValueError, AttributeError, IndexError, TypeError):
        code, title = "", ""
    error = error_text(f"HTTP {status}" + (f" ({code})" if code else "") + (f": {title}" if title else ""), spec.to)
    return refused_create(response, error, default_retry_after=DEFAULT_RETRY_AFTER)
