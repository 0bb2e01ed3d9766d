//! Naming a process so that another one can tell whether it still runs: the marker of a
//! data preparation and the run directory's lock both start with [`tag`]'s
//! `pid <pid> on <host>`, and [`tag_alive`] reads it back.

use std::path::Path;

/// This machine's name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown host".into())
}

/// `pid <pid> on <host>` of this process.
pub fn tag() -> String {
    format!("pid {} on {}", std::process::id(), hostname())
}

/// Whether the process a text starting with [`tag`]'s words names still runs: `None` when
/// the text names none, or one on another machine (which cannot be checked from here).
pub fn tag_alive(text: &str) -> Option<bool> {
    let mut words = text.split_whitespace();
    let (Some("pid"), Some(pid), Some("on"), Some(host)) = (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    let pid: u32 = pid.parse().ok()?;
    (host == hostname()).then(|| Path::new("/proc").join(pid.to_string()).exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_reads_back_as_alive_and_a_finished_process_as_gone() {
        assert_eq!(tag_alive(&format!("{} (`moxin-train train`)", tag())), Some(true));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(tag_alive(&format!("pid {pid} on {}", hostname())), Some(false));
        assert_eq!(tag_alive("pid 1 on another-machine"), None);
        assert_eq!(tag_alive("something else"), None);
    }
}
