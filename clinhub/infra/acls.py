"""Principals on Kafka, as the admin: their SCRAM credentials, the ACLs of `clinhub/kafka_acls.py`,
revoking them.

Creating an ACL that exists already changes nothing, so applying a deployment's grants again is safe.
Revoking removes the principal's ACLs first, which stops it at once (the broker authorises every
request), then its SCRAM credentials, so it can no longer connect.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

from clinhub.exceptions import ServiceError
from core.principals import Grant


def _binding(grant: Grant) -> Any:
    from confluent_kafka.admin import (
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    return AclBinding(
        ResourceType[grant.resource.upper()],
        grant.name,
        ResourcePatternType.PREFIXED if grant.prefixed else ResourcePatternType.LITERAL,
        f"User:{grant.principal}",
        "*",
        AclOperation[grant.operation],
        AclPermissionType.ALLOW,
    )


def _wait(futures: Mapping[Any, Any], what: str) -> list[Any]:
    results = []
    for key, future in futures.items():
        try:
            results.append(future.result())
        except Exception as exc:
            raise ServiceError("kafka", f"{what} {key}: {exc}") from exc
    return results


SCRAM_ITERATIONS = 8192


def set_passwords(admin_config: Mapping[str, Any], passwords: Mapping[str, str]) -> None:
    """SCRAM-SHA-512 credentials for each principal (made, or replaced)."""
    from confluent_kafka.admin import (
        AdminClient,
        ScramCredentialInfo,
        ScramMechanism,
        UserScramCredentialAlteration,
        UserScramCredentialUpsertion,
    )

    if not passwords:
        return
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(name, info, password.encode()) for name, password in passwords.items()
    ]
    admin = AdminClient(dict(admin_config))  # kept while its futures wait: freed, it cancels them
    _wait(admin.alter_user_scram_credentials(upserts), "could not set the credentials of")


def with_credentials(admin_config: Mapping[str, Any], principals: Iterable[str]) -> set[str]:
    """Which of `principals` have SCRAM credentials on the cluster."""
    from confluent_kafka.admin import AdminClient

    names = list(principals)
    if not names:
        return set()
    admin = AdminClient(dict(admin_config))
    described = cast(dict[str, Any], admin.describe_user_scram_credentials(names))
    found = set()
    for name, future in described.items():
        try:
            future.result()
            found.add(name)
        except Exception:  # noqa: BLE001,S112 - RESOURCE_NOT_FOUND: this one has none
            continue
    return found


def apply_grants(admin_config: Mapping[str, Any], grants: Iterable[Grant]) -> int:
    """Create every ACL of `grants`; returns how many were asked for."""
    from confluent_kafka.admin import AdminClient

    bindings = list(dict.fromkeys(_binding(grant) for grant in grants))
    if not bindings:
        return 0
    admin = AdminClient(dict(admin_config))  # kept while its futures wait
    _wait(admin.create_acls(bindings), "could not create the ACL")
    _until_in_force(admin, bindings)
    return len(bindings)


def _until_in_force(admin: Any, bindings: list[Any], timeout: float = 30.0) -> None:
    """Return once the broker's authorizer holds every binding: the controller has committed them when
    create_acls answers, but the broker applies its metadata a moment later, and a client that starts
    at once would be refused."""
    principals = sorted({binding.principal for binding in bindings})
    wanted = set(bindings)
    deadline = time.monotonic() + timeout
    while True:
        held: set[Any] = set()
        for principal in principals:
            held.update(admin.describe_acls(_principal_filter(principal)).result())
        if wanted <= held:
            return
        if time.monotonic() > deadline:
            raise ServiceError("kafka", f"{len(wanted - held)} ACL(s) not in force after {timeout:.0f}s")
        time.sleep(0.1)


def _principal_filter(principal: str) -> Any:
    from confluent_kafka.admin import (
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    anything = cast(Any, None)  # a filter's None matches every name and host (the stubs say str)
    return AclBindingFilter(
        ResourceType.ANY,
        anything,
        ResourcePatternType.ANY,
        principal,
        anything,
        AclOperation.ANY,
        AclPermissionType.ANY,
    )


def remove_acls(admin_config: Mapping[str, Any], principal: str) -> int:
    """Delete every ACL of `principal` (refused at once, even on its open connections); returns how many
    went. Its credentials stay: it still connects, and may do nothing."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(dict(admin_config))  # kept while its futures wait
    every = _principal_filter(f"User:{principal}")
    return sum(len(found) for found in _wait(admin.delete_acls([every]), "could not delete the ACLs of"))


def revoke_principal(admin_config: Mapping[str, Any], principal: str) -> int:
    """Delete every ACL of `principal`, then its SCRAM credentials; returns how many ACLs went."""
    from confluent_kafka.admin import (
        AdminClient,
        ScramMechanism,
        UserScramCredentialDeletion,
    )

    deleted = remove_acls(admin_config, principal)
    admin = AdminClient(dict(admin_config))
    described = cast(dict[str, Any], admin.describe_user_scram_credentials([principal]))
    try:
        described[principal].result()
    except Exception:  # noqa: BLE001 - no credentials (never made, or revoked before): nothing to delete
        return deleted
    deletion = UserScramCredentialDeletion(principal, ScramMechanism.SCRAM_SHA_512)
    _wait(admin.alter_user_scram_credentials([deletion]), "could not delete the credentials of")
    return deleted
