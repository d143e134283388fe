"""2 ranks: rank 1's heartbeat stops (its process lives on); rank 0's watch, started by init_distributed, logs it
before any collective times out.

Usage (under torchrun; see tests/workers/__init__.py):
    watch_silent_rank.py --out JSON

Each rank's result: the warnings the istack_ds logger got while both ranks waited WAIT_S seconds.
"""

import logging
import time

from istack_ds import dist
from tests.workers.protocol import worker_parser, write_all_ranks

TIMEOUT_S = 24  # the watch looks every 6 s (a quarter of it)
WAIT_S = 20


class Kept(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(out_json: str) -> None:
    kept = Kept()
    logging.getLogger("istack_ds").addHandler(kept)
    dist.init_distributed(TIMEOUT_S)
    dist.barrier()
    if dist.rank() == 1:
        dist._heartbeat.stop()  # silent, as a SIGSTOPped process or a frozen host is
    time.sleep(WAIT_S)
    write_all_ranks(out_json, {"warnings": list(kept.messages)})


if __name__ == "__main__":
    main(worker_parser(__doc__.split("\n")[0]).parse_args().out)
