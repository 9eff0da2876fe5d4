"""``python -m pipe_rpc``: the demonstration (see ``_demo``)."""

from ._demo import main

main()
