//! Checks every rank of a new group runs before training: that all see the run directory
//! as one shared filesystem, and that all restored the same checkpoint. A failed check is
//! an error on the ranks at fault and a group failure on the others, so the group re-forms
//! without the ranks that cannot take part.

use std::path::Path;

use tch::Tensor;

use crate::collective::{Collective, CollectiveError, ReduceOp};
use crate::WorkerError;

fn comm(e: CollectiveError) -> WorkerError {
    WorkerError::Collective(e.to_string())
}

/// Rank 0's `value` (< 2^48) on every rank, sent exactly as three 16-bit halves in fp32.
fn broadcast_u48(collective: &mut dyn Collective, value: u64, device: tch::Device) -> Result<u64, WorkerError> {
    let halves = [(value & 0xffff) as f32, ((value >> 16) & 0xffff) as f32, ((value >> 32) & 0xffff) as f32];
    let t = Tensor::from_slice(&halves).to_device(device);
    collective.broadcast(&t, 0).and_then(|w| w.wait()).map_err(comm)?;
    let h = Vec::<f32>::try_from(t.to_device(tch::Device::Cpu)).map_err(WorkerError::Torch)?;
    Ok(h[0] as u64 | (h[1] as u64) << 16 | (h[2] as u64) << 32)
}

/// How many ranks voted `yes` (every rank learns the same count).
fn count_votes(collective: &mut dyn Collective, yes: bool, device: tch::Device) -> Result<u64, WorkerError> {
    let t = Tensor::from_slice(&[f32::from(u8::from(yes))]).to_device(device);
    collective.all_reduce(&t, ReduceOp::Sum).and_then(|w| w.wait()).map_err(comm)?;
    Ok(t.double_value(&[0]).round() as u64)
}

/// Every rank must see the run directory rank 0 sees (checkpoints are written by all ranks
/// into one directory and read back by any): rank 0 writes a file named for the generation
/// holding a fresh nonce, the others read it. Checked at group formation, so a worker
/// without the shared filesystem fails with a message that says so instead of breaking
/// the first checkpoint.
pub fn check_shared_run_dir(
    collective: &mut dyn Collective,
    run_dir: &Path,
    generation: u64,
    device: tch::Device,
) -> Result<(), WorkerError> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let rank = collective.rank();
    let path = run_dir.join(format!(".shared-filesystem-check-g{generation}"));
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
        ^ (std::process::id() as u64) << 20;
    let nonce = nonce & 0xffff_ffff_ffff;
    if rank == 0 {
        std::fs::write(&path, nonce.to_string()).map_err(|e| WorkerError::io(&path, e))?;
    }
    let expected = broadcast_u48(collective, nonce, device)?;
    let seen = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u64>().ok());
    let blind = seen != Some(expected);
    let blind_ranks = count_votes(collective, blind, device)?;
    if rank == 0 {
        let _ = std::fs::remove_file(&path);
    }
    if blind {
        return Err(WorkerError::Setup(format!(
            "rank {rank} does not see the run directory {} as rank 0 does ({} there); every worker must mount \
             the run directory as one shared filesystem (NFS, Lustre, ...) at the same path",
            run_dir.display(),
            if seen.is_some() { "another check file" } else { "no check file" }
        )));
    }
    if blind_ranks > 0 {
        return Err(WorkerError::Collective(format!(
            "{blind_ranks} rank(s) do not see the run directory {}; the group re-forms without them",
            run_dir.display()
        )));
    }
    Ok(())
}

/// Every rank of a new group must continue from the same checkpoint. By construction they
/// do (a group forms only once all its members have left their previous group, whose
/// checkpoint is published by then), but a shared filesystem that shows a new directory
/// late would break that silently; this check turns it into a group failure, and the
/// group re-forms.
pub fn agree_on_restored_step(
    collective: &mut dyn Collective,
    step: u64,
    device: tch::Device,
) -> Result<(), WorkerError> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let root = broadcast_u48(collective, step, device)?;
    let disagree = count_votes(collective, root != step, device)?;
    if disagree > 0 {
        return Err(WorkerError::Collective(format!(
            "{disagree} rank(s) found another newest checkpoint than rank 0 (step {root}; this rank: step {step}); \
             the run directory must be one shared filesystem that all workers see alike"
        )));
    }
    Ok(())
}
