"""Asks a DNS server for a name's A record: exit 0 when it answers with at least one address.

    python3 e2e/lib/dns-query.py SERVER NAME     (e2e/lib/node.sh waits for CoreDNS with it)
"""
import random, socket, struct, sys

server, name = sys.argv[1], sys.argv[2]
query_id = random.randrange(1 << 16)
question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
packet = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.settimeout(1)
    s.sendto(packet, (server, 53))
    reply = s.recv(4096)
answer_id, flags, _, answers = struct.unpack(">HHHH", reply[:8])
sys.exit(0 if answer_id == query_id and flags & 0xF == 0 and answers > 0 else 1)
