"""Client and server interceptors that carry and enforce session leases, sync and aio."""

from ._aio_client import AioStreamStreamLeaseInterceptor
from ._aio_client import AioStreamUnaryLeaseInterceptor
from ._aio_client import AioUnaryStreamLeaseInterceptor
from ._aio_client import AioUnaryUnaryLeaseInterceptor
from ._aio_client import aio_lease_interceptors
from ._aio_lease_channel import AioLeaseChannel
from ._aio_server import AioLeaseServerInterceptor
from ._client import LeaseClientInterceptor
from ._enforcer import DEFAULT_EXEMPT_PATTERNS
from ._enforcer import Enforcer
from ._enforcer import EnforcerConfig
from ._enforcer import LeaseContext
from ._enforcer import SessionEndInfo
from ._enforcer import current_lease
from ._errors import AuthorityUnreachable
from ._errors import LeaseEnded
from ._errors import LeaseMalformed
from ._errors import LeaseMissing
from ._errors import LeaseNotFound
from ._errors import LeaseRefused
from ._errors import PolicyDenied
from ._errors import PrincipalMismatch
from ._lease_channel import LeaseChannel
from ._server import LeaseServerInterceptor

__all__ = [
    "AioLeaseChannel",
    "AioLeaseServerInterceptor",
    "AioStreamStreamLeaseInterceptor",
    "AioStreamUnaryLeaseInterceptor",
    "AioUnaryStreamLeaseInterceptor",
    "AioUnaryUnaryLeaseInterceptor",
    "AuthorityUnreachable",
    "DEFAULT_EXEMPT_PATTERNS",
    "Enforcer",
    "EnforcerConfig",
    "LeaseChannel",
    "LeaseClientInterceptor",
    "LeaseContext",
    "LeaseEnded",
    "LeaseMalformed",
    "LeaseMissing",
    "LeaseNotFound",
    "LeaseRefused",
    "LeaseServerInterceptor",
    "PolicyDenied",
    "PrincipalMismatch",
    "SessionEndInfo",
    "aio_lease_interceptors",
    "current_lease",
]
