"""torch.distributed gloo all-reduce bus bandwidth on loopback, the reference for our CPU ring.
usage: python bench/gloo_allreduce.py --ranks 2 --mib 64 --iters 5  (prints one JSON line)"""
import argparse, json, os, socket, statistics, time
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, args, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks)
    t = torch.ones(args.mib * (1 << 20) // 4)
    dist.all_reduce(t)  # warm-up
    times = []
    for _ in range(args.iters):
        dist.barrier()
        s = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - s)
    slowest = torch.tensor(times)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.put(slowest.tolist())
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args, port, out)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    times = out.get()
    for p in procs:
        p.join()
    median = statistics.median(times)
    nbytes = args.mib * (1 << 20)
    algbw = nbytes / median / 1e9
    print(json.dumps({"system": "gloo", "ranks": args.ranks, "bytes": nbytes, "seconds_median": median,
                      "algbw_gb_s": algbw, "busbw_gb_s": algbw * 2 * (args.ranks - 1) / args.ranks}))


if __name__ == "__main__":
    main()
