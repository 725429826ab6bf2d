"""The ioreq ABI, host side (specs/ioreq.md; C side: src/ioreq.h)."""
import struct

STUB_RAM = 8 << 20
IOREQ_PAGE = 0x400000
IOREQ_DATA = 0x401000
IOREQ_DATA_SIZE = 4096
BLK_RING = 0x402000
STATE_BUF = 0x404000
STATE_SIZE = 0x8000
BOUNCE = 0x410000
BOUNCE_SIZE = 0x80000
NET_RING = 0x490000
NET_TX = 0x4A0000
NET_RX = 0x530000
WINDOW_BASE = 0x10000000

IOREQ_MAGIC = 0x51524F49
IOREQ_VERSION = 1

NONE, READY, INPROCESS, RESP_READY = 0, 1, 2, 3
TYPE_PIO, TYPE_MMIO, TYPE_SAVE, TYPE_LOAD, TYPE_INPUT, TYPE_NET_RX = 0, 1, 2, 3, 4, 5
DIR_WRITE, DIR_READ = 0, 1
RESULTS = {0: "ok", 1: "invalid request", 2: "address not claimed", 3: "device state refused"}

PORT_DOORBELL = 0xE0
PORT_IRQ = 0xE1
PORT_BLK = 0xE2
PORT_CONSOLE = 0xE3
PORT_NET_TX = 0xE4
PORT_NET_RXBUF = 0xE5

UART_BASE = 0x3F8
UART_PORTS = range(UART_BASE, UART_BASE + 8)
UART_IRQ = 4
VIRTIO_BASE = 0xD0000000
VIRTIO_SIZE = 0x200
VIRTIO_IRQ = 5
NET_BASE = 0xD0001000
NET_SIZE = 0x200
NET_IRQ = 6

# struct ioreq_page header, then struct ioreq (64 bytes) per vCPU
PAGE_HEADER = struct.Struct("<IIII56x")          # magic, version, nr_vcpus, ready
# addr, data, count, size, dir, type, data_is_ptr, state, result, pad0, seq, done_seq
IOREQ = struct.Struct("<QQIBBBBBBHII28x")         # 64 bytes
IOREQ_OFFSET = IOREQ_PAGE + PAGE_HEADER.size
STATE_OFFSET = IOREQ_OFFSET + 24                  # byte offset of ioreq.state
assert IOREQ.size == 64 and PAGE_HEADER.size == 72

# The block ring
BLK_OP_READ, BLK_OP_WRITE, BLK_OP_FLUSH = 0, 1, 2
BLK_OK, BLK_EIO, BLK_EINVAL = 0, 1, 2
BLK_RING_SIZE = 32
BLK_HEADER = struct.Struct("<IIQ48x")             # req_prod, rsp_prod, capacity
BLK_REQ = struct.Struct("<QQIIQ")                 # id, sector, op, len, buf (32 bytes)
BLK_RSP = struct.Struct("<QII")                   # id, status, pad (16 bytes)
BLK_REQS = BLK_RING + BLK_HEADER.size
BLK_RSPS = BLK_REQS + BLK_RING_SIZE * BLK_REQ.size

# The net ring (specs/ioreq.md, "Net ring")
NET_SLOTS = 64
NET_SLOT_SIZE = 0x2400
NET_HDR_SIZE = 12
NET_HEADER = struct.Struct("<II6sH48x")           # tx_count, guest_csum, mac, mtu (64 bytes)
NET_LENS = struct.Struct(f"<{NET_SLOTS}I")        # tx_len at NET_RING + 64, rx_len at + 320
NET_TX_LEN = NET_RING + NET_HEADER.size
NET_RX_LEN = NET_TX_LEN + NET_LENS.size
assert NET_HEADER.size == 64 and NET_RX_LEN + NET_LENS.size == NET_RING + 576
