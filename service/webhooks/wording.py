"""The words of a reminder call, as the webhooks speak them.

Interim: the wording rule lives in the dispatcher until the domain package (service/reminders)
takes it over; this module is the webhooks' single import of it.
"""

from service.dispatch.dispatcher import message_for

__all__ = ["message_for"]
