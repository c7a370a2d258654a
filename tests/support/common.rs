//! Helpers every throwaway server shares: the binary under test, free
//! ports, scratch directories, signals and `/proc` scans, and [`wait_for`].

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// How long a server may take to come up before the test fails.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cache-invalidator"))
}

/// A free TCP port on 127.0.0.1 (the OS picks it; the listener is closed again).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// A scratch directory removed on drop, readable by the `postgres` user.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates a fresh directory under the system temp dir.
    pub fn new(label: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ci-{label}-"))
            .tempdir()
            .expect("tempdir")
            .keep();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        ScratchDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a pid we spawned; errors (already gone) are ignored.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

pub(crate) fn wait_or_kill(child: &mut Child, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
}

/// Direct children of a process, from /proc.
pub(crate) fn child_pids(parent: u32) -> Vec<u32> {
    proc_stats()
        .into_iter()
        .filter(|(_, ppid, _)| *ppid == parent)
        .map(|(pid, _, _)| pid)
        .collect()
}

/// PostgreSQL processes whose command line names this data directory, or that
/// are orphaned backends of it (their cwd is the data directory).
pub(crate) fn child_pids_of_dir(data_dir: &Path) -> Vec<u32> {
    proc_stats()
        .into_iter()
        .filter(|(pid, _, _)| {
            fs::read_link(format!("/proc/{pid}/cwd"))
                .map(|cwd| cwd == data_dir)
                .unwrap_or(false)
        })
        .map(|(pid, _, _)| pid)
        .collect()
}

pub(crate) fn proc_stats() -> Vec<(u32, u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in rd.filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Format: pid (comm) state ppid ...; comm may contain spaces.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat[stat.find('(').map(|i| i + 1).unwrap_or(0)..close].to_string();
        let mut fields = stat[close + 1..].split_whitespace();
        let _state = fields.next();
        if let Some(ppid) = fields.next().and_then(|p| p.parse().ok()) {
            out.push((pid, ppid, comm));
        }
    }
    out
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `text` without terminal colour codes (CSI sequences: `ESC [`, parameters,
/// a final letter), so a log's `field=value` reads as such.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// xorshift64*: reproducible "random" numbers for workloads and crash
/// moments, no dependency.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from the clock (the seed is printed, to replay a failure).
    pub fn from_time() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
