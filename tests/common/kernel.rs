//! Plays the kernel's part of binds on a fake sysfs tree, so CLI tests see them succeed.
//! Included by the CLI tests with `#[path = "common/kernel.rs"] mod kernel;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

/// A thread answering binds of devices that are on driver `from`: `from/unbind` and
/// `bus/pci/drivers_probe` become named pipes. For each bind it reads the address from
/// the unbind, points the device's `driver` link at the driver its `driver_override`
/// names, and only then answers the probe, so the binder finds the device on its new
/// driver when its probe write returns.
pub struct FakeKernel {
    thread: Option<JoinHandle<Vec<String>>>,
    fifos: [PathBuf; 2],
}

impl FakeKernel {
    pub fn start(root: &Path, from: &str) -> FakeKernel {
        let unbind = root.join("bus/pci/drivers").join(from).join("unbind");
        let probe = root.join("bus/pci/drivers_probe");
        for fifo in [&unbind, &probe] {
            let _ = std::fs::remove_file(fifo);
            nix::unistd::mkfifo(fifo.as_path(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        }
        let root = root.to_owned();
        let (u, p) = (unbind.clone(), probe.clone());
        let thread = std::thread::spawn(move || {
            let mut bound = Vec::new();
            loop {
                let address = std::fs::read_to_string(&u).unwrap();
                if address == "stop" {
                    return bound;
                }
                let dev = root.join("bus/pci/devices").join(&address);
                let to = std::fs::read_to_string(dev.join("driver_override")).unwrap();
                let link = dev.join("driver");
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(root.join("bus/pci/drivers").join(to.trim()), &link).unwrap();
                if std::fs::read_to_string(&p).unwrap() == "stop" {
                    return bound;
                }
                bound.push(address);
            }
        });
        FakeKernel {
            thread: Some(thread),
            fifos: [unbind, probe],
        }
    }

    /// Stops the thread; the addresses it bound, in order.
    pub fn finish(mut self) -> Vec<String> {
        self.stop()
    }

    fn stop(&mut self) -> Vec<String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let Some(thread) = self.thread.take() else {
            return Vec::new();
        };
        while !thread.is_finished() {
            // A reader waiting on a pipe lets a non-blocking writer open it.
            for fifo in &self.fifos {
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::libc::O_NONBLOCK)
                    .open(fifo)
                {
                    let _ = f.write_all(b"stop");
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // A thread that panicked already failed the test.
        thread.join().unwrap_or_default()
    }
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}
