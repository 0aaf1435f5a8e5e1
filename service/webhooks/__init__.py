"""Provider event routes (Twilio; Telnyx next): verify the signature, then apply to the database.

May import telephony (verification, TwiML), db and the domain; never the dispatcher.
"""

from .twilio import router as twilio_router

__all__ = ["twilio_router"]
