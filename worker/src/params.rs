//! Parameters as views into one flat buffer.
//!
//! Every parameter tensor is a view of a single contiguous buffer, in a fixed order that is
//! identical on every rank: first the matrices (which get weight decay), then the vectors
//! (RMSNorm gains, which do not). Parameters used together (q/k/v, gate/up) sit back to back
//! and form one autograd leaf, so the model multiplies by them in one GEMM. So the optimizer works on flat buffers and a ZeRO-1 rank
//! updates a contiguous slice, and the weight-decay region is one range, `0..decay_numel`.

use tch::{Device, Kind, Tensor};

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, std).
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// All ones (norm gains).
    Ones,
}

/// Declaration of one parameter, in model order.
#[derive(Debug, Clone)]
pub struct ParamDecl {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape (`[out, in]` for linear weights).
    pub shape: Vec<i64>,
    /// Initialisation.
    pub init: Init,
    /// Position in the model's declaration order (initialisation and export order).
    pub order: usize,
}

impl ParamDecl {
    /// Elements.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Matrices get weight decay; vectors (norm gains) do not.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

/// One named parameter (an HF tensor): its declaration, where it sits in the flat buffer,
/// and a view of it. Gradients flow through the view to its group's leaf.
#[derive(Debug)]
pub struct Param {
    /// Declaration.
    pub decl: ParamDecl,
    /// First element in the flat buffer.
    pub offset: i64,
    /// The view (differentiable; for a one-member group it is the leaf itself).
    pub tensor: Tensor,
}

/// Parameters stored back to back and used as one autograd leaf: e.g. a layer's q, k and v
/// projections form one `[q + k + v, dim]` matrix, so attention does one wide GEMM instead
/// of three narrow ones (same for the MLP's gate and up projections). Members are
/// `[out, in]` matrices with the same `in`, so their concatenation along rows is exactly
/// their contiguous memory.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// Name of the fused leaf (its single member's name for one-member groups).
    pub name: String,
    /// Members in order.
    pub members: Vec<ParamDecl>,
}

impl ParamGroup {
    /// A group of one.
    pub fn single(decl: ParamDecl) -> Self {
        ParamGroup { name: decl.name.clone(), members: vec![decl] }
    }

    fn numel(&self) -> i64 {
        self.members.iter().map(ParamDecl::numel).sum()
    }

    fn decays(&self) -> bool {
        self.members[0].decays()
    }
}

/// An autograd leaf: a view of the flat buffer that requires grad.
#[derive(Debug)]
struct Leaf {
    name: String,
    offset: i64,
    numel: i64,
    tensor: Tensor,
}

/// All parameters of a model, backed by one flat buffer.
#[derive(Debug)]
pub struct ParamStore {
    flat: Tensor,
    /// Named parameters in declaration order.
    params: Vec<Param>,
    leaves: Vec<Leaf>,
    decay_numel: i64,
}

impl ParamStore {
    /// Allocates the flat buffer for `groups` (zeros): weight-decayed groups first, then
    /// the others, each in declaration order. The buffer has at least `min_len` elements
    /// (padding at the end, viewed by no parameter), so ZeRO-1 partitions of equal size
    /// can tile it.
    pub fn new(groups: Vec<ParamGroup>, kind: Kind, device: Device, min_len: i64) -> Self {
        let total: i64 = groups.iter().map(ParamGroup::numel).sum();
        let flat = Tensor::zeros([total.max(min_len)], (kind, device));
        let decay_numel: i64 = groups.iter().filter(|g| g.decays()).map(ParamGroup::numel).sum();
        let (mut next_decay, mut next_plain) = (0i64, decay_numel);
        let mut params = Vec::new();
        let mut leaves = Vec::new();
        for group in groups {
            let slot = if group.decays() { &mut next_decay } else { &mut next_plain };
            let offset = *slot;
            *slot += group.numel();
            let first = &group.members[0];
            let leaf_shape: Vec<i64> = if group.members.len() == 1 {
                first.shape.clone()
            } else {
                let rows = group.members.iter().map(|m| m.shape[0]).sum();
                [vec![rows], first.shape[1..].to_vec()].concat()
            };
            let leaf = flat.narrow(0, offset, group.numel()).view(leaf_shape.as_slice()).set_requires_grad(true);
            let (mut row, mut member_offset) = (0i64, offset);
            for decl in group.members {
                let tensor =
                    if leaf_shape == decl.shape { leaf.shallow_clone() } else { leaf.narrow(0, row, decl.shape[0]) };
                row += decl.shape[0];
                let numel = decl.numel();
                params.push(Param { decl, offset: member_offset, tensor });
                member_offset += numel;
            }
            leaves.push(Leaf { name: group.name, offset, numel: member_offset - offset, tensor: leaf });
        }
        params.sort_by_key(|p| p.decl.order);
        ParamStore { flat, params, leaves, decay_numel }
    }

    /// Seeds torch's global RNG with `seed` and initialises every parameter in declaration
    /// order. Holds a process-wide lock so concurrent initialisations (several ranks in one
    /// process) cannot interleave their draws.
    pub fn initialise(&mut self, seed: u64) {
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed as i64);
        tch::no_grad(|| {
            for p in &mut self.params {
                match p.decl.init {
                    Init::Normal { std } => {
                        let _ = p.tensor.normal_(0.0, std);
                    }
                    Init::Ones => {
                        let _ = p.tensor.fill_(1.0);
                    }
                }
            }
        });
    }

    /// The flat buffer all parameters view.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// Parameter elements (the flat buffer may be longer by padding).
    pub fn numel(&self) -> i64 {
        self.params.iter().map(|p| p.decl.numel()).sum()
    }

    /// `0..decay_numel` of the flat buffer is weight-decayed.
    pub fn decay_numel(&self) -> i64 {
        self.decay_numel
    }

    /// Named parameters in declaration order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The view of parameter `name`.
    pub fn get(&self, name: &str) -> &Tensor {
        &self.params.iter().find(|p| p.decl.name == name).unwrap_or_else(|| panic!("no parameter {name}")).tensor
    }

    /// The autograd leaf of group `name` (a fused matrix, or a single parameter).
    pub fn leaf(&self, name: &str) -> &Tensor {
        &self.leaves.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("no parameter group {name}")).tensor
    }

    /// Backpropagates `loss` and writes the gradient of every leaf into `flat_grad` (same
    /// layout as the flat buffer), adding to what is there if `accumulate`. Gradients never
    /// touch `param.grad`: they go straight from autograd into the flat buffer, which saves
    /// the accumulate, copy and zeroing passes of the usual `.grad` round trip.
    pub fn backward_into(&self, loss: &Tensor, flat_grad: &mut Tensor, accumulate: bool) {
        let leaves: Vec<&Tensor> = self.leaves.iter().map(|l| &l.tensor).collect();
        let grads = Tensor::run_backward(&[loss], &leaves, false, false);
        tch::no_grad(|| {
            for (leaf, g) in self.leaves.iter().zip(grads) {
                let mut dst = flat_grad.narrow(0, leaf.offset, leaf.numel);
                match (g.defined(), accumulate) {
                    (true, false) => dst.copy_(&g.view([-1])),
                    (true, true) => {
                        let _ = dst.g_add_(&g.view([-1]));
                    }
                    (false, false) => {
                        let _ = dst.zero_();
                    }
                    (false, true) => {}
                }
            }
        });
    }

    /// `(name, contiguous tensor)` pairs in declaration order, for safetensors.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.params.iter().map(|p| (p.decl.name.clone(), p.tensor.detach())).collect()
    }

    /// Overwrites parameters from `(name, tensor)` pairs (a safetensors file). Every
    /// parameter must be present with the right shape; dtypes are converted.
    pub fn load_named(&mut self, tensors: &[(String, Tensor)]) -> Result<(), String> {
        if tensors.len() != self.params.len() {
            return Err(format!("{} tensors, the model has {} parameters", tensors.len(), self.params.len()));
        }
        tch::no_grad(|| {
            for p in &mut self.params {
                let Some((_, t)) = tensors.iter().find(|(n, _)| *n == p.decl.name) else {
                    return Err(format!("missing tensor {}", p.decl.name));
                };
                if t.size() != p.decl.shape {
                    return Err(format!("{}: shape {:?}, expected {:?}", p.decl.name, t.size(), p.decl.shape));
                }
                p.tensor.copy_(t);
            }
            Ok(())
        })
    }
}
