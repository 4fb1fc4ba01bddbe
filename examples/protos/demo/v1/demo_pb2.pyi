from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Reading(_message.Message):
    __slots__ = ("source", "sequence", "value")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    source: str
    sequence: int
    value: float
    def __init__(self, source: _Optional[str] = ..., sequence: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("from_account", "to_account", "amount_cents")
    FROM_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    TO_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_CENTS_FIELD_NUMBER: _ClassVar[int]
    from_account: str
    to_account: str
    amount_cents: int
    def __init__(self, from_account: _Optional[str] = ..., to_account: _Optional[str] = ..., amount_cents: _Optional[int] = ...) -> None: ...

class TransferResponse(_message.Message):
    __slots__ = ("transfer_id", "from_balance_cents")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_BALANCE_CENTS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    from_balance_cents: int
    def __init__(self, transfer_id: _Optional[str] = ..., from_balance_cents: _Optional[int] = ...) -> None: ...

class BalanceRequest(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    def __init__(self, account: _Optional[str] = ...) -> None: ...

class BalanceResponse(_message.Message):
    __slots__ = ("account", "balance_cents")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    BALANCE_CENTS_FIELD_NUMBER: _ClassVar[int]
    account: str
    balance_cents: int
    def __init__(self, account: _Optional[str] = ..., balance_cents: _Optional[int] = ...) -> None: ...
