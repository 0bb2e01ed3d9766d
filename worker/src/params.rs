//! Parameters as views into one flat buffer, laid out by [`moxin_layout::FlatLayout`].
//!
//! Every parameter tensor is a view of a single contiguous buffer, in the layout's order,
//! identical on every rank. Each parameter group (a fused q/k/v or gate/up matrix, or a
//! single parameter) is one autograd leaf, so the model multiplies by it in one GEMM, the
//! optimizer works on the flat buffer, and a ZeRO-1 rank updates a contiguous slice.

use moxin_layout::{FlatLayout, Init, ParamDecl};
use tch::{Device, Kind, Tensor};

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

/// All parameters of a model, backed by one flat buffer.
#[derive(Debug)]
pub struct ParamStore {
    layout: FlatLayout,
    flat: Tensor,
    /// Named parameters in declaration order.
    params: Vec<Param>,
    /// Autograd leaves, parallel to `layout.leaves`.
    leaves: Vec<Tensor>,
}

impl ParamStore {
    /// Allocates the flat buffer for `layout` (zeros), at least `min_len` elements long
    /// (padding at the end, viewed by no parameter, so ZeRO-1 partitions of equal size can
    /// tile it).
    pub fn new(layout: FlatLayout, kind: Kind, device: Device, min_len: i64) -> Self {
        let flat = Tensor::zeros([layout.numel.max(min_len)], (kind, device));
        let leaves: Vec<Tensor> = layout
            .leaves
            .iter()
            .map(|l| flat.narrow(0, l.offset, l.numel).view(l.shape.as_slice()).set_requires_grad(true))
            .collect();
        let params = layout
            .params
            .iter()
            .map(|p| {
                let leaf = &leaves[p.leaf];
                let tensor = if leaf.size() == p.decl.shape {
                    leaf.shallow_clone()
                } else {
                    leaf.narrow(0, p.row, p.decl.shape[0])
                };
                Param { decl: p.decl.clone(), offset: p.offset, tensor }
            })
            .collect();
        ParamStore { layout, flat, params, leaves }
    }

    /// Seeds torch's global RNG with `seed` and initialises every parameter in declaration
    /// order. Values are drawn in fp32 (fp64 for an fp64 model) and rounded to the
    /// parameters' dtype, so a bf16 model starts from the fp32 model's weights, rounded.
    /// Holds a process-wide lock so concurrent initialisations (several ranks in one
    /// process) cannot interleave their draws.
    pub fn initialise(&mut self, seed: u64) {
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed as i64);
        tch::no_grad(|| {
            for p in &mut self.params {
                match p.decl.init {
                    Init::Normal { std } => {
                        let kind = if p.tensor.kind() == Kind::Double { Kind::Double } else { Kind::Float };
                        let mut values = Tensor::empty(p.decl.shape.as_slice(), (kind, p.tensor.device()));
                        let _ = values.normal_(0.0, std);
                        p.tensor.copy_(&values);
                    }
                    Init::Ones => {
                        let _ = p.tensor.fill_(1.0);
                    }
                }
            }
        });
    }

    /// The layout.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// The flat buffer all parameters view.
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }

    /// Parameter elements (the flat buffer may be longer by padding).
    pub fn numel(&self) -> i64 {
        self.layout.numel
    }

    /// `0..decay_numel` of the flat buffer is weight-decayed.
    pub fn decay_numel(&self) -> i64 {
        self.layout.decay_numel
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
        let i = self
            .layout
            .leaves
            .iter()
            .position(|l| l.name == name)
            .unwrap_or_else(|| panic!("no parameter group {name}"));
        &self.leaves[i]
    }

    /// Leaf `index` of the layout.
    pub fn leaf_at(&self, index: usize) -> &Tensor {
        &self.leaves[index]
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
