//! Reinforcement learning on verifiable rewards (GRPO): rewards ([`reward`]), the
//! group-relative policy objective ([`grpo`]) and the batch source that makes rollouts
//! each step ([`rollouts`]).

pub mod grpo;
pub mod reward;
pub mod rollouts;
