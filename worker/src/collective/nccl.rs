//! NCCL, through cudarc's `nccl` module (the library is opened at run time; see
//! [`crate::cuda::libraries`] for how it is found).
//!
//! Operations run on a side stream: each waits (on the GPU) for the work torch queued
//! before it on the legacy default stream, so gradient buckets reduce while backward
//! continues. The communicator is non-blocking: initialisation and every wait poll
//! `ncclCommGetAsyncError` and abort the communicator when a peer fails or the timeout
//! passes, so NCCL never hangs a worker either. A new communicator is made per membership
//! generation; dropping it aborts it.

use std::cell::Cell;
use std::ffi::CStr;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUevent_flags;
use cudarc::nccl::{result, sys};
use tch::{Device, Kind, Tensor};

use super::{check_buffer, check_ranges, BackendTime, Collective, CollectiveError, Pending, ReduceOp, Work};
use crate::cuda::{self, CudaContext, CudaEvent, CudaStream};

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// Whether the NCCL library can be opened (after [`crate::cuda::libraries::plan`]).
pub fn available() -> bool {
    // SAFETY: only tries to dlopen the library.
    #[allow(unsafe_code)]
    unsafe {
        cuda::driver_present() && sys::is_culib_present()
    }
}

/// Loads NCCL (through cudarc) and checks that this process holds exactly one NCCL library.
fn load() -> Result<(), CollectiveError> {
    if !available() {
        return Err(CollectiveError::Setup(
            "the NCCL library was not found; run `moxin-train doctor`, set MOXIN_NCCL_LIBRARY, \
             or use cluster.collective = \"ring\""
                .into(),
        ));
    }
    let v = result::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e.0))?;
    let mapped = crate::cuda::libraries::loaded_nccl();
    if mapped.len() > 1 {
        return Err(CollectiveError::Setup(format!(
            "two NCCL libraries are loaded in this process ({mapped:?}; NCCL {v} answers), which corrupts \
             communicators; set MOXIN_NCCL_LIBRARY to the one libtorch uses"
        )));
    }
    Ok(())
}

/// The loaded NCCL's version as `major.minor.patch`.
pub fn version() -> Result<String, CollectiveError> {
    load()?;
    let v = result::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e.0))?;
    // NCCL >= 2.9 encodes MAJOR*10000 + MINOR*100 + PATCH.
    Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
}

/// Creates a new unique id (rank 0 does this; it reaches the other ranks through the
/// coordinator).
pub fn new_id() -> Result<Vec<u8>, CollectiveError> {
    load()?;
    let id = result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e.0))?;
    Ok(id_to_bytes(&id.internal))
}

/// An NCCL id as the bytes that travel through the coordinator (`bytes` in protobuf).
fn id_to_bytes(internal: &[std::ffi::c_char; ID_BYTES]) -> Vec<u8> {
    internal.iter().map(|&c| c as u8).collect()
}

/// The inverse of [`id_to_bytes`] (the length is checked by the caller).
fn id_from_bytes(bytes: &[u8]) -> [std::ffi::c_char; ID_BYTES] {
    let mut internal = [0 as std::ffi::c_char; ID_BYTES];
    for (dst, src) in internal.iter_mut().zip(bytes) {
        *dst = *src as std::ffi::c_char;
    }
    internal
}

fn nccl_error(op: &'static str, code: sys::ncclResult_t) -> CollectiveError {
    // SAFETY: both return static or NCCL-owned C strings (ncclGetLastError ignores its
    // argument and reports the calling thread's last warning).
    #[allow(unsafe_code)]
    let (text, last) = unsafe {
        let s = |p: *const std::ffi::c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        (s(sys::ncclGetErrorString(code)), s(sys::ncclGetLastError(std::ptr::null_mut())))
    };
    let detail = if last.is_empty() { String::new() } else { format!(" ({})", last.trim()) };
    CollectiveError::Backend { op, message: format!("{code:?}: {text}{detail}") }
}

/// The raw communicator, shared by the collective and its operations in flight, aborted
/// (once) on failure or drop.
struct Comm {
    raw: sys::ncclComm_t,
    aborted: Cell<bool>,
}

impl Comm {
    /// `Ok(true)` when idle, `Ok(false)` while an operation is still being enqueued,
    /// `Err` once the communicator has failed.
    fn state(&self, op: &'static str) -> Result<bool, CollectiveError> {
        if self.aborted.get() {
            return Err(CollectiveError::Backend {
                op,
                message: "the communicator was aborted after a failure".into(),
            });
        }
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `raw` is a live communicator (not aborted) and `state` a valid out pointer.
        #[allow(unsafe_code)]
        let r = unsafe { sys::ncclCommGetAsyncError(self.raw, &mut state) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(nccl_error(op, r));
        }
        match state {
            sys::ncclResult_t::ncclSuccess => Ok(true),
            sys::ncclResult_t::ncclInProgress => Ok(false),
            e => Err(nccl_error(op, e)),
        }
    }

    /// Polls until the communicator is idle, failing (and aborting) on error or timeout.
    fn settle(&self, op: &'static str, timeout: Duration) -> Result<(), CollectiveError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.state(op) {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(50)),
                Ok(false) => {
                    self.abort();
                    return Err(CollectiveError::Timeout { op, peer: usize::MAX, timeout });
                }
                Err(e) => {
                    self.abort();
                    return Err(e);
                }
            }
        }
    }

    fn abort(&self) {
        if !self.aborted.replace(true) {
            // SAFETY: aborting a live communicator once; it is never used afterwards.
            #[allow(unsafe_code)]
            unsafe {
                let _ = result::comm_abort(self.raw);
            }
        }
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        self.abort();
    }
}

/// One rank of an NCCL group on one GPU.
pub struct NcclCollective {
    comm: Rc<Comm>,
    ctx: Arc<CudaContext>,
    /// Where NCCL runs.
    side: Arc<CudaStream>,
    /// torch's stream (the legacy default stream).
    compute: Arc<CudaStream>,
    rank: usize,
    world: usize,
    ordinal: usize,
    timeout: Duration,
    token: Tensor,
}

impl NcclCollective {
    /// Joins the group `id` as `rank` of `world` on CUDA device `ordinal`. Fails (never
    /// hangs) if the others do not join within `timeout`.
    pub fn connect(
        rank: usize,
        world: usize,
        id: &[u8],
        ordinal: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if id.len() != ID_BYTES {
            return Err(CollectiveError::Setup(format!("an NCCL id has {ID_BYTES} bytes, got {}", id.len())));
        }
        load()?;
        let ctx = cuda::context(ordinal).map_err(|e| CollectiveError::Setup(e.to_string()))?;
        ctx.bind_to_thread().map_err(|e| CollectiveError::Setup(format!("{e:?}")))?;
        let side = ctx.new_stream().map_err(|e| CollectiveError::Setup(format!("creating a stream: {e:?}")))?;
        let compute = ctx.default_stream();
        let internal = id_from_bytes(id);
        let mut config = sys::ncclConfig_t {
            size: std::mem::size_of::<sys::ncclConfig_t>(),
            magic: 0xcafe_beef,
            version: 22800,
            blocking: 0,
            cgaClusterSize: i32::MIN,
            minCTAs: i32::MIN,
            maxCTAs: i32::MIN,
            netName: std::ptr::null(),
            splitShare: i32::MIN,
            trafficClass: i32::MIN,
            commName: std::ptr::null(),
            collnetEnable: i32::MIN,
            CTAPolicy: i32::MIN,
            shrinkShare: i32::MIN,
            nvlsCTAs: i32::MIN,
            nChannelsPerNetPeer: i32::MIN,
            nvlinkCentricSched: i32::MIN,
        };
        let mut raw: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: valid out pointer, id and config; a non-blocking init returns at once and
        // is completed (or aborted) by `settle` below.
        #[allow(unsafe_code)]
        unsafe {
            result::comm_init_rank_config(
                &mut raw,
                world as i32,
                sys::ncclUniqueId { internal },
                rank as i32,
                &mut config,
            )
            .map_err(|e| nccl_error("ncclCommInitRankConfig", e.0))?;
        }
        let comm = Rc::new(Comm { raw, aborted: Cell::new(false) });
        comm.settle("forming the NCCL group", timeout)?;
        let token = Tensor::zeros([1], (Kind::Float, Device::Cuda(ordinal)));
        tracing::info!(rank, world, ordinal, "NCCL communicator ready");
        Ok(NcclCollective { comm, ctx, side, compute, rank, world, ordinal, timeout, token })
    }

    fn check_device(&self, op: &'static str, buf: &Tensor) -> Result<(sys::ncclDataType_t, usize), CollectiveError> {
        let len = check_buffer(op, buf)?;
        if buf.device() != Device::Cuda(self.ordinal) {
            return Err(CollectiveError::Usage(format!(
                "{op}: NCCL on cuda:{} got a tensor on {:?}",
                self.ordinal,
                buf.device()
            )));
        }
        let dtype = match buf.kind() {
            Kind::BFloat16 => sys::ncclDataType_t::ncclBfloat16,
            _ => sys::ncclDataType_t::ncclFloat32,
        };
        Ok((dtype, len))
    }

    /// Issues NCCL calls (`enqueue`) on the side stream after the compute stream's work so
    /// far; returns the handle.
    fn issue(
        &mut self,
        op: &'static str,
        buf: &Tensor,
        enqueue: impl FnOnce(&Comm, sys::cudaStream_t) -> Result<(), CollectiveError>,
    ) -> Result<Work, CollectiveError> {
        let driver = |e: cudarc::driver::DriverError| CollectiveError::Backend { op, message: format!("{e:?}") };
        self.ctx.bind_to_thread().map_err(driver)?;
        let ready = self.compute.record_event(None).map_err(driver)?;
        self.side.wait(&ready).map_err(driver)?;
        self.comm.state(op)?;
        let started = self.side.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver)?;
        let stream = self.side.cu_stream() as sys::cudaStream_t;
        let grouped = (|| {
            result::group_start().map_err(|e| nccl_error("ncclGroupStart", e.0))?;
            let r = enqueue(&self.comm, stream);
            let end = result::group_end().map_err(|e| nccl_error("ncclGroupEnd", e.0));
            r.and(end.map(|_| ()))
        })();
        if let Err(e) = grouped {
            self.comm.abort();
            return Err(e);
        }
        self.comm.settle(op, self.timeout)?;
        let done = self.side.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver)?;
        Ok(Work::new(Box::new(NcclPending {
            op,
            comm: self.comm.clone(),
            started,
            done,
            compute: self.compute.clone(),
            timeout: self.timeout,
            _keep: buf.shallow_clone(),
        })))
    }
}

fn ptr_at(buf: &Tensor, elem: usize) -> *mut std::ffi::c_void {
    // Offsets stay inside the buffer: callers pass elements of checked ranges.
    buf.data_ptr().cast::<u8>().wrapping_add(elem * buf.kind().elt_size_in_bytes()).cast()
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
    }
}

fn call(op: &'static str, r: Result<result::NcclStatus, result::NcclError>) -> Result<(), CollectiveError> {
    r.map(|_| ()).map_err(|e| nccl_error(op, e.0))
}

/// A buffer split into one part per rank, as NCCL needs it: equal parts go to one
/// reduce-scatter / all-gather call; uneven ones to one call per non-empty part's owner.
struct Parts {
    base: *mut std::ffi::c_void,
    mine: *mut std::ffi::c_void,
    /// The common length, when every part has the same one.
    equal: Option<usize>,
    /// `(owner rank, first element, length)` of every non-empty part.
    owned: Vec<(i32, *mut std::ffi::c_void, usize)>,
}

impl Parts {
    fn of(buf: &Tensor, ranges: &[Range<usize>], rank: usize) -> Self {
        let n = ranges[0].len();
        Parts {
            base: ptr_at(buf, 0),
            mine: ptr_at(buf, ranges[rank].start),
            equal: ranges.iter().all(|r| r.len() == n).then_some(n),
            owned: ranges
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.is_empty())
                .map(|(root, r)| (root as i32, ptr_at(buf, r.start), r.len()))
                .collect(),
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce(&mut self, buf: &Tensor, op: ReduceOp) -> Result<Work, CollectiveError> {
        let (dtype, len) = self.check_device("all_reduce", buf)?;
        let p = ptr_at(buf, 0);
        self.issue("all_reduce", buf, |comm, stream| {
            // SAFETY: `p` points at `len` live elements of `dtype` on this device; in place.
            #[allow(unsafe_code)]
            call("ncclAllReduce", unsafe { result::all_reduce(p, p, len, dtype, nccl_op(op), comm.raw, stream) })
        })
    }

    fn reduce_scatter(&mut self, buf: &Tensor, ranges: &[Range<usize>], op: ReduceOp) -> Result<Work, CollectiveError> {
        let (dtype, len) = self.check_device("reduce_scatter", buf)?;
        check_ranges(len, ranges, self.world)?;
        let parts = Parts::of(buf, ranges, self.rank);
        self.issue("reduce_scatter", buf, move |comm, stream| {
            // SAFETY: every pointer and count lies inside the checked buffer on this device.
            #[allow(unsafe_code)]
            unsafe {
                match parts.equal {
                    Some(n) => call(
                        "ncclReduceScatter",
                        result::reduce_scatter(parts.base, parts.mine, n, dtype, nccl_op(op), comm.raw, stream),
                    ),
                    // Uneven parts: one in-place reduce to each part's owner.
                    None => parts.owned.iter().try_for_each(|&(root, p, n)| {
                        call("ncclReduce", result::reduce(p, p, n, dtype, nccl_op(op), root, comm.raw, stream))
                    }),
                }
            }
        })
    }

    fn all_gather(&mut self, buf: &Tensor, ranges: &[Range<usize>]) -> Result<Work, CollectiveError> {
        let (dtype, len) = self.check_device("all_gather", buf)?;
        check_ranges(len, ranges, self.world)?;
        let parts = Parts::of(buf, ranges, self.rank);
        self.issue("all_gather", buf, move |comm, stream| {
            // SAFETY: every pointer and count lies inside the checked buffer on this device.
            #[allow(unsafe_code)]
            unsafe {
                match parts.equal {
                    Some(n) => {
                        call("ncclAllGather", result::all_gather(parts.mine, parts.base, n, dtype, comm.raw, stream))
                    }
                    // Uneven parts: each owner broadcasts its part in place.
                    None => parts.owned.iter().try_for_each(|&(root, p, n)| {
                        call("ncclBroadcast", result::broadcast(p, p, n, dtype, root, comm.raw, stream))
                    }),
                }
            }
        })
    }

    fn broadcast(&mut self, buf: &Tensor, root: usize) -> Result<Work, CollectiveError> {
        let (dtype, len) = self.check_device("broadcast", buf)?;
        if root >= self.world {
            return Err(CollectiveError::Usage(format!("broadcast root {root} outside a group of {}", self.world)));
        }
        let p = ptr_at(buf, 0);
        self.issue("broadcast", buf, |comm, stream| {
            // SAFETY: `p` points at `len` live elements on this device; in place.
            #[allow(unsafe_code)]
            call("ncclBroadcast", unsafe { result::broadcast(p, p, len, dtype, root as i32, comm.raw, stream) })
        })
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        let token = self.token.shallow_clone();
        let work = self.all_reduce(&token, ReduceOp::Sum)?;
        work.wait().map(|_| ())
    }
}

struct NcclPending {
    op: &'static str,
    comm: Rc<Comm>,
    started: CudaEvent,
    done: CudaEvent,
    compute: Arc<CudaStream>,
    timeout: Duration,
    _keep: Tensor,
}

impl Pending for NcclPending {
    /// Polls the completion event and the communicator's error state; measures, on the
    /// GPU, how long the compute stream would have waited for this operation.
    fn wait(self: Box<Self>) -> Result<BackendTime, CollectiveError> {
        let op = self.op;
        let driver = |e: cudarc::driver::DriverError| CollectiveError::Backend { op, message: format!("{e:?}") };
        let marker = self.compute.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(driver)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            if self.done.try_is_complete().map_err(driver)? {
                break;
            }
            if let Err(e) = self.comm.state(op) {
                self.comm.abort();
                return Err(e);
            }
            if Instant::now() >= deadline {
                self.comm.abort();
                return Err(CollectiveError::Timeout { op, peer: usize::MAX, timeout: self.timeout });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
        self.compute.wait(&self.done).map_err(driver)?;
        marker.synchronize().map_err(driver)?;
        // Positive when the operation finished after the compute stream reached this wait.
        let exposed_ms = marker.elapsed_ms(&self.done).map_err(driver)?;
        let busy_ms = self.started.elapsed_ms(&self.done).map_err(driver)?;
        Ok(BackendTime {
            busy_s: f64::from(busy_ms.max(0.0)) / 1e3,
            exposed_s: Some(f64::from(exposed_ms.max(0.0)) / 1e3),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_survive_the_trip_through_the_coordinator() {
        // Every byte value, including those that are negative as a C char.
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (i, c) in internal.iter_mut().enumerate() {
            *c = (i as u8).wrapping_mul(37).wrapping_add(200) as std::ffi::c_char;
        }
        let bytes = id_to_bytes(&internal);
        assert_eq!(bytes.len(), ID_BYTES);
        // Through protobuf `bytes`, as the coordinator relays it.
        use prost::Message;
        let wire = moxin_proto::v1::CollectiveId { worker_id: "w1".into(), generation: 3, id: bytes }.encode_to_vec();
        let back = moxin_proto::v1::CollectiveId::decode(wire.as_slice()).unwrap();
        assert_eq!(id_from_bytes(&back.id), internal);
        // A wrong length is refused before NCCL sees it.
        let e = NcclCollective::connect(0, 1, &[0u8; 7], 0, Duration::from_secs(1)).err().unwrap();
        assert!(e.to_string().contains("128 bytes"), "{e}");
    }
}
