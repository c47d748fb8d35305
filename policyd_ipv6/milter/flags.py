"""The milter protocol's bit vocabulary: SMFIF_* actions, SMFIP_* protocol flags and SMFIM_*
macro stages, as Postfix's ``src/milter/milter8.c`` defines them (L119-333) for version 6.

Contract: three enums, one member per bit or number, defined here once; ``codec`` re-exports
them with the command and response codes. No behaviour, no I/O, nothing from Twisted.
"""

import enum

__all__ = ["Action", "Protocol", "MacroStage"]


class Action(enum.IntFlag):
    """SMFIF_*: what the filter may do at end of message; Postfix offers all nine."""

    ADDHDRS = 1 << 0
    CHGBODY = 1 << 1
    ADDRCPT = 1 << 2
    DELRCPT = 1 << 3
    CHGHDRS = 1 << 4
    QUARANTINE = 1 << 5
    CHGFROM = 1 << 6
    ADDRCPT_PAR = 1 << 7
    SETSYMLIST = 1 << 8


class Protocol(enum.IntFlag):
    """SMFIP_*: events the filter does not want (NO*), will not answer (NR_*), extensions.
    Postfix offers all 21 bits with milter_protocol = 6."""

    NOCONNECT = 1 << 0
    NOHELO = 1 << 1
    NOMAIL = 1 << 2
    NORCPT = 1 << 3
    NOBODY = 1 << 4
    NOHDRS = 1 << 5
    NOEOH = 1 << 6
    NR_HDR = 1 << 7
    NOUNKNOWN = 1 << 8
    NODATA = 1 << 9
    SKIP = 1 << 10
    RCPT_REJ = 1 << 11
    NR_CONN = 1 << 12
    NR_HELO = 1 << 13
    NR_MAIL = 1 << 14
    NR_RCPT = 1 << 15
    NR_DATA = 1 << 16
    NR_UNKN = 1 << 17
    NR_EOH = 1 << 18
    NR_BODY = 1 << 19
    HDR_LEADSPC = 1 << 20


class MacroStage(enum.IntEnum):
    """SMFIM_*: macro list numbers for SETSYMLIST (note EOM = 5 < EOH = 6)."""

    CONNECT = 0
    HELO = 1
    ENVFROM = 2
    ENVRCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6
