"""The child side of tests/test_api_interrupt_random.py: the programs a child interpreter
runs, each a loop of shmchannel calls interrupted at random, reporting a JSON summary.

Nothing here is collected by pytest (no ``test_*`` module): the parent side (starting a
child, checking its summary) is tests/interrupted_harness.py, the tests themselves
tests/test_api_interrupt_random.py. A child runs
``python -c "from tests.interrupted.main import main; main()" <scenario> <json params>``.

- ``interrupts.py``: ``Interrupts``, the signals turned into KeyboardInterrupt only inside
  a shmchannel call; it counts every module of *this package* as the test's own code.
- ``common.py``: the sizes, how long a loop runs, and the helpers the loops share.
- ``streams.py``: send, recv and peek loops on one channel, and a signal handler sending on
  a busy sender.
- ``endpoints.py``: get_queue, the constructors, DataSystem.put/get and close().
- ``cancelled.py``: arecv and asend cancelled at random (asyncio).
- ``main.py``: the scenario table and the child's entry point.

Keep every module a child runs in this package: a frame of a module elsewhere would count
as the library's, and a signal landing there would raise in the loop's own bookkeeping.
"""
