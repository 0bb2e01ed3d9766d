//! A decoder block's projection GEMMs timed two ways on the same inputs: as moxin-train
//! runs them (q/k/v as one matrix, gate/up as one) and split into one GEMM per part, as
//! PyTorch models' separate `q_proj`, `k_proj`, … run (kept in moxin-train's layout), each
//! in its three roles: forward, input gradient and weight gradient (with an fp32 output,
//! moxin-train's way, and a bf16 one). A GPU's kernel trace showed compile's separate
//! projections running faster per FLOP than ours; this says, per projection and role,
//! whether `runtime.split_projections` pays. Forward and input gradient run the training
//! code's own `block::project` / `block::project_back`; for o and down it also times the
//! residual add inside the GEMM (`block::plus_linear`) against a GEMM and an add. Every
//! result is compared with libtorch's own call (`relative_difference_vs_aten`): zero unless
//! the tuned engine (`runtime.gemm = "tuned"`) is installed, its error when it is.

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::trainer::block::{plus_linear, project, project_back};
use crate::trainer::grads::gemm_into;
use crate::WorkerError;

/// A block's dimensions: tokens per step and the model's widths.
#[derive(Clone, Copy, Debug)]
pub struct BlockDims {
    /// Tokens per step (rows of every GEMM).
    pub tokens: i64,
    /// Model width.
    pub dim: i64,
    /// Query heads.
    pub heads: i64,
    /// Key/value heads.
    pub kv_heads: i64,
    /// Width of one head.
    pub head_dim: i64,
    /// SwiGLU hidden width.
    pub ffn: i64,
}

/// One projection: its name, input width and output parts (one part: nothing to split).
fn projections(d: BlockDims) -> [(&'static str, i64, Vec<i64>); 4] {
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    [
        ("qkv", d.dim, vec![q, kv, kv]),
        ("o", q, vec![d.dim]),
        ("gate_up", d.dim, vec![d.ffn, d.ffn]),
        ("down", d.ffn, vec![d.dim]),
    ]
}

/// Times every projection of a block with `dims` on `device` in `kind` (bf16 on a GPU;
/// any float kind elsewhere, where it only checks that the two ways agree), each timing the
/// median of `iters` runs by `time_ms`. Returns per projection and role the milliseconds,
/// TFLOP/s, the split/fused time ratio and the largest relative difference between the
/// two ways' results.
pub fn projection_gemms(
    device: Device,
    kind: Kind,
    dims: BlockDims,
    mut time_ms: impl FnMut(&mut dyn FnMut() -> Result<(), WorkerError>) -> Result<f64, WorkerError>,
) -> Result<Value, WorkerError> {
    let _guard = tch::no_grad_guard();
    tch::manual_seed(3);
    let m = dims.tokens;
    let mut report = serde_json::Map::new();
    let (mut fused_total, mut split_total) = (0.0, 0.0);
    for (name, k_in, parts) in projections(dims) {
        let n: i64 = parts.iter().sum();
        let x = Tensor::randn([m, k_in], (Kind::Float, device)).to_kind(kind);
        let w = (Tensor::randn([n, k_in], (Kind::Float, device)) * 0.02).to_kind(kind);
        // Split the way a split block runs (`block::project`, `block::project_back`): each
        // part's weight a block of rows of the fused matrix, its output and output gradient
        // a block of columns of the fused ones (cuBLAS takes such strided operands as they are).
        let dy = Tensor::randn([m, n], (Kind::Float, device)).to_kind(kind);
        let dys: Vec<Tensor> = dy.split_with_sizes(parts.as_slice(), 1);
        let split_parts = Some(parts.as_slice());
        // Weight gradients accumulate in fp32 when the products are half precision.
        let grad_kind = if matches!(kind, Kind::BFloat16 | Kind::Half) { Kind::Float } else { kind };
        let dw = Tensor::zeros([n, k_in], (grad_kind, device));
        let dw_split = Tensor::zeros([n, k_in], (grad_kind, device));
        let flop = 2.0 * (m * n * k_in) as f64;

        let fused = |role: &str| -> Tensor {
            match role {
                "forward" => project(&x, &w, None),
                "input_grad" => project_back(&dy, &w, None),
                "weight_grad_fp32" => {
                    gemm_into(&dw, &dy.tr(), &x, true);
                    dw.shallow_clone()
                }
                _ => dy.tr().mm(&x),
            }
        };
        let split = |role: &str| -> Tensor {
            match role {
                "forward" => project(&x, &w, split_parts),
                "input_grad" => project_back(&dy, &w, split_parts),
                "weight_grad_fp32" => {
                    let mut offset = 0;
                    for (dyi, &p) in dys.iter().zip(&parts) {
                        gemm_into(&dw_split.narrow(0, offset, p), &dyi.tr(), &x, true);
                        offset += p;
                    }
                    dw_split.shallow_clone()
                }
                _ => Tensor::cat(&dys.iter().map(|dyi| dyi.tr().mm(&x)).collect::<Vec<_>>(), 0),
            }
        };
        // libtorch's own calls, the reference for the tuned engine (`runtime.gemm = "tuned"`),
        // which the training code's GEMMs above go through when it is installed.
        let aten = |role: &str| -> Tensor {
            match role {
                "forward" => x.mm(&w.tr()),
                "input_grad" => dy.mm(&w),
                "weight_grad_fp32" => dy.tr().to_kind(grad_kind).mm(&x.to_kind(grad_kind)),
                _ => dy.tr().mm(&x),
            }
        };
        let mut roles = serde_json::Map::new();
        for role in ["forward", "input_grad", "weight_grad_fp32", "weight_grad_bf16"] {
            let fused_ms = time_ms(&mut || {
                drop(fused(role));
                Ok(())
            })?;
            let mut entry = json!({
                "fused_ms": fused_ms,
                "fused_tflops": flop / fused_ms / 1e9,
                "relative_difference_vs_aten": relative_difference(&aten(role), &fused(role)),
            });
            if parts.len() > 1 {
                // The bf16 weight gradients' `cat` is not timed: a split model keeps them apart.
                let split_ms = time_ms(&mut || {
                    if role == "weight_grad_bf16" {
                        dys.iter().for_each(|dyi| drop(dyi.tr().mm(&x)));
                    } else {
                        drop(split(role));
                    }
                    Ok(())
                })?;
                let difference = relative_difference(&fused(role), &split(role));
                entry["split_ms"] = json!(split_ms);
                entry["split_tflops"] = json!(flop / split_ms / 1e9);
                entry["split_vs_fused"] = json!(split_ms / fused_ms);
                entry["relative_difference"] = json!(difference);
                if role != "weight_grad_bf16" {
                    split_total += split_ms;
                }
            } else if role != "weight_grad_bf16" {
                split_total += fused_ms;
            }
            if role != "weight_grad_bf16" {
                fused_total += fused_ms;
            }
            roles.insert(role.to_string(), entry);
        }
        let mut entry = json!({"m": m, "n": n, "k": k_in, "parts": parts, "roles": roles});
        if parts.len() == 1 {
            // The projections that end in the residual stream (o, down): the training step adds
            // the residual inside the GEMM (`addmm`, β = 1); a GEMM and a separate add is the
            // other way. Whether cuBLAS picks a slower kernel for β = 1 is what this says.
            let residual = Tensor::randn([m, n], (Kind::Float, device)).to_kind(kind);
            let addmm_ms = time_ms(&mut || {
                drop(plus_linear(&residual, &x, &w));
                Ok(())
            })?;
            let mm_add_ms = time_ms(&mut || {
                drop(project(&x, &w, None) + &residual);
                Ok(())
            })?;
            let difference = relative_difference(&plus_linear(&residual, &x, &w), &(x.mm(&w.tr()) + &residual));
            entry["residual"] = json!({
                "addmm_ms": addmm_ms,
                "mm_then_add_ms": mm_add_ms,
                "addmm_vs_mm_then_add": addmm_ms / mm_add_ms,
                "relative_difference": difference,
            });
        }
        report.insert(name.to_string(), entry);
    }
    Ok(json!({
        "dims": {"tokens": m, "dim": dims.dim, "heads": dims.heads, "kv_heads": dims.kv_heads, "head_dim": dims.head_dim, "ffn": dims.ffn},
        "projections": report,
        // Forward, input and fp32 weight gradient of the four projections: one block's GEMMs.
        "block_ms": {"fused": fused_total, "split": split_total, "split_vs_fused": split_total / fused_total},
    }))
}

/// The largest difference between `a` and `b`, relative to `a`'s largest magnitude.
fn relative_difference(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    (&a - &b).abs().max().double_value(&[]) / a.abs().max().double_value(&[]).max(1e-30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_projections_compute_what_the_fused_ones_do() {
        let dims = BlockDims { tokens: 24, dim: 16, heads: 4, kv_heads: 2, head_dim: 4, ffn: 20 };
        let mut calls = 0;
        let report = projection_gemms(Device::Cpu, Kind::Double, dims, |f| {
            calls += 1;
            f().map(|()| 1.0)
        })
        .unwrap();
        // 4 roles of 4 projections fused, 4 roles of the two split ones again, and the
        // residual's two ways for the two unsplit ones.
        assert_eq!(calls, 16 + 8 + 4);
        for name in ["o", "down"] {
            let d = report["projections"][name]["residual"]["relative_difference"].as_f64().unwrap();
            assert!(d < 1e-12, "{name} residual: {d}");
        }
        // Without the tuned engine the training code's GEMMs are libtorch's own.
        for name in ["qkv", "o", "gate_up", "down"] {
            for (role, entry) in report["projections"][name]["roles"].as_object().unwrap() {
                let d = entry["relative_difference_vs_aten"].as_f64().unwrap();
                assert!(d < 1e-12, "{name} {role} vs ATen: {d}");
            }
        }
        for name in ["qkv", "gate_up"] {
            for (role, entry) in report["projections"][name]["roles"].as_object().unwrap() {
                let d = entry["relative_difference"].as_f64().unwrap();
                assert!(d < 1e-12, "{name} {role}: {d}");
            }
        }
        assert_eq!(report["projections"]["qkv"]["n"], 32);
        assert_eq!(report["projections"]["down"]["k"], 20);
        assert!(report["projections"]["o"]["roles"]["forward"].get("split_ms").is_none());
        assert_eq!(report["block_ms"]["fused"], 12.0);
        assert_eq!(report["block_ms"]["split"], 12.0);
    }
}
