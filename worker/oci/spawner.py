#!/usr/bin/env python3
# Picocenter's spawner: starts the worker's detached helpers (`runc restore`, `criu lazy-pages`)
# in its stead. The worker is a large process: its own fork() copies its page tables and holds
# its event loop 5-15 ms per spawn on these hosts (and the child's copy-on-write faults before
# its exec take as long again on the other core), just when a wake's first answers from the
# store come in. posix_spawn here (glibc: clone with CLONE_VM|CLONE_VFORK, no copy) costs well
# under a millisecond. Started ahead of need, it waits on stdin.
#
# stdin, one JSON line per request:
#   {"id": N, "file": PATH, "args": [ARG, ...]}   start PATH with argv [PATH, ARG, ...] in a new
#                                                 session, stdio on /dev/null, with the
#                                                 spawner's environment and working directory
# stdout, one JSON line per event:
#   {"id": N, "pid": PID}                         started
#   {"id": N, "error": MESSAGE}                   could not be started
#   {"id": N, "code": C, "signal": S}             exited: C its exit code, else S the signal's
#                                                 number (the other one null)
# stdin closing (the worker is gone): exit at once. The children run on in their own sessions,
# as the worker's own detached children do when it dies.
import json
import os
import sys
import threading

lock = threading.Condition()
out_lock = threading.Lock()
# pid -> request id, for children not yet reaped; pid -> wait status, for children reaped before
# their request was registered (a child can exit before posix_spawn returns to us).
running: dict = {}
early: dict = {}


def emit(event: dict) -> None:
    line = json.dumps(event) + "\n"
    with out_lock:
        sys.stdout.write(line)
        sys.stdout.flush()


def exited(rid: int, status: int) -> None:
    if os.WIFSIGNALED(status):
        emit({"id": rid, "code": None, "signal": os.WTERMSIG(status)})
    else:
        emit({"id": rid, "code": os.WEXITSTATUS(status), "signal": None})


def reap() -> None:
    while True:
        with lock:
            while not running:
                lock.wait()
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            continue
        with lock:
            rid = running.pop(pid, None)
            if rid is None:
                early[pid] = status
                continue
        exited(rid, status)


def spawn(req: dict) -> None:
    rid = req["id"]
    devnull = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    with lock:
        try:
            pid = os.posix_spawnp(req["file"], [req["file"], *req["args"]], os.environ, file_actions=devnull, setsid=True)
        except OSError as err:
            emit({"id": rid, "error": f"{req['file']}: {err.strerror or err}"})
            return
        emit({"id": rid, "pid": pid})
        status = early.pop(pid, None)
        if status is None:
            running[pid] = rid
            lock.notify()
    if status is not None:
        exited(rid, status)


def main() -> int:
    threading.Thread(target=reap, daemon=True).start()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            spawn(req)
        except (ValueError, KeyError, TypeError) as err:
            print(f"spawner: bad request {line.strip()!r}: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
