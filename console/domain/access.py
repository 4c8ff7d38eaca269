"""Who may see and do what: the console's authorisation rules as pure functions.

Roles (sinks.models.ROLES):
- clinician: the alerts of their institution and wards (all wards when they have none), at or above
  their place in the escalation chain; the timeline of any patient known at their institution, with
  what other institutions stored of them; a patient's MRN at their own institution and, beside it, the
  name their institution sent (`sees_local_identity`), never another institution's MRN or name;
- integration: their institution's unprocessable results, nothing clinical beyond the rejection;
- operator: aggregate figures only, never a patient;
- admin: accounts and the audit log, never a patient.

An alert whose ward is unknown is shown to every clinician of its institution at its level: a
critical result nobody's ward claims must still reach someone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sinks.models import ADMIN, CLINICIAN, INTEGRATION, OPERATOR, ROLES

__all__ = [
    "ADMIN",
    "CLINICIAN",
    "INTEGRATION",
    "OPERATOR",
    "ROLES",
    "AlertScope",
    "Principal",
    "can_see_alert",
    "parse_wards",
    "sees_local_identity",
]


def parse_wards(text: str | Iterable[str] | None) -> frozenset[str]:
    """Wards as an account stores them (comma-separated) or as a list; blanks dropped, case kept."""
    if text is None:
        return frozenset()
    items = text.split(",") if isinstance(text, str) else list(text)
    return frozenset(item.strip() for item in items if item.strip())


@dataclass(frozen=True)
class Principal:
    """The signed-in user, as every rule sees them."""

    username: str
    display_name: str
    role: str
    institution_id: str | None
    wards: frozenset[str] = frozenset()
    chain_level: int = 0

    @property
    def clinical(self) -> bool:
        return self.role == CLINICIAN and self.institution_id is not None

    @property
    def sees_unprocessable(self) -> bool:
        return self.role == INTEGRATION and self.institution_id is not None

    @property
    def sees_aggregates(self) -> bool:
        return self.role in (OPERATOR, ADMIN)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def covers_ward(self, ward: str | None) -> bool:
        return not self.wards or ward is None or ward in self.wards


@dataclass(frozen=True)
class AlertScope:
    """What decides whether an alert is someone's: where it is and how far it has escalated."""

    institution_id: str
    ward: str | None
    escalation_level: int


def can_see_alert(principal: Principal, alert: AlertScope) -> bool:
    """Open the alert's details and acknowledge it."""
    return (
        principal.clinical
        and principal.institution_id == alert.institution_id
        and principal.covers_ward(alert.ward)
    )


def in_queue_of(principal: Principal, alert: AlertScope) -> bool:
    """In the user's queue: theirs to see, and escalated at least as far as their place in the chain."""
    return can_see_alert(principal, alert) and alert.escalation_level >= principal.chain_level


def sees_local_identity(principal: Principal, institution_id: str | None) -> bool:
    """See a patient's MRN at `institution_id` and the name that institution sent for it: exactly where
    the MRN is shown, the name is, and only to that institution's clinicians."""
    return principal.clinical and institution_id is not None and principal.institution_id == institution_id
