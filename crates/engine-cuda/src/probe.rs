//! Whether this machine can run the CUDA engine, asked without touching
//! anything that would panic: cudarc's loaders panic when a library is
//! missing, so each library is opened once here first and a missing one
//! becomes an error that names it.

use std::fmt;

/// What is missing for the CUDA engine to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// `libcuda.so` (NVIDIA's driver) cannot be opened.
    Driver,
    /// The driver loaded but the named runtime library did not.
    Library(&'static str),
    /// The driver loaded but has no usable device (or not the one asked).
    Device(String),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Driver => f.write_str(
                "the NVIDIA driver library (libcuda.so) cannot be loaded: no driver on this machine",
            ),
            Missing::Library(name) => write!(
                f,
                "the CUDA library {name} cannot be loaded (install it or add its folder to \
                 LD_LIBRARY_PATH; pip's nvidia-* packages keep it under site-packages/nvidia/*/lib)"
            ),
            Missing::Device(why) => write!(f, "no usable CUDA device: {why}"),
        }
    }
}

/// A library's name and a probe that only tries to open it.
type Library = (&'static str, unsafe fn() -> bool);

/// The libraries the engine opens, in the order they are checked.
fn libraries() -> [Library; 3] {
    [
        ("libcuda.so", cudarc::driver::sys::is_culib_present),
        ("libcublas.so", cudarc::cublas::sys::is_culib_present),
        ("libnvrtc.so", cudarc::nvrtc::sys::is_culib_present),
    ]
}

/// Checks that the driver, cuBLAS and NVRTC open, and that device
/// `device` exists. Never panics.
pub fn probe(device: usize) -> Result<(), Missing> {
    check(device, &libraries(), device_count)
}

fn device_count() -> Result<usize, String> {
    cudarc::driver::result::init().map_err(|e| format!("cuInit failed: {e}"))?;
    cudarc::driver::result::device::get_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| format!("cannot count devices: {e}"))
}

fn check(
    device: usize,
    libraries: &[Library],
    count: impl FnOnce() -> Result<usize, String>,
) -> Result<(), Missing> {
    for (index, (name, present)) in libraries.iter().enumerate() {
        // Safety: the probes only try to dlopen the library.
        if !unsafe { present() } {
            return Err(if index == 0 {
                Missing::Driver
            } else {
                Missing::Library(name)
            });
        }
    }
    match count() {
        Err(why) => Err(Missing::Device(why)),
        Ok(0) => Err(Missing::Device("the driver reports no CUDA device".into())),
        Ok(n) if device >= n => Err(Missing::Device(format!(
            "device {device} asked, the driver reports {n} (0..{})",
            n - 1
        ))),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yes() -> bool {
        true
    }
    fn no() -> bool {
        false
    }

    #[test]
    fn a_missing_driver_is_named_first() {
        let libs: [Library; 2] = [("libcuda.so", no), ("libcublas.so", no)];
        let err = check(0, &libs, || Ok(1)).unwrap_err();
        assert_eq!(err, Missing::Driver);
        assert!(err.to_string().contains("driver"));
    }

    #[test]
    fn a_missing_library_is_named() {
        let libs: [Library; 3] = [
            ("libcuda.so", yes),
            ("libcublas.so", yes),
            ("libnvrtc.so", no),
        ];
        let err = check(0, &libs, || Ok(1)).unwrap_err();
        assert_eq!(err, Missing::Library("libnvrtc.so"));
        assert!(err.to_string().contains("libnvrtc.so"));
    }

    #[test]
    fn a_missing_device_is_named() {
        let libs: [Library; 1] = [("libcuda.so", yes)];
        assert!(matches!(check(0, &libs, || Ok(0)), Err(Missing::Device(_))));
        let err = check(2, &libs, || Ok(1)).unwrap_err();
        assert!(err.to_string().contains("device 2"), "{err}");
        assert!(check(0, &libs, || Err("cuInit failed".into())).is_err());
        assert_eq!(check(0, &libs, || Ok(1)), Ok(()));
    }

    #[test]
    fn the_real_probe_never_panics() {
        // On a machine without CUDA this names what is missing; with one,
        // it succeeds. Either way it returns.
        match probe(0) {
            Ok(()) => println!("CUDA present"),
            Err(missing) => println!("CUDA absent: {missing}"),
        }
    }
}
