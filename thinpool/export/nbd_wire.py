"""The NBD wire format: every constant and struct layout of the protocol, declared once.

Numbers follow the protocol document of the NetworkBlockDevice project's master branch (and
libnbd's ``nbd-protocol.h``, qemu's ``nbd.h``): LIST_META_CONTEXT is 9, SET_META_CONTEXT 10,
EXTENDED_HEADERS 11 (older revisions of the document number them differently). All integers on
the wire are big-endian. Only layouts live here; :mod:`thinpool.export.nbd` does the talking.

Handshake (fixed newstyle)::

    S: GREETING      u64 NBDMAGIC, u64 IHAVEOPT, u16 handshake flags          18 bytes
    C:               u32 client flags                                          4 bytes
    C: OPTION        u64 IHAVEOPT, u32 option, u32 length, data               16 + n
    S: OPTION_REPLY  u64 REPLY_MAGIC, u32 option, u32 reply type, u32 length  20 + n
    S: EXPORT_NAME_REPLY (answer to OPT_EXPORT_NAME) u64 size, u16 flags [+ 124 zeros]

Transmission::

    C: REQUEST       u32 REQUEST_MAGIC, u16 flags, u16 type, u64 cookie, u64 offset, u32 length
    S: SIMPLE_REPLY  u32 SIMPLE_REPLY_MAGIC, u32 error, u64 cookie            16 bytes
    S: CHUNK         u32 STRUCTURED_REPLY_MAGIC, u16 flags, u16 type, u64 cookie, u32 length
"""

from __future__ import annotations

import struct

# -- magics --------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943            # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054            # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server) and client flags ---------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
CLIENT_FIXED_NEWSTYLE = 1 << 0
CLIENT_NO_ZEROES = 1 << 1
CLIENT_KNOWN = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES

# -- options ---------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# -- option reply types ----------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9

# -- information types (NBD_REP_INFO payloads, NBD_OPT_INFO/GO requests) --------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- transmission flags ----------------------------------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# -- commands and command flags --------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
COMMAND_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
                 CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
                 CMD_BLOCK_STATUS: "BLOCK_STATUS"}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# -- structured reply chunks -----------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# -- errors (the protocol's own numbers, equal to Linux errno) -------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# -- metadata contexts -------------------------------------------------------------------------
BASE_ALLOCATION = b"base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- struct layouts ----------------------------------------------------------------------------
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PAD = 124                    # zero bytes after it unless both sides set NO_ZEROES
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")        # info type, size, transmission flags
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")   # info type, minimum, preferred, maximum
META_CONTEXT_ID = U32                               # REP_META_CONTEXT: u32 id, then the name
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
CHUNK_OFFSET = struct.Struct(">IHHQIQ")             # a chunk header followed by its u64 offset
ERROR_PAYLOAD = struct.Struct(">IH")                # error, message length, then the message
BLOCK_DESCRIPTOR = struct.Struct(">II")             # extent length, state flags

assert GREETING.size == 18 and OPTION.size == 16 and OPTION_REPLY.size == 20
assert EXPORT_NAME_REPLY.size == 10 and INFO_EXPORT_PAYLOAD.size == 12
assert INFO_BLOCK_SIZE_PAYLOAD.size == 14
assert REQUEST.size == 28 and SIMPLE_REPLY.size == 16 and CHUNK.size == 20
assert CHUNK_OFFSET.size == 28 and ERROR_PAYLOAD.size == 6 and BLOCK_DESCRIPTOR.size == 8
