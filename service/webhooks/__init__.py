"""Provider event routes (Twilio, Telnyx): verify the signature, then apply to the database.

May import telephony (verification, TwiML), db and the domain; never the dispatcher.
"""

from .telnyx import router as telnyx_router
from .twilio import router as twilio_router

__all__ = ["telnyx_router", "twilio_router"]
