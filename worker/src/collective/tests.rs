//! Ring collectives against naive references, odd sizes, both dtypes, and dead peers.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use super::ring::TcpRing;
use super::{even_ranges, Collective, CollectiveError, ReduceOp};

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
    let handles: Vec<_> = ls
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let (addrs, f) = (addrs.clone(), f.clone());
            std::thread::spawn(move || {
                f(rank, TcpRing::connect_with(rank, &addrs, &l, 1, timeout, shared_memory).unwrap())
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
    // largest size spans several 1 MiB pieces, so the two-slot outbox wraps around.
    for (shared_memory, world, len) in [true, false].into_iter().flat_map(|shm| {
        [1usize, 2, 3, 4]
            .into_iter()
            .flat_map(move |w| [0usize, 1, 2, 3, 5, 7, 1000, 100_003, 700_001].map(move |n| (shm, w, n)))
    }) {
        {
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(r, len)).collect();
            let sum: Vec<f32> = (0..len).map(|i| inputs.iter().map(|v| v[i]).sum()).collect();
            let ranges = even_ranges(len, world);
            let results = with_ring_via(world, Duration::from_secs(10), shared_memory, move |rank, mut ring| {
                let mut rs = data(rank, len);
                ring.reduce_scatter_f32(&mut rs, &even_ranges(len, world), ReduceOp::Sum).unwrap();
                let mut ar = data(rank, len);
                ring.all_reduce_f32(&mut ar, ReduceOp::Avg).unwrap();
                // all-gather: each rank contributes its own part of a known vector
                let mut ag = vec![-1.0f32; len];
                let mine = even_ranges(len, world)[rank].clone();
                for i in mine {
                    ag[i] = i as f32;
                }
                ring.all_gather_f32(&mut ag, &even_ranges(len, world)).unwrap();
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
        ring.all_gather_f32(&mut g, &ranges).unwrap();
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
        ring.all_reduce_f32(&mut buf, ReduceOp::Sum)
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
        ring.all_reduce_f32(&mut buf, ReduceOp::Sum)
    });
    match &results[0] {
        Err(CollectiveError::Timeout { peer: 2, .. }) => {}
        other => panic!("rank 0 should time out waiting for rank 2, got {other:?}"),
    }
    assert!(results[1].is_err(), "rank 1 must fail too");
}
