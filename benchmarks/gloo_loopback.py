"""How fast ranks on one machine's CPUs exchange gradients: gloo's all-reduce over loopback, the link a CPU world
(``autofit train --gpus N`` without a GPU) plans its communication with (``distributed.LOOPBACK_BUS_GBS``).

Each size is all-reduced ``--repeats`` times after two warm-up calls; the bus bandwidth is what a ring all-reduce
moves per rank, ``2 (n - 1) / n x bytes``, over the median time.

    python benchmarks/gloo_loopback.py                # 2 ranks, 4 / 16 / 64 MiB of fp32
    python benchmarks/gloo_loopback.py --ranks 2 --mib 64 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from autofit import distributed  # noqa: E402


def _rank(rank: int, ranks: int, port: int, sizes: list[int], repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    try:
        for mib in sizes:
            x = torch.ones(mib * 2**20 // 4)
            for _ in range(2):
                dist.all_reduce(x)
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(x)
                times.append(time.perf_counter() - start)
            if rank == 0:
                queue.put((mib, statistics.median(times)))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mib", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 64],
                        help="sizes to all-reduce, MiB of fp32, comma-separated (default: 4,16,64)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(args.ranks, port, args.mib, args.repeats, queue), nprocs=args.ranks, join=True)
    print(f"gloo all-reduce over loopback, {args.ranks} ranks on {os.cpu_count()} cores, torch {torch.__version__}, "
          f"median of {args.repeats}")
    print(f"  {'size':>8} {'time':>10} {'bus GB/s':>9}")
    for _ in args.mib:
        mib, seconds = queue.get()
        moved = 2 * (args.ranks - 1) / args.ranks * mib * 2**20
        print(f"  {mib:>5} MiB {seconds * 1e3:>8.1f} ms {moved / seconds / 1e9:>9.2f}")
    print(f"autofit plans CPU ranks at {distributed.LOOPBACK_BUS_GBS:g} GB/s (distributed.LOOPBACK_BUS_GBS)")


if __name__ == "__main__":
    main()
