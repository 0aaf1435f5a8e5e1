"""The TwiML the voice and gather webhooks answer with, built by the `twilio` library's
`VoiceResponse` (it escapes the spoken text)."""

from __future__ import annotations

from twilio.twiml.voice_response import VoiceResponse

__all__ = ["GATHER_TIMEOUT_SECONDS", "gather_twiml", "hangup_twiml", "hold_twiml", "say_twiml"]


def say_twiml(message: str, *, language: str | None = None) -> str:
    """TwiML that speaks `message`, then hangs up."""
    response = VoiceResponse()
    if language:
        response.say(message, language=language)
    else:
        response.say(message)
    response.hangup()
    return str(response)


# How long <Gather> waits for the first digit after the words end.
GATHER_TIMEOUT_SECONDS = 8


def gather_twiml(text: str, *, language: str | None, action: str) -> str:
    """TwiML that speaks `text` while listening for one key, posting it to `action`; with no key
    pressed, Twilio goes on to the <Redirect>: the same `action` without `Digits`."""
    response = VoiceResponse()
    gather = response.gather(input="dtmf", num_digits=1, timeout=GATHER_TIMEOUT_SECONDS, action=action,
                             method="POST")
    if language:
        gather.say(text, language=language)
    else:
        gather.say(text)
    response.redirect(action, method="POST")
    return str(response)


def hold_twiml(url: str, *, seconds: int = 1) -> str:
    """TwiML that keeps the call in silence for `seconds`, then asks `url` what to do."""
    response = VoiceResponse()
    response.pause(length=seconds)
    response.redirect(url, method="POST")
    return str(response)


def hangup_twiml() -> str:
    """TwiML that ends the call without a word."""
    response = VoiceResponse()
    response.hangup()
    return str(response)
