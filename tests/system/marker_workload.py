"""An application for the marker test, run by the system python3 with libnbd (not ours).

It writes data on volume A (one NBD server), then a commit record naming that data on
volume B (another NBD server), each after the previous reply. It honours a freeze: when
``<ctl>/freeze`` holds a token, it finishes the pair it is in, writes the token to
``<ctl>/frozen`` and waits until ``freeze`` is gone or holds another token, as an
application under ``fsfreeze`` would. It stops at ``<ctl>/stop`` and prints its count.

    python3 marker_workload.py URI_A URI_B CTL_DIR
"""

import os
import struct
import sys
import time
import zlib

import nbd

SLOT, SLOTS, COMMIT, COMMITS = 4096, 64, 512, 256


def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def main():
    uri_a, uri_b, ctl = sys.argv[1:4]
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_uri(uri_a)
    b.connect_uri(uri_b)
    seq, freezes = 0, 0
    while not os.path.exists(os.path.join(ctl, "stop")):
        token = read(os.path.join(ctl, "freeze"))
        if token:
            tmp = os.path.join(ctl, "frozen.tmp")
            with open(tmp, "w") as f:
                f.write(token)
            os.replace(tmp, os.path.join(ctl, "frozen"))
            freezes += 1
            while read(os.path.join(ctl, "freeze")) == token:
                time.sleep(0.0002)
            continue
        seq += 1
        slot = seq % SLOTS
        data = struct.pack(">Q", seq) + seq.to_bytes(8, "big") * ((SLOT - 8) // 8)
        a.pwrite(data, slot * SLOT)
        rec = struct.pack(">QQI", seq, slot, zlib.crc32(data)).ljust(COMMIT, b"c")
        b.pwrite(rec, (seq % COMMITS) * COMMIT)
    print(seq, freezes, flush=True)


if __name__ == "__main__":
    main()
