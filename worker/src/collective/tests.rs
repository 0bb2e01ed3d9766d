//! Ring collectives against naive references, odd sizes, both dtypes, and dead peers.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use super::ring::TcpRing;
use super::{even_ranges, CollectiveError, GroupKey, ReduceOp};

fn listeners(world: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

/// Runs `f(rank, ring)` on `world` threads connected in a ring (same-host shared memory
/// allowed); returns their results.
fn with_ring<R: Send + 'static>(
    world: usize,
    timeout: Duration,
    f: impl Fn(usize, TcpRing) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    with_ring_via(world, timeout, true, f)
}

fn with_ring_via<R: Send + 'static>(
    world: usize,
    timeout: Duration,
    shared_memory: bool,
    f: impl Fn(usize, TcpRing) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let (ls, addrs) = listeners(world);
    let key = GroupKey::random(1).unwrap();
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, f, key) = (addrs.clone(), f.clone(), key.clone());
            std::thread::spawn(move || {
                f(rank, TcpRing::connect_with(rank, &addrs, &l, &key, timeout, shared_memory).unwrap())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn data(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 31 + rank * 7) % 97) as f32 * 0.25 - 3.0 + rank as f32).collect()
}

#[test]
fn reduce_scatter_all_gather_all_reduce_match_naive_for_odd_sizes() {
    // Both data paths: shared memory between same-host neighbours, and plain TCP; the
    // largest sizes span several 1 MiB pieces, so the two-slot outbox wraps around, and
    // several 4 MiB socket reads.
    for (shared_memory, world, len) in [true, false].into_iter().flat_map(|shm| {
        [1usize, 2, 3, 4]
            .into_iter()
            .flat_map(move |w| [0usize, 1, 2, 3, 5, 7, 1000, 100_003, 700_001, 2_500_003].map(move |n| (shm, w, n)))
    }) {
        {
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, len)).collect();
            let sum: Vec<f32> = (0..len).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
            let ranges = even_ranges(len, world);
            let results = with_ring_via(world, Duration::from_secs(10), shared_memory, move |rank, mut ring| {
                let mut rs = data(rank, len);
                ring.reduce_scatter(&mut rs, &even_ranges(len, world), ReduceOp::Sum).unwrap();
                let mut ar = data(rank, len);
                ring.all_reduce(&mut ar, ReduceOp::Avg).unwrap();
                // all-gather: each rank contributes its own part of a known vector
                let mut ag = vec![-1.0f32; len];
                let mine = even_ranges(len, world)[rank].clone();
                for i in mine {
                    ag[i] = i as f32;
                }
                ring.all_gather(&mut ag, &even_ranges(len, world)).unwrap();
                ring.barrier().unwrap();
                (rs, ar, ag)
            });
            for (rank, (rs, ar, ag)) in results.into_iter().enumerate() {
                for i in ranges[rank].clone() {
                    assert!((rs[i] - sum[i]).abs() <= 1e-4 * (1.0 + sum[i].abs()), "w{world} n{len} rs[{i}]");
                }
                for i in 0..len {
                    let mean = sum[i] / world as f32;
                    assert!((ar[i] - mean).abs() <= 1e-4 * (1.0 + mean.abs()), "w{world} n{len} ar[{i}]");
                    assert_eq!(ag[i], i as f32, "w{world} n{len} ag[{i}]");
                }
            }
        }
    }
}

#[test]
fn bf16_all_reduce_and_uneven_zero1_ranges() {
    let world = 3;
    let len = 11; // not divisible by 3; one range empty below
    let results = with_ring(world, Duration::from_secs(10), move |rank, mut ring| {
        let mut v: Vec<half::bf16> = (0..len).map(|i| half::bf16::from_f32((i + rank) as f32)).collect();
        ring.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        let ranges = vec![0..6, 6..6, 6..11];
        let mut g: Vec<f32> = (0..len).map(|i| if ranges[rank].contains(&i) { i as f32 * 2.0 } else { 0.0 }).collect();
        ring.all_gather(&mut g, &ranges).unwrap();
        (v, g)
    });
    for (v, g) in results {
        for i in 0..len {
            assert_eq!(v[i].to_f32(), (3 * i + 3) as f32);
            assert_eq!(g[i], i as f32 * 2.0);
        }
    }
}

#[test]
fn broadcast_from_every_root() {
    let world = 4;
    for root in 0..world {
        let results = with_ring(world, Duration::from_secs(10), move |rank, mut ring| {
            let mut buf = if rank == root { b"hello from the root".to_vec() } else { vec![0u8; 19] };
            ring.broadcast(&mut buf, root).unwrap();
            buf
        });
        assert!(results.iter().all(|b| b == b"hello from the root"));
    }
}

#[test]
fn a_peer_dying_mid_collective_is_an_error_within_the_timeout() {
    let timeout = Duration::from_millis(1500);
    // Rank 2 joins, then dies (its sockets close) before the collective: the others see a
    // closed connection. Rank 1 receives from 0 only, so it learns through its successor.
    let results = with_ring(3, timeout, move |rank, mut ring| {
        if rank == 2 {
            drop(ring);
            return Ok(());
        }
        let mut buf = vec![1.0f32; 1 << 20];
        ring.all_reduce(&mut buf, ReduceOp::Sum)
    });
    for r in &results[..2] {
        let e = r.as_ref().expect_err("survivors must fail");
        assert!(matches!(e, CollectiveError::Peer { .. } | CollectiveError::Timeout { .. }), "{e}");
    }

    // Rank 2 stays connected but never takes part (stuck) for longer than the timeout, then
    // leaves. Rank 0 waits on rank 2: it must fail with a timeout naming rank 2 (had the
    // timeout not fired, it would see rank 2's sockets close instead, a different error).
    let results = with_ring(3, timeout, move |rank, mut ring| {
        if rank == 2 {
            std::thread::sleep(timeout * 3);
            return Ok(());
        }
        let mut buf = vec![1.0f32; 1000];
        ring.all_reduce(&mut buf, ReduceOp::Sum)
    });
    match &results[0] {
        Err(CollectiveError::Timeout { peer: 2, .. }) => {}
        other => panic!("rank 0 should time out waiting for rank 2, got {other:?}"),
    }
    assert!(results[1].is_err(), "rank 1 must fail too");
}

/// Runs `f(rank, collective)` on `world` threads joined by `RingCollective`s.
fn with_ring_collective<R: Send + 'static>(
    world: usize,
    f: impl Fn(usize, &mut dyn super::Collective) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    with_ring(world, Duration::from_secs(10), move |rank, ring| {
        let mut c = super::RingCollective::new(ring);
        f(rank, &mut c)
    })
}

#[test]
fn ring_collective_on_tensors_with_operations_in_flight() {
    use tch::{Device, Kind, Tensor};
    for world in [1usize, 2, 3] {
        let len = 1000usize;
        let results = with_ring_collective(world, move |rank, c| {
            let base = Tensor::arange(len as i64, (Kind::Float, Device::Cpu)) * 0.5 + rank as f64;
            // Three reduce-scatters over buckets of one buffer, all in flight at once, with
            // the ZeRO partitions clipped to each bucket (some parts empty), then an
            // all-reduce in bf16 and an all-gather of parameters.
            let grads = base.copy();
            let partitions = super::even_ranges(len, world);
            let buckets = [0..137usize, 137..600, 600..1000];
            let works: Vec<_> = buckets
                .iter()
                .rev()
                .map(|b| {
                    let view = grads.narrow(0, b.start as i64, b.len() as i64);
                    c.reduce_scatter(&view, &super::clip_ranges(&partitions, b.clone()), ReduceOp::Sum).unwrap()
                })
                .collect();
            let exposed: f64 = works.into_iter().map(|w| w.wait().unwrap().exposed_s).sum();
            assert!(exposed >= 0.0);
            let mine = partitions[rank].clone();
            let own = grads.narrow(0, mine.start as i64, mine.len() as i64).copy();
            let half = (base.copy() * 2.0).to_kind(Kind::BFloat16);
            c.all_reduce(&half, ReduceOp::Avg).unwrap().wait().unwrap();
            let params = Tensor::full([len as i64], -1.0, (Kind::Float, Device::Cpu));
            let _ = params.narrow(0, mine.start as i64, mine.len() as i64).fill_(rank as f64);
            c.all_gather(&params, &partitions).unwrap().wait().unwrap();
            let root_bytes = Tensor::full([8], rank as f64 + 10.0, (Kind::Float, Device::Cpu));
            c.broadcast(&root_bytes, world - 1).unwrap().wait().unwrap();
            c.barrier().unwrap();
            (own, half, params, root_bytes)
        });
        let sum_of_ranks = (0..world).sum::<usize>() as f64;
        for (rank, (own, half, params, root)) in results.into_iter().enumerate() {
            let mine = super::even_ranges(len, world)[rank].clone();
            let want = Tensor::arange_start(mine.start as i64, mine.end as i64, (Kind::Float, Device::Cpu))
                * (0.5 * world as f64)
                + sum_of_ranks;
            assert_eq!((own - want).abs().max().double_value(&[]), 0.0, "world {world} rank {rank}");
            let mean =
                (Tensor::arange(len as i64, (Kind::Float, Device::Cpu)) * 0.5 + sum_of_ranks / world as f64) * 2.0;
            let err = (half.to_kind(Kind::Float) - &mean).abs().max().double_value(&[]);
            assert!(err <= 0.01 * mean.abs().max().double_value(&[]), "bf16 all-reduce off by {err}");
            for (r, part) in super::even_ranges(len, world).into_iter().enumerate() {
                let got = params.narrow(0, part.start as i64, part.len() as i64);
                assert!(got.numel() == 0 || got.eq(r as f64).all().int64_value(&[]) == 1, "all-gather part {r}");
            }
            assert_eq!(root.double_value(&[0]), world as f64 - 1.0 + 10.0);
        }
    }
}

#[test]
fn solo_is_a_group_of_one() {
    use super::{Collective, Solo};
    use tch::{Device, Kind, Tensor};
    let mut c = Solo;
    let t = Tensor::ones([5], (Kind::Float, Device::Cpu));
    c.all_reduce(&t, ReduceOp::Sum).unwrap().wait().unwrap();
    c.reduce_scatter(&t, &even_ranges(5, 1), ReduceOp::Sum).unwrap().wait().unwrap();
    assert_eq!(t.sum(Kind::Float).double_value(&[]), 5.0);
    assert!(c.reduce_scatter(&t, &even_ranges(4, 1), ReduceOp::Sum).is_err(), "ranges must tile the buffer");
    assert!(c.broadcast(&t, 1).is_err());
    let ints = Tensor::ones([5], (Kind::Int64, Device::Cpu));
    assert!(c.all_reduce(&ints, ReduceOp::Sum).unwrap_err().to_string().contains("not supported"));
    assert_eq!((c.rank(), c.world_size(), c.backend()), (0, 1, "solo"));
}

/// Strangers on a rank's collective port — silent, speaking garbage, claiming the right
/// rank without the key, or a member of another generation — are refused, and the real
/// ring still forms and computes.
#[test]
fn only_members_of_the_generation_join_the_ring() {
    use std::io::{Read, Write};
    let (ls, addrs) = listeners(2);
    let key = GroupKey::random(5).unwrap();
    let other_generation = GroupKey::random(4).unwrap();
    let target = addrs[0]; // rank 0 accepts rank 1
                           // All strangers connect before the ranks start, so rank 0 meets them first; they talk
                           // from their own thread, as rank 0 challenges them only once it runs.
    let connect = || std::net::TcpStream::connect(target).unwrap();
    let (silent, mut garbage, mut forged, mut stale) = (connect(), connect(), connect(), connect());
    let strangers = std::thread::spawn(move || -> Vec<std::net::TcpStream> {
        garbage.write_all(&[0xAB; 48]).unwrap();
        // The right rank and generation, a made-up MAC.
        let mut challenge = [0u8; 16];
        forged.read_exact(&mut challenge).unwrap();
        let mut hello = 0x4D58_5247u32.to_le_bytes().to_vec();
        hello.extend_from_slice(&1u32.to_le_bytes());
        hello.extend_from_slice(&5u64.to_le_bytes());
        hello.extend_from_slice(&[0; 32]);
        forged.write_all(&hello).unwrap();
        // A real peer of another generation (another key).
        other_generation.answer(&mut stale, 1).unwrap();
        vec![silent, garbage, forged, stale]
    });
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, key) = (addrs.clone(), key.clone());
            std::thread::spawn(move || {
                let mut ring = TcpRing::connect_with(rank, &addrs, &l, &key, Duration::from_secs(30), false).unwrap();
                let mut buf = vec![rank as f32 + 1.0; 1000];
                ring.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
                buf[0]
            })
        })
        .collect();
    let sums: Vec<f32> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(sums, vec![3.0, 3.0]);
    // Every stranger's connection was closed on it: reading ends (EOF or reset) without a
    // ring's data.
    for mut s in strangers.join().unwrap() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.len() <= 16, "a stranger received {} bytes beyond the challenge", rest.len());
    }
}
