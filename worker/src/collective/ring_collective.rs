//! The CPU ring as a [`Collective`]: a communication thread owns the [`TcpRing`] and works
//! through operations in the order they were issued, so the caller's computation overlaps
//! with the network. CPU tensors are reduced in place; CUDA tensors are copied to host
//! memory when the operation is issued and back when it is waited on (slower than NCCL,
//! but it works with any number of workers per GPU, which NCCL refuses).

use std::ops::Range;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tch::{Device, Kind, Tensor};

use super::ring::TcpRing;
use super::{check_buffer, check_ranges, BackendTime, Collective, CollectiveError, Pending, ReduceOp, Work};

enum Op {
    AllReduce(ReduceOp),
    ReduceScatter(Vec<Range<usize>>, ReduceOp),
    AllGather(Vec<Range<usize>>),
    Broadcast(usize),
    Barrier,
}

/// Host memory the communication thread may use until it answers the job.
struct HostBuffer {
    ptr: *mut u8,
    len: usize,
    kind: Kind,
}

// SAFETY: the buffer is owned by a tensor that the issuing `Work` keeps alive, and the
// `Collective` contract forbids the caller from touching it until the job is answered, so
// exactly one thread uses the memory at a time.
#[allow(unsafe_code)]
unsafe impl Send for HostBuffer {}

struct Job {
    op: Op,
    buffer: Option<HostBuffer>,
    done: mpsc::SyncSender<Result<f64, CollectiveError>>,
}

/// One rank's end of the CPU ring, driven by its own thread.
pub struct RingCollective {
    rank: usize,
    world: usize,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl RingCollective {
    /// Takes over a connected ring.
    pub fn new(ring: TcpRing) -> Self {
        let (rank, world) = (ring.rank(), ring.world_size());
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(format!("moxin-ring-{rank}"))
            .spawn(move || serve(ring, rx))
            .expect("spawning the ring thread");
        RingCollective { rank, world, jobs: Some(tx), thread: Some(thread) }
    }

    fn submit(&mut self, op_name: &'static str, buf: Option<&Tensor>, op: Op) -> Result<Work, CollectiveError> {
        let (done, answer) = mpsc::sync_channel(1);
        let (buffer, keep) = match buf {
            None => (None, None),
            Some(t) => {
                let host = if t.device() == Device::Cpu { t.shallow_clone() } else { t.to_device(Device::Cpu) };
                let bytes = host.numel() * host.kind().elt_size_in_bytes();
                let buffer = HostBuffer { ptr: host.data_ptr().cast::<u8>(), len: bytes, kind: host.kind() };
                let device_copy = (t.device() != Device::Cpu).then(|| t.shallow_clone());
                (Some(buffer), Some((host, device_copy)))
            }
        };
        let jobs = self.jobs.as_ref().expect("ring open until dropped");
        jobs.send(Job { op, buffer, done })
            .map_err(|_| CollectiveError::Backend { op: op_name, message: "the ring thread has stopped".into() })?;
        Ok(Work::new(Box::new(RingPending { op: op_name, answer, keep })))
    }
}

struct RingPending {
    op: &'static str,
    answer: mpsc::Receiver<Result<f64, CollectiveError>>,
    /// The host buffer in use, and the device tensor to copy it back into.
    keep: Option<(Tensor, Option<Tensor>)>,
}

impl Pending for RingPending {
    fn wait(self: Box<Self>) -> Result<BackendTime, CollectiveError> {
        let result = self.answer.recv().unwrap_or_else(|_| {
            Err(CollectiveError::Backend { op: self.op, message: "the ring thread stopped mid-operation".into() })
        });
        let busy_s = result?;
        if let Some((host, Some(mut device))) = self.keep {
            tch::no_grad(|| device.copy_(&host));
        }
        Ok(BackendTime { busy_s, exposed_s: None })
    }
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "ring"
    }
    fn all_reduce(&mut self, buf: &Tensor, op: ReduceOp) -> Result<Work, CollectiveError> {
        check_buffer("all_reduce", buf)?;
        self.submit("all_reduce", Some(buf), Op::AllReduce(op))
    }
    fn reduce_scatter(&mut self, buf: &Tensor, ranges: &[Range<usize>], op: ReduceOp) -> Result<Work, CollectiveError> {
        check_ranges(check_buffer("reduce_scatter", buf)?, ranges, self.world)?;
        self.submit("reduce_scatter", Some(buf), Op::ReduceScatter(ranges.to_vec(), op))
    }
    fn all_gather(&mut self, buf: &Tensor, ranges: &[Range<usize>]) -> Result<Work, CollectiveError> {
        check_ranges(check_buffer("all_gather", buf)?, ranges, self.world)?;
        self.submit("all_gather", Some(buf), Op::AllGather(ranges.to_vec()))
    }
    fn broadcast(&mut self, buf: &Tensor, root: usize) -> Result<Work, CollectiveError> {
        check_buffer("broadcast", buf)?;
        if root >= self.world {
            return Err(CollectiveError::Usage(format!("broadcast root {root} outside a group of {}", self.world)));
        }
        self.submit("broadcast", Some(buf), Op::Broadcast(root))
    }
    fn barrier(&mut self) -> Result<(), CollectiveError> {
        self.submit("barrier", None, Op::Barrier)?.wait().map(|_| ())
    }

    fn overlaps_autograd(&self, buf: &Tensor) -> bool {
        buf.device() == Device::Cpu
    }
}

impl Drop for RingCollective {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The communication thread: runs jobs in order; after the first failure the ring is
/// unusable and every later job fails with the same cause.
fn serve(mut ring: TcpRing, jobs: mpsc::Receiver<Job>) {
    let mut broken: Option<String> = None;
    for job in jobs {
        let started = std::time::Instant::now();
        let result = match &broken {
            Some(cause) => {
                Err(CollectiveError::Backend { op: "ring", message: format!("the ring failed earlier: {cause}") })
            }
            None => run(&mut ring, job.op, job.buffer).map(|()| started.elapsed().as_secs_f64()),
        };
        if let Err(e) = &result {
            broken.get_or_insert_with(|| e.to_string());
        }
        let _ = job.done.send(result);
    }
}

fn run(ring: &mut TcpRing, op: Op, buffer: Option<HostBuffer>) -> Result<(), CollectiveError> {
    let Some(b) = buffer else {
        return match op {
            Op::Barrier => ring.barrier(),
            _ => Err(CollectiveError::Usage("operation without a buffer".into())),
        };
    };
    // SAFETY: see `HostBuffer`: the memory is live and ours until we answer.
    #[allow(unsafe_code)]
    let bytes = unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) };
    match b.kind {
        Kind::Float => run_typed::<f32>(ring, op, bytes),
        Kind::BFloat16 => run_typed::<half::bf16>(ring, op, bytes),
        k => Err(CollectiveError::Usage(format!("dtype {k:?} is not supported"))),
    }
}

fn run_typed<T: super::Element>(ring: &mut TcpRing, op: Op, bytes: &mut [u8]) -> Result<(), CollectiveError> {
    if let Op::Broadcast(root) = op {
        return ring.broadcast(bytes, root);
    }
    assert_eq!(bytes.as_ptr().align_offset(std::mem::align_of::<T>()), 0, "tensor memory is aligned");
    // SAFETY: T is f32 or bf16 (plain data, every bit pattern valid) and the tensor's
    // storage is aligned for its element type, checked above.
    #[allow(unsafe_code)]
    let elems = unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), bytes.len() / T::BYTES) };
    match op {
        Op::AllReduce(op) => ring.all_reduce(elems, op),
        Op::ReduceScatter(ranges, op) => ring.reduce_scatter(elems, &ranges, op),
        Op::AllGather(ranges) => ring.all_gather(elems, &ranges),
        Op::Broadcast(_) | Op::Barrier => unreachable!("handled above"),
    }
}
