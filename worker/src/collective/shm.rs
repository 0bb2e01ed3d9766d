//! Same-host fast path for the ring: each rank's data to its successor goes through a
//! two-slot shared-memory outbox instead of the socket, so a piece is copied once (into the
//! outbox) and reduced straight out of it by the reader, with no kernel copies. The TCP
//! connection stays as the signalling channel ("piece k ready" / "slot free"), which keeps
//! the ring's failure semantics: a dead peer is an EOF, a stuck one a timeout.
//!
//! The outbox file lives in /dev/shm only until the successor has mapped it (then it is
//! unlinked), so nothing is left behind even if a process dies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;

use memmap2::{Mmap, MmapMut};

/// Slots per outbox: double buffering lets the writer fill one while the reader reduces the other.
pub(crate) const SLOTS: usize = 2;

/// This rank's outbox (written by us, read by the successor).
pub(crate) struct Outbox {
    map: MmapMut,
    slot_bytes: usize,
}

/// The predecessor's outbox, mapped read-only.
pub(crate) struct Inbox {
    map: Mmap,
    slot_bytes: usize,
}

impl Outbox {
    /// Copies `bytes` (at most a slot) into slot `slot`.
    pub(crate) fn write(&mut self, slot: usize, bytes: &[u8]) {
        assert!(bytes.len() <= self.slot_bytes && slot < SLOTS);
        // SAFETY: the protocol gives the writer exclusive use of a slot until the reader
        // acknowledges it; we write through a raw pointer to that slot only.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(slot * self.slot_bytes),
                bytes.len(),
            );
        }
    }
}

impl Inbox {
    /// The first `len` bytes of slot `slot`.
    pub(crate) fn read(&self, slot: usize, len: usize) -> &[u8] {
        assert!(len <= self.slot_bytes && slot < SLOTS);
        // SAFETY: after "ready" for this slot and until our acknowledgement the writer does
        // not touch it; the slice covers only this slot (the other may be being written).
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(slot * self.slot_bytes), len)
        }
    }
}

/// Sets up outboxes around the ring. Every rank first offers its outbox to its successor,
/// then maps its predecessor's; each side learns whether the other could (different hosts
/// or no /dev/shm mean plain TCP). Returns `(outbox to next, inbox from prev)`.
pub(crate) fn handshake(
    rank: usize,
    generation: u64,
    slot_bytes: usize,
    allowed: bool,
    next: &mut TcpStream,
    prev: &mut TcpStream,
) -> std::io::Result<(Option<Outbox>, Option<Inbox>)> {
    let enabled = allowed && std::path::Path::new("/dev/shm").is_dir();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let path = PathBuf::from(format!("/dev/shm/{PREFIX}{}-{rank}-{generation}-{nanos}", std::process::id()));
    let outbox = if enabled { create(&path, slot_bytes).ok() } else { None };
    let offer = if outbox.is_some() { path.to_string_lossy().into_owned() } else { String::new() };
    next.write_all(&(offer.len() as u32).to_le_bytes())?;
    next.write_all(offer.as_bytes())?;

    let mut len = [0u8; 4];
    prev.read_exact(&mut len)?;
    // The peer is authenticated, but what it sends is still checked, not trusted: a bounded
    // name, in /dev/shm, of our own pattern, a regular file of exactly the expected size.
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_NAME {
        return Err(std::io::Error::other(format!("the predecessor offered a {len}-byte outbox name")));
    }
    let mut name = vec![0u8; len];
    prev.read_exact(&mut name)?;
    let inbox = match (enabled, name.is_empty()) {
        (true, false) => match std::str::from_utf8(&name).ok().filter(|n| is_outbox_name(n)) {
            Some(name) => open(name, slot_bytes).ok(),
            None => {
                tracing::warn!("the ring predecessor offered an outbox outside /dev/shm/{PREFIX}*; using TCP");
                None
            }
        },
        _ => None,
    };
    prev.write_all(&[u8::from(inbox.is_some())])?;

    let mut accepted = [0u8; 1];
    next.read_exact(&mut accepted)?;
    if outbox.is_some() {
        let _ = std::fs::remove_file(&path);
    }
    let outbox = outbox.filter(|_| accepted[0] == 1);
    Ok((outbox, inbox))
}

/// Outbox names: `/dev/shm/moxin-ring-<pid>-<rank>-<generation>-<nanos>`.
const PREFIX: &str = "moxin-ring-";
const MAX_NAME: usize = 128;

fn is_outbox_name(name: &str) -> bool {
    name.strip_prefix("/dev/shm/")
        .and_then(|file| file.strip_prefix(PREFIX))
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
}

fn create(path: &PathBuf, slot_bytes: usize) -> std::io::Result<Outbox> {
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
    file.set_len((SLOTS * slot_bytes) as u64)?;
    // SAFETY: a fresh file only this rank writes; the successor maps it read-only.
    #[allow(unsafe_code)]
    let map = unsafe { MmapMut::map_mut(&file) }?;
    Ok(Outbox { map, slot_bytes })
}

fn open(path: &str, slot_bytes: usize) -> std::io::Result<Inbox> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NOFOLLOW: a link planted under our name cannot redirect us to another file.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.len() != (SLOTS * slot_bytes) as u64 {
        return Err(std::io::Error::other("not an outbox of the expected size"));
    }
    // SAFETY: read-only view of the predecessor's outbox; accesses follow the slot protocol.
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(&file) }?;
    Ok(Inbox { map, slot_bytes })
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_our_outbox_names_are_opened() {
        assert!(super::is_outbox_name("/dev/shm/moxin-ring-12-0-3-99"));
        for bad in [
            "/etc/passwd",
            "/dev/shm/moxin-ring-",
            "/dev/shm/moxin-ring-1/../../etc/passwd",
            "/dev/shm/other-1",
            "/dev/shm/moxin-ring-1 2",
        ] {
            assert!(!super::is_outbox_name(bad), "{bad}");
        }
    }
}
