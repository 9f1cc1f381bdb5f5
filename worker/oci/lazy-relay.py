#!/usr/bin/env python3
# Picocenter's lazy-pages relay: sits on the socket between `criu restore --lazy-pages` and
# `criu lazy-pages`, and holds back one message until told to let it through.
#
# CRIU's restore sends the daemon, over this socket, each restored task's pid and its
# userfaultfd (SCM_RIGHTS), then a 4-byte "restore finished" marker, and closes. The daemon
# serves page faults from the first fd on, but starts copying every remaining page in the
# background as soon as it reads that marker — one synchronous read at a time, so a fault that
# arrives meanwhile waits behind a read of pages nobody asked for, fetched from the page store.
# Holding the marker back until the app has answered its first traffic keeps the daemon serving
# faults only while that matters. The process runs all along: the restore does not wait for the
# daemon.
#
#   lazy-relay.py     started ahead of need (python takes a few hundred ms to start here), it
#                     waits for one line "DIR<TAB>LISTEN<TAB>DAEMON" on stdin: the working
#                     directory and the socket paths relative to it (sun_path is short, work
#                     directories may not be). stdin closing first (the worker is gone): exit 0.
# Prints "ready" once it listens. Connects to the daemon when the restore connects, waiting up to
# DAEMON_WAIT_S for it to listen (the worker starts the restore beside the daemon). Forwards everything, the fds too, except a trailing marker;
# when the restore closed the socket and a line arrives on stdin (or stdin closes), sends the
# marker and exits 0. Any error: exits 1 with the reason on stderr (the daemon then never
# starts its background copy; the worker kills the container and the daemon).
import os
import socket
import sys
import time

FIN = (0x52535446).to_bytes(4, "little")  # LAZY_PAGES_RESTORE_FINISHED ("FTSR"); no pid is this large
MAX_FDS = 64
DAEMON_WAIT_S = 10


def connect(path: str) -> socket.socket:
    # The daemon may still be starting (the worker starts the restore beside it): the restore
    # waits here meanwhile, its process not yet resumed.
    deadline = time.monotonic() + DAEMON_WAIT_S
    while True:
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            daemon.connect(path)
            return daemon
        except (FileNotFoundError, ConnectionRefusedError):
            daemon.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def main() -> int:
    line = sys.stdin.readline()
    if not line:
        return 0
    workdir, listen_path, daemon_path = line.rstrip("\n").split("\t")
    os.chdir(workdir)
    try:
        os.unlink(listen_path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(listen_path)
    srv.listen(1)
    print("ready", flush=True)
    restore, _ = srv.accept()
    srv.close()
    daemon = connect(daemon_path)
    held = b""
    while True:
        data, fds, _flags, _addr = socket.recv_fds(restore, 65536, MAX_FDS)
        if not data and not fds:
            break  # the restore is done with the socket
        if held:  # what looked like the marker was not the end: pass it on in order
            daemon.sendall(held)
            held = b""
        if data.endswith(FIN):
            data, held = data[:-4], FIN
        if fds:
            # CRIU's send_fd puts the fds on a 1-byte dummy after the pid; a read may have joined
            # the pid to it. The daemon reads the pid with a plain recv(), which would drop fds
            # riding on those bytes: send them apart, the fds on the last byte only, as CRIU did.
            if len(data) > 1:
                daemon.sendall(data[:-1])
            socket.send_fds(daemon, [data[-1:] or b"\0"], fds)
            for fd in fds:
                os.close(fd)
        elif data:
            daemon.sendall(data)
    restore.close()
    sys.stdin.readline()  # the worker's go-ahead (or its death: EOF)
    if held:
        daemon.sendall(held)
    daemon.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as err:  # noqa: BLE001 - one line for the worker's log
        print(f"lazy-relay: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
