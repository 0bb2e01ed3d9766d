//! What a worker brings to a group and how it joins one: the GPU it reports at
//! registration, and the collective its assignment's backend calls for.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use moxin_proto::v1::{Assignment, CollectiveBackend, DeviceInfo};
use tokio::sync::mpsc;

use super::TrainMsg;
use crate::collective::nccl::{self, NcclCollective};
use crate::collective::ring::TcpRing;
use crate::collective::{Collective, GroupKey, RingCollective, Solo};
use crate::WorkerError;

/// The GPU this worker would train on and whether it can load NCCL, for registration.
pub(super) fn local_devices(explicit: Option<tch::Device>) -> (Vec<DeviceInfo>, String) {
    if explicit == Some(tch::Device::Cpu) || !tch::Cuda::is_available() {
        return (Vec::new(), String::new());
    }
    let explicit = match explicit {
        Some(tch::Device::Cuda(n)) => Some(n),
        _ => None,
    };
    let visible = tch::Cuda::device_count().max(0) as usize;
    let Ok(ordinal) = crate::device::gpu_ordinal(explicit, &|k| std::env::var(k).ok(), visible) else {
        return (Vec::new(), String::new());
    };
    let devices = match crate::cuda::gpu_info(ordinal) {
        Ok(g) => vec![DeviceInfo {
            kind: "cuda".into(),
            name: g.name,
            memory_bytes: g.memory_bytes,
            uuid: g.uuid,
            ordinal: ordinal as u32,
        }],
        Err(e) => {
            tracing::warn!("cannot describe CUDA device {ordinal}: {e}");
            Vec::new()
        }
    };
    (devices, nccl::version().unwrap_or_default())
}

/// Joins the group the assignment describes with its backend.
pub(super) fn connect_collective(
    a: &Assignment,
    peers: &[SocketAddr],
    listener: &TcpListener,
    placement: crate::device::Placement,
    ids: &std::sync::mpsc::Receiver<Vec<u8>>,
    tx: &mpsc::UnboundedSender<TrainMsg>,
) -> Result<Box<dyn Collective>, WorkerError> {
    let timeout = Duration::from_millis(a.collective_timeout_ms as u64);
    let (rank, world) = (a.rank as usize, a.world_size as usize);
    let comm = |e: crate::collective::CollectiveError| WorkerError::Collective(e.to_string());
    Ok(match a.backend() {
        CollectiveBackend::Solo => Box::new(Solo),
        CollectiveBackend::Ring => {
            let group = GroupKey::new(a.generation, &a.group_key).map_err(WorkerError::Collective)?;
            let ring = TcpRing::connect(rank, peers, listener, &group, timeout).map_err(comm)?;
            Box::new(RingCollective::new(ring))
        }
        CollectiveBackend::Nccl => {
            let ordinal = placement
                .cuda_ordinal()
                .ok_or_else(|| WorkerError::Device("the group uses NCCL but this worker trains on the CPU".into()))?;
            let id = if rank == 0 {
                let id = nccl::new_id().map_err(comm)?;
                tx.send(TrainMsg::CollectiveId(id.clone()))
                    .map_err(|_| WorkerError::Setup("the agent is gone".into()))?;
                id
            } else {
                ids.recv_timeout(timeout).map_err(|_| {
                    WorkerError::Collective(format!("rank 0 did not share the NCCL id within {timeout:?}"))
                })?
            };
            Box::new(NcclCollective::connect(rank, world, &id, ordinal, timeout).map_err(comm)?)
        }
    })
}
