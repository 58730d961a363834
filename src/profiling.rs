//! CPU profiles: on demand (`GET /debug/pprof/profile` on the admin listener) and from the
//! opt-in CPU monitor, which writes one when the process runs hot for a while.
//!
//! Profiles come from the `pprof` crate (a `SIGPROF` sampler). One profiler can run at a
//! time in a process, so a second request while one runs is refused rather than queued.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pprof::protos::Message;
use serde::Deserialize;

use crate::metrics::Metrics;

/// `profiling:` in the YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfilingConfig {
    /// Run the CPU monitor.
    pub cpu_monitor: bool,
    /// Process CPU, in percent of one core (200 = two cores busy), above which the
    /// process counts as hot.
    pub cpu_threshold_percent: f64,
    /// How long it must stay hot before a profile is taken.
    pub sustain_s: u64,
    /// How often CPU is sampled.
    pub sample_interval_s: u64,
    /// Length of the profile the monitor takes.
    pub profile_s: u64,
    /// Sampling frequency of every profile, monitor or on demand (unless the request says).
    pub frequency_hz: u32,
    /// Where the monitor writes profiles (`cpu-<unix ms>.pb`, pprof protobuf).
    pub dir: PathBuf,
    /// Newest profiles kept in `dir`; older ones are deleted.
    pub keep: usize,
    /// After a profile, the monitor waits this long before it looks again.
    pub cooldown_s: u64,
}

impl Default for ProfilingConfig {
    fn default() -> Self {
        ProfilingConfig {
            cpu_monitor: false,
            cpu_threshold_percent: 80.0,
            sustain_s: 30,
            sample_interval_s: 5,
            profile_s: 10,
            frequency_hz: 99,
            dir: PathBuf::from("data/profiles"),
            keep: 10,
            cooldown_s: 600,
        }
    }
}

/// Longest on-demand profile.
pub const MAX_PROFILE_S: u64 = 300;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("a CPU profile is already being taken")]
    Busy,
    #[error("profiler: {0}")]
    Profiler(#[from] pprof::Error),
}

static PROFILING: AtomicBool = AtomicBool::new(false);

/// Clears [`PROFILING`] however the capture ends.
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        PROFILING.store(false, Ordering::SeqCst);
    }
}

/// A finished profile.
pub struct Profile(pprof::Report);

impl Profile {
    /// pprof's protobuf (`go tool pprof` reads it).
    pub fn protobuf(&self) -> Result<Vec<u8>, ProfileError> {
        Ok(self.0.pprof()?.encode_to_vec())
    }

    /// A flamegraph as SVG.
    pub fn svg(&self) -> Result<Vec<u8>, ProfileError> {
        let mut out = Vec::new();
        self.0.flamegraph(&mut out)?;
        Ok(out)
    }
}

/// Profiles the whole process for `length`, blocking the calling thread (run it on a
/// blocking thread).
pub fn capture(length: Duration, frequency_hz: u32) -> Result<Profile, ProfileError> {
    if PROFILING
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return Err(ProfileError::Busy);
    }
    let _running = Running;
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(frequency_hz.clamp(1, 1000) as i32)
        // Unwinding through these from a signal handler can deadlock.
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()?;
    std::thread::sleep(length);
    let report = guard.report().build()?;
    Ok(Profile(report))
}

/// CPU time this process has used so far (user + system).
fn process_cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct it is given and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Samples process CPU every `sample_interval_s`; when it stays above the threshold for
/// `sustain_s`, writes a profile to `dir`, keeps the newest `keep`, and cools down.
pub struct CpuMonitor {
    cfg: ProfilingConfig,
    metrics: Arc<Metrics>,
}

impl CpuMonitor {
    pub fn new(cfg: ProfilingConfig, metrics: Arc<Metrics>) -> Self {
        CpuMonitor { cfg, metrics }
    }

    /// Runs on a thread of its own for the life of the process.
    pub fn spawn(self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.cfg.dir)?;
        std::thread::Builder::new()
            .name("tollgate-cpu-monitor".into())
            .spawn(move || self.run())?;
        Ok(())
    }

    fn run(self) {
        let interval = Duration::from_secs(self.cfg.sample_interval_s.max(1));
        let sustain = Duration::from_secs(self.cfg.sustain_s);
        let mut last = (Instant::now(), process_cpu_time());
        let mut hot_since: Option<Instant> = None;
        tracing::info!(
            threshold_percent = self.cfg.cpu_threshold_percent,
            sustain_s = self.cfg.sustain_s,
            dir = %self.cfg.dir.display(),
            "CPU monitor running"
        );
        loop {
            std::thread::sleep(interval);
            let now = (Instant::now(), process_cpu_time());
            let wall = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
            let percent = now.1.saturating_sub(last.1).as_secs_f64() / wall * 100.0;
            last = now;
            self.metrics.cpu_percent.set(percent);
            if percent < self.cfg.cpu_threshold_percent {
                hot_since = None;
                continue;
            }
            let since = *hot_since.get_or_insert(now.0);
            if now.0.duration_since(since) < sustain {
                continue;
            }
            tracing::warn!(
                percent,
                for_s = now.0.duration_since(since).as_secs(),
                "CPU over the threshold; taking a profile"
            );
            match self.write_profile() {
                Ok(path) => {
                    self.metrics.cpu_profiles.inc();
                    tracing::warn!(path = %path.display(), "CPU profile written");
                }
                Err(e) => tracing::error!(error = %e, "CPU profile failed"),
            }
            std::thread::sleep(Duration::from_secs(self.cfg.cooldown_s));
            hot_since = None;
            last = (Instant::now(), process_cpu_time());
        }
    }

    fn write_profile(&self) -> Result<PathBuf, Box<dyn std::error::Error>> {
        let profile = capture(
            Duration::from_secs(self.cfg.profile_s.max(1)),
            self.cfg.frequency_hz,
        )?;
        let bytes = profile.protobuf()?;
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let path = self.cfg.dir.join(format!("cpu-{ms:013}.pb"));
        let tmp = path.with_extension("pb.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)?;
        prune(&self.cfg.dir, self.cfg.keep.max(1))?;
        Ok(path)
    }
}

/// Deletes all but the newest `keep` monitor profiles in `dir`.
fn prune(dir: &Path, keep: usize) -> std::io::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cpu-") && n.ends_with(".pb"))
        })
        .collect();
    // Names carry a zero-padded timestamp: sorting by name is sorting by age.
    files.sort();
    let excess = files.len().saturating_sub(keep);
    for old in &files[..excess] {
        std::fs::remove_file(old)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_profiles_only() {
        let dir = tempfile::tempdir().unwrap();
        for ms in [5u64, 1, 3, 4, 2] {
            std::fs::write(dir.path().join(format!("cpu-{ms:013}.pb")), b"x").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"keep me").unwrap();
        prune(dir.path(), 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["cpu-0000000000004.pb", "cpu-0000000000005.pb", "notes.txt"]
        );
    }

    #[test]
    fn process_cpu_time_grows_with_work() {
        let before = process_cpu_time();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(process_cpu_time() > before);
    }
}
