//! The resource monitor: CPU and memory utilisation of the machine, sampled
//! once a second on a background thread (sysinfo reads /proc, which must
//! not run on the async runtime) and read lock-free by the adaptive
//! controller. One monitor per process, shared by every model.
//!
//! GPU utilisation (NVML) is not sampled yet: tickserve's engine is CPU
//! only, so `gpu` stays `None`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::gauge;
use tickserve_telemetry as telemetry;

/// Latest utilisation, percent, as f64 bits; NaN until the first sample.
#[derive(Debug)]
pub struct ResourceMonitor {
    cpu: AtomicU64,
    memory: AtomicU64,
}

const INTERVAL: Duration = Duration::from_secs(1);

static MONITOR: OnceLock<Arc<ResourceMonitor>> = OnceLock::new();

impl ResourceMonitor {
    /// The process-wide monitor, started on first use.
    pub fn global() -> Arc<ResourceMonitor> {
        Arc::clone(MONITOR.get_or_init(|| {
            let monitor = Arc::new(ResourceMonitor {
                cpu: AtomicU64::new(f64::NAN.to_bits()),
                memory: AtomicU64::new(f64::NAN.to_bits()),
            });
            let sampler = Arc::clone(&monitor);
            let started = std::thread::Builder::new()
                .name("resource-monitor".into())
                .spawn(move || sampler.run());
            if let Err(e) = started {
                tracing::warn!(error = %e, "cannot start the resource monitor; adaptive batching keeps its size");
            }
            monitor
        }))
    }

    fn run(&self) {
        use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
        let mut system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        let cpu_gauge = gauge!(telemetry::CPU_UTILISATION);
        let memory_gauge = gauge!(telemetry::MEMORY_UTILISATION);
        loop {
            // CPU usage is a difference between two refreshes.
            std::thread::sleep(INTERVAL.max(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL));
            system.refresh_cpu_usage();
            system.refresh_memory();
            let cpu = f64::from(system.global_cpu_usage());
            let total = system.total_memory();
            let memory = if total == 0 {
                f64::NAN
            } else {
                system.used_memory() as f64 * 100.0 / total as f64
            };
            self.cpu.store(cpu.to_bits(), Ordering::Relaxed);
            self.memory.store(memory.to_bits(), Ordering::Relaxed);
            cpu_gauge.set(cpu);
            memory_gauge.set(memory);
        }
    }

    fn read(cell: &AtomicU64) -> Option<f64> {
        let v = f64::from_bits(cell.load(Ordering::Relaxed));
        v.is_finite().then_some(v)
    }

    /// CPU utilisation of the whole machine, percent.
    pub fn cpu(&self) -> Option<f64> {
        Self::read(&self.cpu)
    }

    /// Memory in use, percent of total.
    pub fn memory(&self) -> Option<f64> {
        Self::read(&self.memory)
    }
}
