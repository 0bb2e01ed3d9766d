//! Reinforcement learning on verifiable rewards (GRPO): rewards ([`reward`]) and the
//! group-relative policy objective ([`grpo`]).

pub mod grpo;
pub mod reward;
