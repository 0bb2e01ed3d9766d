//! Who may join a ring: only members of the current generation. The coordinator gives
//! every member of a generation the same random 32-byte group key (over its authenticated
//! gRPC). A rank accepting its predecessor sends a fresh random challenge; the connecting
//! side answers with its rank, the generation and an HMAC-SHA256 over all three under the
//! key. A stranger — or a member of another generation — cannot answer and is refused;
//! a recorded answer is useless against the next challenge.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use sha2::{Digest, Sha256};

const HELLO_MAGIC: u32 = 0x4D58_5247; // "MXRG"
const CHALLENGE: usize = 16;
const MAC: usize = 32;
/// magic, rank, generation, MAC.
const HELLO: usize = 4 + 4 + 8 + MAC;
/// A connection that does not answer the challenge within this long is dropped, so a
/// silent stranger cannot hold up the ring's formation for the whole collective timeout.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// A generation's identity: its number and the secret its members share.
#[derive(Clone)]
pub struct GroupKey {
    generation: u64,
    key: [u8; 32],
}

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GroupKey(generation {}, <redacted>)", self.generation)
    }
}

impl GroupKey {
    /// The key of `generation` (`key` from the coordinator's assignment: 32 bytes).
    pub fn new(generation: u64, key: &[u8]) -> Result<Self, String> {
        let key: [u8; 32] = key.try_into().map_err(|_| {
            format!("the assignment's group key has {} bytes, not 32 (a coordinator of another version?)", key.len())
        })?;
        Ok(GroupKey { generation, key })
    }

    /// A fresh random key for `generation` (rings formed without a coordinator: tests).
    pub fn random(generation: u64) -> Result<Self, String> {
        let key = moxin_proto::security::random_key().map_err(|e| e.to_string())?;
        Ok(GroupKey { generation, key })
    }

    /// The membership generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn mac(&self, challenge: &[u8; CHALLENGE], rank: u32) -> [u8; MAC] {
        let mut message = Vec::with_capacity(CHALLENGE + 12);
        message.extend_from_slice(challenge);
        message.extend_from_slice(&rank.to_le_bytes());
        message.extend_from_slice(&self.generation.to_le_bytes());
        hmac_sha256(&self.key, &message)
    }

    /// The connecting side: reads the challenge and answers as `rank`.
    pub(crate) fn answer(&self, stream: &mut TcpStream, rank: u32) -> std::io::Result<()> {
        let mut challenge = [0u8; CHALLENGE];
        stream.read_exact(&mut challenge)?;
        let mut hello = Vec::with_capacity(HELLO);
        hello.extend_from_slice(&HELLO_MAGIC.to_le_bytes());
        hello.extend_from_slice(&rank.to_le_bytes());
        hello.extend_from_slice(&self.generation.to_le_bytes());
        hello.extend_from_slice(&self.mac(&challenge, rank));
        stream.write_all(&hello)
    }

    /// The accepting side: challenges the peer and checks that it is rank `expected` of
    /// this generation. `Err` says why it was refused (for a log line; nothing secret).
    pub(crate) fn challenge(&self, stream: &mut TcpStream, expected: u32) -> Result<(), String> {
        let mut challenge = [0u8; CHALLENGE];
        let random = moxin_proto::security::random_key().map_err(|e| e.to_string())?;
        challenge.copy_from_slice(&random[..CHALLENGE]);
        let io = |e: std::io::Error| format!("no answer to the challenge ({e})");
        stream.set_read_timeout(Some(ANSWER_WITHIN)).map_err(io)?;
        stream.write_all(&challenge).map_err(io)?;
        let mut hello = [0u8; HELLO];
        stream.read_exact(&mut hello).map_err(io)?;
        let magic = u32::from_le_bytes(hello[0..4].try_into().unwrap_or_default());
        let from = u32::from_le_bytes(hello[4..8].try_into().unwrap_or_default());
        let generation = u64::from_le_bytes(hello[8..16].try_into().unwrap_or_default());
        if magic != HELLO_MAGIC {
            return Err("not a moxin-train ring peer".into());
        }
        if generation != self.generation {
            return Err(format!("a peer of generation {generation}, not {}", self.generation));
        }
        if from != expected {
            return Err(format!("rank {from} where rank {expected} was expected"));
        }
        let mac = self.mac(&challenge, from);
        if !moxin_proto::security::constant_time_eq(&mac, &hello[16..]) {
            return Err(format!("a peer claiming rank {from} without the generation's key"));
        }
        Ok(())
    }
}

/// HMAC-SHA256 (RFC 2104) for a 32-byte key.
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; MAC] {
    let mut inner_pad = [0x36u8; 64];
    let mut outer_pad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        inner_pad[i] ^= k;
        outer_pad[i] ^= k;
    }
    let inner = Sha256::new().chain_update(inner_pad).chain_update(message).finalize();
    Sha256::new().chain_update(outer_pad).chain_update(inner).finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_style_reference() {
        // HMAC-SHA256 with key 0x0b*32 and "Hi There" (computed with Python's hmac module).
        let mac = hmac_sha256(&[0x0b; 32], b"Hi There");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7");
    }

    #[test]
    fn group_keys_must_be_32_bytes() {
        assert!(GroupKey::new(3, &[1; 16]).unwrap_err().contains("16 bytes"));
        let k = GroupKey::new(3, &[1; 32]).unwrap();
        assert_eq!(k.generation(), 3);
        assert!(!format!("{k:?}").contains('1') || format!("{k:?}").contains("redacted"));
    }
}
