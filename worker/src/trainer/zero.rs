//! ZeRO-1 over a [`Collective`]: the gradient-sync and optimizer-sharding strategy.
//!
//! Gradients accumulate (over micro-batches) into one flat buffer in the parameters'
//! layout. On the step's last micro-batch, as soon as backward has produced every leaf of
//! a *bucket* (a contiguous run of the flat buffer), its reduce-scatter starts, so it
//! overlaps the rest of backward; each rank ends up with the summed gradient of its own
//! partition. Then: the global gradient norm (one all-reduce of three numbers, which also
//! carries the loss and the stop flag), clipping, AdamW on the rank's partition (fp32
//! master weights and moments), and all-gathers of the updated parameters — one per
//! forward stage (norms and embedding, each block, the head), started at the end of the
//! step and waited for only when the next forward reaches that stage, so they overlap the
//! next step's computation.
//!
//! Buckets follow backward's order: the matrices form the weight-decayed prefix of the
//! flat buffer in model order, so backward produces it back to front (head, last block, …,
//! embedding) and buckets are cut from the end at leaf boundaries; the norm gains (a few
//! thousand numbers after the matrices) and the padding go last.

use std::ops::Range;

use moxin_layout::FlatLayout;
use tch::{Kind, Tensor};

use super::grads::FlatGrads;
use super::profile::PhaseClock;
use super::step::GradSink;
use crate::collective::{clip_ranges, Collective, CollectiveError, OpTime, ReduceOp, Work};
use crate::optim::{clip_factor, AdamW};
use crate::WorkerError;

/// A bucket's reduce-scatter starts once it holds at least this many elements (or at a
/// stage boundary that ends the buffer).
const BUCKET_ELEMENTS: i64 = 1 << 24;

/// Communication of one step.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommTimes {
    /// Time the collectives ran.
    pub busy_s: f64,
    /// Time the step waited for them (not hidden behind computation).
    pub exposed_s: f64,
}

impl CommTimes {
    fn add(&mut self, t: OpTime) {
        self.busy_s += t.busy_s;
        self.exposed_s += t.exposed_s;
    }
}

/// What the group agreed on at the end of a step.
#[derive(Debug, Clone, Copy)]
pub struct StepSync {
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    /// The step's loss over all ranks.
    pub loss: f64,
    /// Some rank was asked to stop.
    pub stop: bool,
    /// Some rank asked for a checkpoint after this step (its clock says one is due).
    pub checkpoint: bool,
    /// Some rank asked to stop for the group's next generation, handing the state over in
    /// memory (a stop takes precedence).
    pub handover: bool,
    /// Collective times.
    pub comm: CommTimes,
}

/// What this rank asks the group for at the end of a step; any rank's vote carries.
#[derive(Debug, Default, Clone, Copy)]
pub struct Votes {
    /// Stop (with a checkpoint) at this step.
    pub stop: bool,
    /// Checkpoint at this step.
    pub checkpoint: bool,
    /// Stop at this step for the group's next generation (state handed over in memory).
    pub handover: bool,
}

struct Bucket {
    range: Range<i64>,
    /// Leaves still to finish in the current micro-batch.
    remaining: usize,
    leaves: usize,
}

/// ZeRO-1 gradient sync and sharded AdamW for one rank.
pub struct Zero1 {
    collective: Box<dyn Collective>,
    partitions: Vec<Range<usize>>,
    /// This rank's partition clamped to the real parameters.
    own: Range<i64>,
    grads: FlatGrads,
    buckets: Vec<Bucket>,
    leaf_bucket: Vec<usize>,
    last_micro: bool,
    in_flight: Vec<Work>,
    /// Parameter all-gathers in flight, in forward order: (stage, work).
    gathers: std::collections::VecDeque<(usize, Work)>,
    /// Flat ranges of the parameters each forward stage needs first, in stage order.
    gather_plan: Vec<(usize, Range<i64>)>,
    comm: CommTimes,
    /// AdamW over the partition.
    pub opt: AdamW,
    /// With `runtime.optimizer_stream`: AdamW runs stage by stage on a side stream.
    opt_stream: Option<OptimizerStream>,
}

/// AdamW on a CUDA stream of its own (`runtime.optimizer_stream`, one GPU): the update runs
/// stage by stage in forward order, each stage recording an event, and the next forward
/// makes torch's stream wait only for its own stage's event, so the rest of the update runs
/// beside the next forward instead of before it.
struct OptimizerStream {
    kernels: std::sync::Arc<crate::cuda::kernels::Kernels>,
    side: std::sync::Arc<crate::cuda::CudaStream>,
    /// Stage updates queued on `side` that torch's stream has not been told to wait for.
    pending: std::collections::VecDeque<(usize, crate::cuda::CudaEvent)>,
}

impl Drop for OptimizerStream {
    fn drop(&mut self) {
        // The update writes tensors whose memory torch may hand out again once they are
        // dropped; let it finish first (an error here has nowhere to go but the log).
        if let Err(e) = self.side.synchronize() {
            tracing::warn!("waiting for the optimizer stream: {e:?}");
        }
    }
}

impl Zero1 {
    /// The strategy for `collective`'s rank over `partitions` (tiling the padded flat
    /// buffer `params`), with gradients kept as `grad_kind`.
    pub fn new(
        collective: Box<dyn Collective>,
        partitions: Vec<Range<usize>>,
        layout: &FlatLayout,
        params: &Tensor,
        grad_kind: Kind,
        opt_config: crate::optim::AdamWConfig,
    ) -> Result<Self, WorkerError> {
        let padded = params.size()[0];
        let world = collective.world_size();
        let covered = partitions.last().map_or(0, |r| r.end) as i64;
        if partitions.len() != world || covered != padded || padded < layout.numel {
            return Err(WorkerError::Spec(format!(
                "partitions {partitions:?} do not tile the {padded}-element parameter buffer ({} parameters) over {world} ranks",
                layout.numel
            )));
        }
        let mine = &partitions[collective.rank()];
        let own = (mine.start as i64).min(layout.numel)..(mine.end as i64).min(layout.numel);
        let opt = AdamW::new(opt_config, params, own.start, own.end, layout.decay_numel);
        let grads = FlatGrads::new(layout, padded, grad_kind, params.device());
        let (buckets, leaf_bucket) = plan_buckets(layout, padded);
        let gather_plan = plan_gathers(layout, padded);
        Ok(Zero1 {
            gathers: Default::default(),
            gather_plan,
            collective,
            partitions,
            own,
            grads,
            buckets,
            leaf_bucket,
            last_micro: false,
            in_flight: Vec::new(),
            comm: CommTimes::default(),
            opt,
            opt_stream: None,
        })
    }

    /// Runs AdamW on a side stream of `kernels`' device, stage by stage (see
    /// [`OptimizerStream`]). Only for a group of one with the fused AdamW: with more ranks the
    /// all-gathers would have to wait for the side stream too. Returns whether it is on.
    pub fn use_optimizer_stream(
        &mut self,
        kernels: std::sync::Arc<crate::cuda::kernels::Kernels>,
    ) -> Result<bool, WorkerError> {
        if self.collective.world_size() != 1 || !self.opt.is_fused() {
            return Ok(false);
        }
        let side = kernels.new_side_stream()?;
        self.opt_stream = Some(OptimizerStream { kernels, side, pending: Default::default() });
        Ok(true)
    }

    /// Makes torch's stream wait for the side stream's updates of every stage up to `stage`
    /// (a wait queued on the GPU; the CPU goes on).
    fn wait_updates(&mut self, stage: usize) -> Result<(), WorkerError> {
        let Some(os) = &mut self.opt_stream else { return Ok(()) };
        while os.pending.front().is_some_and(|(s, _)| *s <= stage) {
            let (_, event) = os.pending.pop_front().expect("front exists");
            os.kernels.compute_stream().wait(&event).map_err(|e| WorkerError::Device(format!("{e:?}")))?;
        }
        Ok(())
    }

    /// AdamW stage by stage on the side stream, after everything queued on torch's stream
    /// (the gradients). Returns false when there is no side stream.
    fn update_on_side_stream(
        &mut self,
        own: &Tensor,
        scale: f64,
        lr: f64,
        params: &Tensor,
    ) -> Result<bool, WorkerError> {
        let Some(os) = &mut self.opt_stream else { return Ok(false) };
        let device = |e: cudarc::driver::DriverError| WorkerError::Device(format!("optimizer stream: {e:?}"));
        let ready = os.kernels.compute_stream().record_event(None).map_err(device)?;
        os.side.wait(&ready).map_err(device)?;
        // The stages' ranges within the partition, in forward order (they tile it). The
        // first stage is needed as soon as the next forward starts: it takes every SM; the
        // rest run on a quarter of the SMs beside the forward (`Kernels::side_stream_blocks`).
        let beside = os.kernels.side_stream_blocks();
        let mut stages = Vec::new();
        let mut ranges = Vec::new();
        for (stage, r) in &self.gather_plan {
            let (start, end) = (r.start.max(self.own.start), r.end.min(self.own.end));
            if start < end {
                stages.push(*stage);
                ranges.push((start - self.own.start..end - self.own.start, (*stage > 0).then_some(beside)));
            }
        }
        let side = os.side.clone();
        let mut events = Vec::with_capacity(ranges.len());
        let on = self.opt.update_ranges_on(&side, (own, scale, lr, params), &ranges, |i| {
            events.push((stages[i], side.record_event(None).map_err(device)?));
            Ok(())
        })?;
        os.pending.extend(events);
        Ok(on)
    }

    /// The collective (for broadcasts and barriers outside the step).
    pub fn collective(&mut self) -> &mut dyn Collective {
        self.collective.as_mut()
    }

    /// The collective and the optimizer, borrowed together (checkpoints and handovers need both).
    pub fn collective_and_optimizer(&mut self) -> (&mut dyn Collective, &mut crate::optim::AdamW) {
        (self.collective.as_mut(), &mut self.opt)
    }

    /// Every rank's partition.
    pub fn partitions(&self) -> &[Range<usize>] {
        &self.partitions
    }

    /// Starts micro-batch `index` of `count` in this step.
    pub fn begin_micro_batch(&mut self, index: usize, count: usize) {
        if index == 0 {
            self.grads.begin_step();
            self.comm = CommTimes::default();
        }
        self.last_micro = index + 1 == count;
        for b in &mut self.buckets {
            b.remaining = b.leaves;
        }
    }

    fn launch(&mut self, bucket: usize) -> Result<(), WorkerError> {
        let r = self.buckets[bucket].range.clone();
        let window = r.start as usize..r.end as usize;
        let ranges = clip_ranges(&self.partitions, window);
        let buf = self.grads.buffer().narrow(0, r.start, r.end - r.start);
        let work = self.collective.reduce_scatter(&buf, &ranges, ReduceOp::Sum).map_err(comm_error)?;
        self.in_flight.push(work);
        Ok(())
    }

    fn wait_in_flight(&mut self) -> Result<(), WorkerError> {
        for work in std::mem::take(&mut self.in_flight) {
            let t = work.wait().map_err(comm_error)?;
            self.comm.add(t);
        }
        Ok(())
    }

    /// Ends the step: waits for the buckets, agrees on the global gradient norm, the loss
    /// (`local_loss`, this rank's share) and the `votes` (any rank's vote carries, so all
    /// ranks act at the same step), clips, runs AdamW with `lr` on this rank's partition
    /// and all-gathers the parameters `params`. `clock` times the phases `grad_norm` (the
    /// buckets, the norm and the agreement) and `optimizer` (AdamW, the all-gathers started).
    pub fn finish(
        &mut self,
        params: &Tensor,
        local_loss: &Tensor,
        votes: Votes,
        lr: f64,
        grad_clip: f64,
        clock: &mut PhaseClock,
    ) -> Result<StepSync, WorkerError> {
        tch::no_grad(|| -> Result<StepSync, WorkerError> {
            self.grads.zero_unwritten();
            self.wait_in_flight()?;
            let own = self.grads.buffer().narrow(0, self.own.start, self.own.end - self.own.start);
            let sq_norm = if own.numel() == 0 {
                Tensor::zeros([], (Kind::Float, own.device()))
            } else {
                own.norm_scalaropt_dtype(2, Kind::Float).square()
            };
            // A fill on the device, not a copy from the host: a host-to-device copy of
            // pageable memory waits for the device to finish everything queued.
            let flag = |b: bool| Tensor::full([], f64::from(u8::from(b)), (Kind::Float, own.device()));
            let stats = Tensor::stack(
                &[
                    sq_norm,
                    local_loss.to_kind(Kind::Float),
                    flag(votes.stop),
                    flag(votes.checkpoint),
                    flag(votes.handover),
                ],
                0,
            );
            let t =
                self.collective.all_reduce(&stats, ReduceOp::Sum).map_err(comm_error)?.wait().map_err(comm_error)?;
            self.comm.add(t);
            let stats = Vec::<f64>::try_from(stats.to_kind(Kind::Double).to_device(tch::Device::Cpu))
                .map_err(|e| WorkerError::Spec(format!("reading step statistics: {e}")))?;
            let (grad_norm, loss, stop, checkpoint, handover) =
                (stats[0].max(0.0).sqrt(), stats[1], stats[2] > 0.0, stats[3] > 0.0, stats[4] > 0.0);
            let synced = |comm| StepSync { grad_norm, loss, stop, checkpoint, handover, comm };
            clock.lap("grad_norm");
            if !loss.is_finite() {
                return Ok(synced(self.comm));
            }
            let scale = clip_factor(grad_norm, grad_clip);
            if self.update_on_side_stream(&own, scale, lr, params)? {
                // A group of one: nothing to gather.
                clock.lap("optimizer");
                return Ok(synced(self.comm));
            }
            self.opt.update(&own, scale, lr, params)?;
            for (stage, r) in self.gather_plan.clone() {
                let window = r.start as usize..r.end as usize;
                let ranges = clip_ranges(&self.partitions, window);
                let view = params.narrow(0, r.start, r.end - r.start);
                let work = self.collective.all_gather(&view, &ranges).map_err(comm_error)?;
                self.gathers.push_back((stage, work));
            }
            if !self.collective.overlaps_autograd(params) {
                // Completing them during the next forward would invalidate its graph.
                self.wait_params()?;
            }
            clock.lap("optimizer");
            Ok(synced(self.comm))
        })
    }

    /// Waits for every parameter all-gather in flight (before parameters are read as a
    /// whole: checkpoints, the end of a run).
    pub fn wait_params(&mut self) -> Result<(), WorkerError> {
        self.wait_updates(usize::MAX)?;
        self.wait_gathers(usize::MAX)
    }

    fn wait_gathers(&mut self, stage: usize) -> Result<(), WorkerError> {
        while self.gathers.front().is_some_and(|(s, _)| *s <= stage) {
            let (_, work) = self.gathers.pop_front().expect("front exists");
            let t = work.wait().map_err(comm_error)?;
            self.comm.add(t);
        }
        Ok(())
    }
}

impl GradSink for Zero1 {
    fn params_ready(&mut self, stage: usize) -> Result<(), WorkerError> {
        self.wait_updates(stage)?;
        self.wait_gathers(stage)
    }

    fn add(&mut self, leaf: usize, grad: &Tensor) -> Result<(), WorkerError> {
        self.grads.add(leaf, grad);
        Ok(())
    }

    fn add_product(&mut self, leaf: usize, a: &Tensor, b: &Tensor) -> Result<(), WorkerError> {
        self.grads.add_product(leaf, a, b)
    }

    fn add_product_rows(&mut self, leaf: usize, parts: &[Tensor], b: &Tensor) -> Result<(), WorkerError> {
        self.grads.add_product_rows(leaf, parts, b)
    }

    fn region(&mut self, leaf: usize) -> Tensor {
        self.grads.region(leaf)
    }

    fn done(&mut self, leaf: usize) -> Result<(), WorkerError> {
        let b = self.leaf_bucket[leaf];
        self.buckets[b].remaining -= 1;
        if self.last_micro && self.buckets[b].remaining == 0 {
            self.launch(b)?;
        }
        Ok(())
    }
}

/// The flat ranges each forward stage needs, in stage order: stage 0 the norm gains (and
/// padding, at the end of the buffer) and the embedding; stage `1 + i` block `i`'s
/// matrices; stage `layers + 1` the head. Together they tile `0..padded`.
fn plan_gathers(layout: &FlatLayout, padded: i64) -> Vec<(usize, Range<i64>)> {
    let layers = layout.leaves.iter().filter_map(|l| l.layer).max().map_or(0, |m| m as usize + 1);
    let stage_of = |l: &moxin_layout::LeafSlot| match l.layer {
        _ if l.offset >= layout.decay_numel => 0,
        Some(i) => 1 + i as usize,
        None if l.name == "lm_head.weight" => layers + 1,
        None => 0,
    };
    let mut plan = Vec::new();
    if layout.decay_numel < padded {
        plan.push((0, layout.decay_numel..padded));
    }
    for stage in 0..=layers + 1 {
        let leaves = (0..layout.leaves.len()).filter(|&i| {
            let l = &layout.leaves[i];
            l.offset < layout.decay_numel && stage_of(l) == stage
        });
        plan.extend(layout.ranges_of(leaves).into_iter().map(|r| (stage, r)));
    }
    plan
}

/// Cuts the flat buffer into buckets in backward order; returns them and each leaf's bucket.
fn plan_buckets(layout: &FlatLayout, padded: i64) -> (Vec<Bucket>, Vec<usize>) {
    // Matrices (the decayed prefix) back to front, cut at leaf boundaries.
    let mut matrices: Vec<usize> =
        (0..layout.leaves.len()).filter(|&i| layout.leaves[i].offset < layout.decay_numel).collect();
    matrices.sort_by_key(|&i| std::cmp::Reverse(layout.leaves[i].offset));
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut leaf_bucket = vec![0; layout.leaves.len()];
    let mut current: Option<Bucket> = None;
    for i in matrices {
        let l = &layout.leaves[i];
        let b =
            current.get_or_insert(Bucket { range: l.offset + l.numel..l.offset + l.numel, remaining: 0, leaves: 0 });
        b.range.start = l.offset;
        b.leaves += 1;
        leaf_bucket[i] = buckets.len();
        if b.range.end - b.range.start >= BUCKET_ELEMENTS {
            buckets.push(current.take().expect("bucket"));
        }
    }
    buckets.extend(current.take());
    // Norm gains and padding.
    let rest: Vec<usize> =
        (0..layout.leaves.len()).filter(|&i| layout.leaves[i].offset >= layout.decay_numel).collect();
    if layout.decay_numel < padded {
        for &i in &rest {
            leaf_bucket[i] = buckets.len();
        }
        buckets.push(Bucket { range: layout.decay_numel..padded, remaining: 0, leaves: rest.len() });
    }
    (buckets, leaf_bucket)
}

fn comm_error(e: CollectiveError) -> WorkerError {
    WorkerError::Collective(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_buffer_in_backward_order() {
        let shape = moxin_layout::ModelShape {
            vocab_size: 1000,
            dim: 64,
            n_layers: 3,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 128,
            max_seq_len: 64,
            sliding_window: 64,
            rope_theta: 1e4,
            norm_eps: 1e-5,
            init_std: 0.02,
        };
        let layout = FlatLayout::of(&shape);
        let padded = layout.numel + 37;
        let (buckets, leaf_bucket) = plan_buckets(&layout, padded);
        // Together they tile [0, padded); each leaf lies inside its bucket.
        let mut ranges: Vec<_> = buckets.iter().map(|b| b.range.clone()).collect();
        ranges.sort_by_key(|r| r.start);
        assert_eq!(ranges.first().unwrap().start, 0);
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(ranges.last().unwrap().end, padded);
        for (i, l) in layout.leaves.iter().enumerate() {
            let r = &buckets[leaf_bucket[i]].range;
            assert!(r.start <= l.offset && l.offset + l.numel <= r.end, "{}", l.name);
        }
        assert_eq!(buckets.iter().map(|b| b.leaves).sum::<usize>(), layout.leaves.len());
        // The head's bucket comes first, the embedding's after every block's, norms last.
        let head = layout.leaves.iter().position(|l| l.name == "lm_head.weight").unwrap();
        let embed = layout.leaves.iter().position(|l| l.name == "model.embed_tokens.weight").unwrap();
        assert_eq!(leaf_bucket[head], 0);
        assert!(leaf_bucket[embed] >= leaf_bucket[head]);
        assert_eq!(buckets.last().unwrap().range.start, layout.decay_numel);

        // The all-gather plan tiles the buffer too, in forward order.
        let gathers = plan_gathers(&layout, padded);
        let mut ranges: Vec<_> = gathers.iter().map(|(_, r)| r.clone()).collect();
        ranges.sort_by_key(|r| r.start);
        assert_eq!(ranges.first().unwrap().start, 0);
        assert!(ranges.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(ranges.last().unwrap().end, padded);
        assert!(gathers.windows(2).all(|w| w[0].0 <= w[1].0), "stage order");
        let stage_of_offset = |o: i64| gathers.iter().find(|(_, r)| r.contains(&o)).unwrap().0;
        let leaf = |n: &str| layout.leaf(n).unwrap().offset;
        assert_eq!(stage_of_offset(leaf("model.embed_tokens.weight")), 0);
        assert_eq!(stage_of_offset(leaf("model.layers.2.input_layernorm.weight")), 0);
        assert_eq!(stage_of_offset(leaf("model.layers.1.mlp.gate_up")), 2);
        assert_eq!(stage_of_offset(leaf("lm_head.weight")), 4);
    }
}
