"""One dataclass per atProtocol verb (spec atprotocol.md §3, §4) and the ``Command`` union: plain
data the client builds and encodes and the server receives parsed, kept apart from the grammar
so that neither side needs the parsers to name a verb.  Constructors normalise atSigns and
enumerated words, so built and parsed commands compare equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from noports.at.metadata import Metadata
from noports.at.names import AtKey
from noports.at.syntax import lower, norm_atsign

__all__ = [
    "Command", "Cram", "Delete", "Exit", "From", "Info", "LLookup", "Lookup", "Monitor", "Noop",
    "Notify", "NotifyFetch", "NotifyList", "NotifyRemove", "NotifyStatus", "PLookup", "Pkam",
    "Pol", "Scan", "Stats", "Update", "UpdateMeta",
]


@dataclass
class From:
    atsign: str
    client_config: dict | None = None

    def __post_init__(self) -> None:
        self.atsign = norm_atsign(self.atsign)


@dataclass
class Cram:
    digest: str


@dataclass
class Pol:
    pass


@dataclass
class Pkam:
    signature: str
    signing_algo: str | None = None     # "rsa2048" | "ecc_secp256r1"
    hashing_algo: str | None = None     # "sha256" | "sha512"
    enrollment_id: str | None = None

    def __post_init__(self) -> None:
        self.signing_algo = lower(self.signing_algo)
        self.hashing_algo = lower(self.hashing_algo)


@dataclass
class Update:
    key: AtKey
    value: str
    metadata: Metadata = field(default_factory=Metadata)


@dataclass
class UpdateMeta:
    key: AtKey
    metadata: Metadata = field(default_factory=Metadata)


@dataclass
class LLookup:
    key: AtKey
    mode: str | None = None             # None | "meta" | "all"

    def __post_init__(self) -> None:
        self.mode = lower(self.mode)


@dataclass
class Lookup:
    entity: str
    owner: str
    mode: str | None = None
    bypass_cache: bool | None = None

    def __post_init__(self) -> None:
        self.entity = lower(self.entity)
        self.owner = norm_atsign(self.owner)
        self.mode = lower(self.mode)


@dataclass
class PLookup:
    """``plookup``: same fields as Lookup, a distinct type so that handlers cannot mix them up."""

    entity: str
    owner: str
    mode: str | None = None
    bypass_cache: bool | None = None

    __post_init__ = Lookup.__post_init__


@dataclass
class Delete:
    key: AtKey
    priority: str | None = None

    def __post_init__(self) -> None:
        self.priority = lower(self.priority)


@dataclass
class Scan:
    regex: str | None = None
    show_hidden: bool = False
    for_atsign: str | None = None
    page: int | None = None

    def __post_init__(self) -> None:
        self.for_atsign = norm_atsign(self.for_atsign)


@dataclass
class Notify:
    """``notify:...`` (spec §4.8).

    ``to`` is the recipient (the ``@forAtSign`` before the key); it defaults to the key's
    sharedWith (or, for a self key, its owner: a self notification) and is None for the
    ``public:`` form.  ``@bob:public:x@alice`` is key ``public:x@alice`` with ``to="@bob"``.
    ``messageType:text`` notifications carry ``text`` and no key.
    """

    key: AtKey | None
    value: str | None = None
    id: str | None = None
    operation: str = "update"
    message_type: str | None = None
    priority: str | None = None
    strategy: str | None = None
    latest_n: int | None = None
    notifier: str | None = None
    ttln: int | None = None
    metadata: Metadata = field(default_factory=Metadata)
    to: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        self.operation = lower(self.operation)
        self.message_type = lower(self.message_type)
        self.priority = lower(self.priority)
        self.strategy = lower(self.strategy)
        self.to = norm_atsign(self.to)
        if self.to is None and isinstance(self.key, AtKey):
            if self.key.kind == "shared":
                self.to = self.key.shared_with
            elif self.key.kind == "self":
                self.to = self.key.owner

    @property
    def recipient(self) -> str | None:
        return self.to


@dataclass
class NotifyStatus:
    id: str


@dataclass
class NotifyList:
    since: str | None = None
    until: str | None = None
    regex: str | None = None


@dataclass
class NotifyRemove:
    id: str


@dataclass
class NotifyFetch:
    id: str


@dataclass
class Monitor:
    epoch: int | None = None
    regex: str | None = None
    strict: bool = False
    self_notifications: bool = False
    multiplexed: bool = False


@dataclass
class Noop:
    millis: int


@dataclass
class Info:
    brief: bool = False


@dataclass
class Stats:
    ids: str | None = None
    regex: str | None = None


@dataclass
class Exit:
    pass


Command = (From | Cram | Pol | Pkam | Update | UpdateMeta | LLookup | Lookup | PLookup | Delete
           | Scan | Notify | NotifyStatus | NotifyList | NotifyRemove | NotifyFetch | Monitor
           | Noop | Info | Stats | Exit)
