"""The identity of a TLS peer, as both the authority and enforcers read it.

Both sides must derive the same principal from a client certificate, or an
enforcer would reject the rightful holder of a lease. So the rule lives here,
beside the wire contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

SPIFFE_SCHEME = "spiffe://"
"""URI prefix of a SPIFFE ID in a certificate's subject alternative names."""


def peer_identity(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """Return the identity in a TLS peer's client certificate, or None without one.

    The identity is the certificate's SPIFFE ID (a ``spiffe://`` URI subject
    alternative name) when it has one, else its subject common name. gRPC
    (checked with grpcio 1.85) puts these in ``context.auth_context()`` under
    ``peer_spiffe_id``, ``peer_uri`` and ``x509_common_name``. Its own peer
    identity list is not used, because it puts DNS names before URIs.

    Args:
        auth_context: ``context.auth_context()`` of a ``grpc`` or ``grpc.aio``
            servicer context, or any mapping of the same shape.

    Raises:
        ValueError: The certificate has more than one SPIFFE ID, which an
            X.509 SVID must not have, so no single identity can be chosen.
    """
    spiffe_ids = [
        value.decode("utf-8", "replace")
        for value in auth_context.get("peer_uri", ())
        if value.startswith(SPIFFE_SCHEME.encode("ascii"))
    ]
    if not spiffe_ids:
        spiffe_ids = [value.decode("utf-8", "replace") for value in auth_context.get("peer_spiffe_id", ())]
    if len(spiffe_ids) > 1:
        raise ValueError(
            f"the client certificate has {len(spiffe_ids)} SPIFFE IDs ({', '.join(spiffe_ids)});"
            " issue it with exactly one spiffe:// URI subject alternative name"
        )
    if spiffe_ids:
        return spiffe_ids[0]
    common_names = auth_context.get("x509_common_name", ())
    if common_names:
        return common_names[0].decode("utf-8", "replace")
    return None
