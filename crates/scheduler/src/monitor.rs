//! The resource monitor: CPU and memory utilisation of the container (its
//! cgroup v2 limits where set, else the machine's), and of its NVIDIA GPUs
//! when NVML is there, sampled once a second on a
//! background thread (sysinfo reads /proc and NVML calls the driver, which
//! must not run on the async runtime) and read lock-free by the adaptive
//! controller and the SLA view. One monitor per process, shared by every
//! model.
//!
//! NVML (`libnvidia-ml.so`, part of the NVIDIA driver) is loaded at run
//! time by `nvml-wrapper`: without it the GPU gauges are absent, the GPU
//! readings stay `None`, and the log says why once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::gauge;
use tickserve_telemetry as telemetry;
use tickserve_telemetry::cgroup::{Cgroup, CpuMeter};

/// Latest utilisation, percent, as f64 bits; NaN until the first sample.
#[derive(Debug)]
pub struct ResourceMonitor {
    cpu: AtomicU64,
    memory: AtomicU64,
    /// Memory in use, bytes (not f64 bits).
    memory_used: AtomicU64,
    /// The busiest GPU's utilisation, and the fullest GPU's memory use.
    gpu: AtomicU64,
    gpu_memory: AtomicU64,
}

const INTERVAL: Duration = Duration::from_secs(1);

static MONITOR: OnceLock<Arc<ResourceMonitor>> = OnceLock::new();

impl ResourceMonitor {
    /// The process-wide monitor, started on first use. Memory is read
    /// once before this returns; CPU use, a difference between two
    /// samples, is there a second later.
    pub fn global() -> Arc<ResourceMonitor> {
        Arc::clone(MONITOR.get_or_init(|| {
            let monitor = Arc::new(ResourceMonitor {
                cpu: AtomicU64::new(f64::NAN.to_bits()),
                memory: AtomicU64::new(f64::NAN.to_bits()),
                memory_used: AtomicU64::new(0),
                gpu: AtomicU64::new(f64::NAN.to_bits()),
                gpu_memory: AtomicU64::new(f64::NAN.to_bits()),
            });
            let mut host = HostSampler::new();
            host.sample(&monitor);
            let sampler = Arc::clone(&monitor);
            let started = std::thread::Builder::new()
                .name("resource-monitor".into())
                .spawn(move || sampler.run(host));
            if let Err(e) = started {
                tracing::warn!(error = %e, "cannot start the resource monitor; adaptive batching keeps its size");
            }
            monitor
        }))
    }

    fn run(&self, mut host: HostSampler) {
        let gpus = match GpuSampler::open() {
            Ok(gpus) => {
                tracing::info!(gpus = gpus.count(), "GPU telemetry through NVML");
                Some(gpus)
            }
            Err(reason) => {
                tracing::info!(%reason, "no GPU telemetry");
                None
            }
        };
        loop {
            // CPU usage is a difference between two refreshes.
            std::thread::sleep(INTERVAL.max(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL));
            host.sample(self);
            if let Some(gpus) = &gpus {
                let (utilisation, memory) = gpus.sample();
                self.gpu
                    .store(utilisation.unwrap_or(f64::NAN).to_bits(), Ordering::Relaxed);
                self.gpu_memory
                    .store(memory.unwrap_or(f64::NAN).to_bits(), Ordering::Relaxed);
            }
        }
    }

    fn read(cell: &AtomicU64) -> Option<f64> {
        let v = f64::from_bits(cell.load(Ordering::Relaxed));
        v.is_finite().then_some(v)
    }

    /// CPU utilisation, percent of the cgroup's quota where one is set,
    /// else of the whole machine; `None` before the first sample.
    pub fn cpu(&self) -> Option<f64> {
        Self::read(&self.cpu)
    }

    /// Memory in use, percent of the cgroup's limit where one is set, else
    /// of the machine's total.
    pub fn memory(&self) -> Option<f64> {
        Self::read(&self.memory)
    }

    /// Memory in use, bytes (the cgroup's where it has a limit); `None`
    /// before the first sample.
    pub fn memory_used_bytes(&self) -> Option<u64> {
        Some(self.memory_used.load(Ordering::Relaxed)).filter(|&b| b > 0)
    }

    /// Utilisation of the busiest GPU, percent; `None` without NVML.
    pub fn gpu(&self) -> Option<f64> {
        Self::read(&self.gpu)
    }

    /// Memory in use on the fullest GPU, percent of its total.
    pub fn gpu_memory(&self) -> Option<f64> {
        Self::read(&self.gpu_memory)
    }
}

/// CPU and memory of the container: its cgroup v2 limits where they are
/// set (in a container, 100 % means the quota is spent although the host
/// may be idle), else the machine's figures through sysinfo.
struct HostSampler {
    system: sysinfo::System,
    cgroup: Option<Cgroup>,
    cpu_meter: CpuMeter,
    /// Whether `system` has been refreshed before (its CPU use is the
    /// growth since then).
    sampled: bool,
    cpu_gauge: metrics::Gauge,
    memory_gauge: metrics::Gauge,
}

impl HostSampler {
    fn new() -> Self {
        use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};
        HostSampler {
            system: System::new_with_specifics(
                RefreshKind::nothing()
                    .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                    .with_memory(MemoryRefreshKind::nothing().with_ram()),
            ),
            cgroup: Cgroup::detect(),
            cpu_meter: CpuMeter::default(),
            sampled: false,
            cpu_gauge: gauge!(telemetry::CPU_UTILISATION),
            memory_gauge: gauge!(telemetry::MEMORY_UTILISATION),
        }
    }

    /// Stores this sample in `monitor` and the gauges. CPU use is `None`
    /// on the first call (it is the growth since the previous one).
    fn sample(&mut self, monitor: &ResourceMonitor) {
        let first = !std::mem::replace(&mut self.sampled, true);
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        let mut cpu = (!first).then(|| f64::from(self.system.global_cpu_usage()));
        let total = self.system.total_memory();
        let mut used = self.system.used_memory();
        let mut memory = (total > 0).then(|| used as f64 * 100.0 / total as f64);
        if let Some(cgroup) = &self.cgroup {
            let limited_cpu = self.cpu_meter.sample(cgroup, std::time::Instant::now());
            if limited_cpu.is_some() || cgroup.cpu_limit().is_some() {
                cpu = limited_cpu;
            }
            if let (Some(percent), Some(current)) =
                (cgroup.memory_percent(), cgroup.memory_current())
            {
                memory = Some(percent);
                used = current;
            }
        }
        if let Some(cpu) = cpu {
            monitor.cpu.store(cpu.to_bits(), Ordering::Relaxed);
            self.cpu_gauge.set(cpu);
        }
        if let Some(memory) = memory {
            monitor.memory.store(memory.to_bits(), Ordering::Relaxed);
            monitor.memory_used.store(used, Ordering::Relaxed);
            self.memory_gauge.set(memory);
        }
    }
}

/// The machine's GPUs through NVML, and their gauges.
struct GpuSampler {
    nvml: nvml_wrapper::Nvml,
    devices: Vec<GpuGauges>,
}

struct GpuGauges {
    index: u32,
    utilisation: metrics::Gauge,
    memory_used: metrics::Gauge,
    memory_total: metrics::Gauge,
}

impl GpuSampler {
    /// NVML and its devices, or why there is no GPU telemetry.
    fn open() -> Result<GpuSampler, String> {
        let nvml = nvml_wrapper::Nvml::init()
            .map_err(|e| format!("NVML (libnvidia-ml.so, the NVIDIA driver) unavailable: {e}"))?;
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML cannot count devices: {e}"))?;
        if count == 0 {
            return Err("NVML reports no GPU".into());
        }
        let devices = (0..count)
            .map(|index| {
                let id = index.to_string();
                GpuGauges {
                    index,
                    utilisation: gauge!(telemetry::GPU_UTILISATION, "gpu_id" => id.clone()),
                    memory_used: gauge!(telemetry::GPU_MEMORY_USED, "gpu_id" => id.clone()),
                    memory_total: gauge!(telemetry::GPU_MEMORY_TOTAL, "gpu_id" => id),
                }
            })
            .collect();
        Ok(GpuSampler { nvml, devices })
    }

    fn count(&self) -> usize {
        self.devices.len()
    }

    /// Sets every GPU's gauges; returns the highest utilisation and the
    /// highest memory use, percent.
    fn sample(&self) -> (Option<f64>, Option<f64>) {
        let (mut utilisation, mut memory) = (None::<f64>, None::<f64>);
        for gauges in &self.devices {
            let Ok(device) = self.nvml.device_by_index(gauges.index) else {
                continue;
            };
            if let Ok(rates) = device.utilization_rates() {
                let percent = f64::from(rates.gpu);
                gauges.utilisation.set(percent);
                utilisation = Some(utilisation.map_or(percent, |u| u.max(percent)));
            }
            if let Ok(info) = device.memory_info() {
                gauges.memory_used.set(info.used as f64);
                gauges.memory_total.set(info.total as f64);
                if info.total > 0 {
                    let percent = info.used as f64 * 100.0 / info.total as f64;
                    memory = Some(memory.map_or(percent, |m| m.max(percent)));
                }
            }
        }
        (utilisation, memory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without NVML (no NVIDIA driver) there is no sampler, and the reason
    /// names the library; with it, every device has gauges and a sample.
    #[test]
    fn gpu_telemetry_opens_only_with_nvml_and_says_why_not() {
        match GpuSampler::open() {
            Err(reason) => {
                assert!(reason.contains("NVML"), "{reason}");
                eprintln!("SKIPPED the GPU half of gpu_telemetry_opens_only_with_nvml: {reason}");
            }
            Ok(gpus) => {
                assert!(gpus.count() > 0);
                let (utilisation, memory) = gpus.sample();
                assert!(utilisation.is_some_and(|u| (0.0..=100.0).contains(&u)));
                assert!(memory.is_some_and(|m| (0.0..=100.0).contains(&m)));
            }
        }
    }
}
