"""A fork server for the tests' `vaepipe` commands (tests/conftest.py `vaepipe`).

Every `python -m pipeline ...` spends ~5 s importing torch and Lightning before it does anything,
and the suite runs a few hundred of them. This server imports them once, then runs each command in
a child forked from it: the real entry point (`runpy` of `pipeline.__main__`, as `python -m
pipeline` does), in its own process and session, with the command's environment, working folder,
stdin from /dev/null and stdout/stderr into files; the child exits through the interpreter's exit
path (threads joined, atexit handlers run). What is not the same as a fresh interpreter: modules
are imported before the command's environment is set (nothing in vaepipe reads its environment at
import time). Lightning's multi-process launcher re-runs `python -m pipeline.__main__ ...` as
real subprocesses, as it would from the console; the reply comes when every process of the
command's session has exited, as a caller reading their pipes would see it.

Protocol: one JSON request per line on stdin ({"args", "env", "cwd", "stdout", "stderr",
"timeout"}), one JSON reply per line ({"rc": int} or {"rc": null, "timeout": true}).
"""

import json
import os
import signal
import sys
import time


def _child(req: dict) -> None:
    os.setsid()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, flags, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout.reconfigure(line_buffering=True)  # PYTHONUNBUFFERED, as the tests' subprocesses had
    sys.stderr.reconfigure(line_buffering=True)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = ["pipeline", *req["args"]]
    code = 0
    try:
        import runpy

        runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:  # the interpreter's own exit path: join non-daemon threads, run atexit handlers
            import atexit
            import threading

            threading._shutdown()
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _session_alive(sid: int) -> bool:
    """Whether a live (not zombie) process of session `sid` remains: e.g. a DDP rank started by
    Lightning's launcher, which may outlive rank 0 by a moment."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, session
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                return True
    return False


def _wait_session(sid: int, deadline: float) -> bool:
    """What a caller reading pipes would wait for: every process of the command's session gone (a
    test that starts the next command at once must not find the previous one's ranks running).
    False if some were still there at the deadline (killed): the command timed out."""
    while os.path.isdir("/proc") and _session_alive(sid):
        if time.monotonic() > deadline:
            try:
                os.killpg(sid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return False
        time.sleep(0.02)
    return True


def _wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if not _wait_session(pid, deadline):
                return {"rc": None, "timeout": True}
            return {"rc": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return {"rc": None, "timeout": True}
        time.sleep(0.02)


def main() -> None:
    import pytorch_lightning  # noqa: F401  the imports every command pays, paid once here
    import torch  # noqa: F401

    import pipeline.cli  # noqa: F401
    import pipeline.train  # noqa: F401

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 1)  # a stray print must not corrupt the replies
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            replies.close()
            _child(req)
        replies.write(json.dumps(_wait(pid, req["timeout"])) + "\n")


if __name__ == "__main__":
    main()
