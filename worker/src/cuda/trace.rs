//! A record of every GPU kernel, copy and fill of some training steps, through CUPTI's
//! activity API (`moxin-train train --trace-kernels N`): what the device ran, for how long,
//! and how long it sat idle in between. tch has no profiler, so this talks to CUPTI
//! (`libcupti.so.13`, shipped with torch's CUDA libraries beside NVRTC) directly.
//!
//! CUPTI hands finished records over in buffers we lend it, on a thread of its own; the
//! callbacks below copy out the fields the summary needs (start, end, stream, name) and
//! give the buffer back. Offsets are those of the record layouts of CUPTI 12 and 13
//! (`CUpti_ActivityKernel9/10`, `CUpti_ActivityMemcpy6`, `CUpti_ActivityMemset4`, which
//! keep their first fields where earlier versions had them); records that fail a sanity
//! check (an end before the start, a missing name), and buffers we could not lend, are
//! counted and left out.

#![allow(unsafe_code)]

use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

use crate::WorkerError;

const KIND_MEMCPY: u32 = 1;
const KIND_MEMSET: u32 = 2;
const KIND_KERNEL: u32 = 3;
const KIND_CONCURRENT_KERNEL: u32 = 10;
const FLUSH_FORCED: u32 = 1;
/// Bytes of each buffer lent to CUPTI.
const BUFFER_BYTES: usize = 8 << 20;
/// Library names tried, newest first (torch 2.11's CUDA 13 wheels ship the first).
const LIBRARIES: [&str; 3] = ["libcupti.so.13", "libcupti.so.12", "libcupti.so"];

type BufferRequested = unsafe extern "C" fn(*mut *mut u8, *mut usize, *mut usize);
type BufferCompleted = unsafe extern "C" fn(*mut c_void, u32, *mut u8, usize, usize);

struct Api {
    enable: unsafe extern "C" fn(u32) -> u32,
    disable: unsafe extern "C" fn(u32) -> u32,
    register: unsafe extern "C" fn(BufferRequested, BufferCompleted) -> u32,
    next_record: unsafe extern "C" fn(*mut u8, usize, *mut *mut u8) -> u32,
    flush_all: unsafe extern "C" fn(u32) -> u32,
    library: String,
}

/// One thing the device ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Activity {
    /// Kernel name (mangled, as the driver knows it), or `memcpy` / `memset`.
    pub name: Arc<str>,
    /// GPU timestamps, nanoseconds.
    pub start_ns: u64,
    /// End timestamp, nanoseconds.
    pub end_ns: u64,
    /// CUDA stream id.
    pub stream: u32,
}

#[derive(Default)]
struct Collected {
    /// Each record with the device it ran on.
    records: Vec<(u32, Activity)>,
    names: HashMap<usize, Arc<str>>,
    malformed: u64,
}

/// Buffers CUPTI asked for that could not be allocated (their records are lost). Not in
/// `Collected`: CUPTI may ask for a buffer while a completed one is being read.
static LOST_BUFFERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What a trace recorded.
#[derive(Debug, Default)]
pub struct Recorded {
    /// This device's records, in no particular order.
    pub records: Vec<Activity>,
    /// Records left out for failing a sanity check.
    pub malformed: u64,
    /// Buffers that could not be lent to CUPTI (their records are lost).
    pub lost_buffers: u64,
}

static COLLECTED: OnceLock<Mutex<Collected>> = OnceLock::new();
static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn collected() -> std::sync::MutexGuard<'static, Collected> {
    COLLECTED.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

fn buffer_layout() -> Layout {
    Layout::from_size_align(BUFFER_BYTES, 8).expect("a valid layout")
}

unsafe extern "C" fn buffer_requested(buffer: *mut *mut u8, size: *mut usize, max_records: *mut usize) {
    // SAFETY: CUPTI passes valid out-pointers; a null buffer (allocation failed) with size 0
    // tells it to drop records rather than crash.
    let p = std::alloc::alloc(buffer_layout());
    if p.is_null() {
        LOST_BUFFERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    *buffer = p;
    *size = if p.is_null() { 0 } else { BUFFER_BYTES };
    *max_records = 0;
}

unsafe extern "C" fn buffer_completed(_ctx: *mut c_void, _stream: u32, buffer: *mut u8, _size: usize, valid: usize) {
    if buffer.is_null() {
        return;
    }
    if let Some(Ok(api)) = API.get() {
        let mut c = collected();
        let mut record: *mut u8 = std::ptr::null_mut();
        // SAFETY: `buffer` is one we lent, with `valid` bytes of records; CUPTI walks them.
        while (api.next_record)(buffer, valid, &mut record) == 0 && !record.is_null() {
            match parse(record, &mut c.names) {
                Some(a) => c.records.push(a),
                None => c.malformed += 1,
            }
        }
    }
    // SAFETY: allocated in `buffer_requested` with the same layout.
    std::alloc::dealloc(buffer, buffer_layout());
}

/// Reads `T` at `offset` bytes into a record (records are packed).
unsafe fn field<T: Copy>(record: *const u8, offset: usize) -> T {
    std::ptr::read_unaligned(record.add(offset) as *const T)
}

/// The record's device and what it ran.
unsafe fn parse(record: *const u8, names: &mut HashMap<usize, Arc<str>>) -> Option<(u32, Activity)> {
    let kind: u32 = field(record, 0);
    let (start_ns, end_ns): (u64, u64) = (field(record, 16), field(record, 24));
    let device: u32 = match kind {
        KIND_KERNEL | KIND_CONCURRENT_KERNEL => field(record, 40),
        _ => field(record, 32),
    };
    let (name, stream) = match kind {
        KIND_KERNEL | KIND_CONCURRENT_KERNEL => {
            let ptr: *const c_char = field(record, 104);
            if ptr.is_null() {
                return None;
            }
            let name = names
                .entry(ptr as usize)
                .or_insert_with(|| Arc::from(CStr::from_ptr(ptr).to_string_lossy().as_ref()))
                .clone();
            (name, field::<u32>(record, 48))
        }
        KIND_MEMCPY => (Arc::from("memcpy"), field::<u32>(record, 40)),
        KIND_MEMSET => (Arc::from("memset"), field::<u32>(record, 40)),
        _ => return None,
    };
    (end_ns >= start_ns && start_ns > 0).then_some((device, Activity { name, start_ns, end_ns, stream }))
}

fn load() -> Result<Api, String> {
    use std::ffi::CString;
    let mut tried = Vec::new();
    for lib in LIBRARIES {
        let c = CString::new(lib).expect("no NUL");
        // SAFETY: dlopen of a library name; the handle is kept for the process's life.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            tried.push(lib);
            continue;
        }
        let sym = |name: &str| -> Result<*mut c_void, String> {
            let c = CString::new(name).expect("no NUL");
            // SAFETY: dlsym on a live handle.
            let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
            if p.is_null() {
                Err(format!("{lib} has no {name}"))
            } else {
                Ok(p)
            }
        };
        // SAFETY: the signatures are CUPTI's (cupti_activity.h).
        unsafe {
            return Ok(Api {
                enable: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32) -> u32>(sym(
                    "cuptiActivityEnable",
                )?),
                disable: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32) -> u32>(sym(
                    "cuptiActivityDisable",
                )?),
                register: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(BufferRequested, BufferCompleted) -> u32,
                >(sym("cuptiActivityRegisterCallbacks")?),
                next_record: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(*mut u8, usize, *mut *mut u8) -> u32,
                >(sym("cuptiActivityGetNextRecord")?),
                flush_all: std::mem::transmute::<*mut c_void, unsafe extern "C" fn(u32) -> u32>(sym(
                    "cuptiActivityFlushAll",
                )?),
                library: lib.to_string(),
            });
        }
    }
    Err(format!(
        "CUPTI not found (tried {}); it ships with torch's CUDA libraries (site-packages/nvidia/cu13/lib), \
         which `moxin-train` puts on the library path when it finds them beside torch",
        tried.join(", ")
    ))
}

fn api() -> Result<&'static Api, WorkerError> {
    API.get_or_init(|| {
        let api = load()?;
        // SAFETY: registering our two callbacks, once per process.
        let rc = unsafe { (api.register)(buffer_requested, buffer_completed) };
        if rc != 0 {
            return Err(format!("cuptiActivityRegisterCallbacks failed: {}", describe(rc)));
        }
        Ok(api)
    })
    .as_ref()
    .map_err(|e| WorkerError::Device(e.clone()))
}

/// A CUPTI result code, with what usually causes it.
fn describe(rc: u32) -> String {
    let what = match rc {
        15 => "CUPTI_ERROR_NOT_INITIALIZED: no CUDA driver or device",
        26 => "CUPTI_ERROR_HARDWARE_BUSY: another profiler is attached",
        35 | 40 => "insufficient privileges for profiling on this machine",
        39 => "CUPTI_ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED: another profiler is attached",
        999 => "CUPTI_ERROR_UNKNOWN (seen without a CUDA driver)",
        _ => "see cupti_result.h",
    };
    format!("CUPTI error {rc} ({what})")
}

const KINDS: [u32; 3] = [KIND_CONCURRENT_KERNEL, KIND_MEMCPY, KIND_MEMSET];

/// Recording in progress; [`KernelTrace::stop`] returns what was recorded. Dropped without
/// stopping, it stops recording and discards the records.
pub struct KernelTrace {
    api: &'static Api,
    cuda: usize,
    stopped: bool,
}

impl KernelTrace {
    /// Loads CUPTI (once), so a run that will trace later fails now if it cannot.
    pub fn load() -> Result<(), WorkerError> {
        api().map(|_| ())
    }

    /// Starts recording what CUDA device `cuda` runs from now on.
    pub fn start(cuda: usize) -> Result<KernelTrace, WorkerError> {
        let api = api()?;
        *collected() = Collected::default();
        LOST_BUFFERS.store(0, std::sync::atomic::Ordering::Relaxed);
        for kind in KINDS {
            // SAFETY: plain CUPTI calls.
            let rc = unsafe { (api.enable)(kind) };
            if rc != 0 {
                for k in KINDS {
                    unsafe { (api.disable)(k) };
                }
                return Err(WorkerError::Device(format!(
                    "{}: enabling activity kind {kind} failed: {}",
                    api.library,
                    describe(rc)
                )));
            }
        }
        Ok(KernelTrace { api, cuda, stopped: false })
    }

    fn disable(&mut self) {
        if !self.stopped {
            self.stopped = true;
            for kind in KINDS {
                // SAFETY: plain CUPTI calls.
                unsafe { (self.api.disable)(kind) };
            }
        }
    }

    /// Waits for the device, stops recording and returns what was recorded.
    pub fn stop(mut self) -> Result<Recorded, WorkerError> {
        tch::Cuda::synchronize(self.cuda as i64);
        // Stop first, so nothing recorded after the flush is left for the next trace.
        self.disable();
        // SAFETY: plain CUPTI call; completes every buffer through our callback.
        let rc = unsafe { (self.api.flush_all)(FLUSH_FORCED) };
        if rc != 0 {
            return Err(WorkerError::Device(format!("cuptiActivityFlushAll failed: {}", describe(rc))));
        }
        let c = std::mem::take(&mut *collected());
        let cuda = self.cuda as u32;
        let records = c.records.into_iter().filter(|(d, _)| *d == cuda).map(|(_, a)| a).collect();
        let lost_buffers = LOST_BUFFERS.swap(0, std::sync::atomic::Ordering::Relaxed);
        Ok(Recorded { records, malformed: c.malformed, lost_buffers })
    }
}

impl Drop for KernelTrace {
    fn drop(&mut self) {
        self.disable();
    }
}

/// Per-step figures of `records` covering `steps` steps: the device's span (first start to
/// last end), busy time (the union of everything it ran), idle time (span − busy), and per
/// kernel name the calls and milliseconds, longest first.
pub fn summarise(records: &[Activity], steps: u64) -> serde_json::Value {
    let steps_f = steps.max(1) as f64;
    let ms = |ns: u64| ns as f64 / 1e6 / steps_f;
    let mut intervals: Vec<(u64, u64)> = records.iter().map(|a| (a.start_ns, a.end_ns)).collect();
    intervals.sort_unstable();
    let (mut busy, mut current): (u64, Option<(u64, u64)>) = (0, None);
    for (s, e) in intervals.iter().copied() {
        current = match current {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                busy += ce - cs;
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    busy += current.map_or(0, |(s, e)| e - s);
    let span = match (intervals.first(), records.iter().map(|a| a.end_ns).max()) {
        (Some(&(first, _)), Some(last)) => last - first,
        _ => 0,
    };
    let mut by_name: HashMap<&str, (u64, u64)> = HashMap::new();
    for a in records {
        let e = by_name.entry(&a.name).or_default();
        e.0 += 1;
        e.1 += a.end_ns - a.start_ns;
    }
    let mut kernels: Vec<_> = by_name.into_iter().collect();
    kernels.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(b.0)));
    let total: u64 = kernels.iter().map(|(_, (_, t))| t).sum();
    let mut streams: Vec<u32> = records.iter().map(|a| a.stream).collect();
    streams.sort_unstable();
    streams.dedup();
    serde_json::json!({
        "steps": steps,
        "records": records.len(),
        "streams": streams,
        "span_ms_per_step": ms(span),
        "busy_ms_per_step": ms(busy),
        "idle_ms_per_step": ms(span - busy.min(span)),
        "kernel_ms_per_step": ms(total),
        "kernels": kernels.iter().map(|(name, (calls, t))| serde_json::json!({
            "name": name,
            "calls_per_step": *calls as f64 / steps_f,
            "ms_per_step": ms(*t),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(name: &str, start_ns: u64, end_ns: u64, stream: u32) -> Activity {
        Activity { name: Arc::from(name), start_ns, end_ns, stream }
    }

    #[test]
    fn busy_is_the_union_and_idle_the_gaps() {
        // Two steps: [0,10) gemm, [5,12) adamw on a side stream (overlapping), gap, [20,30)
        // gemm, [30,31) memset.
        let records =
            [a("gemm", 100, 110, 7), a("adamw", 105, 112, 9), a("gemm", 120, 130, 7), a("memset", 130, 131, 7)];
        let s = summarise(&records, 2);
        assert_eq!(s["span_ms_per_step"], 31.0 / 1e6 / 2.0);
        assert_eq!(s["busy_ms_per_step"], 23.0 / 1e6 / 2.0);
        assert_eq!(s["idle_ms_per_step"], 8.0 / 1e6 / 2.0);
        assert_eq!(s["kernel_ms_per_step"], 28.0 / 1e6 / 2.0);
        assert_eq!(s["streams"], serde_json::json!([7, 9]));
        let k = s["kernels"].as_array().unwrap();
        assert_eq!(k[0]["name"], "gemm");
        assert_eq!(k[0]["calls_per_step"], 1.0);
        assert_eq!(k[0]["ms_per_step"], 20.0 / 1e6 / 2.0);
        assert_eq!(k.len(), 3);
        assert_eq!(summarise(&[], 3)["busy_ms_per_step"], 0.0);
    }

    #[test]
    fn records_are_read_at_cuptis_offsets() {
        let name = std::ffi::CString::new("ampere_bf16_gemm").unwrap();
        let mut kernel = [0u8; 160];
        kernel[0..4].copy_from_slice(&KIND_CONCURRENT_KERNEL.to_le_bytes());
        kernel[16..24].copy_from_slice(&1000u64.to_le_bytes());
        kernel[24..32].copy_from_slice(&1500u64.to_le_bytes());
        kernel[40..44].copy_from_slice(&2u32.to_le_bytes());
        kernel[48..52].copy_from_slice(&7u32.to_le_bytes());
        kernel[104..112].copy_from_slice(&(name.as_ptr() as usize as u64).to_le_bytes());
        let mut memset = [0u8; 80];
        memset[0..4].copy_from_slice(&KIND_MEMSET.to_le_bytes());
        memset[16..24].copy_from_slice(&2000u64.to_le_bytes());
        memset[24..32].copy_from_slice(&2100u64.to_le_bytes());
        memset[32..36].copy_from_slice(&1u32.to_le_bytes());
        memset[40..44].copy_from_slice(&3u32.to_le_bytes());
        let mut backwards = memset;
        backwards[24..32].copy_from_slice(&1u64.to_le_bytes());
        let mut names = HashMap::new();
        // SAFETY: each buffer is as long as the record layout read.
        unsafe {
            assert_eq!(parse(kernel.as_ptr(), &mut names), Some((2, a("ampere_bf16_gemm", 1000, 1500, 7))));
            assert_eq!(parse(memset.as_ptr(), &mut names), Some((1, a("memset", 2000, 2100, 3))));
            assert_eq!(parse(backwards.as_ptr(), &mut names), None, "an end before the start");
        }
    }
}
