"""The demo's services, written as ordinary gRPC servicers that know nothing of session leases."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import grpc

from session_authority.examples.protos.demo.v1 import demo_pb2, demo_pb2_grpc

logger = logging.getLogger(__name__)

OPENING_BALANCE_CENTS = 1_000_000
"""Balance of an account the payments service has not seen before."""


class TelemetryService(demo_pb2_grpc.TelemetryServicer):
    """Acknowledges each reading on the stream it arrived on.

    Threading: grpc.server runs each stream's handler on a worker thread;
    the handler keeps no shared state.
    """

    def Stream(self, request_iterator: Iterator[demo_pb2.Reading], context: grpc.ServicerContext) -> Iterator[demo_pb2.Ack]:
        for reading in request_iterator:
            logger.debug("reading %d from %s: %g", reading.sequence, reading.source, reading.value)
            yield demo_pb2.Ack(sequence=reading.sequence)


class PaymentsService(demo_pb2_grpc.PaymentsServicer):
    """Moves integer amounts between in-memory accounts.

    Threading: runs on the aio server's event loop. Handlers do not await
    between reading and writing balances, so no lock is needed.
    """

    def __init__(self) -> None:
        self._balances: dict[str, int] = {}
        self._transfer_ids = itertools.count(1)

    def _balance(self, account: str) -> int:
        return self._balances.setdefault(account, OPENING_BALANCE_CENTS)

    async def Transfer(self, request: demo_pb2.TransferRequest, context: grpc.aio.ServicerContext) -> demo_pb2.TransferResponse:
        if request.amount_cents <= 0:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"amount_cents must be positive, got {request.amount_cents}",
            )
        if not request.from_account or not request.to_account:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "from_account and to_account are required")
        available = self._balance(request.from_account)
        if available < request.amount_cents:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"account {request.from_account} has {available} cents, cannot send {request.amount_cents}",
            )

        self._balances[request.from_account] = available - request.amount_cents
        self._balances[request.to_account] = self._balance(request.to_account) + request.amount_cents
        return demo_pb2.TransferResponse(
            transfer_id=f"t{next(self._transfer_ids)}",
            from_balance_cents=self._balances[request.from_account],
        )

    async def Balance(self, request: demo_pb2.BalanceRequest, context: grpc.aio.ServicerContext) -> demo_pb2.BalanceResponse:
        return demo_pb2.BalanceResponse(account=request.account, balance_cents=self._balance(request.account))
