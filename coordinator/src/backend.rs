//! Which collective backend a group uses: a pure rule over what the coordinator knows
//! about the members' devices, unit-tested without gRPC.

use moxin_proto::v1::CollectiveBackend;

use crate::config::CollectiveChoice;

/// What the coordinator knows about a member's devices when it picks a backend.
#[derive(Debug, Clone)]
pub struct MemberDevices {
    /// Worker id and host:pid, for messages.
    pub worker: String,
    /// Host name.
    pub host: String,
    /// UUID of the GPU it trains on, if any.
    pub gpu: Option<String>,
    /// Whether it can load NCCL.
    pub nccl: bool,
}

/// The backend a group of `members` uses for `cluster.collective = choice`: NCCL needs every
/// member on its own GPU (NCCL refuses two ranks on one device) with NCCL loadable; `auto`
/// falls back to the ring otherwise; one member alone needs nothing unless NCCL is asked for.
pub fn choose_backend(choice: CollectiveChoice, members: &[MemberDevices]) -> Result<CollectiveBackend, String> {
    let why_not_nccl = || -> Option<String> {
        if let Some(m) = members.iter().find(|m| m.gpu.is_none()) {
            return Some(format!("worker {} has no GPU", m.worker));
        }
        if let Some(m) = members.iter().find(|m| !m.nccl) {
            return Some(format!("worker {} cannot load NCCL (see `moxin-train doctor`)", m.worker));
        }
        for (i, a) in members.iter().enumerate() {
            if let Some(b) = members[i + 1..].iter().find(|b| b.host == a.host && b.gpu == a.gpu) {
                return Some(format!(
                    "workers {} and {} share one GPU, which NCCL refuses; give each worker its own GPU \
                     (--device cuda:N or LOCAL_RANK)",
                    a.worker, b.worker
                ));
            }
        }
        None
    };
    match choice {
        CollectiveChoice::Nccl => match why_not_nccl() {
            None => Ok(CollectiveBackend::Nccl),
            Some(reason) => {
                Err(format!("cluster.collective = \"nccl\" but {reason}; use collective = \"ring\" or \"auto\""))
            }
        },
        _ if members.len() <= 1 => Ok(CollectiveBackend::Solo),
        CollectiveChoice::Ring => Ok(CollectiveBackend::Ring),
        CollectiveChoice::Auto => {
            Ok(if why_not_nccl().is_none() { CollectiveBackend::Nccl } else { CollectiveBackend::Ring })
        }
    }
}
