"""Option haggling, the NBD handshake, as a state machine without I/O.

The server feeds it the client's flags and each option request; it answers with a step: bytes
to send and what comes next. Where the answer depends on the repository (which exports
exist), the step asks for that (`NeedExport`, `NeedList`) and the server calls back with what
it found. TLS modes follow the protocol's NOTLS / SELECTIVETLS (here "allow": every export is
available either way) / FORCEDTLS ("require").

With an authorization (`authz.Authz`, FORCEDTLS only), a client reaches only the volumes its
certificate is granted: `LIST` shows only those, and every option naming another export is
answered exactly as for an export that does not exist (`ERR_UNKNOWN`; `EXPORT_NAME` closes),
decided on the name as sent before any lookup (so the repository is not even asked) and again
on the export it resolved to (the empty name). A client learns nothing of exports it may not
use, not even whether they exist.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from snapship.nbd import authz as az
from snapship.nbd import protocol as p


class TlsMode(enum.Enum):
    OFF = "off"
    ALLOW = "allow"
    REQUIRE = "require"


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake needs to know about an export; `name` is the canonical one."""

    name: str
    size: int
    read_only: bool
    description: str


@dataclass(frozen=True)
class Reply:
    """Send `data`, then read the next option."""

    data: bytes


@dataclass(frozen=True)
class NeedExport:
    """Look up export `name` and call `Handshake.resolved` with it (None if there is none)."""

    name: str


@dataclass(frozen=True)
class NeedList:
    """List the exports and call `Handshake.listed` with (name, description) pairs."""


@dataclass(frozen=True)
class StartTls:
    """Send `data` (the ACK), upgrade the connection to TLS, call `tls_started`, go on."""

    data: bytes


@dataclass(frozen=True)
class Close:
    """Send `data` (possibly nothing) and close the connection."""

    data: bytes
    reason: str


@dataclass(frozen=True)
class Transmit:
    """Send `data` and enter the transmission phase on `export`."""

    data: bytes
    export: ExportInfo
    requested_name: str
    tx_flags: int
    structured: bool
    context_id: int | None
    """The id `base:allocation` was given, or None: block status is then refused."""


Step = Reply | NeedExport | NeedList | StartTls | Close | Transmit

BASE_ALLOCATION_ID = 1
_NEED_EXPORT_OPTIONS = (
    p.OPT_EXPORT_NAME, p.OPT_INFO, p.OPT_GO, p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT,
)  # fmt: skip


def transmission_flags(export: ExportInfo, structured: bool, multi_conn: bool) -> int:
    flags = p.TX_HAS_FLAGS | p.TX_SEND_FLUSH | p.TX_SEND_FUA | p.TX_SEND_CACHE
    if export.read_only:
        flags |= p.TX_READ_ONLY
    else:
        flags |= p.TX_SEND_TRIM | p.TX_SEND_WRITE_ZEROES | p.TX_SEND_FAST_ZERO
    if structured:
        flags |= p.TX_SEND_DF
    if multi_conn:
        flags |= p.TX_CAN_MULTI_CONN
    return flags


def _matches_base_allocation(query: str, listing: bool) -> bool:
    # "base:" is a wildcard when listing and selects nothing when setting (proto.md).
    return query == p.META_BASE_ALLOCATION or (listing and query == "base:")


class Handshake:
    def __init__(self, tls: TlsMode, *, multi_conn: bool = True,
                 authz: az.Authz | None = None) -> None:  # fmt: skip
        if authz is not None and tls is not TlsMode.REQUIRE:
            # Under "allow" a client that skips TLS has no certificate to be authorized by.
            raise ValueError("an authorization needs TLS required")
        self.tls_mode = tls
        self.authz = authz
        self._volumes: frozenset[str] = frozenset()
        self.denied: str | None = None
        """The last export name refused by the authorization (for the server's log only: the
        client's answer is that of an unknown export)."""
        self.multi_conn = multi_conn
        self.tls_active = False
        self.no_zeroes = False
        self.structured = False
        self._meta_name: str | None = None
        self._meta_id: int | None = None
        self._pending: tuple[int, object] | None = None

    @staticmethod
    def greeting() -> bytes:
        return p.greeting()

    def client_flags(self, data: bytes) -> None:
        flags = p.parse_client_flags(data)
        self.no_zeroes = bool(flags & p.CLIENT_NO_ZEROES)

    def tls_started(self, identities: frozenset[str] = frozenset()) -> None:
        """TLS is up; `identities` are the verified client certificate's (`authz.identities`)."""
        # Nothing negotiated in the clear survives the upgrade (proto.md, NBD_OPT_STARTTLS).
        self.tls_active = True
        if self.authz is not None:
            self._volumes = self.authz.volumes(identities)
        self.structured = False
        self._meta_name = self._meta_id = None

    def option_too_big(self, option: int, length: int) -> Step:
        """The option's data (already skipped by the caller) was over `MAX_OPTION_DATA`."""
        if option == p.OPT_EXPORT_NAME:
            return Close(b"", f"export name of {length} bytes")
        return Reply(p.option_error(option, p.REP_ERR_TOO_BIG,
                                    f"option data of {length} bytes is too large"))

    def option(self, option: int, data: bytes) -> Step:
        if self._pending is not None:
            raise RuntimeError("an option is still waiting for its export lookup")
        if self.tls_mode is TlsMode.REQUIRE and not self.tls_active:
            if option == p.OPT_EXPORT_NAME:
                return Close(b"", "NBD_OPT_EXPORT_NAME before TLS on a server that requires it")
            if option not in (p.OPT_STARTTLS, p.OPT_ABORT):
                return Reply(p.option_error(option, p.REP_ERR_TLS_REQD,
                                            "this server requires TLS: use NBD_OPT_STARTTLS"))
        if option == p.OPT_ABORT:
            return Close(p.option_reply(option, p.REP_ACK), "client aborted the handshake")
        if option == p.OPT_LIST:
            if data:
                return self._invalid(option, "NBD_OPT_LIST takes no data")
            self._pending = (option, None)
            return NeedList()
        if option == p.OPT_STARTTLS:
            return self._starttls(data)
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                return self._invalid(option, "NBD_OPT_STRUCTURED_REPLY takes no data")
            self.structured = True
            return Reply(p.option_reply(option, p.REP_ACK))
        if option in _NEED_EXPORT_OPTIONS:
            return self._need_export(option, data)
        return Reply(p.option_error(option, p.REP_ERR_UNSUP, f"option {option} is not supported"))

    def _starttls(self, data: bytes) -> Step:
        option = p.OPT_STARTTLS
        if data:
            return self._invalid(option, "NBD_OPT_STARTTLS takes no data")
        if self.tls_mode is TlsMode.OFF:
            return Reply(p.option_error(option, p.REP_ERR_POLICY,
                                        "TLS is not enabled on this server"))
        if self.tls_active:
            return self._invalid(option, "TLS is already active")
        return StartTls(p.option_reply(option, p.REP_ACK))

    def _need_export(self, option: int, data: bytes) -> Step:
        request: object
        try:
            if option == p.OPT_EXPORT_NAME:
                request = p.parse_export_name(data)
                name = request
            elif option in (p.OPT_INFO, p.OPT_GO):
                request = p.parse_info_request(data)
                name = request.name
            else:
                if option == p.OPT_SET_META_CONTEXT:
                    # A failed SET still replaces what an earlier one selected.
                    self._meta_name = self._meta_id = None
                if not self.structured:
                    return self._invalid(option, "negotiate structured replies first")
                request = p.parse_meta_context_request(data)
                name = request.name
        except p.OptionInvalid as e:
            if option == p.OPT_EXPORT_NAME:
                return Close(b"", f"bad export name: {e}")
            return self._invalid(option, str(e))
        if name and not self.may_use(name):
            self.denied = name
            return self._unknown(option, name)
        self._pending = (option, request)
        return NeedExport(name)

    def may_use(self, name: str) -> bool:
        """Whether this client may use export `name` (always, without an authorization)."""
        if self.authz is None:
            return True
        return self.tls_active and az.may_use(self._volumes, name)

    def listed(self, exports: Sequence[tuple[str, str]]) -> Step:
        option, _ = self._take_pending()
        out = [p.option_reply(option, p.REP_SERVER, p.server_entry(n, d))
               for n, d in exports if self.may_use(n)]
        out.append(p.option_reply(option, p.REP_ACK))
        return Reply(b"".join(out))

    def resolved(self, export: ExportInfo | None) -> Step:
        option, request = self._take_pending()
        if export is None or not self.may_use(export.name):
            name = request if isinstance(request, str) else getattr(request, "name", "")
            if export is not None:
                self.denied = name or export.name
            return self._unknown(option, name)
        if option == p.OPT_EXPORT_NAME:
            assert isinstance(request, str)
            flags = self._flags(export)
            reply = p.export_name_reply(export.size, flags, self.no_zeroes)
            return self._transmit(reply, export, request, flags)
        if option in (p.OPT_INFO, p.OPT_GO):
            assert isinstance(request, p.InfoRequest)
            return self._info(option, request, export)
        assert isinstance(request, p.MetaContextRequest)
        return self._meta_context(option, request)

    def _info(self, option: int, request: p.InfoRequest, export: ExportInfo) -> Step:
        flags = self._flags(export)
        infos = [p.info_export(export.size, flags),
                 p.info_block_size(p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_PAYLOAD)]
        if p.INFO_NAME in request.info_types:
            infos.append(p.info_string(p.INFO_NAME, export.name))
        if p.INFO_DESCRIPTION in request.info_types:
            infos.append(p.info_string(p.INFO_DESCRIPTION, export.description))
        out = b"".join(p.option_reply(option, p.REP_INFO, info) for info in infos)
        out += p.option_reply(option, p.REP_ACK)
        if option == p.OPT_INFO:
            return Reply(out)
        return self._transmit(out, export, request.name, flags)

    def _meta_context(self, option: int, request: p.MetaContextRequest) -> Step:
        listing = option == p.OPT_LIST_META_CONTEXT
        if listing:
            wanted = not request.queries or any(
                _matches_base_allocation(q, True) for q in request.queries
            )
            context_id = 0  # reserved in LIST answers
        else:
            wanted = any(_matches_base_allocation(q, False) for q in request.queries)
            context_id = BASE_ALLOCATION_ID
            if wanted:
                self._meta_name, self._meta_id = request.name, context_id
        out = b""
        if wanted:
            entry = p.meta_context_entry(context_id, p.META_BASE_ALLOCATION)
            out = p.option_reply(option, p.REP_META_CONTEXT, entry)
        return Reply(out + p.option_reply(option, p.REP_ACK))

    def _transmit(self, data: bytes, export: ExportInfo, name: str, flags: int) -> Transmit:
        # Contexts apply only to the export they were selected for (proto.md, BLOCK_STATUS).
        context = self._meta_id if self._meta_name == name else None
        return Transmit(data, export, name, flags, self.structured, context)

    def _flags(self, export: ExportInfo) -> int:
        return transmission_flags(export, self.structured, self.multi_conn)

    def _take_pending(self) -> tuple[int, object]:
        if self._pending is None:
            raise RuntimeError("no option is waiting for a lookup")
        pending, self._pending = self._pending, None
        return pending

    @staticmethod
    def _unknown(option: int, name: str) -> Step:
        if option == p.OPT_EXPORT_NAME:
            return Close(b"", f"unknown export {name!r} in NBD_OPT_EXPORT_NAME")
        return Reply(p.option_error(option, p.REP_ERR_UNKNOWN, f"no export named {name!r}"))

    @staticmethod
    def _invalid(option: int, message: str) -> Reply:
        return Reply(p.option_error(option, p.REP_ERR_INVALID, message))
