//! AdamW over flat fp32 buffers, and the learning-rate schedule.
//!
//! The optimizer owns one contiguous *partition* `[start, end)` of the flat parameter
//! buffer: the whole buffer in single-process training, one ZeRO-1 shard per rank when
//! distributed. It keeps fp32 master weights and Adam moments for that range only, so its
//! memory is `12 bytes x partition` and its state can be saved, sliced and resharded.

use moxin_proto::v1::{schedule_spec::Decay, OptimizerSpec, ScheduleSpec};
use tch::{Device, Kind, Tensor};

use crate::cuda::kernels::AdamWStep;

/// Elements updated per kernel sweep: bounds the scratch buffer on huge partitions.
const CHUNK: i64 = 1 << 24;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (applied to matrices only).
    pub weight_decay: f64,
}

impl From<&OptimizerSpec> for AdamWConfig {
    fn from(s: &OptimizerSpec) -> Self {
        AdamWConfig { beta1: s.beta1, beta2: s.beta2, eps: s.eps, weight_decay: s.weight_decay }
    }
}

/// Names of the saved optimizer state with one element per flat parameter element (a
/// checkpoint file holds any range of them); the step counter is saved beside them.
pub const PER_ELEMENT_STATE: [&str; 3] = ["master", "exp_avg", "exp_avg_sq"];

/// AdamW state for the partition `[start, end)` of the flat parameter buffer.
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// First element of the partition in the flat buffer.
    pub start: i64,
    /// One past the last element.
    pub end: i64,
    /// Elements `[start, decay_end)` are weight-decayed (clamped to the partition).
    decay_end: i64,
    /// fp32 master weights of the partition.
    pub master: Tensor,
    /// First moment.
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
    /// Optimizer steps taken (for bias correction).
    pub step: u64,
    scratch: Tensor,
    aliases_params: bool,
    fused: Option<std::sync::Arc<crate::cuda::kernels::Kernels>>,
}

impl AdamW {
    /// State for `params.narrow(0, start, end - start)`, starting from those values.
    /// `decay_numel` is the length of the weight-decayed prefix of the whole flat buffer.
    /// With fp32 parameters the master weights *are* that slice of the parameter buffer
    /// (no copy, no write-back); otherwise they are an fp32 copy.
    pub fn new(config: AdamWConfig, flat_params: &Tensor, start: i64, end: i64, decay_numel: i64) -> Self {
        let len = end - start;
        let device = flat_params.device();
        let slice = flat_params.narrow(0, start, len);
        let aliases_params = flat_params.kind() == Kind::Float;
        let master = if aliases_params { slice } else { slice.detach().to_kind(Kind::Float) };
        let zeros = || Tensor::zeros([len], (Kind::Float, device));
        AdamW {
            config,
            start,
            end,
            decay_end: decay_numel.clamp(start, end),
            master,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            step: 0,
            scratch: Tensor::zeros([len.min(CHUNK)], (Kind::Float, device)),
            aliases_params,
            fused: None,
        }
    }

    /// Whether the update runs as the fused CUDA kernel.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// Runs the update as one fused CUDA kernel (see [`crate::cuda::kernels`]).
    pub fn use_fused_kernel(&mut self, kernels: std::sync::Arc<crate::cuda::kernels::Kernels>) {
        self.fused = Some(kernels);
    }

    /// One AdamW step on the partition with gradient `grad` (`len()` elements, fp32 or
    /// bf16, already reduced) scaled by `grad_scale` (the clipping factor), then the
    /// partition's slice of `flat_params` is made equal to the new master weights.
    pub fn update(
        &mut self,
        grad: &Tensor,
        grad_scale: f64,
        lr: f64,
        flat_params: &Tensor,
    ) -> Result<(), crate::WorkerError> {
        let Some(kernels) = self.fused.clone() else {
            if self.update_on_host(grad, grad_scale, lr, flat_params) {
                return Ok(());
            }
            if grad_scale != 1.0 {
                let mut g = grad.shallow_clone();
                let _ = tch::no_grad(|| g.g_mul_scalar_(grad_scale));
            }
            self.step(grad, lr);
            self.write_params(flat_params);
            return Ok(());
        };
        let out = (!self.aliases_params).then(|| flat_params.narrow(0, self.start, self.len()));
        let hyper = self.next_step(lr, grad_scale);
        let decay_end = self.decay_end - self.start;
        let state = [&self.master, &self.exp_avg, &self.exp_avg_sq, grad];
        kernels.adamw_on(kernels.compute_stream(), state, out.as_ref(), decay_end, hyper, None)
    }

    /// As [`AdamW::update`] with the fused kernel, launched range by range on `stream`;
    /// `ranges` (offsets within the partition, in the order to update them: the forward's,
    /// not the buffer's, as the norm gains at the buffer's end come first; each with an optional cap on the
    /// kernel's thread blocks) tile it, and `launched(i)` is called once range `i` is queued
    /// (to record an event the next forward can wait for). Returns false, having done
    /// nothing, without the fused kernel.
    pub fn update_ranges_on(
        &mut self,
        stream: &std::sync::Arc<crate::cuda::CudaStream>,
        update: (&Tensor, f64, f64, &Tensor),
        capped_ranges: &[(std::ops::Range<i64>, Option<u32>)],
        mut launched: impl FnMut(usize) -> Result<(), crate::WorkerError>,
    ) -> Result<bool, crate::WorkerError> {
        let (grad, grad_scale, lr, flat_params) = update;
        let Some(kernels) = self.fused.clone() else { return Ok(false) };
        let ranges: Vec<_> = capped_ranges.iter().map(|(r, _)| r.clone()).collect();
        if !tiles_in_any_order(&ranges, self.len()) {
            return Err(crate::WorkerError::Spec(format!(
                "optimizer ranges {ranges:?} do not tile the {}-element partition",
                self.len()
            )));
        }
        let out = (!self.aliases_params).then(|| flat_params.narrow(0, self.start, self.len()));
        let hyper = self.next_step(lr, grad_scale);
        let decay_end = self.decay_end - self.start;
        for (i, (r, max_blocks)) in capped_ranges.iter().enumerate() {
            let part = |t: &Tensor| t.narrow(0, r.start, r.end - r.start);
            let state = [&part(&self.master), &part(&self.exp_avg), &part(&self.exp_avg_sq), &part(grad)];
            let out = out.as_ref().map(part);
            let decay = (decay_end - r.start).clamp(0, r.end - r.start);
            kernels.adamw_on(stream, state, out.as_ref(), decay, hyper, *max_blocks)?;
            launched(i)?;
        }
        Ok(true)
    }

    /// Counts a step and returns its scalars (bias corrections at the new step count).
    fn next_step(&mut self, lr: f64, grad_scale: f64) -> AdamWStep {
        let c = self.config;
        self.step += 1;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        AdamWStep {
            decay: (1.0 - lr * c.weight_decay) as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            step_size: (lr / bias1) as f32,
            inv_bias2_sqrt: (1.0 / bias2_sqrt) as f32,
            grad_scale: grad_scale as f32,
        }
    }

    /// The fused update on the CPU: the same arithmetic as the CUDA kernel, in one pass over
    /// memory split across libtorch's intra-op threads, writing the bf16 model copy in the
    /// same pass (the unfused update makes about nine passes, plus the copy). Returns false,
    /// having done nothing, unless every tensor is a contiguous CPU buffer of the partition's
    /// length (fp32 state, fp32 or bf16 gradient, bf16 model copy when it is not the master).
    #[allow(unsafe_code)]
    fn update_on_host(&mut self, grad: &Tensor, grad_scale: f64, lr: f64, flat_params: &Tensor) -> bool {
        let len = self.len();
        let host = |t: &Tensor, kinds: &[Kind]| {
            t.device() == Device::Cpu && kinds.contains(&t.kind()) && t.is_contiguous() && t.numel() as i64 == len
        };
        let out = (!self.aliases_params).then(|| flat_params.narrow(0, self.start, len));
        let state = [&self.master, &self.exp_avg, &self.exp_avg_sq];
        if len == 0
            || !state.iter().all(|t| host(t, &[Kind::Float]))
            || !host(grad, &[Kind::Float, Kind::BFloat16])
            || !out.as_ref().is_none_or(|o| host(o, &[Kind::BFloat16]))
        {
            return false;
        }
        let hyper = self.next_step(lr, grad_scale);
        let decay_end = (self.decay_end - self.start) as usize;
        let n = len as usize;
        // SAFETY: each slice covers a tensor checked above to be a contiguous CPU buffer of
        // `n` elements of the slice's type (bf16 as its bit pattern, u16). They are
        // distinct memory: the master weights, the two moments and the gradient are separate
        // allocations, and the bf16 model copy exists only when the master is not the model's
        // own fp32 buffer. Nothing else touches them while the step runs (`&mut self`; the
        // caller starts the parameter all-gather after this returns).
        unsafe {
            let f32s = |t: &Tensor| std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n);
            let (p, m, v) = (f32s(&self.master), f32s(&self.exp_avg), f32s(&self.exp_avg_sq));
            let out = out.as_ref().map(|o| std::slice::from_raw_parts_mut(o.data_ptr() as *mut u16, n));
            if grad.kind() == Kind::Float {
                let g = std::slice::from_raw_parts(grad.data_ptr() as *const f32, n);
                host_adamw(HostState { p, m, v, g, out }, decay_end, hyper);
            } else {
                let g = std::slice::from_raw_parts(grad.data_ptr() as *const u16, n);
                host_adamw(HostState { p, m, v, g, out }, decay_end, hyper);
            }
        }
        true
    }

    /// Partition length.
    pub fn len(&self) -> i64 {
        self.end - self.start
    }

    /// True for an empty partition (possible when a world is larger than the model).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Device of the state.
    pub fn device(&self) -> Device {
        self.master.device()
    }

    /// One AdamW step with learning rate `lr` on the partition, given its gradient `grad`
    /// (`len()` elements, fp32 or bf16, already reduced and clipped). Updates the master
    /// weights.
    pub fn step(&mut self, grad: &Tensor, lr: f64) {
        let c = self.config;
        self.step += 1;
        let bias1 = 1.0 - c.beta1.powi(self.step as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias1;
        tch::no_grad(|| {
            if c.weight_decay > 0.0 && self.decay_end > self.start {
                let mut decayed = self.master.narrow(0, 0, self.decay_end - self.start);
                let _ = decayed.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let len = self.len();
            let mut offset = 0;
            while offset < len {
                let n = CHUNK.min(len - offset);
                let g = grad.narrow(0, offset, n);
                let g = if g.kind() == Kind::Float { g } else { g.to_kind(Kind::Float) };
                let mut m = self.exp_avg.narrow(0, offset, n);
                let mut v = self.exp_avg_sq.narrow(0, offset, n);
                let mut p = self.master.narrow(0, offset, n);
                let mut s = self.scratch.narrow(0, 0, n);
                // Eight passes over memory, no allocation (the same count as PyTorch's
                // single-tensor AdamW, plus one pass it spends on its own):
                // m = β1 m + (1-β1) g ; v = β2 v + (1-β2) g²
                let _ = m.lerp_(&g, 1.0 - c.beta1);
                let _ = g.mul_out(&s, &g);
                let _ = v.lerp_(&s, 1.0 - c.beta2);
                // p += m / d with d = -(sqrt(v) / sqrt(bias2) + eps) / step_size
                let _ = v.sqrt_out(&s);
                let _ = s.g_mul_scalar_(-1.0 / (bias2_sqrt * step_size));
                let _ = s.g_add_scalar_(-c.eps / step_size);
                let _ = p.addcdiv_(&m, &s);
                offset += n;
            }
        });
    }

    /// Sets the master weights from the partition's slice of the parameters (after they
    /// were initialised or received from rank 0; a no-op when they share memory).
    pub fn reset_master(&mut self, flat_params: &Tensor) {
        if !self.aliases_params {
            let src = flat_params.narrow(0, self.start, self.len());
            tch::no_grad(|| self.master.copy_(&src));
        }
    }

    /// Makes the partition's slice of the model's flat parameters equal the master
    /// weights (a no-op when they are the same memory).
    pub fn write_params(&self, flat_params: &Tensor) {
        if !self.aliases_params {
            let mut dst = flat_params.narrow(0, self.start, self.len());
            tch::no_grad(|| dst.copy_(&self.master));
        }
    }

    /// The partition's master weights and moments, independent of the parameter buffer
    /// (with fp32 parameters the master weights are copied out of it), to outlive this
    /// optimizer (a handover to the group's next generation).
    pub fn detached_state(&self) -> [Tensor; 3] {
        let master = if self.aliases_params { self.master.copy() } else { self.master.shallow_clone() };
        [master, self.exp_avg.shallow_clone(), self.exp_avg_sq.shallow_clone()]
    }

    /// State tensors for a checkpoint: `master`, `exp_avg`, `exp_avg_sq`, and `step`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let [master, exp_avg, exp_avg_sq] = PER_ELEMENT_STATE;
        vec![
            (master.into(), self.master.detach()),
            (exp_avg.into(), self.exp_avg.shallow_clone()),
            (exp_avg_sq.into(), self.exp_avg_sq.shallow_clone()),
            ("step".into(), Tensor::from_slice(&[self.step as i64])),
        ]
    }

    /// Restores the elements `[from, to)` of this partition (flat coordinates) from a saved
    /// partition covering `[saved_start, saved_end)`, so state saved at any world size loads
    /// at any other. Returns how many elements were restored.
    pub fn load_overlap(
        &mut self,
        saved_start: i64,
        saved_end: i64,
        tensors: &[(String, Tensor)],
    ) -> Result<i64, String> {
        let lo = self.start.max(saved_start);
        let hi = self.end.min(saved_end);
        let get = |name: &str| {
            tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t).ok_or_else(|| format!("missing tensor {name:?}"))
        };
        let step = get("step")?.int64_value(&[0]) as u64;
        if hi <= lo {
            return Ok(0);
        }
        let device = self.device();
        tch::no_grad(|| -> Result<(), String> {
            let [master, exp_avg, exp_avg_sq] = PER_ELEMENT_STATE;
            for (name, dst) in
                [(master, &mut self.master), (exp_avg, &mut self.exp_avg), (exp_avg_sq, &mut self.exp_avg_sq)]
            {
                let src = get(name)?;
                if src.size() != [saved_end - saved_start] {
                    return Err(format!("{name}: {:?} elements for range {saved_start}..{saved_end}", src.size()));
                }
                dst.narrow(0, lo - self.start, hi - lo)
                    .copy_(&src.narrow(0, lo - saved_start, hi - lo).to_device(device));
            }
            Ok(())
        })?;
        self.step = step;
        Ok(hi - lo)
    }
}

/// A gradient element as the host update reads it: fp32, or bf16 as its bit pattern.
trait HostGrad: Copy + Send + Sync {
    fn value(self) -> f32;
}

impl HostGrad for f32 {
    fn value(self) -> f32 {
        self
    }
}

impl HostGrad for u16 {
    fn value(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// fp32 → bf16 bit pattern, rounding to nearest even (as torch does; NaN stays NaN).
fn bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// The slices one host AdamW sweep reads and writes, element `i` of each belonging together.
struct HostState<'a, G> {
    p: &'a mut [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    g: &'a [G],
    /// The bf16 model copy, when it is not the master itself.
    out: Option<&'a mut [u16]>,
}

impl<'a, G: HostGrad> HostState<'a, G> {
    /// Elements `[0, n)` and `[n, len)`.
    fn split_at(self, n: usize) -> (Self, Self) {
        let (p0, p1) = self.p.split_at_mut(n);
        let (m0, m1) = self.m.split_at_mut(n);
        let (v0, v1) = self.v.split_at_mut(n);
        let (g0, g1) = self.g.split_at(n);
        let (out0, out1) = match self.out {
            Some(o) => {
                let (a, b) = o.split_at_mut(n);
                (Some(a), Some(b))
            }
            None => (None, None),
        };
        (HostState { p: p0, m: m0, v: v0, g: g0, out: out0 }, HostState { p: p1, m: m1, v: v1, g: g1, out: out1 })
    }

    /// The CUDA kernel's AdamW body (`cuda/kernels.cu`, `ADAMW_BODY`) over every element,
    /// the master weights multiplied by `decay` (one factor per call, so the loop vectorises).
    fn sweep(self, decay: f32, h: AdamWStep) {
        let element = |p: &mut f32, m: &mut f32, v: &mut f32, g: G| {
            let gi = g.value() * h.grad_scale;
            let mi = h.beta1 * *m + (1.0 - h.beta1) * gi;
            let vi = h.beta2 * *v + (1.0 - h.beta2) * gi * gi;
            *m = mi;
            *v = vi;
            *p = *p * decay - h.step_size * mi / (vi.sqrt() * h.inv_bias2_sqrt + h.eps);
            *p
        };
        let rows = self.p.iter_mut().zip(self.m.iter_mut()).zip(self.v.iter_mut()).zip(self.g.iter().copied());
        match self.out {
            Some(out) => {
                for ((((p, m), v), g), o) in rows.zip(out.iter_mut()) {
                    *o = bf16_bits(element(p, m, v, g));
                }
            }
            None => {
                for (((p, m), v), g) in rows {
                    element(p, m, v, g);
                }
            }
        }
    }
}

/// One AdamW step over `state`, its first `decay_end` elements weight-decayed, in
/// contiguous pieces on libtorch's intra-op thread count.
fn host_adamw<G: HostGrad>(mut state: HostState<'_, G>, decay_end: usize, h: AdamWStep) {
    // Below this many elements a thread costs more than it saves.
    const PIECE_MIN: usize = 1 << 16;
    let len = state.p.len();
    let threads = (tch::get_num_threads().max(1) as usize).min(len.div_ceil(PIECE_MIN)).max(1);
    let piece = len.div_ceil(threads);
    std::thread::scope(|scope| {
        let mut start = 0;
        while start < len {
            let (mine, rest) = state.split_at(piece.min(len - start));
            state = rest;
            let decayed = decay_end.saturating_sub(start).min(mine.p.len());
            let work = move || {
                let (decayed_part, plain_part) = mine.split_at(decayed);
                decayed_part.sweep(h.decay, h);
                plain_part.sweep(1.0, h);
            };
            start += piece;
            if start >= len {
                work();
            } else {
                scope.spawn(work);
            }
        }
    });
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup to `lr`
/// over `warmup_steps`, then cosine / linear decay to `min_lr_ratio * lr`, or constant.
pub fn learning_rate(spec: &ScheduleSpec, lr: f64, step: u64, total: u64) -> f64 {
    let min_lr = lr * spec.min_lr_ratio;
    if step < spec.warmup_steps {
        return lr * (step + 1) as f64 / spec.warmup_steps as f64;
    }
    let decay_steps = total.saturating_sub(spec.warmup_steps).max(1);
    let progress = ((step - spec.warmup_steps) as f64 / decay_steps as f64).min(1.0);
    match spec.decay() {
        Decay::Cosine => min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        Decay::Linear => lr - (lr - min_lr) * progress,
        Decay::Constant | Decay::Unspecified => lr,
    }
}

/// Scales `grad` in place so its L2 norm is at most `max_norm` (if `max_norm > 0`), given
/// its norm. Returns the factor applied.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Whether `ranges`, taken in any order, cover `0..len` exactly once.
fn tiles_in_any_order(ranges: &[std::ops::Range<i64>], len: i64) -> bool {
    let mut sorted = ranges.to_vec();
    sorted.sort_by_key(|r| r.start);
    sorted.iter().all(|r| r.start < r.end)
        && sorted.first().map_or(0, |r| r.start) == 0
        && sorted.windows(2).all(|w| w[0].end == w[1].start)
        && sorted.last().map_or(0, |r| r.end) == len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(warmup: u64, decay: Decay) -> ScheduleSpec {
        ScheduleSpec { warmup_steps: warmup, decay: decay as i32, min_lr_ratio: 0.1 }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = spec(10, Decay::Cosine);
        assert!((learning_rate(&s, 1.0, 0, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&s, 1.0, 9, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&s, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&s, 1.0, 55, 100) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&s, 1.0, 100, 100) - 0.1).abs() < 1e-12);
        let l = spec(0, Decay::Linear);
        assert!((learning_rate(&l, 2.0, 50, 100) - 1.1).abs() < 1e-12);
        assert_eq!(learning_rate(&spec(0, Decay::Constant), 2.0, 70, 100), 2.0);
    }

    /// The fused host update (what `update` runs on the CPU) against the unfused one, over a
    /// partition large enough to be split across threads, with the decayed prefix ending
    /// inside a piece: fp32 parameters (the master is the model's buffer) and bf16
    /// parameters with an fp32 or bf16 gradient (the model's copy written in the same pass,
    /// bit for bit the master rounded to bf16).
    #[test]
    fn fused_host_update_matches_the_unfused_one() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let n = 300_001;
        tch::manual_seed(3);
        let init = Tensor::randn([n], (Kind::Float, Device::Cpu));
        for (param_kind, grad_kind) in
            [(Kind::Float, Kind::Float), (Kind::BFloat16, Kind::Float), (Kind::BFloat16, Kind::BFloat16)]
        {
            let fused_params = init.to_kind(param_kind);
            let plain_params = init.to_kind(param_kind);
            let mut fused = AdamW::new(cfg, &fused_params, 1, n, 123_457);
            let mut plain = AdamW::new(cfg, &plain_params, 1, n, 123_457);
            for step in 1..=3 {
                let grad = Tensor::randn([n - 1], (Kind::Float, Device::Cpu)).to_kind(grad_kind);
                let (scale, lr) = (0.5, 1e-2 * step as f64);
                fused.update(&grad, scale, lr, &fused_params).unwrap();
                plain.step(&(grad.to_kind(Kind::Float) * scale), lr);
                plain.write_params(&plain_params);
            }
            let label = format!("{param_kind:?} parameters, {grad_kind:?} gradient");
            for (a, b) in [
                (&fused.master, &plain.master),
                (&fused.exp_avg, &plain.exp_avg),
                (&fused.exp_avg_sq, &plain.exp_avg_sq),
            ] {
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "{label}: state differs by {diff}");
            }
            let copy = fused_params.narrow(0, 1, n - 1);
            assert!(copy.equal(&fused.master.to_kind(param_kind)), "{label}: the model's copy is the master");
            assert!(fused_params.get(0).equal(&init.to_kind(param_kind).get(0)), "{label}: outside the partition");
        }
    }

    /// Our flat AdamW against the textbook formulas, element by element, including the
    /// decay / no-decay split and chunking.
    #[test]
    fn update_ranges_tile_the_partition_in_any_order() {
        // The forward's order: the norm gains (the buffer's end) first, then the matrices.
        assert!(tiles_in_any_order(&[90..100, 0..40, 40..90], 100));
        assert!(tiles_in_any_order(&[0..60, 60..100], 100));
        assert!(!tiles_in_any_order(&[90..100, 0..40], 100), "a gap");
        assert!(!tiles_in_any_order(&[0..50, 40..100], 100), "an overlap");
        assert!(!tiles_in_any_order(&[0..100, 100..100], 100), "an empty range");
        assert!(!tiles_in_any_order(&[0..50, 50..90], 100), "short of the end");
    }

    #[test]
    fn adamw_matches_reference_formula() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        tch::manual_seed(0);
        let p0 = Tensor::randn([10], (Kind::Float, Device::Cpu));
        let mut opt = AdamW::new(cfg, &p0, 2, 9, 5);
        let (mut p, mut m, mut v): (Vec<f64>, Vec<f64>, Vec<f64>) =
            ((2..9).map(|i| p0.double_value(&[i])).collect(), vec![0.0; 7], vec![0.0; 7]);
        for step in 1..=3 {
            let g = Tensor::randn([7], (Kind::Float, Device::Cpu));
            let lr = 0.01 * step as f64;
            opt.step(&g, lr);
            for i in 0..7 {
                let gi = g.double_value(&[i as i64]);
                if i + 2 < 5 {
                    p[i] *= 1.0 - lr * cfg.weight_decay;
                }
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * gi;
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * gi * gi;
                let mh = m[i] / (1.0 - cfg.beta1.powi(step));
                let vh = v[i] / (1.0 - cfg.beta2.powi(step));
                p[i] -= lr * mh / (vh.sqrt() + cfg.eps);
            }
        }
        for (i, want) in p.iter().enumerate() {
            let got = opt.master.double_value(&[i as i64]);
            assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "elem {i}: {got} vs {want}");
        }
    }
}
