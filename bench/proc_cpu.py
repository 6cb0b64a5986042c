"""CPU time of every live process, from /proc: how the benchmarks split CPU between our
processes (workers, Ray's daemons, the driver) and everything else on the machine."""

from __future__ import annotations

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every live process."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:  # the process exited meanwhile
            continue
        fields = data[data.rfind(")") + 2:].split()  # after the command name, which may hold spaces
        table[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table
