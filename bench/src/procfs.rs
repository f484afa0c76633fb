//! A process's or a thread's memory and CPU time, read from `/proc`.

/// Clock ticks per second of `/proc/.../stat` (USER_HZ, 100 on Linux).
pub const TICKS_PER_S: f64 = 100.0;

/// utime + stime, in clock ticks, of the `/proc/.../stat` file at `path`;
/// 0 when it cannot be read.
pub fn cpu_ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields 14 and 15; counted after the parenthesized name, 12 and 13.
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// The calling thread's utime + stime, in clock ticks.
pub fn thread_cpu_ticks() -> u64 {
    cpu_ticks("/proc/thread-self/stat")
}

/// A process's resident memory (VmRSS), in KiB; 0 when it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Context switches (voluntary and not) of every thread a process has
/// now, from `/proc/PID/task/*/status`; threads that ended are not
/// counted. 0 when it cannot be read.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|task| {
            std::fs::read_to_string(task.path().join("status"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}
