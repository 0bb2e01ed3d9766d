//! Parameter declarations: names, shapes, initialisation, and fused groups.

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
#[derive(Debug, Clone, PartialEq)]
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
    /// Elements (saturating at `i64::MAX`: a shape that large is refused by
    /// [`ModelShape::check_size`](crate::ModelShape::check_size) before anything is built).
    pub fn numel(&self) -> i64 {
        self.shape.iter().fold(1i64, |n, &d| n.saturating_mul(d))
    }

    /// Matrices get weight decay; vectors (norm gains) do not.
    pub fn decays(&self) -> bool {
        self.shape.len() >= 2
    }
}

/// Parameters stored back to back and used as one autograd leaf: a layer's q, k and v
/// projections form one `[q + k + v, dim]` matrix, so attention does one wide GEMM instead
/// of three narrow ones (likewise the MLP's gate and up). Members are `[out, in]` matrices
/// with the same `in`, so their concatenation along rows is exactly their contiguous memory.
#[derive(Debug, Clone, PartialEq)]
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

    /// Several `[rows, in]` matrices with the same `in`, fused along rows.
    pub fn fused(name: String, members: Vec<ParamDecl>) -> Self {
        debug_assert!(members.windows(2).all(|w| w[0].shape[1..] == w[1].shape[1..]));
        ParamGroup { name, members }
    }

    /// Elements of all members (saturating, like [`ParamDecl::numel`]).
    pub fn numel(&self) -> i64 {
        self.members.iter().fold(0i64, |n, m| n.saturating_add(m.numel()))
    }

    /// Whether the group is weight-decayed (all members are of one kind).
    pub fn decays(&self) -> bool {
        self.members[0].decays()
    }

    /// Shape of the fused leaf: the single member's, or the members stacked along rows.
    pub fn leaf_shape(&self) -> Vec<i64> {
        let first = &self.members[0];
        if self.members.len() == 1 {
            first.shape.clone()
        } else {
            let rows = self.members.iter().map(|m| m.shape[0]).sum();
            [vec![rows], first.shape[1..].to_vec()].concat()
        }
    }
}
