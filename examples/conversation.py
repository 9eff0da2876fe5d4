"""The multiprocessing docs' Pipe conversation, rewritten as RPC.

The classic example from the ``multiprocessing`` documentation sends a message
down a duplex ``Pipe`` by hand::

    def f(conn):
        conn.send([42, None, 'hello'])
        conn.close()

    parent_conn, child_conn = Pipe()
    p = Process(target=f, args=(child_conn,))
    p.start()
    print(parent_conn.recv())   # prints "[42, None, 'hello']"
    p.join()

Here the child end is served by ``pipe_rpc.serve`` and the parent end is a
typed ``pipe_rpc.Client``: each ``send``/``recv`` pair becomes a method call
with its reply, and the child's death or an exception in it is reported to the
caller instead of leaving ``recv()`` blocked for ever.

Run it from the repository root::

    python examples/conversation.py
"""

from __future__ import annotations

import multiprocessing
import os

import pipe_rpc

Message = list[int | str | None]


class Service:
    """What the child does with the messages it gets."""

    def greeting(self) -> Message:
        # The docs' child sends this message on its own; here it is a reply.
        return [42, None, "hello"]

    def reply(self, message: Message) -> Message:
        # A two-way exchange: the parent sends a message, the child answers it.
        return [*reversed(message), f"from child {os.getpid()}"]


def main() -> None:
    # The hand-written setup: a duplex Pipe, a Process serving one end of it.
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=pipe_rpc.serve, args=(Service(), child))
    process.start()
    child.close()  # the child has its own copy; ours would hide its end of file

    # process= lets the client notice the child's death at once (WorkerDiedError).
    with pipe_rpc.Client[Service](parent, process=process) as client:
        conversation = client.proxy
        print(conversation.greeting())  # prints "[42, None, 'hello']", as in the docs
        answer = conversation.reply([1, "two", None])
        print(answer[:3])  # [None, 'two', 1]
        print(f"answered by another process: {answer[3] != f'from child {os.getpid()}'}")

    # Closing the client asked serve() to return, so the child ends on its own.
    process.join(timeout=10)
    print(f"child exit code: {process.exitcode}")


if __name__ == "__main__":
    main()
