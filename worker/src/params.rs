//! Parameters as views into one flat buffer.
//!
//! Every parameter tensor is a view of a single contiguous buffer, in a fixed order that is
//! identical on every rank: first the matrices (which get weight decay), then the vectors
//! (RMSNorm gains, which do not). So the optimizer works on flat buffers and a ZeRO-1 rank
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

/// One parameter: its declaration, where it sits in the flat buffer, and the view.
#[derive(Debug)]
pub struct Param {
    /// Declaration.
    pub decl: ParamDecl,
    /// First element in the flat buffer.
    pub offset: i64,
    /// The view (a leaf that requires grad).
    pub tensor: Tensor,
}

/// All parameters of a model, backed by one flat buffer.
#[derive(Debug)]
pub struct ParamStore {
    flat: Tensor,
    /// Parameters in model (declaration) order.
    params: Vec<Param>,
    decay_numel: i64,
}

impl ParamStore {
    /// Allocates the flat buffer for `decls` (zeros) with views in flat order.
    pub fn new(decls: Vec<ParamDecl>, kind: Kind, device: Device) -> Self {
        let total: i64 = decls.iter().map(ParamDecl::numel).sum();
        let flat = Tensor::zeros([total], (kind, device));
        let decay_numel: i64 = decls.iter().filter(|d| d.decays()).map(ParamDecl::numel).sum();
        let (mut next_decay, mut next_plain) = (0i64, decay_numel);
        let params = decls
            .into_iter()
            .map(|decl| {
                let slot = if decl.decays() { &mut next_decay } else { &mut next_plain };
                let offset = *slot;
                *slot += decl.numel();
                let tensor = flat.narrow(0, offset, decl.numel()).view(decl.shape.as_slice()).set_requires_grad(true);
                Param { decl, offset, tensor }
            })
            .collect();
        ParamStore { flat, params, decay_numel }
    }

    /// Initialises every parameter in declaration order from torch's global RNG (seed it
    /// first with `tch::manual_seed` for a reproducible model).
    pub fn initialise(&mut self) {
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

    /// Elements in the flat buffer.
    pub fn numel(&self) -> i64 {
        self.flat.numel() as i64
    }

    /// `0..decay_numel` of the flat buffer is weight-decayed.
    pub fn decay_numel(&self) -> i64 {
        self.decay_numel
    }

    /// Parameters in declaration order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// The view of parameter `name`.
    pub fn get(&self, name: &str) -> &Tensor {
        &self
            .params
            .iter()
            .find(|p| p.decl.name == name)
            .unwrap_or_else(|| panic!("no parameter {name}"))
            .tensor
    }

    /// Copies every parameter's gradient into `flat_grad` (same layout as the flat buffer,
    /// any float dtype), scaled by nothing; a missing gradient counts as zero.
    pub fn gather_grads(&self, flat_grad: &mut Tensor) {
        tch::no_grad(|| {
            for p in &self.params {
                let mut dst = flat_grad.narrow(0, p.offset, p.decl.numel());
                let g = p.tensor.grad();
                if g.defined() {
                    dst.copy_(&g.view([-1]));
                } else {
                    let _ = dst.zero_();
                }
            }
        });
    }

    /// Forgets all gradients (frees them, so the next backward allocates fresh ones).
    pub fn zero_grads(&mut self) {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
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
